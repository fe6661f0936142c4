"""Every exact step of the GQA -> MLA conversion, checked against transformers' logits of the source model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mindspore as ms
from youzhi_ms.runtime import init_context

init_context("graph")

from transformers import (DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,  # noqa: E402
                          Qwen2ForCausalLM)

from youzhi_ms.checkpoint.hf import HFCheckpoint  # noqa: E402
from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402
from youzhi_ms.config import SourceConfig, rope_inv_freq, rope_tables  # noqa: E402
from youzhi_ms.convert import attention_np as A  # noqa: E402
from youzhi_ms.convert.calibrate import layer_weights  # noqa: E402
from youzhi_ms.convert.latent import half_split_index, kv_group  # noqa: E402
from youzhi_ms.convert.pipeline import ConvertOptions, convert  # noqa: E402
from youzhi_ms.errors import YouzhiError  # noqa: E402
from youzhi_ms.convert.rorope import band_moments, pca  # noqa: E402
from youzhi_ms.models.base import DecodeCell, PrefillCell  # noqa: E402

from helpers import ROOT, V, add_tiny_tokenizer, calib, make_source, randomize, rel_err  # noqa: E402


def ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# ---------------------------------------------------------------- numpy source forward with a pluggable attention
def numpy_forward(path, ids, attention):
    """The source model in float64 through the converter's own layer arithmetic, with a pluggable attention."""
    ck = HFCheckpoint(path)
    cfg = SourceConfig.from_hf(ck.config)
    eps = cfg.rms_norm_eps
    inv, att = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None, cfg.max_position_embeddings)
    cos, sin = rope_tables(inv, ids.shape[1], att)
    h = ck.get("model.embed_tokens.weight")[ids].astype(np.float64)
    for i in range(cfg.num_layers):
        w = {k: v.astype(np.float64) for k, v in layer_weights(ck, i, cfg).items()}
        x = A.rms_norm(h, w["ln1"], eps)
        h = A.block_output(h, attention(x, w, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cos, sin, inv), w, eps)
    h = A.rms_norm(h, ck.get("model.norm.weight").astype(np.float64), eps)
    head = ck.get("lm_head.weight") if "lm_head.weight" in ck else ck.get("model.embed_tokens.weight")
    return h @ head.T


# The maths of stages 1 and 2 written out in full, as references for the exactness checks below (the converter itself
# builds the compressed layer directly and never forms these matrices).
def latent_selectors(n_heads: int, n_kv: int, d: int) -> np.ndarray:
    """W_UK (= W_UV) stacked per head: [n_heads, d, L]; head h has the identity on its KV block (latent.py)."""
    sel = np.zeros((n_heads, d, n_kv * d))
    for h in range(n_heads):
        g = kv_group(h, n_heads, n_kv)
        sel[h, :, g * d:(g + 1) * d] = np.eye(d)
    return sel


def exact_rotation_keep_all(n_kv: int, d: int, moments_per_freq):
    """The RoRoPE rotation alone, with every component keeping RoPE at its own frequency (F = 1): the exact reference.

    Returns U_rot [L, L] and the frequency index of every column pair (columns 2m, 2m+1 rotate at omega_{freq[m]})."""
    L = n_kv * d
    xi, yi = half_split_index(n_kv, d)
    U_rot = np.zeros((L, L))
    freq = []
    col = 0
    for j, H in enumerate(moments_per_freq):
        _, U = pca(H)
        for m in range(U.shape[1]):
            U_rot[xi[:, j], col], U_rot[yi[:, j], col + 1] = U[:, m], U[:, m]
            freq.append(j)
            col += 2
    return U_rot, np.array(freq)


def plain_attention(x, w, H, kv, d, cos, sin, inv):
    return A.gqa_attention(x, w, H, kv, d, cos, sin)


