"""Real text: the Wikipedia sample, its fixed split, markup stripping, user documents and token packing."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from youzhi_ms.data import text as T
from youzhi_ms.errors import YouzhiError


@pytest.fixture(scope="module")
def splits():
    return T.wiki_splits()


def test_splits_fixed_disjoint_clean(splits):
    calib, ev = splits["wiki-calib"], splits["wiki-eval"]
    assert (len(calib), len(ev)) == (73, 19)  # documented in youzhi_ms/data/text.py
    assert sum(map(len, calib)) == 2_306_320 and sum(map(len, ev)) == 464_388
    assert not set(calib) & set(ev)
    arts = T.wiki_articles()  # a fresh parse gives the same documents in the same order
    assert [a["text"] for a in arts[::5]] == ev
    assert [a["text"] for i, a in enumerate(arts) if i % 5] == calib
    assert arts[0]["title"] == "Anarchism" and ev[0].startswith("Anarchism is a political philosophy")
    for doc in calib + ev:
        assert len(doc) >= T.MIN_ARTICLE_CHARS
        for junk in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "<!--", "&nbsp;", "&amp;", "'''", "[http"):
            assert junk not in doc, junk
        assert "\n\n" not in doc and doc == doc.strip() and "  " not in doc
    assert T.load_documents("wiki-eval") == ev


def test_markup_stripping():
    wiki = """{{Infobox thing|name={{nowrap|X}}|note={{cite web|url=http://a.b|title=T}}}}
'''Thing''' (from {{lang-grc|τι}}; ''italic'') is a [[concept|notion]] in [[philosophy]]s.<ref name="a">{{cite book|x}}</ref> More<ref name=b /> text.<!-- hidden
comment -->
[[File:Pic.jpg|thumb|A caption with a [[link]] inside.]]
== History ==
See [http://example.org the site] and [http://bare.example.org].
{| class="wikitable"
|-
! A !! B
|-
| {{flag|X}} || 2
|}
* First item with <small>small</small> text
# Second&nbsp;item
=== Sub-heading ===
Math <math>x^2</math> and a<br/>break. [[de:Ding]] [[Category:Things]]
== See also ==
* [[Other thing]]
"""
    assert T.clean_wiki_markup(wiki) == [
        "Thing (from; italic) is a notion in philosophys. More text.",
        "History",
        "See the site and.",
        "First item with small text",
        "Second item",
        "Sub-heading",
        "Math and a break.",
    ]
    # unbalanced markup never swallows the rest of the article
    assert T.clean_wiki_markup("Start {{broken template\nAfter the break.") == ["Start broken template", "After the break."]


def test_plain_text_and_jsonl(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("First doc line one.\nline two.\n\n\n  \nSecond doc.\r\n\r\nThird\n", encoding="utf-8")
    assert T.load_documents(str(p)) == ["First doc line one.\nline two.", "Second doc.", "Third"]
    j = tmp_path / "docs.jsonl"
    j.write_text(json.dumps({"text": "alpha\n\nbeta", "id": 1}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    assert T.load_documents(str(j)) == ["alpha\n\nbeta", "gamma"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(YouzhiError, match=r"bad.jsonl:2: .*\"text\""):
        T.load_documents(str(bad))
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(YouzhiError, match=r"bad.jsonl:2: not valid JSON"):
        T.load_documents(str(bad))
    with pytest.raises(YouzhiError, match="neither wiki-calib nor wiki-eval nor news nor news-eval nor an existing file"):
        T.load_documents(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(YouzhiError, match="contains no text"):
        T.load_documents(str(empty))


class _CharTok:
    """A stand-in tokenizer: one id per character."""
    eot_id = 0
    fingerprint = "x" * 64

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def test_news_domain_train_and_held_out_sets_are_disjoint():
    """news (lee_background.cor) is what the pipeline's domain step trains on, news-eval (lee.cor) what it is scored
    on: 300 and 50 articles, no article (nor its opening) in both; lee.cor's Latin-1 pound signs are read as such."""
    train, held = T.load_documents("news"), T.load_documents("news-eval")
    assert (len(train), len(held)) == (300, 50)
    assert not {d[:80] for d in train} & {d[:80] for d in held}
    assert sum(d.count("\u00a3") for d in held) >= 1 and not any("\ufffd" in d for d in held)
    assert held[0].startswith("The national executive of the strife-torn Democrats")


def test_pack_tokens():
    out = T.pack_tokens(["ab", "", "c"], _CharTok())
    assert out.dtype == np.int32 and out.ndim == 1
    assert out.tolist() == [0, 97, 98, 0, 0, 99]
    assert T.pack_tokens(["ab"], _CharTok(), eot_id=7).tolist() == [7, 97, 98]


def test_token_stream_cache(smollm2_hf_dir, splits):
    from youzhi_ms.data.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(smollm2_hf_dir)
    stream = T.load_token_stream("wiki-eval", tok)
    cached = [f for f in os.listdir(os.path.join(T.cache_dir(), "tokens"))
              if f.startswith(f"wiki-eval-v{T.TEXT_VERSION}-{tok.fingerprint[:16]}")]
    assert len(cached) == 1
    again = np.load(os.path.join(T.cache_dir(), "tokens", cached[0]), allow_pickle=False)
    np.testing.assert_array_equal(again, stream)
    assert stream.dtype == np.int32 and int((stream == tok.eot_id).sum()) == len(splits["wiki-eval"])
    first_doc = stream[1:np.flatnonzero(stream == tok.eot_id)[1]]
    assert tok.decode(first_doc.tolist()) == splits["wiki-eval"][0]
    assert stream.size == 106_210  # documented token count (SmolLM2 tokenizer)


def test_download_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("YOUZHI_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(T.subprocess, "run", fake_run)
    with pytest.raises(YouzhiError, match=r"pip could not download gensim==4\.4\.0.*No matching distribution"):
        T.ensure_wiki_sample()
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert os.listdir(tmp_path / "cache") == []  # nothing half-made left in the cache


def test_sft_chat_data_from_text(tmp_path):
    """tools/make_sft_data.py: deterministic continuation conversations that the trainer's chat reader accepts, with
    the response being the sentences that follow the prompt's in the source paragraph."""
    import subprocess
    import sys
    from youzhi_ms.data.sft_data import PROMPT
    from youzhi_ms.train.data import _read_chat_jsonl
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "text.txt"
    paras = [f"Alpha {i} starts here. Beta {i} follows it. Gamma {i} comes next. Delta {i} ends it." for i in range(8)]
    src.write_text("\n\n".join(paras + ["Too short. Only two."]))
    outs = []
    for k in range(2):
        out = tmp_path / f"chat{k}.jsonl"
        r = subprocess.run([sys.executable, "tools/make_sft_data.py", "--source", str(src), "--out", str(out),
                            "--n", "5", "--seed", "3"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    rows = _read_chat_jsonl(str(tmp_path / "chat0.jsonl"))
    assert len(rows) == 5
    for row in rows:
        user, bot = row["messages"]
        i = user["content"].split("Alpha ")[1].split(" ")[0]
        assert user["content"] == PROMPT.format(f"Alpha {i} starts here. Beta {i} follows it.")
        assert bot == {"role": "assistant", "content": f"Gamma {i} comes next. Delta {i} ends it."}
