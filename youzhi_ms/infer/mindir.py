"""MindIR export of the prefill and decode graphs, and a runner that serves generation from the exported files.

Export directory layout (written atomically):
  prefill.mindir   ids [B, None] int32 -> logits [B, S, V] and the two caches [.., S, ..]   (dynamic prompt length S)
  decode.mindir    ids [B, 1] int32, pos [B] int32, the two caches -> logits [B, 1, V], the two updated caches
                   with the caches preallocated at max_seq_len T:
                     GQA: k_cache, v_cache [L, B, kv_heads, T, head_dim]
                     MLA: c_kv [L, B, T, kv_lora_rank] and k_pe [L, B, T, qk_rope_head_dim] (the latent cache only)
  manifest.json    model type, graph files, input/output names + shapes + dtypes, cache bytes per token, T, B
  config.json      the model's config (so the runner knows the cache layout), plus the tokenizer files

The decode graph's state is exactly its cache inputs/outputs (no hidden Parameters), so a serving loop owns the memory.
`MindIRRunner` offers the `EagerRunner` interface (`cfg`, `prefill`, `decode`, `to_state`) used by
`youzhi_ms.infer.generate.generate`: caches handed to `to_state` are padded (or zero-tail trimmed) to the exported T and
batches smaller than the exported B are padded with copies of the first row whose results are dropped.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from youzhi_ms.cli import path_problem
from youzhi_ms.checkpoint.hf import copy_side_files, read_config, write_json
from youzhi_ms.checkpoint.mindspore_ckpt import load_model
from youzhi_ms.config import MLAConfig, load_any_config
from youzhi_ms.contract import read_config_json
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_dir, check_output_dir
from youzhi_ms.infer.generate import EagerRunner, cache_shapes, decode_state
from youzhi_ms.models.base import DecodeCell, PrefillCell
from youzhi_ms.models.gqa import GQACausalLM
from youzhi_ms.models.mla import MLACausalLM
from youzhi_ms.progress import step
from youzhi_ms.runtime import quiet_known_warnings

MANIFEST = "manifest.json"
FORMAT = "youzhi-mindir/1"
PREFILL_FILE = "prefill.mindir"
DECODE_FILE = "decode.mindir"
DEFAULT_MAX_SEQ_LEN = 2048


def cache_layout(cfg, batch: int, max_seq_len: Optional[int]):
    """(names, shapes, seq_axis) of the two cache tensors; a None max_seq_len gives the dynamic prefill shapes."""
    names = (MLACausalLM if isinstance(cfg, MLAConfig) else GQACausalLM).cache_names
    shapes, seq_axis = cache_shapes(cfg, batch, max_seq_len)
    return names, tuple(list(s) for s in shapes), seq_axis


def cache_values_per_token(cfg) -> int:
    """Cached numbers per token (all layers): MLA L*(r + rope); GQA L*2*kv*d."""
    if isinstance(cfg, MLAConfig):
        return cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim


def _io(name, shape, dtype="float32"):
    return {"name": name, "shape": list(shape), "dtype": dtype}


def build_manifest(cfg, model_dir: str, batch: int, max_seq_len: int) -> dict:
    kind = "mla" if isinstance(cfg, MLAConfig) else "gqa"
    names, dyn, _ = cache_layout(cfg, batch, None)
    _, fixed, seq_axis = cache_layout(cfg, batch, max_seq_len)
    per_tok = cache_values_per_token(cfg)
    V = cfg.vocab_size
    return {
        "format": FORMAT,
        "model_type": kind,
        "architecture": (cfg.raw.get("architectures") or [cfg.raw.get("model_type")])[0],
        "source_model_dir": os.path.abspath(model_dir),
        "batch": batch,
        "max_seq_len": max_seq_len,
        "cache_seq_axis": seq_axis,
        "cache_bytes_per_token": {"fp32": per_tok * 4, "bf16": per_tok * 2},
        "cache_values_per_token": per_tok,
        "cache_bytes_resident_fp32": per_tok * 4 * batch * max_seq_len,
        "graphs": {
            "prefill": {"file": PREFILL_FILE,
                        "inputs": [_io("input_ids", [batch, None], "int32")],
                        "outputs": [_io("logits", [batch, None, V])] + [_io(n, s) for n, s in zip(names, dyn)]},
            "decode": {"file": DECODE_FILE,
                       "inputs": [_io("input_ids", [batch, 1], "int32"), _io("pos", [batch], "int32")]
                       + [_io(n, s) for n, s in zip(names, fixed)],
                       "outputs": [_io("logits", [batch, 1, V])] + [_io(n, s) for n, s in zip(names, fixed)]},
        },
        "notes": "None in a shape is a dynamic dimension (the prompt length). Caches are float32 in the graphs; the "
                 "bf16 figure is the deployment size of the same cache. pos[b] is the absolute position of the new "
                 "token; cache rows > pos[b] are ignored (masked). Each graph file embeds its own copy of the "
                 "weights.",
    }


def export_mindir(model_dir: str, out_dir: str, batch: int = 1, max_seq_len: Optional[int] = None,
                  verify: bool = False, log=print, overwrite: bool = False) -> dict:
    """Export prefill + decode graphs of a source (GQA) or converted (MLA) model directory; returns the manifest."""
    inputs = [("--model", model_dir)]
    check_output_dir(out_dir, overwrite, inputs)
    cfg = load_any_config(read_config(model_dir), os.path.join(model_dir, "config.json"))
    if max_seq_len is None:
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
    if batch < 1 or max_seq_len < 2:
        raise YouzhiError(f"--batch {batch} / --max-seq-len {max_seq_len}: need batch >= 1 and max-seq-len >= 2")
    if max_seq_len > cfg.max_position_embeddings:
        raise YouzhiError(f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}; use a smaller --max-seq-len")
    model, cfg = load_model(model_dir, table_len=max_seq_len)
    manifest = build_manifest(cfg, model_dir, batch, max_seq_len)
    _, shapes, _ = cache_layout(cfg, batch, max_seq_len)
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        # ms.export compiles the graph first, which is most of its time (~20 s per graph for SmolLM2, load ~8)
        with step("exporting the prefill graph (compiles it first)"), quiet_known_warnings():
            ms.export(PrefillCell(model), ms.Tensor(shape=[batch, None], dtype=ms.int32),
                      file_name=os.path.join(tmp, PREFILL_FILE[:-len(".mindir")]), file_format="MINDIR")
        with step(f"exporting the decode graph (cache length {max_seq_len}; compiles it first)"), \
                quiet_known_warnings():
            ms.export(DecodeCell(model), ops.zeros((batch, 1), ms.int32), ops.zeros((batch,), ms.int32),
                      ops.zeros(tuple(shapes[0]), ms.float32), ops.zeros(tuple(shapes[1]), ms.float32),
                      file_name=os.path.join(tmp, DECODE_FILE[:-len(".mindir")]), file_format="MINDIR")
        for f in (PREFILL_FILE, DECODE_FILE):
            if not os.path.isfile(os.path.join(tmp, f)):
                raise YouzhiError(f"MindSpore did not write {f} (models over 2 GB are split into external weight "
                                  "files by some versions); export a smaller model or report the MindSpore version")
            _usual_permissions(os.path.join(tmp, f))
            manifest["graphs"]["prefill" if f == PREFILL_FILE else "decode"]["bytes"] = \
                os.path.getsize(os.path.join(tmp, f))
        write_json(os.path.join(tmp, "config.json"), cfg.raw)
        copy_side_files(model_dir, tmp)
        manifest["exported_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        manifest["mindspore_version"] = ms.__version__
        if verify:
            with step("verifying the exported graphs against the eager model (compiles each graph once more)"), \
                    quiet_known_warnings():
                manifest["verify"] = verify_export(tmp, model, cfg, manifest)
            log(f"verify: {manifest['verify']}")
        write_json(os.path.join(tmp, MANIFEST), manifest)
    return manifest


def _usual_permissions(path: str) -> None:
    """ms.export leaves its files readable by their owner only (0400); give them the mode any new file gets here."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def verify_export(export_dir: str, model, cfg, manifest: dict, prompt_len: int = 6, steps: int = 3) -> dict:
    """Max |MindIR - eager| of prefill and a few decode steps on a random prompt (raises when they disagree)."""
    runner = MindIRRunner(export_dir, manifest=manifest)
    eager = EagerRunner(model, cfg)
    B, T = manifest["batch"], manifest["max_seq_len"]
    prompt_len = min(prompt_len, T - steps)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, prompt_len + steps))
    errs = {}
    la, *prefilled = runner.prefill(ids[:, :prompt_len])
    le, *prefilled_eager = eager.prefill(ids[:, :prompt_len])
    errs["prefill_logits"] = float(np.abs(la - le).max())
    caches, caches_eager = decode_state(runner, prefilled, B, T), decode_state(eager, prefilled_eager, B, T)
    worst = 0.0
    for s in range(steps):
        p = prompt_len + s
        pos = np.full(B, p)
        l1, *caches = runner.decode(ids[:, p:p + 1], pos, *caches)
        l2, *caches_eager = eager.decode(ids[:, p:p + 1], pos, *caches_eager)
        worst = max(worst, float(np.abs(l1 - l2).max()))
    errs["decode_logits"] = worst
    scale = float(np.abs(le).max()) or 1.0
    if max(errs.values()) > 1e-3 * scale:
        raise YouzhiError(f"the exported graphs disagree with the eager model ({errs}); the export is not usable — "
                          "report this with the MindSpore version")
    return errs


