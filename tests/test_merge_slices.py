"""The slices of a model / pipeline parallel run, and their way back to one Hugging Face directory.

1. tools/merge_slices.py on a simulated run: MindSpore compiles a tiny dp 2 x mp 2 x pp 2 plan (tools/dryrun.py,
   DryRun level 0) and saves its strategy files; the student's weights are cut into the 8 ranks' slices on CPU by our
   reading of the compiled layouts (train.parallel.rank_slice: device matrix, tensor map, optimizer-shard group); the
   tool merges them back with MindSpore's merge_pipeline_strategys + unified_safetensors, and the Hugging Face
   directory it writes equals the unsplit student bit for bit. With and without the parallel optimizer.
2. The trainer itself, as rank 5 of that plan under DryRun: it compiles its step, reads only the slices it holds, and
   its checkpoint holds exactly those slices (equal to the cut of 1.), with MindSpore's strategy file next to it.
Cost: three tiny compiles (two of two stages, one trainer rank), ~40 s on an idle machine.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from youzhi_ms.checkpoint.hf import HFCheckpoint, save_safetensors, write_json
from youzhi_ms.models.names import ms_to_hf
from youzhi_ms.train.parallel import param_shapes, rank_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=256, hidden_size=128,
               intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               max_position_embeddings=256, rope_interleave=True, tie_word_embeddings=False, rms_norm_eps=1e-6,
               n_routed_experts=None, first_k_dense_replace=2, torch_dtype="float32")
DP, MP, PP = 2, 2, 2


def _tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def _opt_group(dev_matrix, tensor_map, size):
    """The strategy file's optimizer-shard size: 0 = none, -1 = every replica of the model-parallel block."""
    if size != -1:
        return max(size, 1)
    used = 1
    for k in tensor_map:
        if k != -1:
            used *= dev_matrix[len(dev_matrix) - 1 - k]
    return int(np.prod(dev_matrix)) // used


