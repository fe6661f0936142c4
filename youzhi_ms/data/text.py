"""Real English text for calibration and evaluation, and user documents in plain-text / jsonl form.

Source: the English Wikipedia XML sample shipped as test data in the gensim 4.4.0 wheel (CC BY-SA text, LGPL package):
`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`. `ensure_wiki_sample()`
fetches the wheel once with `pip download --no-deps gensim==4.4.0`, extracts that one member into the cache directory
(`$YOUZHI_CACHE`, default `~/.cache/youzhi_ms`) and checks its sha256; gensim is never imported or installed.

Cleaning (`wiki_articles()`): main-namespace pages only; redirects and disambiguation pages ("... may refer to:")
dropped; wiki markup stripped (comments, <ref>s, <math> and similar blocks, nested {{templates}} and {| tables |},
[[File:]]/[[Image:]]/[[Category:]] and interlanguage links, [[a|b]] -> b, [http://x y] -> y, bold/italic quotes,
headings "== x ==" -> x, list bullets, html tags and entities); the text after
the first "See also" / "References" / "Notes" / "External links" / "Further reading" / "Bibliography" / "Sources"
heading is dropped (link and citation lists); whitespace collapsed. Each article is one document, its paragraphs
(and headings) separated by "\\n". Articles shorter than MIN_ARTICLE_CHARS = 2000 cleaned characters are dropped as
stubs (the sample is "shortened": many pages are cut to a few lines).

Split (fixed, by position among the kept articles, in file order): article i goes to `wiki-eval` when i % 5 == 0,
otherwise to `wiki-calib`. The two never overlap; calibration never sees eval text. Counts (TEXT_VERSION "1"):

    split        articles   characters   SmolLM2 tokens (incl. one <|endoftext|> per document)
    wiki-calib         73    2,306,320   504,924
    wiki-eval          19      464,388   106,210
    total              92    2,770,708   611,134

Changing the cleaning rules or MIN_ARTICLE_CHARS changes the split: bump TEXT_VERSION (it keys the token caches).

Packing (`pack_tokens`): every document is preceded by the tokenizer's end-of-text token (`Tokenizer.eot_id`, e.g.
`<|endoftext|>` = 0 for SmolLM2), so the stream reads `<eot> doc0 <eot> doc1 ...`; tokenized wiki splits are cached as
`<cache>/tokens/<split>-v<TEXT_VERSION>-<sha256(tokenizer file)[:16]>-eot<id>.npy` (int32, np.save without pickle).

Held-out text of another domain: `news` = the 300 ABC (Australian Broadcasting Corporation) news articles of the Lee
corpus, `gensim/test/test_data/lee_background.cor` in the same wheel (one article per line; ~80K SmolLM2 tokens). The
converter never calibrates on it unless asked to, so it measures how a calibration choice transfers to other text.
`news-eval` = the 50 other ABC articles of the Lee corpus, `gensim/test/test_data/lee.cor` (one per line, ~6K SmolLM2
tokens; none of them is in `news`, checked by text): the held-out set when `news` is the domain a model is trained on
(tools/pipeline.py). That file is Latin-1 (a pound sign is byte 0xA3), so it is decoded as Latin-1.

User documents (`load_documents(path)`): a `.jsonl` file gives one document per line (its "text" field; blank lines
ignored); any other file is read as UTF-8 plain text and split into documents at blank lines (one or more empty or
whitespace-only lines); line breaks inside a document are kept.
"""
from __future__ import annotations

import bz2
import glob
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence

import numpy as np

from youzhi_ms.errors import YouzhiError
from youzhi_ms.progress import step

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
GENSIM_REQ = "gensim==4.4.0"
MIN_ARTICLE_CHARS = 2000
EVAL_EVERY = 5  # article i is eval when i % EVAL_EVERY == 0
TEXT_VERSION = "1"
WIKI_SPLITS = ("wiki-calib", "wiki-eval")
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
NEWS_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
NEWS = "news"
NEWS_EVAL_MEMBER = "gensim/test/test_data/lee.cor"
NEWS_EVAL_SHA256 = "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e"
NEWS_EVAL = "news-eval"
BUILTIN_TEXTS = WIKI_SPLITS + (NEWS, NEWS_EVAL)


def cache_dir() -> str:
    """`$YOUZHI_CACHE` or `~/.cache/youzhi_ms`, created if needed."""
    path = os.environ.get("YOUZHI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "youzhi_ms")
    os.makedirs(path, exist_ok=True)
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _extract_member(archive: str, dest: str, member: str = WIKI_MEMBER) -> bool:
    """Copy `member` out of a wheel (zip) or sdist (tar.gz) into dest; False if the archive lacks it."""
    if archive.endswith(".whl") or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member)]
            if not names:
                return False
            with z.open(names[0]) as src, open(dest, "wb") as dst:
                dst.write(src.read())
            return True
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.name.endswith(member) and m.isfile()]
            if not members:
                return False
            with t.extractfile(members[0]) as src, open(dest, "wb") as dst:
                dst.write(src.read())
            return True
    return False