def latent_attention(x, w, H, kv, d, cos, sin, inv):
    """Stage 1 (latent.py): queries read the stacked KV latent through the selectors; RoPE per KV block ('big RoPE')."""
    N, S, _ = x.shape
    sel = latent_selectors(H, kv, d)  # [H, d, L]
    q = A.rope_half(A.linear(x, w["wq"], w.get("bq")).reshape(N, S, H, d).transpose(0, 2, 1, 3), cos, sin)
    cK = A.linear(x, w["wk"], w.get("bk")).reshape(N, S, kv, d).transpose(0, 2, 1, 3)
    cK = A.rope_half(cK, cos, sin).transpose(0, 2, 1, 3).reshape(N, S, kv * d)  # latent, rotated per block
    cV = A.linear(x, w["wv"], w.get("bv"))
    q_lat = np.einsum("nhsd,hdl->nhsl", q, sel)
    p = A.causal_softmax(q_lat @ cK[:, None].transpose(0, 1, 3, 2) / np.sqrt(d))
    v = np.einsum("hdl,nsl->nhsd", sel, cV)
    return A.linear((p @ v).transpose(0, 2, 1, 3).reshape(N, S, -1), w["wo"])


def rotated_attention(x, w, H, kv, d, cos, sin, inv):
    """Stage 2 (rorope.py): the RoRoPE rotation with every component keeping RoPE at its own frequency (F = 1): must be
    exact."""
    N, S, _ = x.shape
    L = kv * d
    K = A.linear(x, w["wk"], w.get("bk")).reshape(N * S, L)
    moments = band_moments(K, kv, d, [(j, 1) for j in range(d // 2)])
    U_rot, freq = exact_rotation_keep_all(kv, d, moments)
    assert np.allclose(U_rot.T @ U_rot, np.eye(L), atol=1e-10)
    sel = latent_selectors(H, kv, d) @ U_rot  # W_UK[h] U_rot
    ck = (K @ U_rot).reshape(N, S, L)  # rotated latent, columns (2m, 2m+1) rotate at omega_{freq[m]}
    ang = np.arange(S)[:, None] * inv[freq][None, :]
    c_, s_ = np.cos(ang), np.sin(ang)
    ck = A.rope_interleaved(ck, c_, s_)
    q = A.linear(x, w["wq"], w.get("bq")).reshape(N, S, H, d)
    q_lat = A.rope_interleaved(np.einsum("nshd,hdl->nhsl", q, sel), c_, s_)
    p = A.causal_softmax(q_lat @ ck[:, None].transpose(0, 1, 3, 2) / np.sqrt(d))
    cV = A.linear(x, w["wv"], w.get("bv"))
    v = np.einsum("hdl,nsl->nhsd", latent_selectors(H, kv, d), cV)
    return A.linear((p @ v).transpose(0, 2, 1, 3).reshape(N, S, -1), w["wo"])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_shared_latent_and_rotation_are_exact(kind, tmp_path):
    model = make_source(kind, tmp_path)
    ids = calib(1, 2, 24)
    ref = ref_logits(model, ids)
    assert rel_err(numpy_forward(str(tmp_path), ids, plain_attention), ref) <= 1e-5
    assert rel_err(numpy_forward(str(tmp_path), ids, latent_attention), ref) <= 1e-5
    assert rel_err(numpy_forward(str(tmp_path), ids, rotated_attention), ref) <= 1e-5


def test_half_split_index_layout():
    xi, yi = half_split_index(2, 8)
    assert xi.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]] and yi.tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]]


def _convert(src, out, **kw):
    base = dict(kv_lora_rank=56, qk_rope_dim=8, freqfold="2", calib_ids=calib(), progress=False)
    base.update(kw)
    return convert(str(src), str(out), ConvertOptions(**base))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_full_rank_latent_pca_equals_partial_rope_stage(kind, tmp_path):
    make_source(kind, tmp_path / "src")
    full = 2 * 2 * 16 - 8
    _convert(tmp_path / "src", tmp_path / "partial_rope", kv_lora_rank=full, skip_pca=True)
    _convert(tmp_path / "src", tmp_path / "pca", kv_lora_rank=full)
    ids = calib(2, 2, 32)
    a = load_model(str(tmp_path / "partial_rope"))[0](ms.Tensor(ids, ms.int32)).asnumpy()
    b = load_model(str(tmp_path / "pca"))[0](ms.Tensor(ids, ms.int32)).asnumpy()
    assert rel_err(b, a) <= 1e-4


