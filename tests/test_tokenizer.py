"""Tokenizer wrapper vs transformers on the real SmolLM2 tokenizer; chat templates; sentencepiece fallback."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from youzhi_ms.data.tokenizer import Tokenizer, render_chat_template
from youzhi_ms.errors import YouzhiError

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye — ünïcödé 日本"}],
]


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir):
    return Tokenizer.from_dir(smollm2_hf_dir)


def _toks(tok, ids):
    return "|".join(tok.id_to_token(i) for i in ids)


def test_digits_split_and_byte_level(tok):
    assert _toks(tok, tok.encode(" the price was 1234 dollars.")) == "Ġthe|Ġprice|Ġwas|Ġ|1|2|3|4|Ġdollars|."
    # no prefix space is added: at the start of a text the first word has no Ġ (as SmolLM2's own tokenizer)
    assert _toks(tok, tok.encode("the price was 1234 dollars.")) == "the|Ġprice|Ġwas|Ġ|1|2|3|4|Ġdollars|."
    text = "Zürich, 2024: “naïve” café — 東京\n\ttabs  and  spaces"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") == [1, 4093]  # special tokens are single ids, never split
    assert tok.decode([1, 4093, 2]) == "user"
    assert tok.decode([1, 4093, 2], skip_special_tokens=False) == "<|im_start|>user<|im_end|>"
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # SmolLM2 adds no BOS


def test_special_ids(tok):
    assert (tok.eot_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert tok.id_to_token(tok.eot_id) == "<|endoftext|>" and tok.vocab_size == 49152
    assert tok.kind == "tokenizers" and len(tok.fingerprint) == 64


def test_same_ids_as_transformers_on_wiki(tok, smollm2_hf_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from youzhi_ms.data.text import load_documents
    auto = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(smollm2_hf_dir, "tokenizer.json"))
    paragraphs = []
    for split in ("wiki-eval", "wiki-calib"):
        for doc in load_documents(split)[:3]:
            paragraphs += doc.split("\n")[:4]
    assert len(paragraphs) >= 12
    for p in paragraphs:
        ids = tok.encode(p)
        assert ids == auto.encode(p, add_special_tokens=False) == fast.encode(p, add_special_tokens=False)
        assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=True) == p
    assert tok.encode_batch(paragraphs[:3]) == [tok.encode(p) for p in paragraphs[:3]]
    assert auto.eos_token_id == tok.eos_id and auto.bos_token_id == tok.bos_id


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, smollm2_hf_dir, messages, gen):
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.startswith("<|im_start|>system\n")  # ChatML, default system prompt when none is given
    assert ours.endswith("<|im_start|>assistant\n") is gen
    assert f"<|im_start|>user\n{messages[-1]['content']}<|im_end|>\n" in ours


def test_chat_template_errors_and_features(tmp_path, smollm2_hf_dir):
    d = tmp_path / "notemplate"
    d.mkdir()
    shutil.copy(os.path.join(smollm2_hf_dir, "tokenizer.json"), d)
    cfg = json.load(open(os.path.join(smollm2_hf_dir, "tokenizer_config.json")))
    cfg.pop("chat_template")
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    t = Tokenizer.from_dir(str(d))
    assert t.eos_id == 2 and t.eot_id == 0
    with pytest.raises(YouzhiError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
    with pytest.raises(YouzhiError, match="first message must be user"):
        render_chat_template(strict, [{"role": "assistant", "content": "x"}])
    tpl = ("{{ bos_token }}{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}"
           "{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}")
    out = render_chat_template(tpl, [{"role": "user", "content": "é"}, {"role": "x", "content": "y"}],
                               bos_token="<s>")
    assert out == '<s>{"role": "user", "content": "é"}'
    with pytest.raises(YouzhiError, match="chat template failed"):  # sandbox: no attribute tricks
        render_chat_template("{{ messages.__class__.__mro__ }}", [])


def test_missing_and_sentencepiece_fallback(tmp_path):
    with pytest.raises(YouzhiError, match="does not exist"):
        Tokenizer.from_dir(str(tmp_path / "nope"))
    with pytest.raises(YouzhiError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_dir(str(tmp_path))
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    d = tmp_path / "spdir"
    d.mkdir()
    shutil.move(str(tmp_path / "sp.model"), d / "tokenizer.model")
    json.dump({"eos_token": "</s>", "bos_token": "<s>"}, open(d / "tokenizer_config.json", "w"))
    t = Tokenizer.from_dir(str(d))
    ref = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    text = "the lazy fox jumps"
    assert t.kind == "sentencepiece" and t.encode(text) == ref.encode(text)
    assert t.decode(t.encode(text)) == text
    assert t.encode(text, add_special_tokens=True)[0] == 1
    # no <|endoftext|> in this vocabulary: the document separator falls back to eos
    assert (t.bos_id, t.eos_id, t.eot_id) == (1, 2, 2)
