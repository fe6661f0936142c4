"""Multiple-choice log-likelihood scoring: our per-option log-likelihoods and accuracies equal a direct transformers
computation of log p(option | prompt) on a tiny model, for jsonl and C-Eval csv data, 0- and 1-shot; bad files fail with
one clear error."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from youzhi_ms.runtime import init_context

init_context("graph")

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402
from youzhi_ms.data.tokenizer import Tokenizer  # noqa: E402
from youzhi_ms.errors import YouzhiError  # noqa: E402
from youzhi_ms.eval import mcq  # noqa: E402

from helpers import ROOT, randomize  # noqa: E402

V = 384

JSONL = [
    {"question": "Which planet is known as the red planet?", "choices": ["Venus", "Mars", "Jupiter", "Saturn"],
     "answer": 1, "subject": "astronomy"},
    {"question": "What is the closest star to Earth?", "choices": ["The Sun", "Sirius", "Vega"], "answer": "A",
     "subject": "astronomy"},
    {"question": "How many moons does Mars have?", "choices": ["0", "1", "2", "4"], "answer": "c",
     "subject": "astronomy"},
    {"question": "2 + 3 = ?", "choices": ["4", "5", "6", "7"], "answer": 1, "subject": "elementary_mathematics"},
    {"question": "What is 10 / 2?", "choices": ["2", "5", "8", "20"], "answer": "B",
     "subject": "elementary_mathematics"},
    {"question": "Which number is prime?", "choices": ["4", "6", "7", "9"], "answer": 2,
     "subject": "elementary_mathematics"},
]
CEVAL_VAL = [
    ("0", "TCP 协议工作在哪一层？", "应用层", "传输层", "网络层", "物理层", "B"),
    ("1", "IP 地址由多少位组成（IPv4）？", "16", "32", "64", "128", "B"),
    ("2", "以下哪个是路由器的功能？", "转发分组", "打印文件", "显示图像", "播放声音", "A"),
    ("3", "HTTP 默认端口是？", "21", "25", "80", "110", "C"),
]
CEVAL_DEV = [
    ("0", "DNS 的作用是？", "域名解析", "文件传输", "邮件发送", "远程登录", "A", "DNS 把域名解析为地址。"),
    ("1", "以太网属于哪类网络？", "广域网", "局域网", "城域网", "个人网", "B", "以太网是局域网。"),
]


def write_csv(path, header, rows):
    import csv
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def char_tokenizer(path, texts):
    """Character-level BPE over the fixture characters, with ' A'..' D' merged into single tokens (as in real BPEs)."""
    from tokenizers import Tokenizer as HFTok, models
    chars = sorted(set("".join(texts)) | set(" \nABCD"))
    vocab = {"<|endoftext|>": 0}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    merges = [(" ", x) for x in "ABCD"]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) <= V, len(vocab)
    tk = HFTok(models.BPE(vocab, merges=merges, unk_token="<|endoftext|>"))
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    return tk


def random_model(cls, cfg, seed, model_dir, texts):
    """A transformers model with random weights (norms near 1) saved to model_dir with a character tokenizer, and the
    same directory loaded by youzhi_ms."""
    torch.manual_seed(seed)
    ref = randomize(cls(cfg), seed=None, std=0.15)  # seeded before the build, as this test always has been
    ref.save_pretrained(model_dir)
    tk = char_tokenizer(str(model_dir), texts)
    model, _ = load_model(str(model_dir))
    return {"model_dir": str(model_dir), "ref": ref, "tk": tk, "model": model, "tok": Tokenizer.from_dir(str(model_dir))}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("mcq")
    data = base / "data"
    (data / "val").mkdir(parents=True)
    (data / "dev").mkdir()
    with open(data / "six.jsonl", "w", encoding="utf-8") as f:
        for q in JSONL:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    write_csv(data / "val" / "computer_network_val.csv", ["id", "question", "A", "B", "C", "D", "answer"], CEVAL_VAL)
    write_csv(data / "dev" / "computer_network_dev.csv",
              ["id", "question", "A", "B", "C", "D", "answer", "explanation"], CEVAL_DEV)
    with open(data / "subject_mapping.json", "w", encoding="utf-8") as f:
        json.dump({"computer_network": ["Computer Network", "计算机网络", "STEM"]}, f, ensure_ascii=False)
    texts = [mcq.ZH_HEADER.format(subject="计算机网络"), mcq.EN_HEADER, mcq.EN_HEADER_PLAIN, "答案：Answer:.0123456789",
             json.dumps(JSONL, ensure_ascii=False), json.dumps(CEVAL_VAL + CEVAL_DEV, ensure_ascii=False),
             "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"]
    model_dir = base / "llama"
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
    return dict(random_model(LlamaForCausalLM, cfg, 0, model_dir, texts), data=data, texts=texts, base=base)


@pytest.fixture(scope="module")
def mla_env(env):
    """The same data and tokenizer with a tiny DeepSeek-V3 (MLA) model: scoring works for converted models too."""
    model_dir = env["base"] / "dsv3"
    cfg = DeepseekV3Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=None,
                           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=None,
                           first_k_dense_replace=2, max_position_embeddings=1024, rope_interleave=True)
    return dict(env, **random_model(DeepseekV3ForCausalLM, cfg, 1, model_dir, env["texts"]))


def torch_ll(env, context, continuation):
    """log p(continuation | context) with transformers, tokenized the harness way (cont = enc(ctx+cont)[len(ctx):])."""
    ctx = env["tk"].encode(context).ids
    whole = env["tk"].encode(context + continuation).ids
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logits = env["ref"](torch.tensor([whole[:-1]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[j - 1, whole[j]] for j in range(len(ctx), len(whole))))


def check_against_torch(env, res, items, shots_of, lang, score):
    """Every option's log-likelihood and the accuracies from our run equal the direct transformers computation."""
    assert len(res["items"]) == len(items)
    correct = correct_norm = 0
    for rec, it in zip(res["items"], items):
        opts = list("ABCDEFGH"[:len(it.choices)]) if score == "letters" else it.choices
        ctx = mcq.build_context(it, shots_of(it), lang, score)
        ref = np.array([torch_ll(env, ctx, " " + o) for o in opts])
        np.testing.assert_allclose(rec["lls"], ref, rtol=2e-5, atol=2e-4)
        assert rec["answer"] == it.answer
        correct += int(np.argmax(ref) == it.answer)
        correct_norm += int(np.argmax(ref / np.array([len(o) for o in opts])) == it.answer)
    assert res["acc"] == pytest.approx(correct / len(items))
    assert res["acc_norm"] == pytest.approx(correct_norm / len(items))


