"""tools/merge_slices.py on a simulated model / pipeline parallel run: MindSpore compiles a tiny dp 2 x mp 2 x pp 2 plan
(tools/dryrun.py, DryRun level 0) and saves its strategy files; the student's weights are cut into the 8 ranks'
slices on CPU by our own reading of the compiled layouts (device matrix, tensor map, optimizer-shard group); the tool
merges them back with MindSpore's merge_pipeline_strategys + unified_safetensors, and the Hugging Face directory it
writes equals the unsplit student bit for bit. With and without the parallel optimizer (which also shards weights).
Cost: two tiny compiles of two stages each, ~30 s.
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
from youzhi_ms.train.parallel import param_shapes

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


def _slice(a, dev_matrix, tensor_map, local):
    """Rank `local`'s block of `a`: tensor dim d is split over device-matrix axis len-1-tensor_map[d] (MindSpore's
    right-to-left numbering); ranks enumerate the device matrix row-major."""
    coords = np.unravel_index(local, dev_matrix)
    index = []
    for d, k in enumerate(tensor_map):
        if k == -1:
            index.append(slice(None))
            continue
        axis = len(dev_matrix) - 1 - k
        n = a.shape[d] // dev_matrix[axis]
        index.append(slice(coords[axis] * n, (coords[axis] + 1) * n))
    return a[tuple(index)]


def _opt_shard(a, dev_matrix, tensor_map, size, step, local):
    """The parallel optimizer's piece along dim 0: size -1 = all the replicas of the model-parallel block; members of
    a group are `step` ranks apart."""
    if size == 0:
        return a
    if size == -1:
        used = 1
        for k in tensor_map:
            if k != -1:
                used *= dev_matrix[len(dev_matrix) - 1 - k]
        size = int(np.prod(dev_matrix)) // used
    if size <= 1:
        return a
    k = (local // max(step, 1)) % size
    n = a.shape[0] // size
    return a[k * n:(k + 1) * n]


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
        items = [(n, np.ascontiguousarray(_opt_shard(_slice(full[n], dm, tm, local), dm, tm, size, step, local)))
                 for n, (st, dm, tm, size, step) in layouts.items() if st == stage]
        save_safetensors(str(d / "student.safetensors"), items)
        write_json(str(d / "trainer_state.json"), {"step": 10, "world_size": world})
    r = _tool("merge_slices.py", "--run", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    out = HFCheckpoint(str(run / "hf_model"))
    assert sorted(out.names()) == sorted(ms_to_hf(n, "mla") for n in full)
    for n, a in full.items():
        b = out.get(ms_to_hf(n, "mla"))
        assert b.dtype == np.float32 and np.array_equal(a, b), n
    assert json.loads((run / "hf_model" / "config.json").read_text()) == STUDENT
    assert (run / "hf_model" / "tokenizer_config.json").is_file()
    # a missing rank is one clear error, and nothing is written
    os.rename(step_dir / "rank_5", tmp_path / "rank_5")
    r = _tool("merge_slices.py", "--run", str(run), "--step", "10", "--output-dir", str(tmp_path / "other"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "rank(s) [5]" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "other").exists()
