"""The one literal Hugging Face <-> MindFormers parameter-name table, used in both directions.

`{i}` stands for the layer index. Source (Llama/Qwen2) and MLA (DeepSeek-V3) models share the embedding, norm, MLP and
output entries; their attention entries differ.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

from youzhi_ms.errors import YouzhiError

COMMON: List[Tuple[str, str]] = [
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    ("model.norm.weight", "decoder.final_layernorm.weight"),
    ("lm_head.weight", "output_layer.weight"),
    ("model.layers.{i}.input_layernorm.weight", "decoder.layers.{i}.input_layernorm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "decoder.layers.{i}.pre_mlp_layernorm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "decoder.layers.{i}.mlp.gating.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "decoder.layers.{i}.mlp.hidden.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "decoder.layers.{i}.mlp.linear_fc2.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "decoder.layers.{i}.self_attention.linear_proj.weight"),
    ("model.layers.{i}.self_attn.o_proj.bias", "decoder.layers.{i}.self_attention.linear_proj.bias"),
]

GQA: List[Tuple[str, str]] = COMMON + [
    ("model.layers.{i}.self_attn.q_proj.weight", "decoder.layers.{i}.self_attention.linear_q.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "decoder.layers.{i}.self_attention.linear_q.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "decoder.layers.{i}.self_attention.linear_k.weight"),
    ("model.layers.{i}.self_attn.k_proj.bias", "decoder.layers.{i}.self_attention.linear_k.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "decoder.layers.{i}.self_attention.linear_v.weight"),
    ("model.layers.{i}.self_attn.v_proj.bias", "decoder.layers.{i}.self_attention.linear_v.bias"),
]

MLA: List[Tuple[str, str]] = COMMON + [
    ("model.layers.{i}.self_attn.q_proj.weight", "decoder.layers.{i}.self_attention.linear_q_proj.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "decoder.layers.{i}.self_attention.linear_q_proj.bias"),
    ("model.layers.{i}.self_attn.q_a_proj.weight", "decoder.layers.{i}.self_attention.linear_q_down_proj.weight"),
    ("model.layers.{i}.self_attn.q_a_proj.bias", "decoder.layers.{i}.self_attention.linear_q_down_proj.bias"),
    ("model.layers.{i}.self_attn.q_a_layernorm.weight", "decoder.layers.{i}.self_attention.q_layernorm.weight"),
    ("model.layers.{i}.self_attn.q_b_proj.weight", "decoder.layers.{i}.self_attention.linear_q_up_proj.weight"),
    ("model.layers.{i}.self_attn.q_b_proj.bias", "decoder.layers.{i}.self_attention.linear_q_up_proj.bias"),
    ("model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
     "decoder.layers.{i}.self_attention.linear_kv_down_proj.weight"),
    ("model.layers.{i}.self_attn.kv_a_proj_with_mqa.bias", "decoder.layers.{i}.self_attention.linear_kv_down_proj.bias"),
    ("model.layers.{i}.self_attn.kv_a_layernorm.weight", "decoder.layers.{i}.self_attention.kv_layernorm.weight"),
    ("model.layers.{i}.self_attn.kv_b_proj.weight", "decoder.layers.{i}.self_attention.linear_kv_up_proj.weight"),
]

_LAYER = re.compile(r"\.(\d+)\.")


def _compile(table):
    fwd: Dict[str, str] = {}
    for hf, ms_name in table:
        fwd[hf] = ms_name
    bwd = {v: k for k, v in fwd.items()}
    assert len(bwd) == len(fwd), "name table must be a bijection"
    return fwd, bwd


_TABLES = {"gqa": _compile(GQA), "mla": _compile(MLA)}


def _map(name: str, table: Dict[str, str], kind: str, direction: str) -> str:
    m = _LAYER.search(name)
    key = _LAYER.sub(".{i}.", name, count=1) if m else name
    if key not in table:
        raise YouzhiError(f"unexpected {direction} parameter {name!r} for a {kind} model; the checkpoint has tensors "
                          "this architecture does not define (wrong model type or an unsupported variant)")
    out = table[key]
    return out.replace("{i}", m.group(1)) if m else out


def hf_to_ms(name: str, kind: str = "gqa") -> str:
    return _map(name, _TABLES[kind][0], kind, "Hugging Face")


def ms_to_hf(name: str, kind: str = "gqa") -> str:
    return _map(name, _TABLES[kind][1], kind, "MindSpore")
