"""Multiple-choice evaluation by log-likelihood, the way lm-evaluation-harness scores MMLU / C-Eval / CMMLU.

Protocol (fixed so the numbers are reproducible):
1. Data. C-Eval csv (`id,question,A,B,C,D,answer[,explanation]`), CMMLU csv (`(index),Question,A,B,C,D,Answer`) or jsonl
   (`{"question", "choices": [...], "answer": 0-based int or letter, "subject"?}`). A directory means every csv (or
   jsonl) file in it. The subject is the `subject` column/field, else the file name (C-Eval's `_val`/`_dev`/`_test`
   suffix dropped); a `subject_mapping.json` next to the files (C-Eval's `{"key": [English, 中文, category]}`) gives
   the display name used in the prompt.
2. Prompt. Chinese (ceval, cmmlu; C-Eval style):
       以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n
       {shot question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案： {shot answer}\\n\\n      (K times)
       {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：
   English (jsonl; MMLU style): header "The following are multiple choice questions (with answers) about {subject}."
   (no "about ..." without a subject), blocks end with "Answer:". `lang` overrides the default per format.
3. K-shot examples: the first K items of the same subject from the dev split when given, else the first K items of
   the data itself, which are then excluded from scoring.
4. Scoring. Each option is the continuation " A" / " B" ... (`score="letters"`, default) or " " + option text
   (`score="text"`). As in the harness, trailing whitespace of the context moves into the continuation, the context
   and context+continuation are tokenized separately (no special tokens unless `add_bos`) and the continuation tokens
   are whole[len(context):]; an over-long input is truncated from the left. ll(option) = sum of log p(continuation
   token | everything before it). acc = mean[argmax ll == answer]; acc_norm uses ll / len(option string in
   characters) (equal to acc for letters). Overall acc is the micro average; acc_macro averages the subjects.
5. Batching. Requests whose model input is identical (all options of a single-token continuation) share one forward
   pass. Rows are right-padded (attention_mask) to a power-of-two length bucket and a fixed batch size, so only a few
   shapes are ever compiled.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import string
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops


from youzhi_ms.checkpoint.hf import read_config
from youzhi_ms.checkpoint.mindspore_ckpt import load_model
from youzhi_ms.compile_cache import announce_compile
from youzhi_ms.config import load_any_config
from youzhi_ms.data.tokenizer import Tokenizer
from youzhi_ms.errors import YouzhiError
from youzhi_ms.progress import ProgressBar, step

LETTERS = string.ascii_uppercase
FORMATS = ("ceval", "cmmlu", "jsonl")
ZH_HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
EN_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
EN_HEADER_PLAIN = "The following are multiple choice questions (with answers).\n\n"
ANSWER_CUE = {"zh": "答案：", "en": "Answer:"}


@dataclass
class Item:
    subject: str  # grouping key
    question: str
    choices: List[str]
    answer: int  # 0-based
    uid: str = ""
    display: Optional[str] = None  # subject name shown in the prompt (None: no subject in the header)


# ------------------------------------------------------------------------------------------------------------ loading
def _subject_from_file(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"_(val|dev|test)$", "", stem)


def _read_mapping(folder: str) -> Dict[str, list]:
    for d in (folder, os.path.dirname(folder)):
        p = os.path.join(d, "subject_mapping.json")
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    obj = json.load(f)
            except ValueError as exc:
                raise YouzhiError(f"{p} is not valid JSON ({exc}); fix or remove it") from None
            if not isinstance(obj, dict):
                raise YouzhiError(f"{p} must map subject keys to [English, Chinese, category] lists")
            return obj
    return {}


def _display(key: str, mapping: Dict[str, list], lang: str) -> str:
    v = mapping.get(key)
    if isinstance(v, list) and len(v) >= 2:
        return str(v[1] if lang == "zh" else v[0])
    if isinstance(v, str):
        return v
    return key.replace("_", " ") if lang == "en" else key


def _parse_answer(v, n_choices: int, where: str) -> int:
    if isinstance(v, bool):
        v = None
    if isinstance(v, int):
        idx = v
    elif isinstance(v, str) and v.strip().upper() in LETTERS[:n_choices] and v.strip():
        idx = LETTERS.index(v.strip().upper())
    elif isinstance(v, str) and v.strip().isdigit():
        idx = int(v.strip())
    else:
        if v is None or (isinstance(v, str) and not v.strip()):
            raise YouzhiError(f"{where}: the answer is empty (C-Eval/CMMLU test splits have no labels); evaluate the "
                              "val/dev split or a labelled file")
        raise YouzhiError(f"{where}: answer {v!r} is not one of {', '.join(LETTERS[:n_choices])} or a 0-based index; "
                          "fix the file")
    if not 0 <= idx < n_choices:
        raise YouzhiError(f"{where}: answer index {idx} is outside the {n_choices} choices (0-based); fix the file")
    return idx


def detect_format(path: str) -> str:
    files = _data_files(path)
    f = files[0]
    if f.endswith(".jsonl"):
        return "jsonl"
    header = _csv_header(f)
    if "Question" in header and "Answer" in header:
        return "cmmlu"
    if "question" in header and "answer" in header:
        return "ceval"
    raise YouzhiError(f"{f}: cannot tell the format from the header {header}; expected C-Eval "
                      "(id,question,A,B,C,D,answer) or CMMLU (,Question,A,B,C,D,Answer) columns, or pass --format")


def _data_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".csv", ".jsonl")))
        if not files:
            raise YouzhiError(f"{path} holds no .csv or .jsonl files; point --data at a data file or a folder of them")
        return files
    if not os.path.isfile(path):
        raise YouzhiError(f"data file {path} does not exist")
    if not path.endswith((".csv", ".jsonl")):
        raise YouzhiError(f"{path}: expected a .csv (C-Eval / CMMLU) or .jsonl file")
    return [path]


def _csv_header(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise YouzhiError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None


def _load_csv(path: str, fmt: str, mapping: Dict[str, list], lang: str) -> List[Item]:
    qcol, acol = ("question", "answer") if fmt == "ceval" else ("Question", "Answer")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else _csv_header(path)
    except UnicodeDecodeError:
        raise YouzhiError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None
    except csv.Error as exc:
        raise YouzhiError(f"{path} is not a readable csv file ({exc}); fix the file") from None
    need = [qcol, "A", "B", "C", "D", acol]
    missing = [c for c in need if c not in header]
    if missing:
        want = "id,question,A,B,C,D,answer" if fmt == "ceval" else ",Question,A,B,C,D,Answer"
        raise YouzhiError(f"{path}: column(s) {', '.join(missing)} missing for --format {fmt} (expected {want}); "
                          "fix the header or pick the right --format")
    if not rows:
        raise YouzhiError(f"{path} has a header but no questions; remove it or add data")
    file_subject = _subject_from_file(path)
    items = []
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        if any(row.get(c) is None for c in need):
            raise YouzhiError(f"{where}: the row has fewer fields than the header; fix the csv quoting")
        key = (row.get("subject") or "").strip() or file_subject
        choices = [row[c].strip() for c in "ABCD"]
        items.append(Item(key, row[qcol].strip(), choices, _parse_answer(row[acol], 4, where),
                          uid=(row.get("id") or row.get("") or str(n - 2)).strip(),
                          display=_display(key, mapping, lang)))
    return items


def _load_jsonl(path: str, mapping: Dict[str, list], lang: str) -> List[Item]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise YouzhiError(f"{where} is not valid JSON ({exc}); fix the line") from None
            if not isinstance(obj, dict) or "question" not in obj or "choices" not in obj or "answer" not in obj:
                raise YouzhiError(f'{where}: each line needs {{"question", "choices": [...], "answer"}}; fix the line')
            ch = obj["choices"]
            if not isinstance(ch, list) or not 2 <= len(ch) <= len(LETTERS) or \
                    not all(isinstance(c, (str, int, float)) for c in ch):
                raise YouzhiError(f"{where}: choices must be a list of 2 to 26 strings; fix the line")
            subj = obj.get("subject")
            subj = str(subj).strip() if subj not in (None, "") else None
            key = subj or _subject_from_file(path)
            items.append(Item(key, str(obj["question"]).strip(), [str(c).strip() for c in ch],
                              _parse_answer(obj["answer"], len(ch), where), uid=str(obj.get("id", n)),
                              display=_display(subj, mapping, lang) if subj else None))
    if not items:
        raise YouzhiError(f"{path} holds no questions; add jsonl lines")
    return items


def load_items(path: str, fmt: Optional[str] = None, lang: Optional[str] = None) -> Tuple[List[Item], str, str]:
    """(items, format, lang) from a file or a folder of files."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise YouzhiError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    lang = lang or ("en" if fmt == "jsonl" else "zh")
    items: List[Item] = []
    for f in _data_files(path):
        mapping = _read_mapping(os.path.dirname(os.path.abspath(f)))
        if fmt == "jsonl":
            if not f.endswith(".jsonl"):
                continue
            items += _load_jsonl(f, mapping, lang)
        else:
            if not f.endswith(".csv"):
                continue
            items += _load_csv(f, fmt, mapping, lang)
    if not items:
        raise YouzhiError(f"{path} holds no {fmt} files; check --format")
    return items, fmt, lang


