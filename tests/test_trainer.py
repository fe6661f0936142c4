"""The GKD / SFT trainer on a tiny teacher (random Llama written with numpy) and its MLA conversion (student).

Covers: GKD lowers the distillation loss; attention-only training leaves everything else bit-identical; the exported
Hugging Face directory loads; interrupted + resumed == uninterrupted (exactly); 2 msrun workers == 1 process with the
same global batch; on-policy batches are the student's greedy generation and only they are scored; SFT on chat data
scores response tokens only and lowers the loss; config errors are one clear line.
"""
import json
import os
import random
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from youzhi_ms.runtime import init_context

init_context("graph")

from youzhi_ms.errors import YouzhiError  # noqa: E402
from youzhi_ms.checkpoint.hf import HFCheckpoint, save_safetensors, write_json  # noqa: E402
from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402
from youzhi_ms.train.run_config import load_run_config  # noqa: E402
from youzhi_ms.train.loss_log import read_loss_log  # noqa: E402
from youzhi_ms.train.trainer import Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 128
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "the cat sat on a mat while dogs ran far away from big red houses near old green trees".split()


def write_tokenizer(path):
    """Character-level byte-level BPE (no merges) with ChatML specials: 99 ids < V."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.save(os.path.join(path, "tokenizer.json"))
    write_json(os.path.join(path, "tokenizer_config.json"),
               {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>",
                "chat_template": CHATML})


def make_teacher(path, seed=0, D=64, I=96, L=1, H=4, KV=2, hd=16):
    os.makedirs(path, exist_ok=True)
    write_json(os.path.join(path, "config.json"), dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=I,
        num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV, head_dim=hd, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", torch_dtype="float32"))
    rng = np.random.default_rng(seed)
    t = [("model.embed_tokens.weight", rng.normal(0, 0.5, (V, D))), ("model.norm.weight", rng.uniform(0.5, 1.5, D)),
         ("lm_head.weight", rng.normal(0, 0.1, (V, D)))]
    for i in range(L):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", rng.uniform(0.5, 1.5, D)),
              (p + "post_attention_layernorm.weight", rng.uniform(0.5, 1.5, D)),
              (p + "self_attn.q_proj.weight", rng.normal(0, 0.15, (H * hd, D))),
              (p + "self_attn.k_proj.weight", rng.normal(0, 0.15, (KV * hd, D))),
              (p + "self_attn.v_proj.weight", rng.normal(0, 0.15, (KV * hd, D))),
              (p + "self_attn.o_proj.weight", rng.normal(0, 0.15, (D, H * hd))),
              (p + "mlp.gate_proj.weight", rng.normal(0, 0.15, (I, D))),
              (p + "mlp.up_proj.weight", rng.normal(0, 0.15, (I, D))),
              (p + "mlp.down_proj.weight", rng.normal(0, 0.15, (D, I)))]
    save_safetensors(os.path.join(path, "model.safetensors"), [(n, a.astype(np.float32)) for n, a in t])
    write_tokenizer(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(teacher dir, student dir, corpus file): a tiny one-layer GQA teacher (graph compile time grows with depth)
    and its stock DeepSeek-V3 MLA conversion (with a kv_a_layernorm, and a deliberately small latent so there is
    something to recover)."""
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    d = tmp_path_factory.mktemp("gkd")
    make_teacher(str(d / "teacher"))
    convert(str(d / "teacher"), str(d / "student"), ConvertOptions(
        kv_lora_rank=16, qk_rope_dim=8, freqfold="2", calib_ids=np.random.default_rng(0).integers(0, V, (8, 64)),
        export="deepseek", progress=False))
    rnd = random.Random(0)
    docs = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(30, 80))) + "." for _ in range(40)]
    (d / "corpus.txt").write_text("\n\n".join(docs))
    return str(d / "teacher"), str(d / "student"), str(d / "corpus.txt")