def ensure_wiki_sample() -> str:
    """Path of the cached Wikipedia sample (.xml.bz2), fetching it from the gensim 4.4.0 wheel the first time."""
    return _ensure_gensim_member(WIKI_MEMBER, WIKI_SHA256, "Wikipedia sample")


def ensure_news_sample() -> str:
    """Path of the cached Lee news corpus (one article per line), from the same wheel."""
    return _ensure_gensim_member(NEWS_MEMBER, NEWS_SHA256, "news sample")


def _ensure_gensim_member(member: str, sha256: str, what: str) -> str:
    cdir = cache_dir()
    name = os.path.basename(member)
    path = os.path.join(cdir, name)
    if os.path.isfile(path):
        return path
    with tempfile.TemporaryDirectory(prefix="youzhi-gensim-", dir=cdir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", GENSIM_REQ,
               "-d", tmp]
        try:
            with step(f"fetching the {what} from the {GENSIM_REQ} wheel (first use only)"):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise YouzhiError(f"could not run pip to fetch the {what} ({exc}); run `{' '.join(cmd[2:])}` "
                              f"yourself and put {member} from the wheel into {cdir}") from None
        archives = sorted(glob.glob(os.path.join(tmp, "gensim-*")))
        if proc.returncode != 0 or not archives:
            said = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            tail = " ".join([ln for ln in said if ln.startswith("ERROR")][-2:] or said[-1:])  # pip's reason, one line
            raise YouzhiError(f"pip could not download {GENSIM_REQ} (needed only for its {what}): "
                              f"{tail or 'no archive downloaded'}; check network/index access, or download the wheel "
                              f"elsewhere and copy {member} from it into {cdir}")
        part = os.path.join(tmp, name)
        if not _extract_member(archives[0], part, member):
            raise YouzhiError(f"{os.path.basename(archives[0])} does not contain {member}; copy that file into "
                              f"{cdir} by hand")
        digest = _sha256(part)
        if digest != sha256:
            raise YouzhiError(f"the {what} from {os.path.basename(archives[0])} has sha256 {digest}, "
                              f"expected {sha256}; the package index served a different file")
        os.replace(part, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# wiki markup

_DROP_TAGS = ("ref", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source", "hiero",
              "graph", "mapframe", "chem", "ce", "references")
_RE_COMMENT = re.compile(r"<!--.*?(-->|\Z)", re.S)
_RE_SELF_CLOSING = re.compile(r"<(?:%s)\b[^>]*/\s*>" % "|".join(_DROP_TAGS), re.I)
_RE_DROP_BLOCK = re.compile(r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(_DROP_TAGS), re.I | re.S)
_RE_NEST_TOKEN = re.compile(r"\{\{|\}\}|\{\||\|\}")
_RE_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_RE_EXT_LINK = re.compile(r"\[(?:(?:https?|ftp)://|//)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_RE_BARE_URL = re.compile(r"(?:https?|ftp)://\S+", re.I)
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_RE_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_RE_BR = re.compile(r"<br\s*/?>", re.I)
_RE_QUOTES = re.compile(r"'{2,}")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_RE_SPACE_PUNCT = re.compile(r" +([,.;:)])")
_RE_OPEN_PAREN_SPACE = re.compile(r"\( +")
_RE_LEAD_PUNCT = re.compile(r"\(\s*[,;]\s*")
_RE_WS = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_LINK_DROP_NS = {"file", "image", "category", "media"}
_RE_INTERLANG = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]+)*$")
_END_SECTIONS = {"see also", "references", "notes", "external links", "further reading", "bibliography", "sources",
                 "footnotes", "citations", "notes and references", "references and notes", "works cited"}


def _strip_nested(text: str) -> str:
    """Remove {{templates}} and {| tables |}, however nested; an unclosed opener is dropped on its own."""
    out: List[str] = []
    pos, start, stack = 0, 0, []
    tokens = list(_RE_NEST_TOKEN.finditer(text))
    i = 0
    while i < len(tokens):
        m = tokens[i]
        tok = m.group()
        if m.start() < pos:  # overlapping match consumed by a previous token (e.g. "{{|}")
            i += 1
            continue
        if tok in ("{{", "{|"):
            if not stack:
                out.append(text[start:m.start()])
            stack.append((tok, m.start()))
        elif stack and ((tok == "}}" and stack[-1][0] == "{{") or (tok == "|}" and stack[-1][0] == "{|")):
            stack.pop()
            if not stack:
                start = m.end()
        pos = m.end()
        i += 1
    if stack:  # unbalanced: drop the outermost unclosed opener only and rescan the rest
        opener_at = stack[0][1]
        return "".join(out) + _strip_nested(text[opener_at + 2:])
    out.append(text[start:])
    return "".join(out)


