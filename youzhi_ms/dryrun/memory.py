"""Per-rank device memory of a compiled training plan: parameters, gradients and optimizer states counted from the
slices MindSpore's parallel compiler assigned to the rank, plus an activation estimate (a model, stated below).

Counted from the compiled slices (exact for what the graph holds, not for allocator overheads):
  param_bytes      every parameter the rank holds (student and teacher), slice shape x dtype size, divided by the
                   optimizer-shard group size when the parallel optimizer shards it (MindSpore's level 1 shards the
                   weights as well as the moments)
  grad_bytes       the gradient buffers: the pipeline accumulators (`accu_grads.*`) when there are pipeline stages,
                   otherwise the gradients of the trainable slices, which all exist when the update runs
  optimizer_bytes  the AdamW moments (`adam_m.*`, `adam_v.*`) and the step's scalars

Activation estimate (float32 compute, as the trainer runs; b = batch_size rows per micro-batch per data-parallel rank,
S = seq_length, D = hidden, I = intermediate, H = heads, m = model_parallel; 4 bytes per element). What one student
layer keeps for its backward pass, per micro-batch, read off the operators of sharded_model.py:
  layer input, input-norm output, residual, pre-MLP-norm output         4 b S D
  query halves after RoPE (nope + rope), the shared rope key tiled       b S H (nope + 2 rope) / m
  to the local heads, k_nope and v from kv_b, the attention output       + b S H (nope + 2 v) / m
  latent before and after kv_layernorm                                   + 2 b S r
  softmax output (probabilities)                                         + b H S^2 / m
  MLP gate, up, SiLU(gate), SiLU(gate) * up                              + 4 b S I / m
(GQA: q, k, v per head and the output, H d / m each, in place of the MLA terms.) With recompute_config.recompute only
the layer input is kept and one layer is recomputed at a time. The teacher is frozen: its activations are freed layer
by layer, so it adds one layer's forward working set. In the 1F1B pipeline schedule stage s (of p) holds the
activations of min(micro_batch_num, p - s) micro-batches. The last stage adds the loss: the generalized JSD's
backward keeps 11 float32 [b S, V / m] tensors (student logits after the max shift and their exp, log P_S, log P_T,
the two shifted mixtures and their exps, log M, and the two log-ratio differences); SFT keeps 4. One layer's worth is
added as backward working space. With the parallel optimizer (MindSpore's level 1) the weights are stored sharded and
all-gathered for use; the gathered student weights stay until the backward pass has used them, so the whole stage's
gathered student slices are added, plus the largest gathered teacher block (a layer, or the embedding / head), which
is freed after its forward use. Not modelled: allocator fragmentation, communication buffers, workspace of fused
kernels; MindSpore's own figure needs DryRun level 1 on a machine with CANN.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

from youzhi_ms.contract import MLA_MODEL_TYPE, parse_config
from youzhi_ms.train.run_config import RunConfig

GiB = 1024 ** 3
CARD_BYTES = 64 * GiB  # Ascend 910B: 64 GB HBM per card
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "bool": 1, "float64": 8}


def human(n: int) -> str:
    """Bytes as GB (2^30) or, below 1 GB, MB (2^20), for messages."""
    return f"{n / GiB:.1f} GB" if n >= GiB else f"{n / 2 ** 20:.1f} MB"


def dtype_bytes(name: str) -> int:
    key = name.lower().replace("mindspore.", "")
    for k, v in _DTYPE_BYTES.items():
        if key.endswith(k):
            return v
    raise ValueError(f"unknown dtype {name}")


def parse_memory(text) -> Optional[int]:
    """'58GB' / '512MB' / 58 (GB) -> bytes, as MindSpore reads max_device_memory (1 GB = 1024^3 bytes)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return int(float(text) * GiB)
    t = str(text).strip().upper()
    for unit, mult in (("GB", GiB), ("MB", 1024 ** 2), ("KB", 1024)):
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * mult)
    return int(float(t) * GiB)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def tensor_bytes(p: dict) -> int:
    return _prod(p["slice_shape"]) * dtype_bytes(p["dtype"]) // max(int(p.get("opt_shard", 1)), 1)


def classify(name: str) -> str:
    if name.startswith(("adam_m.", "adam_v.")) or name == "step_hyper":
        return "optimizer"
    if name.startswith("accu_grads."):
        return "grad"
    return "param"


