"""The compile cache returns only the graph a process would have compiled, a second tools/generate.py run loads its
graphs from it with unchanged output, and the stderr filter drops only MindSpore's known-harmless lines."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from youzhi_ms.runtime import init_context

init_context("graph")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402
from youzhi_ms.compile_cache import MARKER  # noqa: E402
from youzhi_ms.infer.generate import EagerRunner, generate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 64
LOADED = "Use the compilation cache"  # MindSpore's own line when it loads a cached graph (shown with YOUZHI_MS_LOG=all)


def tiny_llama(path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)


def run(args, cache, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, YOUZHI_COMPILE_CACHE=str(cache), **env))


def test_second_generate_run_loads_its_graphs_and_answers_the_same(tmp_path, write_word_tokenizer):
    model_dir, cache = str(tmp_path / "m"), tmp_path / "cache"
    tiny_llama(model_dir)
    write_word_tokenizer(model_dir, V)
    model, cfg = load_model(model_dir)
    results = []
    for prompt in ("w5 w17 w33 w2", "w9 w1 w40 w41 w42 w3 w60"):  # a different prompt length in the second run
        js = str(tmp_path / f"{len(results)}.json")
        r = run(["tools/generate.py", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", "6", "--json", js],
                cache, YOUZHI_MS_LOG="all")
        assert r.returncode == 0, r.stderr[-2000:]
        with open(js) as f:
            res = json.load(f)
        ids = [int(w[1:]) for w in prompt.split()]
        assert res["output_ids"] == generate(EagerRunner(model, cfg), ids, max_new_tokens=6, stop_ids=[0])
        results.append(r.stderr)
    assert LOADED not in results[0] and results[1].count(LOADED) == 2  # prefill and decode both loaded
    (entry,) = os.listdir(cache)
    with open(cache / entry / MARKER) as f:
        assert [g.split()[0] for g in json.load(f)["compiled"]] == ["prefill", "decode"]


GRAPHS = textwrap.dedent("""
    import os, sys
    import numpy as np
    import mindspore as ms
    from mindspore import nn
    sys.path.insert(0, {root!r})
    from youzhi_ms.runtime import init_context
    from youzhi_ms.compile_cache import GraphCache
    init_context("graph")

    class Scale(nn.Cell):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def construct(self, x):
            return x * self.k

    cache = GraphCache("test", {{}}, ["times3"])
    with cache.compiling("times2", "an unplanned graph"):
        print(Scale(2.0)(ms.Tensor(np.ones(3, np.float32))).asnumpy().tolist())
    with cache.compiling("times3", "the planned graph"):
        print(Scale(3.0)(ms.Tensor(np.ones(3, np.float32))).asnumpy().tolist())
    print(cache.path)
""")


def test_only_planned_graphs_enter_the_cache(tmp_path):
    script = tmp_path / "graphs.py"
    script.write_text(GRAPHS.format(root=ROOT))
    outs = []
    for _ in range(2):
        r = run([str(script)], tmp_path / "cache", YOUZHI_MS_LOG="all")
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r)
    for r in outs:  # each graph computes its own result, also when the second run loads the planned one
        assert r.stdout.splitlines()[:2] == ["[2.0, 2.0, 2.0]", "[3.0, 3.0, 3.0]"]
    path = outs[0].stdout.splitlines()[2]
    files = sorted(os.listdir(os.path.join(path, "rank_0", "graph_cache")))
    assert [f for f in files if f.endswith(".mindir")] == ["compile_cache_0.mindir"]  # the planned graph only
    with open(os.path.join(path, MARKER)) as f:
        assert json.load(f)["compiled"] == ["times3"]
    assert LOADED not in outs[0].stderr and outs[1].stderr.count(LOADED) == 1


def test_known_harmless_lines_are_filtered_from_stderr():
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from youzhi_ms.runtime import quiet_known_warnings
        with quiet_known_warnings():
            os.write(2, b"[WARNING] x does not match original cnode's abstract. new: ...\\n")
            os.write(2, b"[WARNING] something else\\n")
            print("python line", file=sys.stderr)
        os.write(2, b"after\\n")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stderr.splitlines() == ["[WARNING] something else", "python line", "after"]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, YOUZHI_MS_LOG="all"))
    assert len(r.stderr.splitlines()) == 4


def test_cache_length_buckets():
    from youzhi_ms.infer.generate import cache_length
    assert [cache_length(n) for n in (1, 29, 256, 257, 1500)] == [256, 256, 256, 512, 2048]
    assert np.all(np.diff([cache_length(n) for n in range(1, 3000)]) >= 0)
