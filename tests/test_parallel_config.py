"""The shipped yaml configs, `--set` overrides, and the parallel layout (strategy tables as data; CPU refusals)."""
import json
import os

import pytest
import yaml

from youzhi_ms.errors import YouzhiError
from youzhi_ms.train.parallel import check_device, check_world, plan_parallel
from youzhi_ms.train.run_config import DEFAULTS, load_run_config, parse_override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = os.path.join(ROOT, "yaml_configs")
MODELS = os.path.join(YAMLS, "model_configs")
MINDFORMERS_SECTIONS = {"seed", "output_dir", "run_mode", "context", "parallel", "parallel_config", "model",
                        "runner_config", "optimizer", "lr_schedule", "callbacks", "train_dataset"}


def _model(name):
    with open(os.path.join(MODELS, name, "config.json")) as f:
        return json.load(f)


def _mla(**kw):
    """A complete dense DeepSeek-V3 config dict (the contract reads every size), with `kw` overriding."""
    return dict({"model_type": "deepseek_v3", "hidden_size": 64, "kv_lora_rank": 64, "qk_rope_head_dim": 8,
                 "qk_nope_head_dim": 16, "v_head_dim": 16}, **kw)


@pytest.mark.parametrize("name,device,devices,mode,models", [
    ("distill_smollm2_mla.yaml", "CPU", None, "distill", None),
    ("sft_smollm2_mla.yaml", "CPU", None, "sft", None),
    ("distill_qwen2_5_7b_mla.yaml", "Ascend", 8, "distill", ("qwen2_5_7b_mla_r320", "qwen2_5_7b", 28)),
    ("distill_qwen2_5_7b_mla_16npu.yaml", "Ascend", 16, "distill", ("qwen2_5_7b_mla_r320", "qwen2_5_7b", 28)),
    ("distill_qwen2_5_14b_mla_16npu.yaml", "Ascend", 16, "distill", ("qwen2_5_14b_mla_r736", "qwen2_5_14b", 48)),
])
def test_shipped_yaml_configs(name, device, devices, mode, models):
    path = os.path.join(YAMLS, name)
    with open(path) as f:
        raw = yaml.safe_load(f)
    assert MINDFORMERS_SECTIONS <= set(raw), MINDFORMERS_SECTIONS - set(raw)
    assert set(raw) <= set(DEFAULTS)
    if mode == "distill":
        assert {"teacher", "beta", "lmbda", "temperature", "max_new_tokens"} <= set(raw["distill"])
    cfg = load_run_config(path)
    assert cfg["run_mode"] == mode and cfg["context"]["device_target"] == device
    pc = cfg["parallel_config"]
    if devices is None:  # CPU: data parallel over however many workers msrun starts
        assert pc["model_parallel"] == pc["pipeline_stage"] == 1 and pc["data_parallel"] is None
        check_device(pc, "CPU")
        for world in (1, 2):
            plan = plan_parallel(pc, _mla(kv_lora_rank=112, num_hidden_layers=30, num_attention_heads=9,
                                          intermediate_size=1536, vocab_size=49152), world_size=world)
            check_world(plan, world, "CPU")
            assert plan.data_parallel == world and not plan.semi_auto
        return
    assert cfg["parallel"]["parallel_mode"] == "semi_auto_parallel"
    dp, mp, pp = pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"]
    assert dp * mp * pp == devices and mp > 1 and pp > 1
    student, teacher, layers = models
    assert cfg["dry_run"] == {"student_config": f"yaml_configs/model_configs/{student}",
                              "teacher_config": f"yaml_configs/model_configs/{teacher}"}
    assert cfg["runner_config"]["gradient_accumulation_steps"] == 1 and cfg["distill"]["lmbda"] == 0.0
    plan = plan_parallel(pc, _model(student), _model(teacher))
    assert plan.device_num == devices
    check_world(plan, devices, "Ascend")
    with pytest.raises(YouzhiError, match="CPU backend does not have"):
        check_world(plan, devices, "CPU")
    with pytest.raises(YouzhiError, match=f"= {devices} devices, but the job has 4 worker"):
        check_world(plan, 4, "Ascend")
    col, row, rep = ((dp, 1), (mp, 1)), ((dp, mp), (1, mp)), ((dp, 1), (1, 1))
    s = plan.strategies
    a = f"decoder.layers.{layers - 1}.self_attention."
    assert (s[a + "linear_q_proj"], s[a + "linear_kv_down_proj"], s[a + "linear_kv_up_proj"],
            s[a + "linear_proj"]) == (col, rep, col, row)
    assert (s["decoder.layers.0.mlp.gating"], s["decoder.layers.0.mlp.hidden"],
            s["decoder.layers.0.mlp.linear_fc2"]) == (col, col, row)
    assert s["teacher.decoder.layers.3.self_attention.linear_k"] == col
    assert s["teacher.decoder.layers.3.self_attention.linear_proj"] == row
    assert s["embedding.word_embeddings"] == ((dp, 1), (1, 1)) and s["output_layer"] == col
    # every linear of both models has a strategy: L x (4 MLA + 3 MLP) + L x (4 GQA + 3 MLP) + embeddings + heads
    assert len(s) == layers * 7 + layers * 7 + 4
    pp_stages = [plan.pp_stage_of[f"decoder.layers.{i}"] for i in range(layers)]
    assert pp_stages == [0] * (layers // 2) + [1] * (layers // 2) and plan.pp_stage_of["output_layer"] == pp - 1
    assert plan.micro_batch_num >= pp


def test_strategy_table_is_a_pure_function_of_the_config():
    mla = _mla(kv_lora_rank=64, q_lora_rank=32, num_hidden_layers=4, num_attention_heads=8, intermediate_size=64,
               vocab_size=100)
    pc = {"data_parallel": 1, "model_parallel": 4, "pipeline_stage": 1, "vocab_emb_dp": False,
          "use_seq_parallel": True}
    a, b = plan_parallel(pc, mla), plan_parallel(dict(pc), dict(mla))
    assert a == b
    s = a.strategies
    assert s["decoder.layers.0.self_attention.linear_q_down_proj"] == ((1, 1), (1, 1))  # q latent replicated
    assert s["decoder.layers.0.self_attention.linear_q_up_proj"] == ((1, 1), (4, 1))
    assert "decoder.layers.0.self_attention.linear_q_proj" not in s
    assert s["decoder.layers.0.self_attention.linear_proj"] == ((1, 4), (1, 4), (4, 1))  # sequence parallel output
    assert s["embedding.word_embeddings"] == ((1, 1), (4, 1))  # vocab split over mp
    assert plan_parallel({"data_parallel": None}, mla, world_size=6).data_parallel == 6


@pytest.mark.parametrize("pc,teacher_kv,expect", [
    ({"model_parallel": 3}, 4, "does not divide the student's num_attention_heads (28)"),
    ({"model_parallel": 4}, 2, "does not divide the teacher's num_key_value_heads (2)"),
    ({"pipeline_stage": 2, "micro_batch_num": 1}, 4, "micro_batch_num (1) must be >= pipeline_stage"),
    ({"pipeline_stage": 40, "micro_batch_num": 40}, 4, "exceeds the student's 28 layers"),
])
def test_bad_layouts_are_refused(pc, teacher_kv, expect):
    pc = dict({"data_parallel": 1}, **pc)
    teacher = dict(_model("qwen2_5_7b"), num_key_value_heads=teacher_kv)
    with pytest.raises(YouzhiError) as e:
        plan_parallel(pc, _model("qwen2_5_7b_mla_r320"), teacher)
    assert expect in str(e.value)


def test_plan_and_memory_read_model_configs_through_the_contract():
    """One reader: the plan and the dry run's activation estimate take Hugging Face config dicts and validate them
    with contract.parse_config, so the trainer's configs (their .raw) plan the same, and a dict in another key
    vocabulary (SourceConfig's num_layers / num_heads) or a broken one is refused with the contract's error."""
    from youzhi_ms.config import load_any_config
    from youzhi_ms.dryrun.memory import layer_elements
    pc = {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2}
    student, teacher = _model("qwen2_5_7b_mla_r320"), _model("qwen2_5_7b")
    objs = load_any_config(student), load_any_config(teacher)
    assert plan_parallel(pc, objs[0].raw, objs[1].raw) == plan_parallel(pc, student, teacher)
    other_vocabulary = {k: v for k, v in teacher.items() if k not in ("num_hidden_layers", "num_attention_heads")}
    other_vocabulary.update(num_layers=teacher["num_hidden_layers"], num_heads=teacher["num_attention_heads"])
    with pytest.raises(YouzhiError, match="the teacher's config: no 'num_hidden_layers' key"):
        plan_parallel(pc, student, other_vocabulary)
    with pytest.raises(YouzhiError, match="num_key_value_heads must be a positive integer"):
        layer_elements(dict(teacher, num_key_value_heads="4"), 1, 16, 1)
    # the GQA estimate uses head_dim = hidden_size / heads when the config has none, as parse_config defines it
    b, S, m, D, H, kv, I = 1, 16, 2, teacher["hidden_size"], teacher["num_attention_heads"], \
        teacher["num_key_value_heads"], teacher["intermediate_size"]
    assert "head_dim" not in teacher
    assert layer_elements(teacher, b, S, m) == (4 * b * S * D + 4 * b * S * I // m + b * H * S * S // m
                                                + b * S * (2 * H + 2 * kv) * (D // H) // m)


def test_model_parallel_is_refused_on_cpu_with_the_reason():
    with pytest.raises(YouzhiError) as e:
        check_device({"model_parallel": 2, "pipeline_stage": 1}, "CPU")
    msg = str(e.value)
    assert "semi-auto parallel" in msg and "CPU backend" in msg and "model_parallel: 1" in msg
    check_device({"model_parallel": 2, "pipeline_stage": 2}, "Ascend")


def test_overrides_parse_as_yaml_scalars():
    cfg = load_run_config(os.path.join(YAMLS, "distill_smollm2_mla.yaml"), [
        "runner_config.max_steps=20", "lr_schedule.learning_rate=1e-4", "distill.teacher=/x/teacher",
        "optimizer.betas=[0.8, 0.9]", "lr_schedule.kv_layernorm_learning_rate=null", "model.trainable=attention",
        "callbacks.CheckpointMonitor.save_checkpoint_steps=5", "callbacks.LossMonitor.per_print_times=1",
        "runner_config.progress=false"])
    assert cfg["runner_config"]["max_steps"] == 20 and cfg["lr_schedule"]["learning_rate"] == 1e-4
    assert cfg["distill"]["teacher"] == "/x/teacher" and cfg["optimizer"]["betas"] == [0.8, 0.9]
    assert cfg["lr_schedule"]["kv_layernorm_learning_rate"] is None and cfg["model"]["trainable"] == "attention"
    ck = next(c for c in cfg["callbacks"] if c["type"] == "CheckpointMonitor")
    assert ck == {"type": "CheckpointMonitor", "save_checkpoint_steps": 5, "keep_checkpoint_max": 2}
    assert cfg["runner_config"]["progress"] is False
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)  # YAML 1.1 would give the string '1e-3'
    assert parse_override("a.b= x=y ") == (["a", "b"], "x=y")


@pytest.mark.parametrize("overrides,expect", [
    (["runner_config.max_stepz=3"],
     "unknown config key 'runner_config.max_stepz' in --set (did you mean 'max_steps'?)"),
    (["runner_config=3"], "'runner_config' is a section"),
    (["runner_config.max_steps.x=3"], "unknown config key 'runner_config.max_steps.x'"),
    (["nokey"], "expected section.key=value"),
    (["distill.beta=2"], "distill.beta must be <= 1.0"),
    (["lr_schedule.learning_rate=fast"], "lr_schedule.learning_rate must be a number"),
    (["run_mode=pretrain"], "run_mode must be one of"),
    (["distill.lmbda=0.5", "distill.max_new_tokens=256"], "must be smaller than runner_config.seq_length"),
    (["callbacks.LossMonitor.every=3"], "unknown config key 'callbacks.LossMonitor.every'"),
    (["model.recompute=true"], "'model.recompute' in --set is now 'recompute_config.recompute'"),
    (["recompute_config.recompute=1"], "recompute_config.recompute must be true or false"),
])
def test_bad_overrides_one_clear_error(overrides, expect):
    with pytest.raises(YouzhiError) as e:
        load_run_config(os.path.join(YAMLS, "distill_smollm2_mla.yaml"), overrides)
    assert expect in str(e.value)


def test_unknown_yaml_key_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("runner_config:\n  max_steps: 3\n  batchsize: 4\n")
    with pytest.raises(YouzhiError) as e:
        load_run_config(str(p))
    assert f"'runner_config.batchsize' in {p}" in str(e.value) and "batch_size" in str(e.value)


@pytest.mark.parametrize("args,expect", [
    (["tools/train.py --config x.yaml", "2", "2"], "expected 1, 2, 6 or 9 arguments"),
    ([], "expected 1, 2, 6 or 9 arguments"),
    (["tools/train.py", "two"], "WORKER_NUM must be a non-negative integer"),
    (["tools/train.py", "2", "8118", "LOG", "yes", "7200"], "JOIN must be True or False, got 'yes'"),
    (["tools/train.py", "2", "8118", "LOG", "True", "soon"], "CLUSTER_TIME_OUT must be an integer"),
    (["tools/train.py", "2", "4", "127.0.0.1", "8118", "0", "LOG", "True", "60"], "LOCAL_WORKER (4) <= WORKER_NUM (2)"),
    (["tools/train.py", "0"], "WORKER_NUM must be at least 1"),
])
def test_msrun_launcher_refuses_bad_arguments(args, expect):
    import subprocess
    r = subprocess.run(["bash", "run_scripts/msrun_launcher.sh", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and expect in r.stderr, r.stderr


_MSRUN = "--worker_num={} --local_worker_num={}"
_TAIL = "--master_port={} --log_dir={} --join={} --cluster_time_out={} tools/train.py --config x.yaml"


@pytest.mark.parametrize("args,expect", [
    # MindFormers' four forms and its defaults (8 workers, port 8118, output/msrun_log, JOIN False, 7200 s); the
    # one-node forms leave master address and node rank to msrun, the multi-node form passes them
    ([], _MSRUN.format(8, 8) + " " + _TAIL.format(8118, "output/msrun_log", "False", 7200)),
    (["4"], _MSRUN.format(4, 4) + " " + _TAIL.format(8118, "output/msrun_log", "False", 7200)),
    (["4", "9000", "LOGS", "True", "60"], _MSRUN.format(4, 4) + " " + _TAIL.format(9000, "LOGS", "True", 60)),
    (["16", "8", "10.0.0.1", "9000", "1", "LOGS", "false", "-1"],
     _MSRUN.format(16, 8) + " --master_addr=10.0.0.1 --node_rank=1 " + _TAIL.format(9000, "LOGS", "False", -1)),
    (["8", "8", "10.0.0.1", "9000", "0", "LOGS", "True", "60"],  # all workers local: one node
     _MSRUN.format(8, 8) + " " + _TAIL.format(9000, "LOGS", "True", 60)),
    (["1"], _MSRUN.format(1, 1) + " " + _TAIL.format(8118, "output/msrun_log", "False", 7200)),
])
def test_msrun_launcher_mindformers_forms(tmp_path, args, expect):
    """The msrun command line each form produces (a recording stand-in for msrun via YOUZHI_MSRUN)."""
    import subprocess
    fake = tmp_path / "msrun"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, YOUZHI_MSRUN=str(fake))
    r = subprocess.run(["bash", os.path.join(ROOT, "run_scripts/msrun_launcher.sh"), "tools/train.py --config x.yaml",
                        *args], cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == expect