def by_subject(items: Sequence[Item]) -> "OrderedDict[str, List[Item]]":
    out: "OrderedDict[str, List[Item]]" = OrderedDict()
    for it in items:
        out.setdefault(it.subject, []).append(it)
    return out


# ------------------------------------------------------------------------------------------------------------ prompts
def question_block(item: Item, lang: str) -> str:
    lines = [item.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\n" + ANSWER_CUE[lang]


def option_strings(item: Item, score: str) -> List[str]:
    return list(LETTERS[:len(item.choices)]) if score == "letters" else list(item.choices)


def header(item: Item, lang: str) -> str:
    if lang == "zh":
        return ZH_HEADER.format(subject=item.display or item.subject)
    return EN_HEADER.format(subject=item.display) if item.display else EN_HEADER_PLAIN


def build_context(item: Item, shots: Sequence[Item], lang: str, score: str) -> str:
    """The prompt before the scored continuation (see the module docstring)."""
    parts = [header(item, lang)]
    for s in shots:
        parts.append(question_block(s, lang) + " " + option_strings(s, score)[s.answer] + "\n\n")
    parts.append(question_block(item, lang))
    return "".join(parts)


def plan_shots(items: Sequence[Item], k: int, dev: Optional[Sequence[Item]] = None):
    """[(item, shots)] to score: shots from `dev` (same subject) or the first k items of the subject (not scored)."""
    if k < 0:
        raise YouzhiError(f"--shots {k} must be >= 0")
    dev_by = by_subject(dev) if dev is not None else None
    out = []
    for subj, group in by_subject(items).items():
        if k == 0:
            out += [(it, []) for it in group]
        elif dev_by is not None:
            ex = dev_by.get(subj, [])
            if len(ex) < k:
                raise YouzhiError(f"the dev data has {len(ex)} item(s) for subject {subj!r}, fewer than --shots {k}; "
                                  "give a dev split covering every subject or fewer shots")
            out += [(it, ex[:k]) for it in group]
        else:
            if len(group) <= k:
                raise YouzhiError(f"subject {subj!r} has {len(group)} item(s): with --shots {k} and no --dev nothing "
                                  "is left to score; give --dev or fewer shots")
            out += [(it, group[:k]) for it in group[k:]]
    return out


# ------------------------------------------------------------------------------------------------------------ scoring
def encode_pair(tok, context: str, continuation: str, add_bos: bool = False, cache: Optional[dict] = None):
    """Harness-style split: trailing context whitespace joins the continuation; cont = enc(ctx+cont)[len(enc(ctx)):]."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        continuation = context[-n_sp:] + continuation
        context = context[:-n_sp]
    key = (context, add_bos)
    if cache is not None and key in cache:
        ctx = cache[key]
    else:
        ctx = tok.encode(context)
        if add_bos:
            if tok.bos_id is None:
                raise YouzhiError("--add-bos was given but the tokenizer has no bos token")
            ctx = [tok.bos_id] + ctx
        if cache is not None:
            cache[key] = ctx
    whole = ([tok.bos_id] if add_bos else []) + tok.encode(context + continuation)
    cont = whole[len(ctx):]
    if not cont:
        raise YouzhiError(f"the continuation {continuation!r} encodes to no tokens after its context; "
                          "use --score text or check the tokenizer")
    return whole[:len(ctx)], cont


def _bucket(n: int, cap: int, floor: int = 16) -> int:
    """Padded length for a batch whose longest row has n <= cap tokens: the next power of two (>= floor), <= cap."""
    return min(max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1))))), cap)


class ScoreCell(nn.Cell):
    """(ids [B,S], attention_mask [B,S], pos [B,K], tgt [B,K]) -> log p(tgt[b,k] | ids[b, :pos[b,k]+1]) [B,K] and the
    full log-distribution at pos[:, -1], [B,V]; the final norm and the head run only at the K gathered positions."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # keep the wrapped model's parameter names (MindFormers names)
        self.model = model

    def construct(self, input_ids, attention_mask, pos, tgt):
        h, _, _ = self.model.hidden_states(input_ids, attention_mask)
        b, k = pos.shape
        idx = ops.broadcast_to(pos.astype(ms.int32).expand_dims(-1), (b, k, h.shape[-1]))
        logits = self.model.head(ops.gather_elements(h, 1, idx)).astype(ms.float32)
        logp = ops.log_softmax(logits, -1)
        tok = ops.gather_elements(logp, -1, tgt.astype(ms.int32).expand_dims(-1)).squeeze(-1)
        return tok, logp[:, -1]


class LogLikelihood:
    """Per-request continuation log-likelihoods from a MindSpore causal LM (source or converted), batched and
    right-padded; the final norm and the vocabulary head run only at the scored positions."""

    def __init__(self, model, max_len: int, batch_size: int = 8, progress: bool = False):
        self.cell = ScoreCell(model)
        self.max_len, self.batch_size, self.progress = max_len, batch_size, progress
        self.compiled_shapes = set()

    def __call__(self, requests: Sequence[Tuple[List[int], List[int]]]) -> np.ndarray:
        # one row per distinct model input; members differ only in their last target token
        rows: "OrderedDict[Tuple[int, ...], List[int]]" = OrderedDict()
        seqs = []
        for i, (ctx, cont) in enumerate(requests):
            seq = list(ctx) + list(cont)
            inp = seq[:-1][-self.max_len:]
            tgt = seq[1:][-self.max_len:]
            seqs.append((inp, tgt, len(cont)))
            rows.setdefault(tuple(inp), []).append(i)
        keys = sorted(rows, key=lambda k: -len(k))
        K = max(c for _, _, c in seqs)  # one gather width for the whole run (one compiled shape per length bucket)
        if K > self.max_len:
            raise YouzhiError(f"an option is {K} tokens long, more than the maximum length {self.max_len}; "
                              "use --score letters or a larger --max-len")
        out = np.zeros(len(requests), np.float64)
        bar = ProgressBar(total=len(requests), desc="mcq", unit="opt", disable=not self.progress)
        B = self.batch_size
        for start in range(0, len(keys), B):
            chunk = keys[start:start + B]
            S = _bucket(len(chunk[0]), self.max_len)
            ids = np.zeros((B, S), np.int32)
            mask = np.zeros((B, S), np.int32)
            pos = np.zeros((B, K), np.int32)
            tgt = np.zeros((B, K), np.int32)
            for b in range(B):
                key = chunk[b] if b < len(chunk) else chunk[0]  # pad the batch with copies (discarded)
                inp, t, _ = seqs[rows[key][0]]
                n = len(inp)
                ids[b, :n], mask[b, :n] = inp, 1
                p = np.arange(n - K, n)
                pos[b] = np.maximum(p, 0)
                tgt[b] = [t[j] if j >= 0 else 0 for j in p]
            new_shape = (B, S, K) not in self.compiled_shapes
            self.compiled_shapes.add((B, S, K))
            with _announce(new_shape and self.progress, f"the scoring graph for inputs of length {S}"):
                tok_lp, last_lp = self.cell(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(pos), ms.Tensor(tgt))
            tok_lp, last_lp = tok_lp.asnumpy().astype(np.float64), last_lp.asnumpy().astype(np.float64)
            for b, key in enumerate(chunk):
                for i in rows[key]:
                    _, t, c = seqs[i]
                    ll = float(tok_lp[b, K - c:K - 1].sum()) + float(last_lp[b, t[-1]])
                    if not math.isfinite(ll):
                        raise YouzhiError("the model produced non-finite log-probabilities; the weights are corrupt "
                                          "or overflow in this dtype (evaluate in fp32)")
                    out[i] = ll
                bar.update(len(rows[key]))
        bar.close()
        return out


def _announce(compiling: bool, what: str):
    if not compiling:
        return contextlib.nullcontext()
    return announce_compile(what)


def score_items(model, tok, planned, lang: str, score: str = "letters", max_len: int = 2048, batch_size: int = 8,
                add_bos: bool = False, progress: bool = False) -> List[dict]:
    """Per-item records {subject, id, answer, lls, pred, pred_norm} for [(item, shots)] from `plan_shots`."""
    if score not in ("letters", "text"):
        raise YouzhiError(f"--score {score} must be letters or text")
    reqs, cache = [], {}
    for item, shots in planned:
        ctx = build_context(item, shots, lang, score)
        for opt in option_strings(item, score):
            reqs.append(encode_pair(tok, ctx, " " + opt, add_bos, cache))
    lls = LogLikelihood(model, max_len, batch_size, progress)(reqs)
    records = []
    at = 0
    for item, _ in planned:
        n = len(item.choices)
        ll = lls[at:at + n]
        at += n
        lens = np.array([float(len(s)) for s in option_strings(item, score)])
        records.append({"subject": item.subject, "id": item.uid, "answer": item.answer, "lls": [float(x) for x in ll],
                        "pred": int(np.argmax(ll)), "pred_norm": int(np.argmax(ll / lens))})
    return records


def summarize(records: Sequence[dict]) -> dict:
    subjects: "OrderedDict[str, dict]" = OrderedDict()
    for r in records:
        s = subjects.setdefault(r["subject"], {"n": 0, "correct": 0, "correct_norm": 0})
        s["n"] += 1
        s["correct"] += int(r["pred"] == r["answer"])
        s["correct_norm"] += int(r["pred_norm"] == r["answer"])
    per = OrderedDict((k, {"n": v["n"], "acc": v["correct"] / v["n"], "acc_norm": v["correct_norm"] / v["n"]})
                      for k, v in subjects.items())
    n = len(records)
    return {"n": n, "acc": sum(v["correct"] for v in subjects.values()) / n,
            "acc_norm": sum(v["correct_norm"] for v in subjects.values()) / n,
            "acc_macro": float(np.mean([v["acc"] for v in per.values()])), "subjects": per}


def evaluate_mcq(model_dir: str, data: str, fmt: Optional[str] = None, shots: int = 0, dev: Optional[str] = None,
                 score: str = "letters", lang: Optional[str] = None, batch_size: int = 8,
                 max_len: Optional[int] = None, limit: Optional[int] = None, add_bos: bool = False,
                 progress: bool = True, model=None, tok=None) -> dict:
    """Load the data (validated before the model), the model and its tokenizer; score; return the summary + items."""
    items, fmt, lang = load_items(data, fmt, lang)
    dev_items = load_items(dev, fmt, lang)[0] if dev else None
    planned = plan_shots(items, shots, dev_items)
    if limit:
        planned = planned[:limit]
    if model is None:
        cfg = load_any_config(read_config(model_dir), os.path.join(model_dir, "config.json"))
        max_len = max_len or cfg.max_position_embeddings
        with step(f"loading {model_dir}"):
            model, _ = load_model(model_dir, table_len=max_len)
    if tok is None:
        tok = Tokenizer.from_dir(model_dir)
    max_len = max_len or model.cfg.max_position_embeddings
    t0 = time.time()
    records = score_items(model, tok, planned, lang, score, max_len, batch_size, add_bos, progress)
    res = {"model": model_dir, "data": data, "dev": dev, "format": fmt, "lang": lang, "shots": shots,
           "score": score, "add_bos": add_bos, "max_len": max_len, "seconds": round(time.time() - t0, 2)}
    res.update(summarize(records))
    res["items"] = records
    return res