def _link_text(m: "re.Match") -> str:
    body = m.group(1)
    target, _, label = body.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is a visible link
        target = target[1:]
    elif ":" in target:
        ns = target.split(":", 1)[0].strip()
        if ns.lower() in _LINK_DROP_NS or (not label and _RE_INTERLANG.match(ns)):
            return ""
    if label:
        label = body.rsplit("|", 1)[1].strip()
        return label or target.split("(")[0].strip()  # pipe trick [[a (b)|]] -> a
    return target.split("#")[0] if target.split("#")[0] else target.lstrip("#")


def _strip_links(text: str) -> str:
    while True:
        new = _RE_INNER_LINK.sub(_link_text, text)
        if new == text:
            return new
        text = new


def clean_wiki_markup(text: str) -> List[str]:
    """Wikitext -> list of plain-text paragraphs (headings included as their own paragraphs, end sections cut)."""
    text = _RE_COMMENT.sub("", text)
    text = _RE_SELF_CLOSING.sub("", text)
    text = _RE_DROP_BLOCK.sub("", text)
    text = _strip_nested(text)
    text = _strip_links(text)
    text = _RE_EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = html.unescape(html.unescape(text))  # "&amp;nbsp;" survives one round in the XML text
    # tags that only appear after unescaping, plus plain ones: comments/refs again, then drop markup tags
    text = _RE_COMMENT.sub("", text)
    text = _RE_SELF_CLOSING.sub("", text)
    text = _RE_DROP_BLOCK.sub("", text)
    text = _RE_BR.sub(" ", text)
    text = _RE_TAG.sub("", text)
    text = _RE_QUOTES.sub("", text)
    text = _RE_MAGIC.sub("", text)
    paragraphs: List[str] = []
    for line in text.split("\n"):
        h = _RE_HEADING.match(line.strip())
        if h:
            title = h.group(2).strip()
            if len(h.group(1)) >= 2 and title.lower() in _END_SECTIONS:
                break
            line = title
        s = line.strip()
        if not s or s.startswith(("{|", "|", "!")) or set(s) <= set("-="):
            continue
        s = s.lstrip("*#:;").strip()
        s = _RE_BARE_URL.sub("", s)
        s = _RE_WS.sub(" ", s)
        s = _RE_EMPTY_PARENS.sub("", s)
        s = _RE_LEAD_PUNCT.sub("(", s)
        s = _RE_OPEN_PAREN_SPACE.sub("(", s)
        s = _RE_SPACE_PUNCT.sub(r"\1", s)
        s = _RE_WS.sub(" ", s).strip()
        # leftovers of unbalanced markup are dropped rather than leaked into the text
        s = s.replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")
        if s:
            paragraphs.append(s)
    return paragraphs


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _is_disambiguation(title: str, paragraphs: List[str]) -> bool:
    head = " ".join(paragraphs[:2]).lower()
    return "(disambiguation)" in (title or "").lower() or "may refer to:" in head or "may also refer to:" in head


def wiki_articles(path: Optional[str] = None, min_chars: int = MIN_ARTICLE_CHARS) -> List[Dict[str, str]]:
    """Kept articles in file order: [{'title', 'text'}], text = paragraphs joined by '\\n'."""
    path = path or ensure_wiki_sample()
    articles = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(c.tag): c for c in elem}
            ns = (fields.get("ns").text or "").strip() if fields.get("ns") is not None else "0"
            title = fields["title"].text if "title" in fields else ""
            raw = ""
            rev = fields.get("revision")
            if rev is not None:
                for c in rev:
                    if _local(c.tag) == "text":
                        raw = c.text or ""
            redirect = "redirect" in fields or raw.lstrip()[:9].upper() == "#REDIRECT"
            elem.clear()
            if ns != "0" or redirect:
                continue
            paragraphs = clean_wiki_markup(raw)
            if _is_disambiguation(title, paragraphs):
                continue
            text = "\n".join(paragraphs)
            if len(text) >= min_chars:
                articles.append({"title": title, "text": text})
    return articles


_SPLIT_CACHE: Dict[str, Dict[str, List[str]]] = {}