def config(models, out, *overrides):
    teacher, student, corpus = models
    base = [f"output_dir={out}", f"model.student={student}", f"distill.teacher={teacher}",
            f"train_dataset.data_path={corpus}", "runner_config.seq_length=32", "runner_config.batch_size=2",
            "runner_config.progress=false", "lr_schedule.learning_rate=3e-3", "lr_schedule.warmup_steps=1",
            "distill.max_new_tokens=8", "distill.temperature=1.0", "distill.lmbda=0.0", "seed=3"]
    return load_run_config(None, base + list(overrides))


# --------------------------------------------------------------------------------------------------------- GKD
def test_attention_plus_norms_selects_attention_and_every_norm_weight(models, tmp_path):
    tr = Trainer(config(models, tmp_path / "run", "model.trainable=attention+norms"))
    tr._setup_models()
    every = {p.name for p in tr.student.get_parameters()}
    norms = {n for n in every if n.endswith("layernorm.weight")}
    assert {p.name for p in tr.trainable} == {n for n in every if ".self_attention." in n} | norms
    assert {n.split(".")[-2] for n in norms} >= {"input_layernorm", "pre_mlp_layernorm", "final_layernorm"}
    assert all(p.requires_grad == (p.name in norms or ".self_attention." in p.name) for p in tr.student.get_parameters())


def test_gkd_lowers_loss_attention_only_keeps_the_rest(models, tmp_path):
    _, student_dir, _ = models
    # two windows = one global batch: every step sees the same sequences, so the logged loss is the distillation
    # loss of one fixed batch before each update
    cfg = config(models, tmp_path / "run", "runner_config.max_steps=8", "model.trainable=attention",
                 "train_dataset.max_tokens=64", "lr_schedule.kv_layernorm_learning_rate=1e-2",
                 "callbacks.CheckpointMonitor.save_checkpoint_steps=8")
    res = Trainer(cfg).run()
    rows = read_loss_log(res["loss_log"])
    assert res["end_step"] == 8 and len(rows) == 8 and {r["tokens"] for r in rows} == {2 * 31}
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.7 * losses[0] and losses[-1] == min(losses)
    assert os.path.isfile(tmp_path / "run" / "loss_curve.png")
    out = res["hf_model"]
    # same config.json and tokenizer files; loads with load_model
    assert open(os.path.join(out, "config.json")).read() == open(os.path.join(student_dir, "config.json")).read()
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    before, after = HFCheckpoint(student_dir), HFCheckpoint(out)
    assert sorted(before.names()) == sorted(after.names())
    changed = {n for n in before.names() if not np.array_equal(before.get(n), after.get(n))}
    assert changed and all(".self_attn." in n for n in changed)  # MLP, norms, embeddings, head: bit-identical
    assert "model.layers.0.self_attn.kv_a_layernorm.weight" in changed
    assert "model.layers.0.self_attn.kv_b_proj.weight" in changed
    model, cfg_out = load_model(out)
    assert cfg_out.kv_lora_rank == 16
    # tools/eval_ppl.py --train-checkpoint: the step-8 checkpoint in the student's architecture = the exported model
    from youzhi_ms.eval.ppl import evaluate_dir
    corpus = models[2]
    exported = evaluate_dir(out, corpus, seq_len=32, max_tokens=128, progress=False)
    ckpt = evaluate_dir(student_dir, corpus, seq_len=32, max_tokens=128, progress=False,
                        train_checkpoint=str(tmp_path / "run" / "checkpoint" / "step_00000008"))
    untrained = evaluate_dir(student_dir, corpus, seq_len=32, max_tokens=128, progress=False)
    assert abs(ckpt["ppl"] - exported["ppl"]) <= 1e-5 * exported["ppl"] and ckpt["ppl"] != untrained["ppl"]
    with pytest.raises(YouzhiError, match="has no student.safetensors"):
        evaluate_dir(student_dir, corpus, seq_len=32, max_tokens=128, train_checkpoint=str(tmp_path / "run"))


