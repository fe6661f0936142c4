"""tools/generate.py --chat: a conversation at a terminal (driven over a pty: prompt, labelled answers after each Enter,
history kept, /reset, exit word, Ctrl-D) and the piped form for scripts. The history reaches the model: every turn's
prompt ids equal transformers' chat-template rendering of the whole conversation, and the answers equal transformers'
greedy generation from those ids."""
import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 128
# the word tokenizer knows only w0..w127: roles and the turn markers are words too
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w1 {% else %}w2 {% endif %}{{ m['content'] }} w3 "
            "{% endfor %}{% if add_generation_prompt %}w2 {% endif %}")
MAX_NEW = 5


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from helpers import make_source, write_word_tokenizer
    path = tmp_path_factory.mktemp("chat") / "m"
    model = make_source("llama", path, seed=3)
    write_word_tokenizer(path, V)
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "chat_template": TEMPLATE}, f)
    return path, model


def _reference(path, model, messages):
    """transformers: the prompt ids of `messages` and the greedy reply's ids (stopping at <|endoftext|> = 0)."""
    import torch
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=0,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return ids, out[0, len(ids):].tolist()


def _own_terminal():
    """In the child: a new session whose controlling terminal is the pty (stdin), so that Ctrl-C typed there is a
    SIGINT to the tool, as in a real terminal."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test run started in the background inherits it ignored


class Terminal:
    """A tool run with a pty as its terminal (stdin, stdout and stderr)."""

    def __init__(self, argv):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env=dict(os.environ, TERM="dumb"), preexec_fn=_own_terminal)
        os.close(slave)
        self.master, self.seen = master, ""

    def expect(self, text, timeout=600):
        """Read until `text` appears after what was already consumed; returns what came before it."""
        t_end = time.time() + timeout
        while text not in self.seen:
            if time.time() > t_end or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{text!r} not seen; the terminal shows:\n{self.seen}")
            if select.select([self.master], [], [], 1)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:  # EIO: the tool ended and its output is drained
                    pass
        before, _, self.seen = self.seen.partition(text)
        return before

    def send(self, text):
        os.write(self.master, text.encode())

    def finish(self, timeout=60):
        rc = self.proc.wait(timeout)
        try:
            while select.select([self.master], [], [], 0.2)[0]:
                self.seen += os.read(self.master, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
        except OSError:
            pass
        os.close(self.master)
        return rc


def _answer(block):
    """The answer text between `assistant> ` and the line end (compile and status lines come before the label)."""
    line = block.split("assistant> ", 1)[1]
    return line.split("\n", 1)[0]


def test_chat_at_a_terminal(chat_model, tmp_path):
    path, model = chat_model
    js = tmp_path / "chat.json"
    term = Terminal([sys.executable, "tools/generate.py", "--model", str(path), "--chat", "--max-new-tokens",
                     str(MAX_NEW), "--json", str(js)])
    banner = term.expect("you> ")
    assert "type a message and press Enter; `exit` or Ctrl-D ends" in banner
    term.send("w10 w11\n")
    first = _answer(term.expect("you> "))
    term.send("w12 w13 w14\n")  # a follow-up: answered with the first turn in its prompt
    second = _answer(term.expect("you> "))
    term.send("/reset\n")
    assert "a new conversation" in term.expect("you> ")
    term.send("w12 w13 w14\n")  # the same message again, now without history
    third = _answer(term.expect("you> "))
    term.send("exit\n")
    assert term.finish() == 0, term.seen
    with open(js) as f:
        res = json.load(f)
    assert [r["text"] for r in res] == [first, second, third]
    u1, u2 = {"role": "user", "content": "w10 w11"}, {"role": "user", "content": "w12 w13 w14"}
    a1 = {"role": "assistant", "content": first}
    for r, history in zip(res, ([u1], [u1, a1, u2], [u2])):  # the third turn comes after /reset
        # the whole conversation reached the model, and it answered what transformers answers to it
        assert (r["prompt_ids"], r["output_ids"]) == _reference(path, model, history)
    assert len(res[1]["prompt_ids"]) > len(res[0]["prompt_ids"]) + len(res[0]["output_ids"])


@pytest.mark.parametrize("key", ["ctrl-d", "ctrl-c"])
def test_ctrl_d_or_ctrl_c_ends_the_chat(chat_model, key):
    path, _ = chat_model
    term = Terminal([sys.executable, "tools/generate.py", "--model", str(path), "--chat", "--max-new-tokens",
                     str(MAX_NEW)])
    term.expect("you> ")
    term.send("w20\n")
    assert _answer(term.expect("you> "))
    if key == "ctrl-d":
        term.send("\x04")  # at an empty prompt: the end of the conversation
        assert term.finish() == 0, term.seen
        assert term.seen.strip() == ""
    else:
        term.send("w21\x03")  # half-typed: the chat ends with one line (MindSpore's own handler makes it a SIGTERM)
        assert term.finish() in (130, 143), term.seen
        assert term.seen.splitlines()[-1] in ("interrupted (Ctrl-C): the chat ended",
                                              "interrupted (Ctrl-C or SIGTERM): the chat ended"), term.seen
    assert "Traceback" not in term.seen


def test_piped_chat_is_the_same_conversation_unlabelled(chat_model, tmp_path):
    path, model = chat_model
    js = tmp_path / "piped.json"
    r = subprocess.run([sys.executable, "tools/generate.py", "--model", str(path), "--chat", "--max-new-tokens",
                        str(MAX_NEW), "--json", str(js)], cwd=ROOT, input="w10 w11\n\nw12 w13 w14\n",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with open(js) as f:
        res = json.load(f)
    assert r.stdout.splitlines() == [x["text"] for x in res] and "you>" not in r.stdout + r.stderr
    history = [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": res[0]["text"]},
               {"role": "user", "content": "w12 w13 w14"}]
    assert (res[1]["prompt_ids"], res[1]["output_ids"]) == _reference(path, model, history)