@pytest.mark.parametrize("parallel_optimizer", [False, True], ids=["mp-pp", "mp-pp-parallel-optimizer"])
def test_slices_merge_back_bit_for_bit(tmp_path, parallel_optimizer):
    # the student the run started from: a DeepSeek-V3 directory with arbitrary float32 weights
    student = tmp_path / "student"
    student.mkdir()
    write_json(str(student / "config.json"), STUDENT)
    (student / "tokenizer_config.json").write_text("{}")
    shapes = param_shapes(STUDENT)
    rng = np.random.default_rng(7)
    full = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    save_safetensors(str(student / "model.safetensors"), [(ms_to_hf(n, "mla"), a) for n, a in full.items()])
    # MindSpore compiles the plan and writes its strategy files
    cfg = {"run_mode": "sft", "context": {"device_target": "Ascend"}, "output_dir": str(tmp_path / "run"),
           "parallel": {"parallel_mode": "semi_auto_parallel", "enable_parallel_optimizer": parallel_optimizer},
           "parallel_config": {"data_parallel": DP, "model_parallel": MP, "pipeline_stage": PP, "micro_batch_num": 2},
           "runner_config": {"batch_size": 1, "seq_length": 32}, "model": {"student": str(student),
                                                                           "save_dtype": "fp32"}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    r = _tool("dryrun.py", "--config", str(run / "run_config.yaml"), "--jobs", "2", "--strategy-dir",
              str(run / "strategy"))
    assert r.returncode == 0, r.stderr[-3000:]
    # every rank's slices, cut by the compiled layouts, as the trainer writes them
    from mindspore.parallel import build_searched_strategy
    world, per_stage = DP * MP * PP, DP * MP
    layouts = {}
    for f in sorted((run / "strategy").glob("*.ckpt")):
        for name, lay in build_searched_strategy(str(f)).items():
            if name in shapes:
                stage = int(f.stem.rsplit("_", 1)[1]) // per_stage
                layouts[name] = (stage, list(lay.dev_matrix[0].dim), list(lay.tensor_map[0].dim),
                                 int(lay.opt_weight_shard_size), int(lay.opt_weight_shard_step))
    assert set(layouts) == set(shapes)
    assert any(size != 0 for *_, size, _ in layouts.values()) == parallel_optimizer
    step_dir = run / "checkpoint" / "step_00000010"
    for rank in range(world):
        stage, local = divmod(rank, per_stage)
        d = step_dir / f"rank_{rank}"
        d.mkdir(parents=True)
        items = [(n, rank_slice(full[n], dm, tm, local, _opt_group(dm, tm, size)))
                 for n, (st, dm, tm, size, _) in layouts.items() if st == stage]
        save_safetensors(str(d / "student.safetensors"), items)
        write_json(str(d / "trainer_state.json"), {"step": 10, "world_size": world})
    r = _tool("merge_slices.py", "--run", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    out = HFCheckpoint(str(run / "hf_model"))
    assert sorted(out.names()) == sorted(ms_to_hf(n, "mla") for n in full)
    for n, a in full.items():
        b = out.get(ms_to_hf(n, "mla"))
        assert b.dtype == np.float32 and np.array_equal(a, b), n
    # the student's config.json, with the contract's dense MoE keys stated (checkpoint.hf.write_model_files)
    from youzhi_ms.contract import dense_moe_keys
    assert json.loads((run / "hf_model" / "config.json").read_text()) == {**STUDENT, **dense_moe_keys(2, 256)}
    assert (run / "hf_model" / "tokenizer_config.json").is_file()
    # a missing rank is one clear error, and nothing is written
    os.rename(step_dir / "rank_5", tmp_path / "rank_5")
    r = _tool("merge_slices.py", "--run", str(run), "--step", "10", "--output-dir", str(tmp_path / "other"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "rank(s) [5]" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "other").exists()


TRAINER_CHILD = r"""
import sys
import mindspore as ms
ms.set_device("Ascend")
from mindspore.communication import init
init()
from youzhi_ms.train.run_config import load_run_config
from youzhi_ms.train.trainer import Trainer
t = Trainer(load_run_config(sys.argv[1]), rank=int(sys.argv[2]), world=8)
t._check_output(False, False)
t._setup_models()
t._setup_data()
t._prepare_output(False, False)
print("SAVED", t.save_checkpoint(0))
"""


def test_the_trainer_writes_exactly_its_compiled_slices(tmp_path):
    from test_trainer import WORDS, make_teacher
    from youzhi_ms.dryrun.cann_standin import ensure_standin
    make_teacher(str(tmp_path / "teacher"), L=2)
    student = tmp_path / "student"
    student.mkdir()
    cfg = dict(STUDENT, vocab_size=128, hidden_size=64, intermediate_size=96)
    write_json(str(student / "config.json"), cfg)
    rng = np.random.default_rng(3)
    full = {n: rng.standard_normal(s).astype(np.float32) for n, s in param_shapes(cfg).items()}
    save_safetensors(str(student / "model.safetensors"), [(ms_to_hf(n, "mla"), a) for n, a in full.items()])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (student / f).write_bytes((tmp_path / "teacher" / f).read_bytes())
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(60))
                                                     for i in range(20)))
    run = tmp_path / "run"
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({
        "output_dir": str(run), "run_mode": "distill", "context": {"device_target": "Ascend"},
        "parallel": {"parallel_mode": "semi_auto_parallel"},
        "parallel_config": {"data_parallel": DP, "model_parallel": MP, "pipeline_stage": PP, "micro_batch_num": 2},
        "runner_config": {"batch_size": 1, "seq_length": 32, "progress": False},
        "model": {"student": str(student)}, "distill": {"teacher": str(tmp_path / "teacher"), "lmbda": 0.0},
        "train_dataset": {"data_path": str(tmp_path / "corpus.txt")}}))
    env = ensure_standin(log=lambda *_: None).child_env()
    env.update(MS_SIMULATION_LEVEL="0", RANK_SIZE="8", RANK_ID="5", GLOG_v="3",
               PYTHONPATH=os.pathsep.join([ROOT, env["PYTHONPATH"]]))
    r = subprocess.run([sys.executable, "-c", TRAINER_CHILD, str(y), "5"], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "SAVED" in r.stdout, (r.stdout + r.stderr)[-3000:]
    from mindspore.parallel import build_searched_strategy
    from safetensors.numpy import load_file
    strategy = build_searched_strategy(str(run / "strategy" / "strategy_rank_5.ckpt"))
    saved = load_file(str(run / "checkpoint" / "step_00000000" / "rank_5" / "student.safetensors"))
    # stage 1 of 2 holds layer 1, the final norm and the head; rank 5 is its second rank (dp 0, mp 1)
    assert sorted(saved) == sorted(n for n in full if n.startswith(("decoder.layers.1.", "decoder.final_layernorm",
                                                                     "output_layer")))
    for name, arr in saved.items():
        lay = strategy[name]
        want = rank_slice(full[name], list(lay.dev_matrix[0].dim), list(lay.tensor_map[0].dim), 5 - 4)
        assert np.array_equal(arr, want), name
    assert saved["output_layer.weight"].shape == (64, 64)  # the vocabulary split over model parallel
    moments = load_file(str(run / "checkpoint" / "step_00000000" / "rank_5" / "optimizer.safetensors"))
    assert sorted(moments) == sorted(f"adam_{m}.{n}" for m in "mv" for n in saved)
