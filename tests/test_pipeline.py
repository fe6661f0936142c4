"""tools/pipeline.py end to end on a tiny model made by transformers (one layer, character tokenizer, tiny budgets):

- every stage runs in order and hands its output to the next; the summary has a row per model, and each row's
  perplexities equal those transformers computes on the same token windows from the same directory (so every
  stage's output also loads in transformers: LlamaForCausalLM for the source, DeepseekV3ForCausalLM after);
- interrupted (Ctrl-C during the GKD stage) and resumed with --resume: the finished stages are skipped, GKD continues
  from its checkpoint, and the final weights and every figure equal the uninterrupted run's;
- --stop-after / --resume: finished stages are not run again; a changed config key re-runs that stage and those after;
- bad config: one `error:` line, exit 2, before any stage runs.
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 128
WORDS = "the cat sat on a mat while dogs ran far away from big red houses near old green trees".split()
NEWS = "police said the minister will meet union leaders today after the fire near sydney burned houses".split()


def _tokenizer(path):
    """Character-level byte-level BPE with one merge ('th': llama.cpp, hence the GGUF stage, loads no BPE vocabulary
    without merges), <|endoftext|> = 0: every text is tokenizable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    chars = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "th"]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(["<|endoftext|>"] + chars)}, merges=[("t", "h")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)


def _docs(words, n, seed):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(20, 50))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama (transformers, random weights) and general / domain texts, each a train and a held-out file."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False))
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in n else torch.randn_like(p) * 0.15)
    m.save_pretrained(str(d / "src"))
    _tokenizer(str(d / "src"))
    for name, words, n, seed in (("general.txt", WORDS, 30, 1), ("general_eval.txt", WORDS, 8, 2),
                                 ("news.txt", NEWS, 30, 3), ("news_eval.txt", NEWS, 8, 4)):
        (d / name).write_text("\n\n".join(_docs(words, n, seed)))
    with open(d / "mcq.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"question": f"the cat sat on {i}", "choices": ["mat", "dog", "red", "tree"],
                                "answer": i % 4}) + "\n")
    return d


def _args(d, out, *extra):
    gkd = ["runner_config.seq_length=32", "runner_config.gradient_accumulation_steps=1",
           "lr_schedule.learning_rate=3e-3", "lr_schedule.warmup_steps=1", "callbacks.CheckpointMonitor."
           "save_checkpoint_steps=2", "callbacks.CheckpointMonitor.keep_checkpoint_max=100",
           "callbacks.LossMonitor.per_print_times=1", "runner_config.progress=false",
           f"train_dataset.data_path={d / 'general.txt'}", "model.trainable=attention+norms"]
    dom = ["runner_config.seq_length=32", "lr_schedule.learning_rate=3e-3", "lr_schedule.warmup_steps=1",
           "callbacks.CheckpointMonitor.save_checkpoint_steps=2", "runner_config.progress=false",
           f"train_dataset.replay_path={d / 'general.txt'}", "train_dataset.replay_fraction=0.25"]
    sets = [f"output_dir={out}", f"source.model={d / 'src'}", f"eval.general_text={d / 'general_eval.txt'}",
            f"eval.domain_text={d / 'news_eval.txt'}", "eval.max_tokens=640", "eval.seq_len=64",
            f"eval.mcq={d / 'mcq.jsonl'}", "eval.mcq_batch_size=4", "convert.kv_lora_rank=16", "convert.qk_rope_dim=8",
            "convert.freqfold=2", f"convert.calib_text={d / 'general.txt'}", "convert.calib_tokens=2048",
            "gkd.max_steps=12", f"gkd.overrides={json.dumps(gkd)}", f"domain.corpus={d / 'news.txt'}",
            "domain.max_steps=4", f"domain.overrides={json.dumps(dom)}", "export.mindir_max_seq_len=64",
            "plan.device_memory_gib=1", "plan.max_model_len=64"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pipeline.py"), "--config",
           os.path.join(ROOT, "yaml_configs", "youzhi_pipeline_smollm2.yaml")]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800, **kw)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _state(out):
    with open(os.path.join(out, "pipeline_state.json")) as f:
        return json.load(f)["stages"]