def run(env, data, **kw):
    return mcq.evaluate_mcq(env["model_dir"], str(data), progress=False, model=env["model"], tok=env["tok"],
                            batch_size=4, **kw)


def test_prompt_templates(env):
    items, fmt, lang = mcq.load_items(str(env["data"] / "val"))
    assert (fmt, lang) == ("ceval", "zh") and items[0].subject == "computer_network"
    dev = mcq.load_items(str(env["data"] / "dev"))[0]
    assert mcq.build_context(items[0], dev[:1], lang, "letters") == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "DNS 的作用是？\nA. 域名解析\nB. 文件传输\nC. 邮件发送\nD. 远程登录\n答案： A\n\n"
        "TCP 协议工作在哪一层？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\n答案：")
    j, fmt, lang = mcq.load_items(str(env["data"] / "six.jsonl"))
    assert (fmt, lang) == ("jsonl", "en") and [i.answer for i in j] == [1, 0, 2, 1, 1, 2]
    assert mcq.build_context(j[1], [], lang, "letters") == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "What is the closest star to Earth?\nA. The Sun\nB. Sirius\nC. Vega\nAnswer:")
    assert mcq.build_context(j[1], [j[0]], lang, "text").count(" Mars\n\n") == 1


@pytest.mark.parametrize("shots,score", [(0, "letters"), (1, "letters"), (0, "text")])
def test_jsonl_matches_transformers(env, shots, score):
    res = run(env, env["data"] / "six.jsonl", shots=shots, score=score)
    items = mcq.load_items(str(env["data"] / "six.jsonl"))[0]
    groups = mcq.by_subject(items)
    scored = [it for g in groups.values() for it in g[shots:]]  # no dev: the first K of a subject are the shots
    check_against_torch(env, res, scored, lambda it: groups[it.subject][:shots], "en", score)
    assert set(res["subjects"]) == {"astronomy", "elementary_mathematics"}
    assert sum(v["n"] for v in res["subjects"].values()) == res["n"] == 6 - 2 * shots


