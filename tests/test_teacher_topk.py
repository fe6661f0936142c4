"""The offline teacher's top-k file: exact round trip, resume of a partial file, damaged files refused with one clear
message, and the top-k / tail arithmetic against float64 numpy."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from youzhi_ms.errors import YouzhiError
from youzhi_ms.train.teacher_topk import MAGIC, TopKStore, TopKWriter, shrink, topk_of_logits

R, T, K, V = 5, 7, 4, 300  # V > 256 would not fit uint8; uint16 ids


def _fake(rng, k=K):
    ids = np.stack([np.stack([rng.choice(V, k, replace=False) for _ in range(T)]) for _ in range(R)])
    logp = -rng.gamma(2.0, 2.0, (R, T, k)).astype(np.float32)
    tail = -rng.gamma(2.0, 2.0, (R, T)).astype(np.float32)
    tail[0, 0] = -np.inf  # an empty tail bucket must survive too
    input_ids = rng.integers(0, V, (R, T)).astype(np.int32)
    return input_ids, ids, logp, tail


def _write(path, rows, arrays, upto=R, resume=False):
    w = TopKWriter(str(path), rows, T, K, V, 0.9, {"why": "test"}, resume=resume)
    for i in range(upto):
        if not w.done()[i]:
            w.write(i, *(a[i] for a in arrays))
    return w


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    arrays = _fake(rng)
    rows = [11, 3, 40, 7, 0]
    path = tmp_path / "t.topk"
    assert _write(path, rows, arrays).close() == str(path)
    assert not (tmp_path / "t.topk.partial").exists()
    st = TopKStore(str(path))
    assert (st.k, st.vocab_size, st.seq_len, st.temperature) == (K, V, T, 0.9)
    order = [3, 0, 4]  # any order of stored windows
    got = st.batch([rows[i] for i in order], arrays[0][order])
    assert got["ids"].dtype == np.int32 and np.array_equal(got["ids"], arrays[1][order])
    assert np.array_equal(got["lq_top"], arrays[2][order])  # bit-exact float32, -inf included
    assert np.array_equal(got["lq_tail"], arrays[3][order])
    with pytest.raises(YouzhiError, match="no entry for dataset window 5"):
        st.batch([5], arrays[0][:1])
    with pytest.raises(YouzhiError, match="stored tokens"):
        st.batch([rows[1]], arrays[0][:1])
    with pytest.raises(YouzhiError, match="temperature 0.9"):
        st.check_compatible(V, T, 1.0)


def test_an_interrupted_write_resumes_and_nothing_appears_before_close(tmp_path):
    rng = np.random.default_rng(1)
    arrays = _fake(rng)
    rows = list(range(R))
    path = tmp_path / "t.topk"
    w = _write(path, rows, arrays, upto=2)
    with pytest.raises(YouzhiError, match="3 windows not written"):
        w.close()
    del w
    assert not path.exists()
    w = TopKWriter(str(path), rows, T, K, V, 0.9, {"why": "test"}, resume=True)
    assert w.done().tolist() == [True, True, False, False, False]
    for i in range(2, R):
        w.write(i, *(a[i] for a in arrays))
    w.close()
    got = TopKStore(str(path)).batch(rows, arrays[0])
    assert np.array_equal(got["lq_top"], arrays[2]) and np.array_equal(got["ids"], arrays[1])


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[8:16])
    h = json.loads(raw[16:16 + n])
    first = min(a["offset"] for a in h["arrays"].values())
    edit(h)
    head = raw[:8] + struct.pack("<Q", len(json.dumps(h))) + json.dumps(h).encode()
    assert len(head) <= first  # the arrays stay where they are
    path.write_bytes(head + raw[len(head):])


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b"PK\x03\x04" + p.read_bytes()[4:]), "not a top-k teacher file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "does not lie inside"),
    (lambda p: p.write_bytes(MAGIC + struct.pack("<Q", 1 << 40)), "header length"),
    (lambda p: _rewrite_header(p, lambda h: h["arrays"]["logp"].update(offset=h["arrays"]["logp"]["offset"] + 8)),
     "does not lie inside"),
    (lambda p: _rewrite_header(p, lambda h: h["arrays"]["ids"].update(shape=[R, T, K + 1])), "array ids"),
    (lambda p: _rewrite_header(p, lambda h: h.update(k=V + 1)), "exceeds the vocabulary"),
    (lambda p: _rewrite_header(p, lambda h: h.update(version=99)), "unsupported version"),
])
def test_damaged_files_are_refused(tmp_path, damage, message):
    rng = np.random.default_rng(2)
    path = tmp_path / "t.topk"
    _write(path, list(range(R)), _fake(rng)).close()
    damage(path)
    with pytest.raises(YouzhiError, match=message):
        TopKStore(str(path))


def test_topk_and_shrink_match_float64():
    rng = np.random.default_rng(3)
    logits = (3.0 * rng.standard_normal((3, 5, 40))).astype(np.float32)
    tau = 0.9
    z = logits.astype(np.float64) / tau
    lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    ids, top, tail = topk_of_logits(logits, 8, tau)
    want_ids = np.argsort(-lp, -1, kind="stable")[..., :8]
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(top, np.take_along_axis(lp, want_ids, -1), rtol=1e-6)
    mass_rest = 1.0 - np.exp(np.take_along_axis(lp, want_ids, -1)).sum(-1)
    np.testing.assert_allclose(np.exp(tail.astype(np.float64)), mass_rest, rtol=1e-5)
    # shrinking a top-8 to a top-3 = computing the top-3 directly
    s_ids, s_top, s_tail = shrink(ids, top, tail, 3)
    d_ids, d_top, d_tail = topk_of_logits(logits, 3, tau)
    assert np.array_equal(s_ids, d_ids)
    np.testing.assert_allclose(s_top, d_top, rtol=1e-6)
    np.testing.assert_allclose(s_tail, d_tail, rtol=1e-5)
    # k = V: everything stored, the tail is empty
    f_ids, f_top, f_tail = topk_of_logits(logits, 40, tau)
    assert np.all(np.isneginf(f_tail)) and np.allclose(np.exp(f_top.astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_tool_never_replaces_a_file_and_says_so_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "x.topk"
    out.write_bytes(b"not mine")
    r = subprocess.run([sys.executable, "tools/make_teacher_topk.py", "--config", "yaml_configs/distill_smollm2_mla.yaml",
                        "--k", "4", "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=120)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "already exists" in lines[0], r.stderr
    assert out.read_bytes() == b"not mine"
