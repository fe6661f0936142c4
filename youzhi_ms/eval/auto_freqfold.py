"""`--freqfold auto`, TransMLA's uniform FreqFold search: convert with F = c, 2c, 4c, ... (c = head_dim /
qk_rope_dim) and keep the last F before the calibration perplexity of the converted model stops improving.

It judges each candidate by running the converted model (the MindSpore model and the perplexity protocol of
`eval.ppl`), so it lives here, beside the evaluation, and calls the numpy converter (`convert.pipeline.convert`) once
per candidate: the converter package itself imports nothing from eval/ or the MindSpore checkpoint code. The adaptive
modes (`convert/adaptive.py`) choose per layer from the numpy reference forward instead and need none of this.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile

import numpy as np

from youzhi_ms.checkpoint.hf import HFCheckpoint, write_json
from youzhi_ms.checkpoint.mindspore_ckpt import load_model
from youzhi_ms.config import SourceConfig
from youzhi_ms.contract import check_rope_dim
from youzhi_ms.convert.adaptive import fold_sizes
from youzhi_ms.convert.pipeline import ConvertOptions, calibration_windows, convert
from youzhi_ms.convert.report import write_markdown
from youzhi_ms.errors import YouzhiError
from youzhi_ms.eval.ppl import perplexity
from youzhi_ms.fsutil import atomic_output_dir, check_output_dir

log = logging.getLogger("youzhi_ms.convert")

AUTO = "auto"  # the --freqfold value that selects this search
PPL_WINDOWS = 8  # calibration windows the perplexity of each candidate is measured on


def convert_auto(src_dir: str, out_dir: str, opt: ConvertOptions, overwrite: bool = False) -> dict:
    """Convert `src_dir` with the uniform F of the lowest calibration perplexity; returns the kept candidate's report
    with freqfold_mode 'auto' and the search's `auto_trace` [{F, calib_ppl}, ...] (also in config.json's youzhi
    block). Every other option of `opt` is passed to each candidate's conversion. `out_dir` appears only when complete;
    the candidates live in a temporary directory beside it that is removed on every exit."""
    if opt.freqfold != AUTO:
        raise YouzhiError(f"convert_auto runs freqfold={AUTO!r}, got {opt.freqfold!r}; call "
                          "youzhi_ms.convert.pipeline.convert for the other modes")
    inputs = [("--hf-dir", src_dir), ("--calib-text", opt.calib_text)]
    check_output_dir(out_dir, overwrite, inputs)
    cfg = SourceConfig.from_hf(HFCheckpoint(src_dir).config)
    head_dim = cfg.head_dim
    collapse = head_dim // check_rope_dim(head_dim // 2 if opt.qk_rope_dim is None else opt.qk_rope_dim, head_dim)
    if opt.calib_ids is not None:
        ids = np.asarray(opt.calib_ids)[:PPL_WINDOWS]
    else:
        ids = calibration_windows(src_dir, opt.calib_text, min(opt.calib_tokens, PPL_WINDOWS * opt.calib_seq_len),
                                  opt.calib_seq_len, opt.seed + 1)
    trace, best, best_dir = [], None, None
    work = tempfile.mkdtemp(prefix=".auto-", dir=os.path.dirname(os.path.abspath(os.path.expanduser(out_dir))))
    try:
        for fold in fold_sizes(head_dim, collapse):  # the paper's F
            cand = os.path.join(work, f"F{fold}")
            convert(src_dir, cand, dataclasses.replace(opt, freqfold=str(fold)))
            model, _ = load_model(cand, table_len=ids.shape[1])
            ppl = perplexity(model, ids.reshape(-1), ids.shape[1], progress=False)["ppl"]
            trace.append({"F": fold, "calib_ppl": ppl})
            log.info("auto FreqFold: F=%d calibration ppl %.4f", fold, ppl)
            if best is not None and ppl >= best:
                break
            best, best_dir = ppl, cand
        report = _mark_auto(best_dir, trace)
        with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
            os.rmdir(tmp)
            shutil.move(best_dir, tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _mark_auto(conv_dir: str, trace: list) -> dict:
    """The kept candidate's report, config.json and markdown say freqfold_mode 'auto' and carry the trace."""
    rep_path = os.path.join(conv_dir, "conversion_report.json")
    with open(rep_path) as f:
        report = json.load(f)
    report["freqfold_mode"] = AUTO
    report["auto_trace"] = trace
    write_json(rep_path, report)
    cfg_path = os.path.join(conv_dir, "config.json")
    with open(cfg_path) as f:
        conf = json.load(f)
    conf["youzhi"]["freqfold_mode"] = AUTO
    conf["youzhi"]["auto_trace"] = trace
    write_json(cfg_path, conf)
    write_markdown(report, os.path.join(conv_dir, "conversion_report.md"))
    return report