def test_mla_model_matches_transformers(mla_env):
    res = run(mla_env, mla_env["data"] / "six.jsonl", shots=1)
    items = mcq.load_items(str(mla_env["data"] / "six.jsonl"))[0]
    groups = mcq.by_subject(items)
    check_against_torch(mla_env, res, [it for g in groups.values() for it in g[1:]],
                        lambda it: groups[it.subject][:1], "en", "letters")


@pytest.mark.parametrize("shots", [0, 1])
def test_ceval_csv_matches_transformers(env, shots):
    res = run(env, env["data"] / "val", shots=shots, dev=str(env["data"] / "dev") if shots else None)
    items = mcq.load_items(str(env["data"] / "val"))[0]
    dev = mcq.load_items(str(env["data"] / "dev"))[0]
    check_against_torch(env, res, items, lambda it: dev[:shots], "zh", "letters")
    assert res["n"] == 4 and list(res["subjects"]) == ["computer_network"]
    assert res["acc_norm"] == res["acc"]  # letters have equal lengths


def test_cmmlu_format_and_cli(env, tmp_path):
    rows = [(i, q, a, b, c, d, ans) for i, (_, q, a, b, c, d, ans) in enumerate(CEVAL_VAL)]
    write_csv(tmp_path / "computer_network.csv", ["", "Question", "A", "B", "C", "D", "Answer"], rows)
    items, fmt, _ = mcq.load_items(str(tmp_path / "computer_network.csv"))
    assert fmt == "cmmlu" and [i.answer for i in items] == [1, 1, 0, 2] and items[2].uid == "2"
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_mcq.py"), "--model", env["model_dir"],
                        "--data", str(env["data"] / "six.jsonl"), "--shots", "1", "--json", str(out)],
                       capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "overall" in r.stdout and "astronomy" in r.stdout
    cli = json.loads(out.read_text(encoding="utf-8"))
    lib = run(env, env["data"] / "six.jsonl", shots=1)
    np.testing.assert_allclose([x for i in cli["items"] for x in i["lls"]],
                               [x for i in lib["items"] for x in i["lls"]], rtol=1e-6, atol=1e-5)


def test_bad_files(env, tmp_path):
    write_csv(tmp_path / "a_val.csv", ["id", "question", "A", "B", "C", "D"], [("0", "q", "1", "2", "3", "4")])
    with pytest.raises(YouzhiError, match="answer missing for --format ceval"):
        mcq.load_items(str(tmp_path / "a_val.csv"), "ceval")
    write_csv(tmp_path / "b_test.csv", ["id", "question", "A", "B", "C", "D", "answer"],
              [("0", "q", "1", "2", "3", "4", "")])
    with pytest.raises(YouzhiError, match="no labels"):
        mcq.load_items(str(tmp_path / "b_test.csv"))
    (tmp_path / "c.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{oops\n')
    with pytest.raises(YouzhiError, match="line 2 is not valid JSON"):
        mcq.load_items(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": "C"}\n')
    with pytest.raises(YouzhiError, match="not one of A, B"):
        mcq.load_items(str(tmp_path / "d.jsonl"))
    with pytest.raises(YouzhiError, match="nothing is left to score"):
        mcq.plan_shots([mcq.Item("s", "q", ["a", "b"], 0)], 1)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_mcq.py"), "--model", env["model_dir"],
                        "--data", str(tmp_path / "c.jsonl")], capture_output=True, text=True,
                       env=dict(os.environ, GLOG_v="3"))
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error:") and len(err.splitlines()) == 1 and "line 2" in err
