"""Layer-adaptive FreqFold: the candidate set, the search and the residual score, against brute force and transformers."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from youzhi_ms.checkpoint.hf import HFCheckpoint
from youzhi_ms.convert import adaptive
from youzhi_ms.convert.pipeline import ConvertOptions, convert
from youzhi_ms.convert.rorope import validate_bands

from helpers import ROOT, add_tiny_tokenizer, calib, make_source


def _all_tilings(n, sizes):
    """Every ordered tiling of n frequencies with the given band sizes, in any order (compositions of n), by brute
    force; the monotone ones are filtered afterwards."""
    if n == 0:
        return [[]]
    out = []
    for F in sizes:
        if F <= n:
            out += [[(0, F)] + [(f + F, G) for f, G in rest] for rest in _all_tilings(n - F, sizes)]
    return out


@pytest.mark.parametrize("d,c", [(16, 2), (32, 2), (32, 4), (64, 2), (64, 4)])
def test_monotone_tilings_are_exactly_the_monotone_tilings(d, c):
    got = adaptive.monotone_tilings(d, c)
    brute = [t for t in _all_tilings(d // 2, adaptive.fold_sizes(d, c))
             if all(a[1] <= b[1] for a, b in zip(t, t[1:]))]
    assert sorted(map(tuple, got)) == sorted(map(tuple, brute))
    assert len({tuple(t) for t in got}) == len(got)
    for t in got:
        validate_bands(t, d, c)
    names = adaptive.layer_candidates("adaptive", d, c)
    assert len(names) == len(got)
    assert all(f"F={F}" in names for F in adaptive.fold_sizes(d, c))


def test_candidate_counts():
    # binary partitions: 36 tilings of 16 units (d = 64, c = 2), 202 of 32 units (d = 128, c = 2)
    assert len(adaptive.monotone_tilings(64, 2)) == 36
    assert len(adaptive.monotone_tilings(128, 2)) == 202
    assert list(adaptive.layer_candidates("adaptive-layer", 64, 2)) == ["F=2", "F=4", "F=8", "F=16", "F=32"]


def test_choose_returns_the_true_minimum():
    rng = np.random.default_rng(0)
    cands = adaptive.layer_candidates("adaptive", 32, 2)
    table = {(n, b): float(rng.random()) for n in cands for b in (0.5, 1.0, 2.0)}
    by_bands = {tuple(v): n for n, v in cands.items()}

    def score_of(bands, beta):
        return table[(by_bands[tuple(bands)], beta)]

    # every candidate a finalist: the global minimum over all (bands, balance) pairs
    dec = adaptive.choose(cands, score_of, (0.5, 1.0, 2.0), finalists=len(cands))
    assert dec.score == min(table.values()) and table[(dec.name, dec.beta)] == dec.score
    # three finalists: the minimum over the balances of the three best at balance 1
    dec = adaptive.choose(cands, score_of, (0.5, 1.0, 2.0), finalists=3)
    top = sorted(cands, key=lambda n: table[(n, 1.0)])[:3]
    assert dec.score == min(table[(n, b)] for n in top for b in (0.5, 1.0, 2.0))
    assert dec.scores == {n: table[(n, 1.0)] for n in cands} and len(dec.refined) == 9


def test_shortlist_keeps_the_uniform_tilings_and_the_best_by_proxy():
    cands = adaptive.layer_candidates("adaptive", 64, 2)
    err = {b: float(f + 1) / F for bands in cands.values() for b in [tuple(x) for x in bands] for f, F in [b]}
    short = adaptive.shortlist(cands, lambda b: err[tuple(b)], 5)
    totals = {n: sum(err[tuple(b)] for b in v) for n, v in cands.items()}
    best5 = sorted(totals, key=totals.get)[:5]
    assert set(short) == set(best5) | {n for n in cands if n.startswith("F=")}


def _layer_io(model, ids, replace=None):
    """Per layer of a transformers decoder, via hooks: input hidden state h, attention output a, layer output y.
    replace = (i, h): layer i reads h instead of its own input (the model builds masks and rotary tables)."""
    io = {}
    hooks = []

    def pre(m, args, kwargs, i):
        h = kwargs.get("hidden_states", args[0] if args else None)
        if replace is not None and replace[0] == i:
            h = replace[1].to(h.dtype)
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = h
            else:
                args = (h,) + tuple(args[1:])
        io.setdefault(i, {})["h"] = h.detach().double()
        return args, kwargs

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, i=i: io[i].update(a=out[0].detach().double())))
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, i=i: io[i].update(y=(out[0] if isinstance(out, tuple) else out).detach().double())))
    with torch.no_grad():
        model(torch.tensor(ids))
    for h in hooks:
        h.remove()
    return io


def _transformers_mla(path):
    """transformers' DeepseekV3 on an exact export: no latent norm, and the query bias a Qwen2 source keeps."""
    mla = DeepseekV3ForCausalLM.from_pretrained(path).eval()
    ck = HFCheckpoint(str(path))
    for i, layer in enumerate(mla.model.layers):
        layer.self_attn.kv_a_layernorm = torch.nn.Identity()
        bias = f"model.layers.{i}.self_attn.q_proj.bias"
        if bias in ck:  # stock DeepSeek-V3 has no slot for it
            q = layer.self_attn.q_proj
            layer.self_attn.q_proj = torch.nn.Linear(q.in_features, q.out_features, bias=True)
            with torch.no_grad():
                layer.self_attn.q_proj.weight.copy_(q.weight)
                layer.self_attn.q_proj.bias.copy_(torch.from_numpy(ck.get(bias)))
    return mla