class Corrupting(Trainer):
    """Micro-step calls listed in `bad` (1-based) report an impossible GKD loss (and keep their gradients)."""
    bad = ()

    def _setup_models(self):
        super()._setup_models()
        micro, calls = self.micro, []

        def step(*args):
            loss = micro(*args)
            calls.append(1)
            return ms.Tensor(8774.0, ms.float32) if len(calls) in self.bad else loss
        self.micro = step


def test_corrupted_gkd_step_is_recomputed_and_never_applied(models, tmp_path, caplog):
    """A token-mean JSD above its supremum (a corrupted computation, seen on CPU) drops that step's gradients and
    computes it again: the run ends with the same weights as a run that never saw the fault."""
    class Once(Corrupting):
        bad = (2,)

    clean = Trainer(config(models, tmp_path / "clean", "runner_config.max_steps=3")).run()
    with caplog.at_level("WARNING", logger="youzhi_ms.train"):
        res = Once(config(models, tmp_path / "run", "runner_config.max_steps=3")).run()
    rows = read_loss_log(res["loss_log"])
    assert [r.get("retries", 0) for r in rows] == [0, 1, 0] and not any(r.get("skipped") for r in rows)
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_loss_log(clean["loss_log"])]
    assert res["weights_sha256"] == clean["weights_sha256"]
    assert any("exceeds 0.6931" in m and "computed again" in m for m in caplog.messages)


def test_guarded_gkd_step_equals_the_fused_step(models, tmp_path):
    """The checked path (micro-step, check, apply) is the same update as the fused one-graph step."""
    from youzhi_ms.train.optim import FusedStep

    class Fused(Trainer):
        def _setup_models(self):
            super()._setup_models()
            self.fused = FusedStep(self.loss_net, self.core)

    a = Trainer(config(models, tmp_path / "guarded", "runner_config.max_steps=3")).run()
    b = Fused(config(models, tmp_path / "fused", "runner_config.max_steps=3")).run()
    ra, rb = read_loss_log(a["loss_log"]), read_loss_log(b["loss_log"])
    np.testing.assert_allclose([r["loss"] for r in ra], [r["loss"] for r in rb], rtol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in ra], [r["grad_norm"] for r in rb], rtol=1e-5)
    wa, wb = HFCheckpoint(a["hf_model"]), HFCheckpoint(b["hf_model"])
    for n in wa.names():
        np.testing.assert_allclose(wa.get(n), wb.get(n), rtol=1e-5, atol=1e-7)