@pytest.mark.parametrize("kind,stats", [("llama", "cascaded"), ("qwen2", "cascaded"), ("qwen2", "standard")])
def test_single_kv_head_full_rope_conversion_is_exact(kind, stats, tmp_path):
    """With one KV head and qk_rope_dim = head_dim (c = 1, F = 1) no component loses RoPE and the maximal rank keeps
    the whole latent, so the exported MLA (Qwen2: with q/k/v biases through q_proj.bias and kv_a bias) must reproduce
    the source end to end, whichever model the statistics come from."""
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(head_dim=8, **common)) if kind == "llama" else \
        Qwen2ForCausalLM(Qwen2Config(**common))
    randomize(model, 0, std=0.2).save_pretrained(tmp_path / "src")
    _convert(tmp_path / "src", tmp_path / "mla", kv_lora_rank=8, qk_rope_dim=8, freqfold="1", stats=stats)
    if kind == "qwen2":
        names = set(HFCheckpoint(str(tmp_path / "mla")).names())
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.kv_a_proj_with_mqa.bias"} <= names
    ids = calib(3, 2, 32)
    out = load_model(str(tmp_path / "mla"))[0](ms.Tensor(ids, ms.int32)).asnumpy()
    assert rel_err(out, ref_logits(model, ids)) <= 1e-4