def layers_on_pp_stage(num_layers: int, pp: int, pp_stage: int) -> int:
    """Layers on pipeline stage `pp_stage` of `pp`: layer i is on stage i * pp // L (sharded_model.set_pp_stages)."""
    return sum(1 for i in range(num_layers) if i * pp // num_layers == pp_stage)


def _layer_index(name: str) -> Optional[int]:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and i > 0 and parts[i - 1] == "decoder" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def gathered_bytes(parameters: List[dict], layer_scale: Optional[Dict[str, float]] = None) -> int:
    """Bytes the parallel optimizer's all-gathers materialise at peak (see the module docstring)."""
    student, teacher_layers, teacher_other = 0, {}, 0
    for p in parameters:
        if int(p.get("opt_shard", 1)) <= 1 or classify(p["name"]) != "param" or p["name"] == "step_hyper":
            continue
        b = _prod(p["slice_shape"]) * dtype_bytes(p["dtype"])
        layer = _layer_index(p["name"])
        if p["name"].startswith("teacher."):
            if layer is None:
                teacher_other = max(teacher_other, b)
            else:
                teacher_layers[layer] = teacher_layers.get(layer, 0) + b
        else:
            if layer is not None and layer_scale:
                b = int(round(b * layer_scale["student"]))
            student += b
    return student + max([teacher_other] + list(teacher_layers.values()))


def held_bytes(parameters: List[dict], pipeline: bool, trainable: Optional[set] = None,
               layer_scale: Optional[Dict[str, float]] = None) -> Dict[str, int]:
    """{'param', 'grad', 'optimizer'} bytes of one rank. `layer_scale` {'student': f, 'teacher': f} multiplies the
    per-layer tensors of a depth-reduced compile up to the real depth (every layer of a model has the same slices)."""
    out = {"param": 0, "grad": 0, "optimizer": 0}
    for p in parameters:
        b = tensor_bytes(p)
        if layer_scale and _layer_index(p["name"]) is not None:
            b = int(round(b * layer_scale["teacher" if p["name"].startswith("teacher.") else "student"]))
        kind = classify(p["name"])
        out[kind] += b
        if kind == "param" and not pipeline and trainable is not None and p["name"] in trainable:
            out["grad"] += b
    return out


def _dims(cfg: Mapping) -> dict:
    """The model sizes the estimate uses (the letters of the module docstring), read from a Hugging Face config dict
    through the contract."""
    f = parse_config(cfg)
    mla = f["model_type"] == MLA_MODEL_TYPE
    d = dict(mla=mla, D=f["hidden_size"], I=f["intermediate_size"], H=f["num_attention_heads"], V=f["vocab_size"],
             L=f["num_hidden_layers"])
    if mla:
        d.update(nope=f["qk_nope_head_dim"], rope=f["qk_rope_head_dim"], v=f["v_head_dim"], r=f["kv_lora_rank"])
    else:
        d.update(kv=f["num_key_value_heads"], hd=f["head_dim"])
    return d


def layer_elements(cfg: dict, b: int, S: int, m: int) -> int:
    """Elements one layer keeps for its backward pass per micro-batch (see the module docstring)."""
    d = _dims(cfg)
    n = 4 * b * S * d["D"] + 4 * b * S * d["I"] // m + b * d["H"] * S * S // m
    if d["mla"]:
        n += b * S * d["H"] * (d["nope"] + 2 * d["rope"]) // m + b * S * d["H"] * (d["nope"] + 2 * d["v"]) // m
        n += 2 * b * S * d["r"]
    else:
        n += b * S * (2 * d["H"] + 2 * d["kv"]) * d["hd"] // m
    return n


def activation_bytes(run: RunConfig, student: dict, teacher: Optional[dict], dp: int, mp: int, pp: int, pp_stage: int,
                     micro_batch_num: int, gathered: int = 0) -> Dict[str, int]:
    b = int(run.runner.batch_size)
    S = int(run.runner.seq_length)
    recompute = bool(run.recompute)
    in_flight = min(micro_batch_num, pp - pp_stage) if pp > 1 else 1
    sd = _dims(student)
    per_layer = 4 * layer_elements(student, b, S, mp)
    kept = 4 * b * S * sd["D"] if recompute else per_layer
    n_layers = layers_on_pp_stage(sd["L"], pp, pp_stage)
    saved = in_flight * n_layers * kept
    working = per_layer
    if teacher is not None and layers_on_pp_stage(_dims(teacher)["L"], pp, pp_stage):
        working += 4 * layer_elements(teacher, b, S, mp)
    loss = 0
    if pp_stage == pp - 1:
        loss = 4 * (11 if teacher is not None else 4) * b * S * sd["V"] // mp
    return {"saved": saved, "working": working, "loss": loss, "gathered_weights": gathered, "in_flight": in_flight,
            "per_layer": per_layer, "total": saved + working + loss + gathered}
