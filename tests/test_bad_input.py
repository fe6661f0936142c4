"""Every bad input ends in one clean error (#11): exit 2, one `error:` line naming the problem and the fix, no
traceback, inputs and unrelated files untouched. Validation functions are tested in-process (fast); each class of
input is also driven once through a tool as a subprocess, on tiny models made by transformers."""
import json
import os

import pytest

from youzhi_ms.errors import YouzhiError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------- torn logs
def test_torn_loss_log_tail_is_dropped_on_resume(tmp_path):
    from youzhi_ms.train.loss_log import append_row, read_loss_log, truncate_loss_log
    log = str(tmp_path / "loss_log.jsonl")
    for step in (1, 2, 3):
        append_row(log, {"step": step, "loss": 1.0 / step, "lr": 1e-3})
    with open(log, "a") as f:
        f.write('{"step": 4, "loss": 0.2')  # killed while appending step 4
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3]
    truncate_loss_log(log, 2)  # resume from the step-2 checkpoint
    append_row(log, {"step": 3, "loss": 0.3, "lr": 1e-3})
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3]
    with open(log, "a") as f:
        f.write('{"step": 4}\n')
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3, 4]  # a whole last line is kept


def test_damaged_loss_log_line_is_refused_with_its_number(tmp_path):
    from youzhi_ms.train.loss_log import truncate_loss_log
    log = tmp_path / "loss_log.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n\x00\x00garbage\n{"step": 2, "loss": 1}\n')
    before = log.read_bytes()
    with pytest.raises(YouzhiError, match="line 2 is not a loss-log row; the file is damaged"):
        truncate_loss_log(str(log), 1)
    assert log.read_bytes() == before


# ------------------------------------------------------------------------------------------------- tiny models
V = 96


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny Llama saved by transformers, with a character-level tokenizer, and a text file: (model dir, text)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("bad_input")
    d = base / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=0, eos_token_id=V - 1)).save_pretrained(d)
    tok = Tokenizer(models.BPE(vocab={chr(i + 33): i for i in range(V - 1)} | {"<|endoftext|>": V - 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(d / "tokenizer.json"))
    text = base / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says little but says it {i % 7} times over." * 4 for i in range(200)))
    return d, text


def run_tool(name, *args, signal_after=None):
    """(returncode, stdout, stderr) of tools/<name> in a fresh process (SIGINT after `signal_after` seconds)."""
    import signal
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        time.sleep(signal_after[0])
        p.send_signal(signal_after[1])
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def one_error(rc_out_err, *expect):
    rc, out, err = rc_out_err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (rc, err)
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_is_one_line_and_its_exit_code(tiny, tmp_path, sig, code):
    """Ctrl-C / SIGTERM while MindSpore starts or computes: one 'interrupted' line, 130 / 143, nothing written (it used
    to be a page of MindSpore exit-handler tracebacks and SIGABRT, or 143 without a word)."""
    import signal
    model, text = tiny
    rc, _, err = run_tool("eval_ppl.py", "--model", model, "--text", text, "--seq-len", 32,
                          "--json", tmp_path / "r.json", signal_after=(2.5, getattr(signal, sig)))
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert rc == code and len(lines) == 1 and lines[0].startswith("interrupted"), (rc, err)
    assert os.listdir(tmp_path) == []