@pytest.fixture(scope="module")
def llama_exact(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    make_source("llama", d / "src")
    rep = _convert(d / "src", d / "exact", kv_lora_rank=40, freqfold="adaptive", proxy_seqs=2)
    return d, rep


def test_exact_export_matches_transformers_without_latent_norm(llama_exact):
    d, rep = llama_exact
    cfg = json.load(open(d / "exact" / "config.json"))
    assert cfg["model_type"] == "deepseek_v3" and cfg["youzhi"]["no_kv_layernorm"]
    assert len(cfg["youzhi"]["freqfold"]) == 2
    ref_model = DeepseekV3ForCausalLM.from_pretrained(d / "exact").eval()
    for layer in ref_model.model.layers:
        layer.self_attn.kv_a_layernorm = torch.nn.Identity()
    ids = calib(4, 2, 40)
    ours = load_model(str(d / "exact"))[0](ms.Tensor(ids, ms.int32)).asnumpy()
    assert rel_err(ours, ref_logits(ref_model, ids)) <= 1e-4


def test_absorbed_decode_on_converted_model(llama_exact):
    d, _ = llama_exact
    model, cfg = load_model(str(d / "exact"))
    ids = calib(5, 1, 20)
    naive = model(ms.Tensor(ids, ms.int32)).asnumpy()
    _, c, pe = PrefillCell(model)(ms.Tensor(ids[:, :4], ms.int32))
    T = 32
    cc = np.zeros((cfg.num_layers, 1, T, cfg.kv_lora_rank), np.float32)
    pc = np.zeros((cfg.num_layers, 1, T, cfg.qk_rope_head_dim), np.float32)
    cc[:, :, :4], pc[:, :, :4] = c.asnumpy(), pe.asnumpy()
    cc, pc = ms.Tensor(cc), ms.Tensor(pc)
    step = DecodeCell(model)
    for p in range(4, 20):
        out, cc, pc = step(ms.Tensor(ids[:, p:p + 1], ms.int32), ms.Tensor([p], ms.int32), cc, pc)
        assert rel_err(out.asnumpy()[:, 0], naive[:, p]) <= 1e-5
    assert cc.shape[-1] + pc.shape[-1] == 40 + 8  # the cache is r + rope per token per layer


def test_deepseek_export_loads_in_transformers(llama_exact, tmp_path):
    d, _ = llama_exact
    rep = _convert(d / "src", tmp_path / "ds", kv_lora_rank=40, export="deepseek")
    assert all(L["refit"]["rel_err_refit"] <= L["refit"]["rel_err_norm_only"] for L in rep["layers"])
    ref_model = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ds").eval()  # stock class, stock norm
    names = set(HFCheckpoint(str(tmp_path / "ds")).names())
    assert "model.layers.0.self_attn.kv_a_layernorm.weight" in names
    assert not any(n.endswith(".bias") for n in names)
    # the latent scale lives in kv_b_proj, the norm weight starts at 1 (optimizer-friendly split, see refit_kv_b)
    ck = HFCheckpoint(str(tmp_path / "ds"))
    assert all(np.all(ck.get(f"model.layers.{i}.self_attn.kv_a_layernorm.weight") == 1.0) for i in range(2))
    ids = calib(6, 2, 40)
    ours = load_model(str(tmp_path / "ds"))[0](ms.Tensor(ids, ms.int32)).asnumpy()
    assert rel_err(ours, ref_logits(ref_model, ids)) <= 1e-4


def _cli(*args):
    return subprocess.run([sys.executable, "tools/convert_gqa_to_mla.py", *args], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.parametrize("args,expect", [
    (["--kv-lora-rank", "57"], "out of range"),
    (["--kv-lora-rank", "16", "--freqfold", "3"], "power-of-two multiple"),
    (["--kv-lora-rank", "16", "--freqfold", "16"], "at most head_dim/2"),
    (["--kv-lora-rank", "16", "--qk-rope-dim", "6"], "divide head_dim"),
    (["--kv-lora-rank", "16", "--calib-text", "setup.py", "--calib-tokens", "100000"], "calib-tokens"),
])
def test_bad_options_one_clear_error_no_output(args, expect, tmp_path):
    make_source("llama", tmp_path / "src")
    add_tiny_tokenizer(tmp_path / "src")  # a tokenizer is needed for the text-based check
    rope = [] if "--qk-rope-dim" in args else ["--qk-rope-dim", "8"]
    r = _cli("--hf-dir", str(tmp_path / "src"), "--output-dir", str(tmp_path / "out"), *rope, *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and expect in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_qk_norm_source_refused(tmp_path):
    make_source("llama", tmp_path / "src")
    cfg = json.load(open(tmp_path / "src" / "config.json"))
    cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    json.dump(cfg, open(tmp_path / "src" / "config.json", "w"))
    r = _cli("--hf-dir", str(tmp_path / "src"), "--output-dir", str(tmp_path / "out"), "--kv-lora-rank", "16")
    assert r.returncode == 2 and "q/k RMSNorm" in r.stderr and not (tmp_path / "out").exists()


def test_non_finite_weights_and_calibration_statistics_refused(tmp_path, monkeypatch):
    from youzhi_ms.checkpoint.hf import save_safetensors
    from youzhi_ms.convert import attention_np
    from youzhi_ms.errors import YouzhiError
    make_source("llama", tmp_path / "src")
    # finite weights whose calibration streams still overflow (here: an MLP that returns inf) stop at the statistics
    real = attention_np.mlp
    monkeypatch.setattr(attention_np, "mlp", lambda x, w: real(x, w) * np.inf)
    with pytest.raises(YouzhiError, match="non-finite calibration statistics"):
        _convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(attention_np, "mlp", real)
    # a weight holding Inf is refused by name when it is read, before any statistics
    ck = HFCheckpoint(str(tmp_path / "src"))
    tensors = [(n, ck.get(n)) for n in ck.names()]
    tensors = [(n, np.full_like(a, np.inf) if n.endswith("layers.0.self_attn.k_proj.weight") else a) for n, a in tensors]
    save_safetensors(str(tmp_path / "src" / "model.safetensors"), tensors)
    with pytest.raises(YouzhiError, match=r"model.layers.0.self_attn.k_proj.weight holds \d+ NaN/Inf"):
        _convert(tmp_path / "src", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_interrupted_conversion_resumes_to_the_same_result(tmp_path, monkeypatch):
    from youzhi_ms.convert import attention_np
    make_source("llama", tmp_path / "src")
    _convert(tmp_path / "src", tmp_path / "once", kv_lora_rank=40)
    real = attention_np.mlp
    work = tmp_path / ".resumed.partial"

    def flaky(x, w):
        # interrupt inside the second layer: layer 0's record is committed, layer 1's work has begun
        if (work / "records.jsonl").exists() and (work / "records.jsonl").read_text().count("\n") == 1:
            raise KeyboardInterrupt
        return real(x, w)

    monkeypatch.setattr(attention_np, "mlp", flaky)
    with pytest.raises(KeyboardInterrupt):
        _convert(tmp_path / "src", tmp_path / "resumed", kv_lora_rank=40)
    assert not (tmp_path / "resumed").exists()
    assert (work / "records.jsonl").exists() and (work / "hidden_00001.npz").exists()
    # a kill while appending layer 1's record: its hidden states are saved, its record line is torn
    (work / "hidden_00002.npz").write_bytes((work / "hidden_00001.npz").read_bytes())
    with open(work / "records.jsonl", "a") as f:
        f.write('{"layer": 1, "bands": [[0, 2], [2')
    monkeypatch.setattr(attention_np, "mlp", real)
    _convert(tmp_path / "src", tmp_path / "resumed", kv_lora_rank=40)
    assert not (tmp_path / ".resumed.partial").exists()
    a, b = HFCheckpoint(str(tmp_path / "once")), HFCheckpoint(str(tmp_path / "resumed"))
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        np.testing.assert_array_equal(a.get(n), b.get(n))


def test_converter_package_imports_no_evaluation_and_no_mindspore():
    """The numpy converter stands below the evaluation and the MindSpore checkpoint code: no module of
    youzhi_ms/convert imports eval/, checkpoint.mindspore_ckpt, models/ or MindSpore, at the top or inside a function
    (read from the source), and importing all of them loads no MindSpore (checked in a fresh interpreter)."""
    import ast
    conv = os.path.join(ROOT, "youzhi_ms", "convert")
    banned = ("youzhi_ms.eval", "youzhi_ms.checkpoint.mindspore_ckpt", "youzhi_ms.models", "mindspore")
    found, modules = [], []
    for name in sorted(os.listdir(conv)):
        if not name.endswith(".py"):
            continue
        modules.append("youzhi_ms.convert." + name[:-3])
        for node in ast.walk(ast.parse(open(os.path.join(conv, name)).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [(name, n) for n in names if n == "youzhi_ms" or n.startswith(banned)]
    assert len(modules) >= 9 and not found, found
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(m for m in sys.modules if m.startswith(('mindspore', 'youzhi_ms.eval', 'youzhi_ms.models'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_auto_uniform_search_records_its_trace(tmp_path):
    from youzhi_ms.eval.auto_freqfold import convert_auto
    make_source("llama", tmp_path / "src")
    with pytest.raises(YouzhiError, match="youzhi_ms.eval.auto_freqfold.convert_auto"):
        _convert(tmp_path / "src", tmp_path / "auto", kv_lora_rank=24, freqfold="auto")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # refused before anything was written
    rep = convert_auto(str(tmp_path / "src"), str(tmp_path / "auto"),
                       ConvertOptions(kv_lora_rank=24, qk_rope_dim=8, freqfold="auto", calib_ids=calib(),
                                      progress=False))
    trace = rep["auto_trace"]
    assert [t["F"] for t in trace][:1] == [2] and all(np.isfinite(t["calib_ppl"]) for t in trace)
    chosen = json.load(open(tmp_path / "auto" / "config.json"))["youzhi"]
    assert chosen["freqfold_mode"] == "auto" and chosen["auto_trace"] == trace
    # the search stops at the first non-improvement, so the kept F is the trace's minimum
    best = min(trace, key=lambda t: t["calib_ppl"])["F"]
    assert all(b[1] == best for b in chosen["freqfold"][0])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".auto")]


@pytest.mark.parametrize("saved,resumed", [(("conv", "orig", "partial_rope"), True),
                                           (("conv", "orig", "stage1"), False)])
def test_a_work_dir_is_resumed_only_with_the_same_hidden_streams(saved, resumed, tmp_path):
    """Same options and source, but hidden states saved with other streams (a work dir of the build that named the
    partial-RoPE stream 'stage1'): the conversion starts afresh instead of failing on a missing stream."""
    from youzhi_ms.convert.journal import LayerRecord, resume as _resume
    work, fp = tmp_path / "work", {"source": "src", "options": {"stats": "standard"}}
    work.mkdir()
    (work / "meta.json").write_text(json.dumps(fp))
    rec = LayerRecord(layer=0, bands=[[0, 2]], choice="F=2")
    (work / "records.jsonl").write_text(json.dumps(rec.__dict__) + "\n")
    np.savez(work / "hidden_00001.npz", **{k: np.zeros((1, 2, 4), np.float32) for k in saved})
    records, h = _resume(str(work), fp, {"conv", "orig", "partial_rope"})
    if resumed:
        assert len(records) == 1 and set(h) == set(saved)
    else:
        assert records == [] and h is None and os.listdir(work) == ["meta.json"]