def _figures(out):
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return [(r["model"], r["general_ppl"], r["domain_ppl"], r["mcq_acc"]) for r in s["rows"]]


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "full")
    p = _run(_args(setup, out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def _transformers_ppl(model_dir, text_file, max_tokens, seq_len):
    """The perplexity protocol (eot before each document, non-overlapping windows, first token unscored) computed
    with transformers' own model class on CPU."""
    from transformers import AutoModelForCausalLM
    from youzhi_ms.data.text import load_documents, pack_tokens
    from youzhi_ms.data.tokenizer import Tokenizer
    stream = pack_tokens(load_documents(text_file), Tokenizer.from_dir(model_dir))[:max_tokens]
    n = len(stream) // seq_len
    win = torch.tensor(stream[:n * seq_len].reshape(n, seq_len).astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(win).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, win[:, 1:, None]).squeeze(-1)
    return float(torch.exp(nll.mean())), type(model).__name__


def test_stages_chain_and_every_output_loads_in_transformers(setup, full_run):
    out, stdout = full_run
    st = _state(out)
    assert [n for n in st] == ["source", "eval_source", "convert", "eval_mla", "gkd", "eval_gkd", "domain",
                               "eval_domain", "mindir", "gguf", "plan"]
    assert all(v["status"] == "done" and v["peak_rss_mib"] > 0 and v["seconds"] > 0 for v in st.values())
    # the chain: GKD trained the conversion against the source, the domain step started from GKD's model
    with open(os.path.join(out, "gkd", "run_config.yaml")) as f:
        gcfg = f.read()
    assert os.path.join(out, "mla") in gcfg and str(setup / "src") in gcfg
    with open(os.path.join(out, "domain", "run_config.yaml")) as f:
        dcfg = f.read()
    assert os.path.join(out, "gkd", "hf_model") in dcfg and str(setup / "news.txt") in dcfg
    assert str(setup / "general.txt") in dcfg and "replay_fraction: 0.25" in dcfg  # the general replay
    assert st["gkd"]["result"]["steps"] == 12 and st["domain"]["result"]["steps"] == 4
    assert st["domain"]["result"]["loss_last"] < st["domain"]["result"]["loss_first"]
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    rows = {r["model"]: r for r in s["rows"]}
    assert list(rows) == ["source", "mla", "gkd", "domain"]
    for model, path in (("source", str(setup / "src")), ("mla", os.path.join(out, "mla")),
                        ("gkd", os.path.join(out, "gkd", "hf_model")),
                        ("domain", os.path.join(out, "domain", "hf_model"))):
        for kind, text in (("general", "general_eval.txt"), ("domain", "news_eval.txt")):
            ref, cls = _transformers_ppl(path, str(setup / text), 640, 64)
            assert abs(rows[model][f"{kind}_ppl"] / ref - 1) < 1e-4, (model, kind, rows[model][f"{kind}_ppl"], ref)
            assert cls == ("LlamaForCausalLM" if model == "source" else "DeepseekV3ForCausalLM")
        assert 0 <= rows[model]["mcq_acc"] <= 1
    assert rows["source"]["general_x_source"] == 1.0
    assert abs(rows["domain"]["domain_x_source"] - rows["domain"]["domain_ppl"] / rows["source"]["domain_ppl"]) < 1e-12
    # training on the domain corpus lowers the domain held-out perplexity
    assert rows["domain"]["domain_ppl"] < rows["gkd"]["domain_ppl"]
    t = s["trade_off"]
    assert abs(t["forgetting_general"] - (rows["domain"]["general_ppl"] / rows["gkd"]["general_ppl"] - 1)) < 1e-12
    assert "forgetting:" in stdout and "| after GKD (12 steps) |" in stdout
    assert os.path.getsize(os.path.join(out, "summary.png")) > 1000
    for f in ("prefill.mindir", "decode.mindir", "manifest.json"):
        assert os.path.isfile(os.path.join(out, "mindir", f))
    assert "skipped" not in st["gguf"]["result"]
    from gguf import GGUFReader  # the llama.cpp project's reader: the final MLA model as llama.cpp's deepseek2
    arch = GGUFReader(os.path.join(out, "final.gguf")).get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "deepseek2"
    plan = st["plan"]["result"]
    assert plan["kv_bytes_per_token"]["final"] < plan["kv_bytes_per_token"]["source"]  # (16 + 8) < 2 * 2 * 16


def test_interrupted_stage_resumes_and_ends_identical(setup, full_run, tmp_path):
    ref, _ = full_run
    out = str(tmp_path / "run")
    # stop after the conversion's evaluation, then continue: the finished stages are not run again
    p = _run(_args(setup, out, "--stop-after", "eval_mla"))
    assert p.returncode == 0 and "stopped after eval_mla" in p.stdout, p.stderr[-2000:]
    before = _state(out)
    assert list(before) == ["source", "eval_source", "convert", "eval_mla"]
    # Ctrl-C during GKD, after its step-4 checkpoint (kept: with the default keep_checkpoint_max=2 the step-8 save
    # removed it, and a test process descheduled for those few steps never saw it and the run finished)
    proc = subprocess.Popen(_args(setup, out, "--resume"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ck = os.path.join(out, "gkd", "checkpoint", "step_00000004")
    t0 = time.time()
    while not os.path.isdir(ck) and proc.poll() is None and time.time() - t0 < 900:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before GKD's step-4 checkpoint"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
    assert "interrupted" in stderr and "Traceback" not in stderr
    mid = _state(out)
    assert mid["gkd"]["status"] == "interrupted" and not os.path.exists(os.path.join(out, "gkd", "hf_model"))
    assert all(mid[n] == before[n] for n in before)
    p = _run(_args(setup, out, "--resume"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for n in before:
        assert f"{n}: done earlier" in p.stdout
    assert "gkd (continues from its newest checkpoint)" in p.stdout
    after = _state(out)
    assert after["gkd"]["resumed_from_checkpoint"] and after["gkd"]["result"]["start_step"] >= 4
    assert all(after[n]["finished"] == before[n]["finished"] for n in before)
    for model in ("gkd", "domain"):
        assert _sha(os.path.join(out, model, "hf_model", "model.safetensors")) == \
            _sha(os.path.join(ref, model, "hf_model", "model.safetensors"))
    assert _figures(out) == _figures(ref)
    # nothing left to do: every stage skipped; a changed domain budget re-runs the domain step and what follows
    p = _run(_args(setup, out, "--resume"))
    assert p.returncode == 0 and p.stdout.count("done earlier") == 11, p.stdout[-3000:]
    p = _run(_args(setup, out, "--resume", "--set", "domain.max_steps=2"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("done earlier") == 6 and "domain (config or inputs changed, runs again)" in p.stdout
    assert _state(out)["domain"]["result"]["steps"] == 2


@pytest.mark.parametrize("extra,expect", [
    (["--set", "eval.domain_text=/nonexistent.txt"], "eval.domain_text"),
    (["--set", "gkd.max_steps=0"], "gkd.max_steps must be an integer >= 1"),
    (["--set", "domain.overrides=[bogus]"], "domain.overrides: --set 'bogus'"),
    (["--set", "gkd.overrides=[runner_config.batch_size=0]"], "runner_config.batch_size must be an integer >= 1"),
    (["--set", "gkd.config=yaml_configs/domain_smollm2_mla.yaml"], "the gkd stage needs run_mode distill"),
    (["--stop-after", "nonsense"], "--stop-after 'nonsense' is not a stage"),
    (["--set", "domain.overrides=[train_dataset.replay_fraction=0.95]"],
     "train_dataset.replay_fraction must be <= 0.9"),
    (["--set", "domain.overrides=[train_dataset.replay_fraction=0.3, train_dataset.replay_path=null]"],
     "needs train_dataset.replay_path"),
    (["--set", "domain.overrides=[train_dataset.replay_fraction=0.3, train_dataset.replay_path=/nonexistent.txt]"],
     "domain: train_dataset.replay_path '/nonexistent.txt' is neither"),
])
def test_bad_config_is_one_error_line_before_any_stage(setup, tmp_path, extra, expect):
    out = tmp_path / "bad"
    p = _run(_args(setup, str(out), *extra))
    one_error_line(p.returncode, p.stderr, expect)
    assert not (out / "pipeline_state.json").exists()


def test_existing_foreign_output_dir_is_refused(setup, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    p = _run(_args(setup, str(out), "--overwrite"))
    one_error_line(p.returncode, p.stderr, "not replaced even with --overwrite")
    assert (out / "notes.txt").read_text() == "keep"


def test_replay_mixes_the_first_general_windows_into_the_domain_windows(setup):
    """train_dataset.replay_path / replay_fraction: the domain windows unchanged, then the first general windows,
    as many as make the fraction of the union; fraction 0 is the plain dataset; too short a replay text is refused."""
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.errors import YouzhiError
    from youzhi_ms.train.data import PackedText, build_dataset, replay_windows
    tok = Tokenizer.from_dir(str(setup / "src"))
    news, general = str(setup / "news.txt"), str(setup / "general.txt")
    plain = PackedText(news, tok, 32)
    cfg = {"data_path": news, "format": "packed", "replay_path": general, "replay_fraction": 0.25}
    mixed = build_dataset(cfg, tok, 32, 0)
    n = len(plain)
    want = round(n / 3)
    assert replay_windows(n, 0.25) == want and mixed.replay == want and len(mixed) == n + want
    assert np.array_equal(mixed.windows[:n], plain.windows)
    assert np.array_equal(mixed.windows[n:], PackedText(general, tok, 32).windows[:want])
    assert abs(want / len(mixed) - 0.25) < 1 / len(mixed)
    ex = mixed[n]  # a replay window is a packed window like the others: every position but the last scored
    assert ex.loss_mask.sum() == 31 and np.array_equal(ex.input_ids, PackedText(general, tok, 32).windows[0])
    assert np.array_equal(build_dataset(dict(cfg, replay_fraction=0.0), tok, 32, 0).windows, plain.windows)
    short = setup / "short.txt"
    short.write_text("the cat sat on the mat.")
    with pytest.raises(YouzhiError, match="replay_path .* fewer than the"):
        build_dataset(dict(cfg, replay_path=str(short)), tok, 32, 0)