def wiki_splits() -> Dict[str, List[str]]:
    """{'wiki-calib': [...], 'wiki-eval': [...]} documents; eval = kept article i with i % 5 == 0."""
    path = ensure_wiki_sample()
    if path not in _SPLIT_CACHE:
        with step("cleaning the Wikipedia sample's markup into articles"):
            arts = wiki_articles(path)
        _SPLIT_CACHE[path] = {
            "wiki-calib": [a["text"] for i, a in enumerate(arts) if i % EVAL_EVERY != 0],
            "wiki-eval": [a["text"] for i, a in enumerate(arts) if i % EVAL_EVERY == 0],
        }
    return {k: list(v) for k, v in _SPLIT_CACHE[path].items()}


# ---------------------------------------------------------------------------------------------------------------------
# documents


def iter_jsonl(path: str, kind: str = "a .jsonl file"):
    """(line number, parsed object) for every non-blank line; a malformed line is one clear error."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise YouzhiError(f"{path}:{lineno}: not UTF-8 text; {kind} must be UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise YouzhiError(f"{path}:{lineno}: not valid JSON ({exc.msg}); {kind} needs one JSON object "
                                  "per line") from None


def _read_jsonl(path: str) -> List[str]:
    docs = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise YouzhiError(f"{path}:{lineno}: expected an object with a string \"text\" field, e.g. "
                              "{\"text\": \"...\"}")
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs


_RE_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*(?:\n[ \t\r\f\v]*)+")


def split_plain_text(text: str) -> List[str]:
    """Documents of a plain-text file: separated by one or more blank (empty or whitespace-only) lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [d.strip() for d in _RE_BLANK_LINES.split(text) if d.strip()]


def news_articles() -> List[str]:
    with open(ensure_news_sample(), encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def ensure_news_eval_sample() -> str:
    """Path of the cached held-out Lee articles (lee.cor), from the same wheel."""
    return _ensure_gensim_member(NEWS_EVAL_MEMBER, NEWS_EVAL_SHA256, "held-out news sample")


def news_eval_articles() -> List[str]:
    with open(ensure_news_eval_sample(), encoding="latin-1") as f:
        return [ln.strip() for ln in f if ln.strip()]


def load_documents(source: str) -> List[str]:
    """'wiki-calib' | 'wiki-eval' | 'news' | 'news-eval' | path to a .jsonl ("text" per line) or plain-text file (blank-line
    separated)."""
    if source in WIKI_SPLITS:
        return wiki_splits()[source]
    if source == NEWS:
        return news_articles()
    if source == NEWS_EVAL:
        return news_eval_articles()
    path = os.path.expanduser(os.fspath(source))
    if not os.path.isfile(path):
        raise YouzhiError(f"text source {source!r} is neither {' nor '.join(BUILTIN_TEXTS)} nor an existing file; pass "
                          "one of the built-in texts, a .jsonl file with a \"text\" field per line, or a plain-text file")
    if path.lower().endswith(".jsonl"):
        docs = _read_jsonl(path)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                docs = split_plain_text(f.read())
        except UnicodeDecodeError:
            raise YouzhiError(f"{path} is not UTF-8 text; convert it to UTF-8 (or pass a .jsonl file)") from None
    if not docs:
        raise YouzhiError(f"{path} contains no text; pass a non-empty file")
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# tokens


def pack_tokens(docs: Sequence[str], tokenizer, eot_id: Optional[int] = None) -> np.ndarray:
    """1-D int32 stream: [eot] + tokens(doc) for every document, in order. eot_id defaults to tokenizer.eot_id."""
    eot = tokenizer.eot_id if eot_id is None else int(eot_id)
    encoded = tokenizer.encode_batch(list(docs))
    total = sum(len(e) + 1 for e in encoded)
    out = np.empty(total, dtype=np.int32)
    pos = 0
    for ids in encoded:
        out[pos] = eot
        out[pos + 1:pos + 1 + len(ids)] = ids
        pos += 1 + len(ids)
    return out


def load_token_stream(source: str, tokenizer) -> np.ndarray:
    """`pack_tokens(load_documents(source), tokenizer)`, cached on disk for the built-in texts."""
    if source not in BUILTIN_TEXTS:
        return pack_tokens(load_documents(source), tokenizer)
    key = f"{source}-v{TEXT_VERSION}-{tokenizer.fingerprint[:16]}-eot{tokenizer.eot_id}"
    tdir = os.path.join(cache_dir(), "tokens")
    os.makedirs(tdir, exist_ok=True)
    path = os.path.join(tdir, key + ".npy")
    if os.path.isfile(path):
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            pass  # corrupt cache entry: rebuild below
    docs = load_documents(source)
    with step(f"tokenizing {source} (cached for the next runs)"):
        arr = pack_tokens(docs, tokenizer)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy", dir=tdir)
    with os.fdopen(fd, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return arr
