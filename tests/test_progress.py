"""Progress written to a pipe or a file: plain lines (one at the start, one every `every` seconds, one at the end), no
carriage-return redraws; on a terminal the ordinary tqdm bar (youzhi_ms/progress.py). And a tool's whole stderr in a
pipe carries no carriage return."""
import io
import os
import pty
import subprocess
import sys
import time

from youzhi_ms.progress import ProgressBar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    t0 = time.time()
    bar = ProgressBar(total=4, desc="work", unit="item", file=out, every=0.5)
    bar.update(1)
    bar.set_postfix(err="0.1")
    time.sleep(1.3)  # one item that takes a while: the ticks still come, with the elapsed time moving on
    bar.update(3)
    bar.close()
    elapsed = time.time() - t0
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:   0% 0/4 [00:00<?")
    ticks = lines[1:-1]
    assert 2 <= len(ticks) <= elapsed / 0.5, lines  # at 0.5 and 1.0 s (later ones if the machine is slow)
    assert all(t.startswith("work:  25% 1/4 [00:0") and t.endswith(", err=0.1]") for t in ticks), ticks
    assert lines[-1].startswith("work: 100% 4/4 [00:01<00:00")
    bar.close()  # a second close (tqdm's __del__ does one) adds nothing
    assert out.getvalue() == text


def test_plain_iteration_write_and_leave_false():
    out = io.StringIO()
    for _ in ProgressBar(range(3), desc="quick", file=out, leave=False):
        ProgressBar.write("a log line", file=out)  # tqdm.write: would clear the bar with a carriage return
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("quick:   0% 0/3") and lines[1:4] == ["a log line"] * 3
    assert lines[4].startswith("quick: 100% 3/3") and len(lines) == 5  # leave=False still ends with a line


def test_tqdm_bar_on_a_terminal():
    master, slave = pty.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as term:
            assert term.isatty()
            bar = ProgressBar(total=2, desc="tty", file=term, every=0.1)
            bar.update(2)
            bar.close()
        os.close(slave)
        slave = None
        data = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            data += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert b"\r" in data and b"tty: 100%|" in data  # tqdm's own redraws and bar


def test_tool_stderr_in_a_pipe_has_no_carriage_returns(tmp_path):
    """A real tool whose bar runs (HF -> MindSpore conversion of a tiny model), stderr to a pipe."""
    from helpers import make_source
    make_source("llama", tmp_path / "hf")
    r = subprocess.run([sys.executable, "tools/convert_hf_weights.py", "--input-dir", str(tmp_path / "hf"),
                        "--output-dir", str(tmp_path / "ms")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\r" not in r.stdout
    bar = [ln for ln in r.stderr.splitlines() if ln.startswith("convert:")]
    assert bar[0].startswith("convert:   0% 0/") and bar[-1].startswith("convert: 100% ")
    assert max(len(ln) for ln in r.stderr.splitlines()) < 200