def _unit(y):
    return y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("kind,score", [("llama", "local-block"), ("qwen2", "local-block"), ("llama", "residual")])
def test_candidate_score_matches_transformers(kind, score, tmp_path):
    """The score the search minimised for the kept candidate, recomputed from transformers' source and converted
    models. local-block (default): the converted layer's output against the SOURCE layer's output on the same
    (converted-model) input, both at unit RMS, on every 2nd query position; residual: the residual stream after the
    attention block against the original model's."""
    src = make_source(kind, tmp_path / "src").eval()
    ids = calib(1, 4, 32)
    stride = 2 if score == "local-block" else 1
    rep = convert(str(tmp_path / "src"), str(tmp_path / "mla"),
                  ConvertOptions(kv_lora_rank=24, qk_rope_dim=8, freqfold="adaptive", calib_ids=ids, proxy_seqs=4,
                                 score=score, score_stride=stride, progress=False))
    conv = _layer_io(_transformers_mla(tmp_path / "mla"), ids)
    ref = _layer_io(src, ids)
    pos = np.arange(stride - 1, ids.shape[1], stride)
    for L in rep["layers"]:
        i = L["layer"]
        if score == "local-block":
            target = _unit(_layer_io(src, ids, replace=(i, conv[i]["h"]))[i]["y"])[:, pos]
            e = _unit(conv[i]["y"])[:, pos] - target
            want = float((e * e).sum() / (target * target).sum())
        else:
            e = conv[i]["h"] + conv[i]["a"] - (ref[i]["h"] + ref[i]["a"])
            want = float((e * e).sum() / (ref[i]["a"] ** 2).sum())
        assert L["score"] == pytest.approx(want, rel=2e-3, abs=1e-7), (i, L["score"], want)
        assert L["score"] == min(L["refined"].values()) and L["choice"] in L["scores"]
        assert len(L["scores"]) == 4  # every monotone tiling of 8 frequencies into bands of 2, 4, 8: 2222, 224, 44, 8
    assert i == 1 and rep["layers"][1]["score"] > 0


