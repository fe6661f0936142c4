"""Hugging Face <-> MindSpore (MindFormers names) checkpoints, and building a loaded MindSpore model from a directory.

A MindSpore checkpoint directory is the HF directory with tensors renamed by `models/names.py` and stored as MindSpore
safetensors (what `ms.save_checkpoint(..., format="safetensors")` writes and `ms.load_checkpoint` reads); config.json
and tokenizer files are carried along so the directory is self-describing.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np

from youzhi_ms.checkpoint.hf import IGNORED_SUFFIXES, HFCheckpoint, ShardedWriter, copy_side_files, write_json
from youzhi_ms.config import MLAConfig, load_any_config
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_dir, check_free_space, check_output_dir
from youzhi_ms.models.names import hf_to_ms, ms_to_hf
from youzhi_ms.progress import ProgressBar, step


def model_kind(cfg) -> str:
    return "mla" if isinstance(cfg, MLAConfig) else "gqa"


def is_ms_layout(ckpt: HFCheckpoint) -> bool:
    return any(n.startswith(("decoder.", "embedding.")) for n in ckpt.names())


def convert_dir(input_dir: str, output_dir: str, dtype: str = "keep", reverse: bool = False,
                progress: bool = True, overwrite: bool = False) -> int:
    """HF -> MindSpore names (or back with reverse=True); dtype 'keep' copies the stored bits (bit-exact round trip).
    `overwrite`: replace an earlier output at `output_dir` (see fsutil for the rule)."""
    inputs = [("--input-dir", input_dir)]
    check_output_dir(output_dir, overwrite, inputs)
    ckpt = HFCheckpoint(input_dir)
    cfg = load_any_config(ckpt.config, os.path.join(ckpt.dir, "config.json"))
    kind = model_kind(cfg)
    if is_ms_layout(ckpt) != reverse:
        want = "MindSpore (decoder.*)" if reverse else "Hugging Face (model.*)"
        raise YouzhiError(f"{input_dir} does not hold {want} tensor names; "
                          f"{'drop' if not reverse else 'add'} --reverse")
    mapper = ms_to_hf if reverse else hf_to_ms
    names = [n for n in ckpt.names() if not n.endswith(IGNORED_SUFFIXES)]
    item = {"fp32": 4, "fp16": 2, "bf16": 2}.get(dtype)
    total = sum(ckpt.file_range(n)[2] if item is None else int(np.prod(ckpt.shape(n) or (1,))) * item for n in names)
    # a shard is written as a body file, then copied behind its header: the last shard exists twice for a moment
    check_free_space(output_dir, total + min(total, ShardedWriter.DEFAULT_SHARD_BYTES), f"{output_dir}")
    with atomic_output_dir(output_dir, overwrite, inputs) as tmp:
        writer = ShardedWriter(tmp, dtype="fp32" if dtype == "keep" else dtype)
        for name in ProgressBar(names, desc="convert", unit="tensor", disable=not progress):
            new = mapper(name, kind)
            if dtype == "keep":
                writer.add_file_range(new, ckpt.dtype(name), ckpt.shape(name), *ckpt.file_range(name), source_name=name)
            else:
                writer.add_blocks(new, ckpt.shape(name), ckpt.row_blocks(name))
        with step(f"writing the tensors to {output_dir}") if progress else contextlib.nullcontext():
            writer.close()  # copies the bytes the loop above only recorded: seconds for a 0.5 GB model
        config = dict(ckpt.config)
        if dtype != "keep":
            config["torch_dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
        write_json(os.path.join(tmp, "config.json"), config)
        copy_side_files(input_dir, tmp)
    return len(names)


# MindSpore (and models/, which imports it) is imported inside the functions that build or fill a model: convert_dir
# only renames tensors, and tools/convert_hf_weights.py should not pay MindSpore's import (seconds) for it.
def build_model(cfg, dtype=None, table_len: Optional[int] = None, use_fused=None):
    import mindspore as ms
    dtype = dtype or ms.float32
    if isinstance(cfg, MLAConfig):
        from youzhi_ms.models.mla import MLACausalLM
        return MLACausalLM(cfg, dtype=dtype, use_fused=use_fused, table_len=table_len)
    from youzhi_ms.models.gqa import GQACausalLM
    return GQACausalLM(cfg, dtype=dtype, use_fused=use_fused, table_len=table_len)


def load_weights(model, ckpt: HFCheckpoint, kind: str, progress: bool = False) -> None:
    """Fill every model parameter from the checkpoint (HF or MindSpore names), checking shapes; refuse leftovers."""
    import mindspore as ms
    ms_layout = is_ms_layout(ckpt)
    used = set()
    params = list(model.get_parameters())
    for p in ProgressBar(params, desc="load", unit="tensor", disable=not progress):
        src = p.name if ms_layout else ms_to_hf(p.name, kind)
        if src not in ckpt:
            raise YouzhiError(f"{ckpt.dir}: tensor {src} is missing; the checkpoint is incomplete or does not match "
                              "config.json")
        arr = ckpt.get(src, expect_shape=tuple(p.shape))
        p.set_data(ms.Tensor(arr, p.dtype))
        used.add(src)
    tied_head = "output_layer.weight" if ms_layout else "lm_head.weight"
    extra = [n for n in ckpt.names() if n not in used and not n.endswith(IGNORED_SUFFIXES)
             and not (n == tied_head and getattr(model, "tied", False))]
    if extra:
        raise YouzhiError(f"{ckpt.dir}: tensor {extra[0]} (and {len(extra) - 1} more) is not used by a "
                          f"{kind} model built from config.json; the architecture has parts youzhi_ms does not "
                          "support (e.g. q/k norms) or config.json is wrong")


def load_model(model_dir: str, dtype=None, table_len: Optional[int] = None, progress: bool = False):
    """(model, cfg) for a HF or MindSpore-layout directory, source (GQA) or converted (MLA)."""
    ckpt = HFCheckpoint(model_dir)
    cfg = load_any_config(ckpt.config, os.path.join(ckpt.dir, "config.json"))
    from youzhi_ms.models.layers import weights_to_be_loaded
    with weights_to_be_loaded():  # load_weights fills every parameter or raises
        model = build_model(cfg, dtype=dtype, table_len=table_len)
    load_weights(model, ckpt, model_kind(cfg), progress=progress)
    model.set_train(False)
    return model, cfg


def hf_state_dict_from_model(model, kind: str) -> dict:
    """{hf_name: float32 array} from a MindSpore model (used to write trained models back as HF directories)."""
    out = {}
    for p in model.get_parameters():
        out[ms_to_hf(p.name, kind)] = p.asnumpy().astype(np.float32)
    return out
