"""tools/dryrun.py: the shipped Ascend plans compile with MindSpore's parallel compiler (DryRun level 0, on CPU, with
the compile-only CANN stand-in) and their per-rank parameter / gradient / optimizer bytes equal an independent count
from the model shapes and the plan; refused plans exit 2 with one `error:` line; the stand-in is generated, labelled,
pinned and stays out of normal runs.

Cost: the shipped 7B plans are compiled at their real widths with one layer per pipeline stage (the layers of a stage
all compile to the same slices, and the tool scales them to the full depth), two stages in parallel: about 1 minute
per yaml on an idle 2-core machine; the full-depth compiles are recorded in docs/ascend_memory.md.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = os.path.join(ROOT, "yaml_configs")


def _tool(*args, timeout=1800):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "dryrun.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(r):
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def _model(rel):
    with open(os.path.join(ROOT, rel, "config.json")) as f:
        return json.load(f)


def expected_bytes(cfg, student, teacher):
    """Per stage {param, grad, optimizer} bytes, counted from the full shapes and the plan's strategy table alone
    (every parameter is float32; a column-parallel linear's bias is split like its output features)."""
    from youzhi_ms.train.parallel import param_shapes, plan_parallel
    plan = plan_parallel(cfg["parallel_config"], student, teacher)
    pp = plan.pipeline_stage
    out = {s: {"param": 0, "grad": 0, "optimizer": 0} for s in range(pp)}

    def stage_of(name, layers):
        parts = name.split(".")
        if parts[0] == "embedding":
            return 0
        if parts[1] == "layers":
            return int(parts[2]) * pp // layers
        return pp - 1

    for model, prefix, trainable in ((student, "", True), (teacher, "teacher.", False)):
        for name, shape in param_shapes(model).items():
            cell, kind = name.rsplit(".", 1)
            split = [1] * len(shape)
            strategy = plan.strategies.get(prefix + cell)
            if strategy is not None and kind == "weight":
                split = list(strategy[1])
            elif strategy is not None and kind == "bias" and strategy[1][0] > 1:  # column parallel
                split = [strategy[1][0]]
            n = 4
            for d, s in zip(shape, split):
                n *= d // s
            st = stage_of(name, int(model["num_hidden_layers"]))
            out[st]["param"] += n
            if trainable:
                out[st]["grad"] += n
                out[st]["optimizer"] += 2 * n
    groups = 2 if cfg["lr_schedule"]["kv_layernorm_learning_rate"] is not None else 1
    for s in out:
        out[s]["optimizer"] += 4 * (3 + groups)  # the step's scalars (scale, bias corrections, learning rates)
    return plan, out


@pytest.mark.parametrize("name", ["distill_qwen2_5_7b_mla.yaml", "distill_qwen2_5_7b_mla_16npu.yaml"])
def test_shipped_ascend_plans_compile_and_their_memory_is_the_plans(name, tmp_path):
    from youzhi_ms.train.run_config import load_run_config
    out = tmp_path / "dryrun.json"
    r = _tool("--config", os.path.join(YAMLS, name), "--layers-per-stage", "1", "--jobs", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fits" in r.stdout and "DOES NOT FIT" not in r.stdout and "compile-only stand-in" in r.stdout
    rep = json.loads(out.read_text())
    cfg = load_run_config(os.path.join(YAMLS, name))
    with open(os.path.join(YAMLS, name)) as f:
        raw = yaml.safe_load(f)
    student, teacher = _model(raw["dry_run"]["student_config"]), _model(raw["dry_run"]["teacher_config"])
    plan, expect = expected_bytes(cfg, student, teacher)
    assert (rep["world_size"], rep["data_parallel"], rep["model_parallel"], rep["pipeline_stage"]) == \
        (plan.device_num, plan.data_parallel, plan.model_parallel, plan.pipeline_stage)
    assert [x["rank"] for x in rep["ranks"]] == list(range(plan.device_num))
    per_stage = plan.device_num // plan.pipeline_stage
    for x in rep["ranks"]:
        assert set(x) == {"rank", "stage", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
                          "total_bytes"}
        e = expect[x["rank"] // per_stage]
        assert x["stage"] == x["rank"] // per_stage
        assert (x["param_bytes"], x["grad_bytes"], x["optimizer_bytes"]) == (e["param"], e["grad"], e["optimizer"])
        assert x["total_bytes"] == x["param_bytes"] + x["grad_bytes"] + x["optimizer_bytes"] + x["activation_bytes"]
        assert 0 < x["activation_bytes"] and x["total_bytes"] <= rep["limit_bytes"] <= 64 * 2 ** 30
    from youzhi_ms.train.parallel import param_shapes
    one_copy = 4 * sum(int(__import__("numpy").prod(s)) for m in (student, teacher) for s in param_shapes(m).values())
    assert rep["unsharded_param_bytes"] == one_copy
    assert rep["strategy_table_checked"] > 0 and rep["depth_reduced"]


@pytest.mark.parametrize("overrides,expect", [
    (["parallel_config.model_parallel=3"], "does not divide the student's num_attention_heads (28)"),
    (["distill.lmbda=0.5"], "on-policy sampling needs the student's decode graph"),
    (["runner_config.gradient_accumulation_steps=4"], "the pipeline micro-batches are the accumulation"),
    (["parallel_config.model_parallel=1", "parallel_config.pipeline_stage=1"], "that is a data-parallel run"),
    (["distill.offline_teacher=/nonexistent/topk", "distill.loss=chunked"], "offline_teacher is implemented for data parallel only"),
    (["distill.teacher_graph=separate"], "teacher_graph=separate is implemented for data parallel only"),
])
def test_refused_plans_exit_2_before_compiling(overrides, expect):
    args = ["--config", os.path.join(YAMLS, "distill_qwen2_5_7b_mla.yaml")]
    for o in overrides:
        args += ["--set", o]
    assert expect in _one_error_line(_tool(*args, timeout=120))


def test_level_1_needs_cann():
    r = _tool("--config", os.path.join(YAMLS, "distill_qwen2_5_7b_mla.yaml"), "--level", "1", timeout=120)
    assert "--level 1 needs CANN" in _one_error_line(r)


def test_a_plan_that_does_not_fit_exits_2_with_the_table(tmp_path):
    """A tiny pair under a 1 MB device limit: compiled, tabled, refused."""
    student = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=128, hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   max_position_embeddings=256, rope_interleave=True, tie_word_embeddings=False)
    teacher = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
    (tmp_path / "s.json").write_text(json.dumps(student))
    (tmp_path / "t.json").write_text(json.dumps(teacher))
    y = tmp_path / "tiny.yaml"
    y.write_text(yaml.safe_dump({
        "run_mode": "distill", "context": {"device_target": "Ascend", "max_device_memory": "1MB"},
        "parallel": {"parallel_mode": "semi_auto_parallel"},
        "parallel_config": {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2},
        "runner_config": {"batch_size": 1, "seq_length": 64}, "distill": {"lmbda": 0.0},
        "dry_run": {"student_config": str(tmp_path / "s.json"), "teacher_config": str(tmp_path / "t.json")}}))
    out = tmp_path / "r.json"
    r = _tool("--config", str(y), "--jobs", "2", "--json", str(out))
    line = _one_error_line(r)
    assert "the plan does not fit" in line and "of 0 GB" not in line
    assert "DOES NOT FIT" in r.stdout and out.is_file()
    rep = json.loads(out.read_text())
    assert rep["limit_bytes"] == 2 ** 20 and all(x["total_bytes"] > 2 ** 20 for x in rep["ranks"])


def test_the_standin_is_generated_labelled_pinned_and_kept_out_of_normal_runs(monkeypatch):
    from youzhi_ms.dryrun import cann_standin
    from youzhi_ms.errors import YouzhiError
    before = dict(os.environ)
    s = cann_standin.ensure_standin(log=lambda *_: None)
    assert dict(os.environ) == before  # building it changes nothing in this process
    assert s.manifest["mindspore_version"] == cann_standin.PINNED_MINDSPORE and "COMPILE-ONLY" in s.manifest["label"]
    assert s.root.endswith(os.sep + "latest") and not s.root.startswith(ROOT)  # a cache, never the repository
    with open(os.path.join(os.path.dirname(s.root), "youzhi_cann_compile_only.c")) as f:
        assert f.readline().startswith("/* COMPILE-ONLY CANN stand-in")
    for name in ("libascendcl.so", "libhccl.so", "libge_runner.so"):
        assert os.path.realpath(os.path.join(s.lib_dir, name)) == os.path.join(s.lib_dir, cann_standin.STANDIN_LIB)
    syms = subprocess.run(["nm", "-D", "--defined-only", os.path.join(s.lib_dir, cann_standin.STANDIN_LIB)],
                          capture_output=True, text=True).stdout
    assert " aclrtMalloc" in syms and " HcclCommInitRootInfo" in syms
    env = s.child_env({"PATH": "/usr/bin"})
    assert env["LD_LIBRARY_PATH"] == s.lib_dir and env["PYTHONPATH"] == s.python_dir
    monkeypatch.setattr(cann_standin, "mindspore_version", lambda _d: "2.11.0")
    with pytest.raises(YouzhiError, match="written for mindspore 2.10.0, this venv has 2.11.0"):
        cann_standin.ensure_standin(log=lambda *_: None)