def test_chunked_loss_separate_teacher_and_offline_topk_train_like_the_plain_loss(models, tmp_path):
    """Same 3 steps with the plain loss on full logits, the chunked loss (teacher in its own graph), and the offline
    teacher file at k = V (tools/make_teacher_topk.py, no teacher in memory): same losses, same weights."""
    teacher, student, corpus = models
    common = ["runner_config.max_steps=3", "distill.loss_chunk_tokens=24"]
    plain = Trainer(config(models, tmp_path / "plain", *common, "distill.loss=full")).run()
    chunked = Trainer(config(models, tmp_path / "chunked", *common, "distill.teacher_graph=separate")).run()
    topk = str(tmp_path / "teacher.topk")
    r = subprocess.run([sys.executable, "tools/make_teacher_topk.py", "--no-progress", "--k", str(V), "--out", topk,
                        "--set", f"model.student={student}", "--set", f"distill.teacher={teacher}",
                        "--set", f"train_dataset.data_path={corpus}", "--set", "runner_config.seq_length=32",
                        "--set", "runner_config.max_steps=3", "--set", "distill.temperature=1.0", "--set", "seed=3",
                        "--config", "yaml_configs/distill_smollm2_mla.yaml"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    offline = Trainer(config(models, tmp_path / "offline", *common, f"distill.offline_teacher={topk}",
                             "distill.teacher=null")).run()
    ref = read_loss_log(plain["loss_log"])
    for res in (chunked, offline):
        rows = read_loss_log(res["loss_log"])
        np.testing.assert_allclose([x["loss"] for x in rows], [x["loss"] for x in ref], rtol=2e-5)
        np.testing.assert_allclose([x["grad_norm"] for x in rows], [x["grad_norm"] for x in ref], rtol=1e-4)
        # Adam divides by sqrt(v): float32 rounding in a near-zero gradient entry can move that weight by a
        # fraction of the learning rate (3e-3), so weights agree to 1e-4, not to the last bit
        a, b = HFCheckpoint(res["hf_model"]), HFCheckpoint(plain["hf_model"])
        for n in b.names():
            np.testing.assert_allclose(a.get(n), b.get(n), rtol=0, atol=1e-4, err_msg=n)
    with pytest.raises(YouzhiError, match="needs the live teacher"):
        config(models, tmp_path / "x", f"distill.offline_teacher={topk}", "distill.lmbda=0.5")
    with pytest.raises(YouzhiError, match="temperature 1.0"):
        Trainer(config(models, tmp_path / "y", f"distill.offline_teacher={topk}", "distill.temperature=0.9")).run()


def test_persistently_corrupted_steps_are_skipped_then_the_run_stops_resumable(models, tmp_path):
    class Always(Corrupting):
        bad = tuple(range(2, 100))  # step 1 fine; every later try fails: steps 2, 3, 4 are skipped

    cfg = config(models, tmp_path / "run", "runner_config.max_steps=6")
    with pytest.raises(YouzhiError, match=r"3 steps in a row .*--resume"):
        Always(cfg).run()
    rows = read_loss_log(str(tmp_path / "run" / "loss_log.jsonl"))
    assert [bool(r.get("skipped")) for r in rows] == [False, True, True, True]
    assert all(r["grad_norm"] is None and r["retries"] == 1 for r in rows[1:])
    # skipped steps changed nothing: the saved state holds step 1's weights, and --resume continues from step 4
    one = Trainer(config(models, tmp_path / "one", "runner_config.max_steps=6", "runner_config.stop_at_step=1")).run()
    saved = HFCheckpoint.from_file(str(tmp_path / "run" / "checkpoint" / "step_00000004" / "student.safetensors"))
    after_one = HFCheckpoint.from_file(str(tmp_path / "one" / "checkpoint" / "step_00000001" / "student.safetensors"))
    assert all(np.array_equal(saved.get(n), after_one.get(n)) for n in saved.names())
    rest = Trainer(config(models, tmp_path / "run", "runner_config.max_steps=6")).run(resume=True)
    assert rest["start_step"] == 4 and rest["end_step"] == 6


def test_resume_reproduces_the_uninterrupted_run(models, tmp_path):
    """Sampled on-policy batches, accumulation and a checkpoint at step 2: stop there, resume, compare."""
    common = ["runner_config.max_steps=4", "runner_config.gradient_accumulation_steps=2", "distill.lmbda=0.5",
              "callbacks.CheckpointMonitor.save_checkpoint_steps=2"]
    full = Trainer(config(models, tmp_path / "full", *common)).run()
    part = Trainer(config(models, tmp_path / "split", *common, "runner_config.stop_at_step=2")).run()
    assert part["end_step"] == 2 and "hf_model" not in part and part["last_checkpoint"] == 2
    with pytest.raises(Exception, match="already holds a run"):
        Trainer(config(models, tmp_path / "split", *common)).run()
    rest = Trainer(config(models, tmp_path / "split", *common)).run(resume=True)
    assert rest["start_step"] == 2 and rest["end_step"] == 4
    a, b = read_loss_log(full["loss_log"]), read_loss_log(rest["loss_log"])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert any(any(r["on_policy"]) for r in a)
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["grad_norm"], ra["tokens"], ra["on_policy"]) == \
            (rb["loss"], rb["grad_norm"], rb["tokens"], rb["on_policy"])
    assert full["weights_sha256"] == rest["weights_sha256"]
    state = json.load(open(tmp_path / "split" / "checkpoint" / "step_00000004" / "trainer_state.json"))
    assert state["step"] == 4 and state["rng"]["bit_generator"] == "PCG64"
    assert all(isinstance(w, int) for w in state["rng"]["state"] + state["rng"]["inc"])


def test_gradient_accumulation_equals_the_larger_batch(models, tmp_path):
    """2 micro-batches of 1 == 1 batch of 2 (same rows): gradients are summed and normalised by the global count."""
    common = ["runner_config.max_steps=3", "callbacks.CheckpointMonitor.save_checkpoint_steps=3"]
    one = Trainer(config(models, tmp_path / "one", *common)).run()
    acc = Trainer(config(models, tmp_path / "acc", *common, "runner_config.batch_size=1",
                         "runner_config.gradient_accumulation_steps=2")).run()
    a, b = read_loss_log(one["loss_log"]), read_loss_log(acc["loss_log"])
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-5)
    x, y = HFCheckpoint(one["hf_model"]), HFCheckpoint(acc["hf_model"])
    for n in x.names():
        np.testing.assert_allclose(y.get(n), x.get(n), rtol=0, atol=1e-5, err_msg=n)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_worker_data_parallel_equals_one_process(models, tmp_path):
    """msrun, 2 CPU workers x batch 2 vs one process x batch 4 (same yaml, same global batch). lmbda 0.65 with seed 3
    makes steps 2 and 3 on-policy (sampled with per-row generators)."""
    teacher, student, corpus = models
    sets = [f"model.student={student}", f"distill.teacher={teacher}", f"train_dataset.data_path={corpus}",
            "runner_config.seq_length=32", "runner_config.progress=false", "runner_config.max_steps=3",
            "runner_config.gradient_accumulation_steps=1", "lr_schedule.learning_rate=3e-3",
            "lr_schedule.warmup_steps=1", "distill.max_new_tokens=8", "distill.temperature=1.0",
            "distill.lmbda=0.65", "seed=3"]
    yaml_path = os.path.join(ROOT, "yaml_configs", "distill_smollm2_mla.yaml")
    single = Trainer(load_run_config(yaml_path, sets + [f"output_dir={tmp_path / 'single'}",
                                                        "runner_config.batch_size=4"])).run()
    cmd = "tools/train.py --config yaml_configs/distill_smollm2_mla.yaml " + " ".join(
        f"--set {s}" for s in sets + [f"output_dir={tmp_path / 'dp'}", "runner_config.batch_size=2"])
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run(["bash", "run_scripts/msrun_launcher.sh", cmd, "2", "2", "127.0.0.1", str(_free_port()), "0",
                        str(tmp_path / "msrun_log"), "True", "300"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    logs = "".join(open(p).read()[-3000:] for p in (tmp_path / "msrun_log").glob("worker_*.log"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + logs
    ranks = [json.load(open(tmp_path / "dp" / "ranks" / f"rank_{i}.json")) for i in (0, 1)]
    assert [x["world"] for x in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # identical weights on both ranks
    a, b = read_loss_log(single["loss_log"]), read_loss_log(str(tmp_path / "dp" / "loss_log.jsonl"))
    assert [r["on_policy"] for r in a] == [r["on_policy"] for r in b] and any(any(r["on_policy"]) for r in a)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-5)
    one, two = HFCheckpoint(single["hf_model"]), HFCheckpoint(str(tmp_path / "dp" / "hf_model"))
    for n in one.names():
        np.testing.assert_allclose(two.get(n), one.get(n), rtol=0, atol=1e-5, err_msg=n)


# ------------------------------------------------------------------------------------------------------ on-policy
def test_on_policy_batch_is_the_students_greedy_generation(models, tmp_path):
    from youzhi_ms.infer.generate import EagerRunner, generate
    cfg = config(models, tmp_path / "onp", "distill.lmbda=1.0", "runner_config.batch_size=3",
                 "distill.max_new_tokens=10")
    tr = Trainer(cfg)
    tr._setup_models()
    tr._setup_data()
    tr.continuation.temperature = 0.0  # greedy, to compare with infer.generate
    batch = tr.next_micro_batch(0, 0)
    assert batch["on_policy"]
    runner = EagerRunner(tr.student, tr.student_cfg)
    stop = (tr.tokenizer.eos_id, tr.tokenizer.eot_id)
    P = 32 - 10
    for b in range(3):
        ids, mask = batch["input_ids"][b], batch["loss_mask"][b]
        gen = batch["generated"][b]
        assert 1 <= len(gen) <= 10
        prompt = ids[:P].tolist()
        want = generate(runner, prompt, max_new_tokens=10, temperature=0.0, stop_ids=stop, max_len=32)
        assert gen == want
        assert ids[P:P + len(gen)].tolist() == gen
        # scored: exactly the positions whose next token is generated
        assert np.flatnonzero(mask).tolist() == list(range(P - 1, P - 1 + len(gen)))
        assert batch["labels"][b][P - 1:P - 1 + len(gen)].tolist() == gen
    # the prompts are the sampled dataset windows' first P tokens
    rows = np.random.default_rng([3, 0]).permutation(len(tr.dataset))[:3]
    for b, i in enumerate(rows):
        assert batch["input_ids"][b][:P].tolist() == tr.dataset[int(i)].input_ids[:P].tolist()


# ------------------------------------------------------------------------------------------------------------ SFT
def test_sft_chat_scores_responses_only_and_lowers_the_loss(models, tmp_path):
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.train.data import ChatExamples
    from youzhi_ms.train.losses import build_sft_labels
    _, student, _ = models
    rows = [{"prompt": f"what does the {w} do", "response": f"the {w} sat on a mat"} for w in WORDS[:6]]
    rows.append({"messages": [{"role": "system", "content": "be short"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                              {"role": "assistant", "content": "see you"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = Tokenizer.from_dir(student)
    ds = ChatExamples(str(path), tok, 96, pad_id=0)
    assert len(ds) == 7 and ds.dropped == 0
    # single turn: exactly build_sft_labels(prompt part, response part incl. <|im_end|>)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]}]))
    response = tok.encode(rows[0]["response"] + "<|im_end|>")
    for got, want in zip((ds[0].input_ids, ds[0].labels, ds[0].loss_mask), build_sft_labels(prompt, response, 96, 0)):
        np.testing.assert_array_equal(got, want)
    assert ds[0].prompt_len == len(prompt)
    # multi turn: both assistant turns scored, nothing else
    ex = ds[6]
    scored = tok.decode(ex.labels[ex.loss_mask > 0].tolist(), skip_special_tokens=False)
    assert scored == "hello<|im_end|>see you<|im_end|>"
    cfg = config(models, tmp_path / "sft", "run_mode=sft", f"train_dataset.data_path={path}",
                 "runner_config.seq_length=96", "runner_config.max_steps=12", "lr_schedule.learning_rate=1e-2")
    res = Trainer(cfg).run()
    losses = [r["loss"] for r in read_loss_log(res["loss_log"])]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


# ----------------------------------------------------------------------------------------------------- errors
def _cli(*args):
    return subprocess.run([sys.executable, "tools/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,expect", [
    (["--set", "runner_config.max_stepz=3"], "unknown config key 'runner_config.max_stepz' in --set (did you mean "
                                             "'max_steps'?)"),
    (["--set", "runner_config"], "expected section.key=value"),
    (["--set", "distil.beta=0.1"], "unknown config key 'distil'"),
    (["--set", "parallel_config.model_parallel=2"], "CPU backend does not have"),
    (["--set", "runner_config.batch_size=0"], "runner_config.batch_size must be an integer >= 1"),
    (["--set", "callbacks.Checkpoint.save_checkpoint_steps=1"], "unknown config key 'callbacks.Checkpoint'"),
])
def test_cli_config_errors_are_one_clear_line(args, expect, tmp_path):
    r = _cli("--config", "yaml_configs/distill_smollm2_mla.yaml", "--set", f"output_dir={tmp_path / 'o'}", *args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert not (tmp_path / "o").exists()
