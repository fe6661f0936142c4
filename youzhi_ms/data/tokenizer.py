"""One small tokenizer interface over a model directory: `tokenizer.json` (the `tokenizers` library) or, when only that
exists, a sentencepiece `tokenizer.model`; plus chat-template rendering with jinja2.

Special ids:
- `eos_id`: tokenizer_config.json's `eos_token`, else generation_config.json's `eos_token_id` (first if a list),
  else config.json's. For SmolLM2-Instruct this is `<|im_end|>` = 2 (the end of a chat turn).
- `bos_id`: the same lookup order with `bos_token` / `bos_token_id` (SmolLM2-Instruct: `<|im_start|>` = 1).
- `eot_id`, the document separator used when packing text for perplexity and calibration: the first of
  `<|endoftext|>`, `<|end_of_text|>` that is in the vocabulary; else `eos_id`; else `bos_id`. For SmolLM2 this is
  `<|endoftext|>` = 0, which is what the model saw between pre-training documents (NOT the chat eos 2).

Chat templates are rendered the way transformers does (sandboxed jinja2, trim_blocks + lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, `{% generation %}` blocks rendered as plain text)
with `bos_token` / `eos_token` / `unk_token` / `pad_token` strings available as variables.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence

import jinja2
import sentencepiece
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from youzhi_ms.cli import path_problem
from youzhi_ms.errors import YouzhiError

EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise YouzhiError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or re-create the file") \
            from None
    except UnicodeDecodeError:
        raise YouzhiError(f"{path} is not UTF-8 text; fix or re-create the file") from None
    return obj if isinstance(obj, dict) else {}


def _token_str(v) -> Optional[str]:
    if isinstance(v, dict):  # {"content": "<|im_end|>", ...} (AddedToken serialization)
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _first_id(v) -> Optional[int]:
    if isinstance(v, list):
        v = v[0] if v else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


class _HFBackend:
    def __init__(self, path: str):
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # the library raises a bare Exception on malformed files
            raise YouzhiError(f"{path} could not be loaded by the tokenizers library ({exc}); re-create it "
                              "(tools/gguf_to_hf.py writes one) or update the tokenizers package") from None

    def encode(self, text: str, add_special_tokens: bool) -> List[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.tok.id_to_token(i)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SPBackend:
    def __init__(self, path: str):
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as exc:
            raise YouzhiError(f"{path} is not a valid sentencepiece model ({exc}); re-create the tokenizer files") \
                from None

    def encode(self, text: str, add_special_tokens: bool) -> List[int]:
        ids = list(self.sp.EncodeAsIds(text))
        if add_special_tokens and self.sp.bos_id() >= 0:
            ids = [self.sp.bos_id()] + ids
        return ids

    def encode_batch(self, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self.sp.IsControl(i) or self.sp.IsUnknown(i))]
        return self.sp.DecodeIds(ids)

    def token_to_id(self, token: str) -> Optional[int]:
        i = self.sp.PieceToId(token)
        return i if self.sp.IdToPiece(i) == token else None

    def id_to_token(self, i: int) -> Optional[str]:
        return self.sp.IdToPiece(int(i)) if 0 <= int(i) < self.sp.GetPieceSize() else None

    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()


class Tokenizer:
    """Tokenizer of a model directory. Build with `Tokenizer.from_dir(model_dir)`."""

    def __init__(self, backend, model_dir: str, tokenizer_config: dict, generation_config: dict, config: dict,
                 fingerprint: str, kind: str):
        self._b = backend
        self.model_dir = model_dir
        self.tokenizer_config = tokenizer_config
        self.kind = kind  # "tokenizers" or "sentencepiece"
        self.fingerprint = fingerprint  # sha256 of the tokenizer file (keys token caches)
        self.eos_id = self._special_id("eos", tokenizer_config, generation_config, config)
        self.bos_id = self._special_id("bos", tokenizer_config, generation_config, config)
        self.pad_id = self._special_id("pad", tokenizer_config, generation_config, config)
        self.eot_id = next((i for i in (self.token_to_id(t) for t in EOT_CANDIDATES) if i is not None), None)
        if self.eot_id is None:
            self.eot_id = self.eos_id if self.eos_id is not None else self.bos_id
        if self.eot_id is None:
            raise YouzhiError(f"{model_dir}: the tokenizer has no end-of-text, eos or bos token, so documents cannot be "
                              "separated; set eos_token in tokenizer_config.json")

    @classmethod
    def from_dir(cls, model_dir: str) -> "Tokenizer":
        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise YouzhiError(f"model directory {model_dir} {path_problem(model_dir, 'folder')}")
        tj, sp = os.path.join(model_dir, "tokenizer.json"), os.path.join(model_dir, "tokenizer.model")
        if os.path.isfile(tj):
            backend, path, kind = _HFBackend(tj), tj, "tokenizers"
        elif os.path.isfile(sp):
            backend, path, kind = _SPBackend(sp), sp, "sentencepiece"
        else:
            raise YouzhiError(f"{model_dir} has neither tokenizer.json nor tokenizer.model; copy the tokenizer files "
                              "of the source model into the directory")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        cfg = _read_json(os.path.join(model_dir, "config.json"))
        n, model_vocab = backend.vocab_size(), cfg.get("vocab_size")
        if isinstance(model_vocab, int) and not isinstance(model_vocab, bool) and n > model_vocab:
            # its ids past the model's embedding table would be looked up out of range
            raise YouzhiError(f"{path} has {n} tokens but the model's vocab_size is {model_vocab}; the tokenizer "
                              "belongs to another model: copy the source model's tokenizer files")
        return cls(backend, model_dir, _read_json(os.path.join(model_dir, "tokenizer_config.json")),
                   _read_json(os.path.join(model_dir, "generation_config.json")), cfg, h.hexdigest(), kind)

    def _special_id(self, which: str, tcfg: dict, gcfg: dict, cfg: dict) -> Optional[int]:
        s = _token_str(tcfg.get(f"{which}_token"))
        if s is not None and self.token_to_id(s) is not None:
            return self.token_to_id(s)
        for src in (gcfg, cfg):
            i = _first_id(src.get(f"{which}_token_id"))
            if i is not None:
                return i
        return None

    # --- encoding --------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return self._b.encode(text, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> List[List[int]]:
        return self._b.encode_batch(list(texts), add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._b.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._b.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._b.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self._b.vocab_size()

    def _special_str(self, name: str) -> Optional[str]:
        s = _token_str(self.tokenizer_config.get(name))
        if s is None:
            i = getattr(self, name.replace("_token", "_id"), None)
            s = self.id_to_token(i) if i is not None else None
        return s

    # --- chat ------------------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> Optional[str]:
        t = self.tokenizer_config.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if not t:
            jinja = os.path.join(self.model_dir, "chat_template.jinja")
            if os.path.isfile(jinja):
                with open(jinja, encoding="utf-8") as f:
                    t = f.read()
        return t or None

    def apply_chat_template(self, messages: Sequence[Dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        template = self.chat_template
        if not template:
            raise YouzhiError(f"{self.model_dir} has no chat template (no chat_template in tokenizer_config.json and no "
                              "chat_template.jinja); use a chat/instruct model, or pass plain text instead")
        variables = {k: self._special_str(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        variables = {k: v for k, v in variables.items() if v is not None}
        variables.update(kwargs)
        return render_chat_template(template, list(messages), add_generation_prompt=add_generation_prompt,
                                    **variables)


# ---------------------------------------------------------------------------------------------------------------------
# jinja2 rendering

_HUGE_WIDTH = re.compile(r"[%{:][^%{}]*?\d{8,}")  # a width / precision of 8 digits in a format spec: 100 M characters
MAX_TEMPLATE_CHARS = 1 << 24  # a rendered prompt (or one step of building it) above 16 M characters is refused
MAX_TEMPLATE_SECONDS = 30


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) rendered as their plain content."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _too_big(what):
    raise jinja2.exceptions.TemplateError(f"the template builds {what} (over {MAX_TEMPLATE_CHARS} items)")


def _check_args(name, args, kwargs):
    if any(isinstance(a, int) and abs(a) > MAX_TEMPLATE_CHARS for a in (*args, *kwargs.values())):
        _too_big(f"a call of {name} with a count")


def _bounded_filter(name, f):
    """Filters are called directly, not through the sandbox's `call`: the same checks (center(10**10), a '%...s'
    format of a huge width)."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        _check_args(name, args, kwargs)
        if name == "format" and any(isinstance(a, str) and _HUGE_WIDTH.search(a) for a in args[:2]):
            _too_big("a format with a huge width")
        return f(*args, **kwargs)
    return wrapper


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox bounds range() (jinja2's MAX_RANGE); these bound the other ways a template can ask for memory
    in one step: repeating a string or list, a huge power, a call with a huge count (ljust, center, format)."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_CHARS:
                    _too_big(f"a {type(seq).__name__} repeated {n} times")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256 and \
                isinstance(left, (int, float)) and abs(left) > 1:
            _too_big(f"a power {left} ** {right}")
        if operator == "%" and isinstance(left, str) and _HUGE_WIDTH.search(left):
            _too_big("a %-format with a huge width")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):
        fmt = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the sandbox wraps str.format
        if isinstance(fmt, str) and getattr(__obj, "__name__", "") in ("format", "format_map") and \
                _HUGE_WIDTH.search(fmt):
            _too_big("a format with a huge width")
        _check_args(getattr(__obj, "__name__", "a function"), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


@functools.lru_cache(maxsize=1)
def _jinja_env() -> _BoundedSandbox:
    """The one template environment (built on first use): transformers' settings, every filter bounded."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded_filter(name, f) for name, f in env.filters.items()})
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def render_chat_template(template: str, messages: List[Dict[str, Any]], add_generation_prompt: bool = True,
                         **variables) -> str:
    """Render a Hugging Face chat template; template errors become YouzhiError."""
    try:
        compiled = _jinja_env().from_string(template)
        # streamed, so a template that writes without end is stopped at the budget, not when memory runs out
        out, size, t0 = [], 0, time.monotonic()
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            out.append(piece)
            size += len(piece)
            if size > MAX_TEMPLATE_CHARS or time.monotonic() - t0 > MAX_TEMPLATE_SECONDS:
                raise jinja2.exceptions.TemplateError(
                    f"the rendered prompt grew past {size} characters in {time.monotonic() - t0:.1f} s (limits "
                    f"{MAX_TEMPLATE_CHARS} characters, {MAX_TEMPLATE_SECONDS} s)")
        return "".join(out)
    except (jinja2.exceptions.TemplateError, OverflowError, MemoryError, RecursionError) as exc:
        what = str(exc) if isinstance(exc, jinja2.exceptions.TemplateError) else \
            f"{type(exc).__name__} ({exc or 'out of memory'})"
        raise YouzhiError(f"chat template failed: {what}; check the messages (roles/order the template expects) or "
                          "the template in tokenizer_config.json") from None
