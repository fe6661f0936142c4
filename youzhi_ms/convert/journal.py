"""The conversion's resume journal: the work directory next to the output, one record line and one safetensors file
per finished layer, and the hidden-state streams after the last finished layer.

An interrupted conversion started again with the same source, options and calibration (its fingerprint) continues at
the first unfinished layer; anything else starts over. The record line is the commit point: a layer whose line is
torn or missing is converted again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from youzhi_ms.checkpoint.hf import write_json
from youzhi_ms.errors import YouzhiError

log = logging.getLogger("youzhi_ms.convert")


@dataclass
class LayerRecord:
    layer: int
    bands: List[List[int]]
    choice: str
    beta: float = 1.0
    score: float = 0.0  # the FreqFold score of the built layer (what the search minimised; opt.score's kind)
    attn_rel_err: float = 0.0  # the built layer's attention error against the source attention on the same inputs
    scores: Dict[str, float] = field(default_factory=dict)  # candidates scored in full at balance 1
    refined: Dict[str, float] = field(default_factory=dict)  # finalists x balances
    coarse: Dict[str, float] = field(default_factory=dict)  # fast search: every candidate on the subsample
    coarse_balances: Dict[str, float] = field(default_factory=dict)  # fast search: finalist x balance on the subsample
    alpha: float = 0.0
    pca_energy_kept: float = 0.0
    refit: Optional[Dict[str, float]] = None


def work_dir(out_dir: str) -> str:
    out = os.path.abspath(os.path.expanduser(out_dir))  # '~/x' is the home folder's (as the output rule reads it)
    return os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".partial")


def read_records(work: str):
    """(records, lines): the longest prefix of records.jsonl that parses. A process killed while appending leaves a
    torn last line; like a database log tail it is dropped, and that layer is converted again."""
    path = os.path.join(work, "records.jsonl")
    recs, lines = [], []
    if not os.path.isfile(path):
        return recs, lines
    with open(path, "rb") as f:
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                rec = LayerRecord(**json.loads(raw.decode("utf-8")))
                if rec.layer != len(recs):
                    raise ValueError("out of order")
            except (ValueError, TypeError):
                break
            recs.append(rec)
            lines.append(raw)
    return recs, lines


def resume(work: str, fingerprint: dict, streams: set):
    """(records, hidden-state streams) of a matching unfinished conversion, else a fresh work dir and ([], None). A
    work dir whose saved streams are not `streams` (e.g. left by a build that named them otherwise) is not resumed."""
    meta = os.path.join(work, "meta.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                same = json.load(f) == json.loads(json.dumps(fingerprint))
        except (OSError, ValueError):
            same = False
        if same:
            recs, lines = read_records(work)
            hid = os.path.join(work, f"hidden_{len(recs):05d}.npz")
            if recs and os.path.isfile(hid):
                try:
                    with np.load(hid, allow_pickle=False) as z:
                        h = {k: z[k] for k in z.files}
                except (OSError, ValueError):
                    h = None
                if h is not None and set(h) == streams:
                    rewrite_records(work, lines)
                    return recs, h
        log.info("discarding an unfinished conversion with other options in %s", work)
    elif os.path.isdir(work) and os.listdir(work):
        raise YouzhiError(f"{work} exists but is not a youzhi_ms conversion work directory (no meta.json); the "
                          "conversion keeps its resumable state there: move that directory away")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    write_json(meta, fingerprint)
    return [], None


def rewrite_records(work: str, lines: list) -> None:
    """records.jsonl cut back to its valid prefix (through a temp file), so later appends follow a whole line."""
    path = os.path.join(work, "records.jsonl")
    with open(path + ".tmp", "wb") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def commit_layer(work: str, i: int, h: Dict[str, np.ndarray], rec: "LayerRecord") -> None:
    """Hidden states after layer i, then the record line (the commit point), then drop the previous states."""
    tmp = os.path.join(work, "hidden.tmp.npz")
    np.savez(tmp, **h)
    os.replace(tmp, os.path.join(work, f"hidden_{i + 1:05d}.npz"))
    with open(os.path.join(work, "records.jsonl"), "a") as f:
        f.write(json.dumps(rec.__dict__) + "\n")
    prev = os.path.join(work, f"hidden_{i:05d}.npz")
    if os.path.exists(prev):
        os.remove(prev)