@contextlib.contextmanager
def _native_stderr_kept_on_success():
    """MindSpore's C++ logs its own `[ERROR] CORE ...` lines to fd 2 before a failed load raises: they are held in a
    temp file and dropped when the load fails (our one error line says it), shown as usual when it succeeds."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                data = held.read()
                if data:
                    os.write(2, data)


def _pos(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{v!r} is not a positive integer")
    return v


class MindIRRunner:
    """Generation from an export directory through `ms.load` + `nn.GraphCell` (same interface as EagerRunner)."""

    def __init__(self, export_dir: str, manifest: Optional[dict] = None):
        self.dir = os.path.abspath(export_dir)
        path = os.path.join(self.dir, MANIFEST)
        if manifest is None:
            if not os.path.isdir(self.dir):
                        raise YouzhiError(f"MindIR export {export_dir} {path_problem(export_dir, 'folder')}")
            if not os.path.isfile(path):
                raise YouzhiError(f"{export_dir} has no {MANIFEST}; it is not a directory written by "
                                  "tools/export_mindir.py (run that first)")
            manifest = read_config_json(path)
        if manifest.get("format") != FORMAT:
            raise YouzhiError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; re-export with this "
                              "version of tools/export_mindir.py")
        self.manifest = manifest
        cfg_path = os.path.join(self.dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise YouzhiError(f"{export_dir} has no config.json; re-run tools/export_mindir.py")
        self.cfg = load_any_config(read_config_json(cfg_path), cfg_path)
        try:
            self.batch, self.max_seq_len = _pos(manifest["batch"]), _pos(manifest["max_seq_len"])
            self.seq_axis = _pos(manifest["cache_seq_axis"])
            files = {key: manifest["graphs"][key]["file"] for key in ("prefill", "decode")}
            if not all(isinstance(f, str) and os.path.basename(f) == f and f not in ("", ".", "..")
                       for f in files.values()):
                raise ValueError(f"graph files {files} must be plain file names in the export directory")
        except (KeyError, TypeError, ValueError) as exc:
            raise YouzhiError(f"{path} is damaged ({exc!r}); re-run tools/export_mindir.py") from None
        self.tokenizer_dir = self.dir
        self.graphs = {}
        for key in ("prefill", "decode"):
            f = os.path.join(self.dir, files[key])
            if not os.path.isfile(f):
                raise YouzhiError(f"{f} is missing; the export is incomplete — re-run tools/export_mindir.py")
            try:
                with _native_stderr_kept_on_success():
                    self.graphs[key] = nn.GraphCell(ms.load(f))
            except (RuntimeError, ValueError) as exc:
                raise YouzhiError(f"{f} could not be loaded by MindSpore {ms.__version__} ({exc}); re-export it "
                                  "with this MindSpore version") from None

    def _pad_rows(self, arr: np.ndarray, what: str) -> np.ndarray:
        n = arr.shape[0]
        if n > self.batch:
            raise YouzhiError(f"{what} has batch {n} but the graphs were exported for batch {self.batch}; re-export "
                              f"with --batch {n}")
        if n < self.batch:
            arr = np.concatenate([arr, np.repeat(arr[:1], self.batch - n, 0)])
        return arr

    def prefill(self, ids: np.ndarray):
        ids = np.asarray(ids)
        if ids.shape[1] > self.max_seq_len:
            raise YouzhiError(f"the prompt has {ids.shape[1]} tokens, more than the exported max_seq_len "
                              f"{self.max_seq_len}; shorten it or re-export with a larger --max-seq-len")
        n = ids.shape[0]
        logits, a, b = self.graphs["prefill"](ms.Tensor(self._pad_rows(ids, "the prompt").astype(np.int32)))
        return logits.asnumpy()[:n], a.asnumpy()[:, :n], b.asnumpy()[:, :n]

    def to_state(self, arr: np.ndarray):
        """A cache from `cache_shapes(cfg, n, T')` -> the exported [.., B, .., max_seq_len, ..] state tensor."""
        arr = np.asarray(arr, np.float32)
        ax, T = self.seq_axis, self.max_seq_len
        if arr.shape[ax] > T:
            tail = [slice(None)] * arr.ndim
            tail[ax] = slice(T, None)
            if np.any(arr[tuple(tail)]):
                raise YouzhiError(f"the cache holds more than the exported max_seq_len {T} tokens; re-export with a "
                                  "larger --max-seq-len")
            keep = [slice(None)] * arr.ndim
            keep[ax] = slice(0, T)
            arr = arr[tuple(keep)]
        elif arr.shape[ax] < T:
            pad = [(0, 0)] * arr.ndim
            pad[ax] = (0, T - arr.shape[ax])
            arr = np.pad(arr, pad)
        n = arr.shape[1]
        if n > self.batch:
            raise YouzhiError(f"cache batch {n} exceeds the exported batch {self.batch}; re-export with --batch {n}")
        if n < self.batch:
            arr = np.concatenate([arr, np.repeat(arr[:, :1], self.batch - n, 1)], 1)
        return ms.Tensor(np.ascontiguousarray(arr))

    def decode(self, ids: np.ndarray, pos: np.ndarray, *caches):
        ids, pos = np.asarray(ids), np.asarray(pos).reshape(-1)
        if int(pos.max()) >= self.max_seq_len:
            raise YouzhiError(f"generation reached the exported max_seq_len {self.max_seq_len}; ask for fewer new "
                              "tokens or re-export with a larger --max-seq-len")
        n = ids.shape[0]
        logits, a, b = self.graphs["decode"](ms.Tensor(self._pad_rows(ids, "the decode input").astype(np.int32)),
                                             ms.Tensor(self._pad_rows(pos, "pos").astype(np.int32)), *caches)
        return logits.asnumpy()[:n], a, b