def test_chosen_plan_is_reported_and_reproduced_by_freqfold_plan(tmp_path):
    make_source("llama", tmp_path / "src")
    add_tiny_tokenizer(tmp_path / "src")
    rng = np.random.default_rng(0)
    words = ["".join(chr(97 + k) for k in rng.integers(0, 26, rng.integers(2, 8))) for _ in range(3000)]
    (tmp_path / "calib.txt").write_text(" ".join(words))
    common = ["--hf-dir", str(tmp_path / "src"), "--kv-lora-rank", "20", "--qk-rope-dim", "8", "--calib-text",
              str(tmp_path / "calib.txt"), "--calib-tokens", "2048", "--calib-seq-len", "64", "--quiet"]

    def cli(*args):
        r = subprocess.run([sys.executable, "tools/convert_gqa_to_mla.py", *common, *args], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    cli("--output-dir", str(tmp_path / "a"), "--freqfold", "adaptive")
    rep = json.load(open(tmp_path / "a" / "conversion_report.json"))
    cfg = json.load(open(tmp_path / "a" / "config.json"))["youzhi"]
    assert cfg["freqfold"] == [L["bands"] for L in rep["layers"]]
    md = open(tmp_path / "a" / "conversion_report.md").read()
    assert all(f"| {L['layer']} | {L['choice']} |" in md for L in rep["layers"])
    cli("--output-dir", str(tmp_path / "b"), "--freqfold-plan", str(tmp_path / "a" / "config.json"))
    rep_b = json.load(open(tmp_path / "b" / "conversion_report.json"))
    assert rep_b["freqfold_mode"] == "plan" and [L["bands"] for L in rep_b["layers"]] == cfg["freqfold"]
    a, b = HFCheckpoint(str(tmp_path / "a")), HFCheckpoint(str(tmp_path / "b"))
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():  # same bands, same balances, same statistics: the same weights, bit for bit
        np.testing.assert_array_equal(a.get(n), b.get(n))


def test_strided_query_attention_equals_the_full_attention_at_those_positions():
    from youzhi_ms.convert import attention_np as A
    rng = np.random.default_rng(3)
    H, nope, rope, r, D, S = 3, 8, 4, 6, 16, 12
    m = {"q_proj.weight": rng.normal(size=(H * (nope + rope), D)), "kv_a_proj_with_mqa.weight": rng.normal(
        size=(r + rope, D)), "kv_b_proj.weight": rng.normal(size=(H * 2 * nope, r)), "o_proj.weight": rng.normal(
        size=(D, H * nope))}
    X = rng.normal(size=(2, S, D))
    ang = np.arange(S)[:, None] * 0.3 ** np.arange(rope // 2)[None, :]
    full = A.mla_attention(X, m, H, nope, rope, nope, r, np.cos(ang), np.sin(ang))
    pos = np.arange(2, S, 3)
    part = A.mla_attention(X, m, H, nope, rope, nope, r, np.cos(ang), np.sin(ang), q_pos=pos)
    np.testing.assert_allclose(part, full[:, pos], rtol=1e-6, atol=1e-9)


def test_standard_statistics_come_from_the_source_and_the_partial_rope_model(tmp_path, monkeypatch):
    """--stats standard: RoRoPE's keys from the source model's layer inputs, the latent PCA's inputs from the
    partial-RoPE model (every layer at full rank with its bands), both checked against transformers."""
    from youzhi_ms.convert import calibrate
    src = make_source("llama", tmp_path / "src").eval()
    ids = calib(4, 4, 32)
    seen = []
    real = calibrate.LayerStats.__init__

    def spy(self, geo, w, keys_x, pca_x, *a, **k):
        seen.append((keys_x.copy(), pca_x.copy()))
        real(self, geo, w, keys_x, pca_x, *a, **k)

    monkeypatch.setattr(calibrate.LayerStats, "__init__", spy)
    convert(str(tmp_path / "src"), str(tmp_path / "std"),
            ConvertOptions(kv_lora_rank=24, qk_rope_dim=8, freqfold="4", calib_ids=ids, stats="standard",
                           progress=False))
    monkeypatch.setattr(calibrate.LayerStats, "__init__", real)
    # the partial-RoPE model with the same bands: maximal rank, no PCA
    convert(str(tmp_path / "src"), str(tmp_path / "partial"),
            ConvertOptions(kv_lora_rank=56, qk_rope_dim=8, freqfold="4", calib_ids=ids, skip_pca=True, progress=False))
    normed = {}
    for name, model in (("src", src), ("partial", _transformers_mla(tmp_path / "partial"))):
        hooks = [layer.input_layernorm.register_forward_hook(
            lambda m, a, out, i=i, name=name: normed.__setitem__((name, i), out.detach().double().numpy()))
            for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(torch.tensor(ids))
        for h in hooks:
            h.remove()
    assert len(seen) == 2
    for i, (keys_x, pca_x) in enumerate(seen):
        np.testing.assert_allclose(keys_x, normed[("src", i)].reshape(keys_x.shape), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pca_x, normed[("partial", i)].reshape(pca_x.shape), rtol=1e-4, atol=1e-5)
    # layer 1 differs between the two models (the partial-RoPE layer 0 is lossy), so the check can tell them apart
    assert np.abs(seen[1][0] - seen[1][1]).max() > 1e-3
