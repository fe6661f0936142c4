"""One function per pipeline stage. Each runs in its own process (runner.py starts it through worker.py), reads the
resolved config and writes exactly one output under the pipeline's output directory, through the output rule of
youzhi_ms/fsutil.py (a directory appears only when complete; an earlier output of the same stage, e.g. one a killed
run finished writing before the state file recorded it, is replaced, never anything else). It returns a small dict
of figures for the summary.

Outputs (under output_dir):  source_hf/  eval_<model>.json  mla/  gkd/ (a tools/train.py run; the model is
gkd/hf_model)  domain/ (the same; domain/hf_model)  mindir/  final.gguf  plan.json
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List

from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import read_marker, write_json_output
from youzhi_ms.pipeline.config import resolve_file



class Context:
    """The resolved config and the paths every stage agrees on."""

    def __init__(self, cfg: Dict[str, Any], out: str):
        self.cfg, self.out = cfg, out

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    @property
    def source_dir(self) -> str:
        src = self.cfg["source"]["model"]
        return self.path("source_hf") if _is_gguf(src) else src

    def model_dir(self, model: str) -> str:
        return {"source": self.source_dir, "mla": self.path("mla"), "gkd": self.path("gkd/hf_model"),
                "domain": self.path("domain/hf_model")}[model]

    @property
    def final_dir(self) -> str:
        return self.model_dir("domain")


def _is_gguf(src: str) -> bool:
    return src == "smollm2" or src.lower().endswith(".gguf")


def is_output(path: str) -> bool:
    """A complete youzhi_ms output directory (marked when it was renamed into place) or a non-empty file."""
    if os.path.isdir(path):
        return read_marker(path) is not None
    return os.path.isfile(path) and os.path.getsize(path) > 0


# --------------------------------------------------------------------------------------------------------- stages


def stage_source(ctx: Context) -> Dict[str, Any]:
    """The source as a Hugging Face directory: a GGUF ('smollm2' or a file) is dequantized into source_hf/."""
    src = ctx.cfg["source"]["model"]
    if not _is_gguf(src):
        return {"model": src, "note": "used as given"}
    from youzhi_ms.checkpoint.gguf import gguf_to_hf
    s = gguf_to_hf(src, ctx.path("source_hf"), overwrite=True)
    return {"model": ctx.path("source_hf"), "n_params": s["n_params"], "gguf": s["gguf"]}


def _eval(ctx: Context, model: str) -> Dict[str, Any]:
    """Both held-out perplexities with one model load and one compiled graph (the protocol of youzhi_ms/eval/ppl.py,
    as tools/eval_ppl.py), then the MCQ accuracy."""
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.checkpoint.mindspore_ckpt import load_model
    from youzhi_ms.compile_cache import GraphCache
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.eval.ppl import TokenNLL, graph_signature, perplexity, token_stream, windows
    from youzhi_ms.progress import step
    e = ctx.cfg["eval"]
    model_dir = ctx.model_dir(model)
    tok = Tokenizer.from_dir(model_dir)
    streams = {kind: token_stream(e[f"{kind}_text"], tok, e["max_tokens"]) for kind in ("general", "domain")}
    for s in streams.values():
        windows(s, e["seq_len"])  # too short a text is an error before the model loads
    with step(f"loading {model_dir}"):
        net, cfg = load_model(model_dir, table_len=e["seq_len"])
    scorer = TokenNLL(net)
    cache = GraphCache("ppl", {"config": cfg.raw, "dtype": "float32", "table_len": e["seq_len"]},
                       [graph_signature(1, e["seq_len"])])
    res: Dict[str, Any] = {"model": model, "model_dir": model_dir}
    for i, kind in enumerate(("general", "domain")):
        r = perplexity(net, streams[kind], e["seq_len"], graph_cache=cache if i == 0 else None, scorer=scorer)
        print(f"{model}: {kind} ppl {r['ppl']:.4f} on {r['tokens']} tokens of {e[f'{kind}_text']} [{r['seconds']} s]",
              flush=True)
        res[kind] = {k: r[k] for k in ("ppl", "nll", "tokens", "windows", "seq_len", "seconds")}
        res[kind]["text"] = e[f"{kind}_text"]
    del net, scorer
    if e["mcq"] is not None:
        from youzhi_ms.eval.mcq import evaluate_mcq
        m = evaluate_mcq(model_dir, e["mcq"], e["mcq_format"], e["mcq_shots"], e["mcq_dev"],
                         batch_size=e["mcq_batch_size"], limit=e["mcq_limit"])
        print(f"{model}: MCQ acc {m['acc']:.4f} on {m['n']} questions [{m['seconds']} s]", flush=True)
        res["mcq"] = {k: m[k] for k in ("acc", "acc_norm", "n", "seconds", "shots")}
    write_json_output(ctx.path(f"eval_{model}.json"), res, overwrite=True, inputs=[("model", model_dir)],
                      flag="the evaluation file")
    return res


def stage_convert(ctx: Context) -> Dict[str, Any]:
    """GQA -> MLA (youzhi_ms/convert/pipeline.py); an interrupted conversion continues from its finished layers."""
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    c = ctx.cfg["convert"]
    opt = ConvertOptions(kv_lora_rank=c["kv_lora_rank"], qk_rope_dim=c["qk_rope_dim"], freqfold=str(c["freqfold"]),
                         calib_text=c["calib_text"], calib_tokens=c["calib_tokens"], export=c["export"])
    rep = convert(ctx.source_dir, ctx.path("mla"), opt, overwrite=True)
    return {k: rep.get(k) for k in ("kv_lora_rank", "qk_rope_head_dim", "cache_ratio", "export", "freqfold_mode",
                                    "seconds")}


def train_config(ctx: Context, stage: str) -> Dict[str, Any]:
    """The tools/train.py config of the gkd / domain stage: its yaml, the pipeline's paths and budget, the user's
    overrides last (so they can change anything but the paths, which are set again after them)."""
    from youzhi_ms.train.run_config import load_run_config
    s = ctx.cfg[stage]
    paths = [f"output_dir={ctx.path(stage)}", f"runner_config.max_steps={s['max_steps']}"]
    if stage == "gkd":
        paths += [f"model.student={ctx.path('mla')}", f"distill.teacher={ctx.source_dir}"]
    else:
        paths += [f"model.student={ctx.model_dir('gkd')}", f"train_dataset.data_path={ctx.cfg['domain']['corpus']}",
                  "train_dataset.format=packed"]
    cfg = load_run_config(resolve_file(s["config"]), list(s["overrides"]) + paths)
    want = "distill" if stage == "gkd" else "sft"
    if cfg["run_mode"] != want:
        raise YouzhiError(f"{stage}.config {s['config']} has run_mode {cfg['run_mode']}; the {stage} stage needs "
                          f"run_mode {want}")
    return cfg


def _train(ctx: Context, stage: str, resume: bool) -> Dict[str, Any]:
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.train.trainer import HF_DIR, train
    cfg = train_config(ctx, stage)
    res = train(cfg, resume=resume, overwrite=not resume)
    if not res.get("hf_model"):
        raise YouzhiError(f"the {stage} run ended before max_steps without a model; run the pipeline again with "
                          "--resume")
    losses = res["losses"]
    return {"steps": res["end_step"], "start_step": res["start_step"], "train_seconds": res["seconds"],
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "model": os.path.join(ctx.path(stage), HF_DIR), "resumed": resume}


def stage_gkd(ctx: Context, resume: bool = False) -> Dict[str, Any]:
    """GKD recovery of the MLA student from the source (tools/train.py, run_mode distill)."""
    return _train(ctx, "gkd", resume)


def stage_domain(ctx: Context, resume: bool = False) -> Dict[str, Any]:
    """Continued pre-training of the GKD student on the domain corpus (run_mode sft on packed text windows)."""
    return _train(ctx, "domain", resume)


def stage_mindir(ctx: Context) -> Dict[str, Any]:
    if not ctx.cfg["export"]["mindir"]:
        print("mindir: skipped (export.mindir is false)", flush=True)
        return {"skipped": "export.mindir is false"}
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.infer.mindir import export_mindir
    m = export_mindir(ctx.final_dir, ctx.path("mindir"), max_seq_len=ctx.cfg["export"]["mindir_max_seq_len"],
                      overwrite=True)
    return {"output": ctx.path("mindir"), "max_seq_len": m["max_seq_len"],
            "cache_bytes_per_token": m["cache_bytes_per_token"]}


def stage_gguf(ctx: Context) -> Dict[str, Any]:
    """The final model as one GGUF for llama.cpp (youzhi_ms/checkpoint/gguf_writer.py, as tools/export_gguf.py)."""
    if not ctx.cfg["export"]["gguf"]:
        print("gguf: skipped (export.gguf is false)", flush=True)
        return {"skipped": "export.gguf is false"}
    from youzhi_ms.checkpoint.gguf_writer import export_gguf
    out, outtype = ctx.path("final.gguf"), ctx.cfg["export"]["gguf_outtype"]
    try:
        export_gguf(ctx.final_dir, out, outtype, overwrite=os.path.exists(out))
    except YouzhiError as exc:
        raise YouzhiError(f"{exc}; the stages before the GGUF export are kept: fix the cause and run the pipeline "
                          "again with --resume") from None
    return {"output": out, "bytes": os.path.getsize(out), "outtype": outtype}


def stage_plan(ctx: Context) -> Dict[str, Any]:
    """vLLM-style KV-cache concurrency, source vs final model (youzhi_ms/infer/planner.py)."""
    from youzhi_ms.infer import planner as P
    settings = P.PlanSettings(device_memory_gib=float(ctx.cfg["plan"]["device_memory_gib"]),
                              max_model_len=ctx.cfg["plan"]["max_model_len"]).validate()
    plans = {name: P.plan_concurrency(P.load_model_shape(path), settings).to_dict()
             for name, path in (("source", ctx.source_dir), ("final", ctx.final_dir))}
    res = {"settings": settings.to_dict(), "plans": plans,
           "kv_bytes_per_token": {k: v["kv_bytes_per_token"] for k, v in plans.items()},
           "max_concurrency": {k: v["max_concurrency"] for k, v in plans.items()}}
    src = plans["source"]["max_concurrency"]
    res["concurrency_ratio"] = plans["final"]["max_concurrency"] / src if src else None
    write_json_output(ctx.path("plan.json"), res, overwrite=True, flag="the plan file")
    print(f"plan ({settings.device_memory_gib:g} GiB card, {settings.max_model_len}-token sequences): max concurrency "
          f"source {src:.2f}, final {plans['final']['max_concurrency']:.2f}"
          + (f" ({res['concurrency_ratio']:.3f}x)" if src else ""), flush=True)
    return {k: res[k] for k in ("kv_bytes_per_token", "max_concurrency", "concurrency_ratio")}


def _eval_stage(model: str) -> Callable[[Context], Dict[str, Any]]:
    def run(ctx: Context) -> Dict[str, Any]:
        return _eval(ctx, model)
    run.__name__ = f"stage_eval_{model}"
    run.__doc__ = f"general / domain held-out perplexity (and MCQ accuracy) of the {model} model"
    return run


class Stage:
    """`outputs(ctx)`: the paths the stage's finished run leaves (checked before it is skipped on --resume);
    `deps`: the stages whose outputs it reads; `sections`: the config sections it depends on; `files(ctx)`: the
    files whose content it depends on; `resumable`: an interrupted run continues from its checkpoint."""

    def __init__(self, name: str, fn: Callable, outputs: Callable[[Context], List[str]], deps: List[str],
                 sections: List[str], files: Callable[[Context], List[str]] = lambda ctx: [],
                 resumable: bool = False):
        self.name, self.fn, self.outputs, self.deps, self.sections = name, fn, outputs, deps, sections
        self.files, self.resumable = files, resumable


def _eval_files(ctx: Context) -> List[str]:
    e = ctx.cfg["eval"]
    return [e["general_text"], e["domain_text"], e["mcq"], e["mcq_dev"]]


def _fixed(*names: str) -> Callable[[Context], List[str]]:
    return lambda ctx: [ctx.path(n) for n in names]


def _source_outputs(ctx: Context) -> List[str]:
    return [ctx.path("source_hf")] if _is_gguf(ctx.cfg["source"]["model"]) else []


def _mindir_outputs(ctx: Context) -> List[str]:
    return [ctx.path("mindir")] if ctx.cfg["export"]["mindir"] else []


def _gguf_outputs(ctx: Context) -> List[str]:
    return [ctx.path("final.gguf")] if ctx.cfg["export"]["gguf"] else []


def _train_files(stage: str) -> Callable[[Context], List[str]]:
    def files(ctx: Context) -> List[str]:
        out = [resolve_file(ctx.cfg[stage]["config"])]
        if stage == "domain":
            out.append(ctx.cfg["domain"]["corpus"])
            # the general text the domain step replays (a user's file: its content, a built-in: its name)
            out.append(train_config(ctx, stage)["train_dataset"]["replay_path"])
        return out
    return files


# The run order.
STAGES: List[Stage] = [
    Stage("source", stage_source, _source_outputs, [], ["source"]),
    Stage("eval_source", _eval_stage("source"), _fixed("eval_source.json"), ["source"], ["eval"],
          _eval_files),
    Stage("convert", stage_convert, _fixed("mla"), ["source"], ["convert"]),
    Stage("eval_mla", _eval_stage("mla"), _fixed("eval_mla.json"), ["convert"], ["eval"],
          _eval_files),
    Stage("gkd", stage_gkd, _fixed("gkd/hf_model"), ["source", "convert"], ["gkd"], _train_files("gkd"), True),
    Stage("eval_gkd", _eval_stage("gkd"), _fixed("eval_gkd.json"), ["gkd"], ["eval"],
          _eval_files),
    Stage("domain", stage_domain, _fixed("domain/hf_model"), ["gkd"], ["domain"], _train_files("domain"), True),
    Stage("eval_domain", _eval_stage("domain"), _fixed("eval_domain.json"), ["domain"], ["eval"],
          _eval_files),
    Stage("mindir", stage_mindir, _mindir_outputs, ["domain"], ["export"]),
    Stage("gguf", stage_gguf, _gguf_outputs, ["domain"], ["export"], lambda ctx: []),
    Stage("plan", stage_plan, _fixed("plan.json"), ["source", "domain"], ["plan"]),
]
BY_NAME = {s.name: s for s in STAGES}
EVALUATED = ("source", "mla", "gkd", "domain")  # the models the summary has a row for, in order
