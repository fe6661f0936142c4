"""A tool started by a Python without MindSpore (the system python3, the venv not activated): it restarts itself with
the project's .venv and says so in one line, or, with no .venv, ends with one `error:` line and exit 2; never a
ModuleNotFoundError traceback (tools/_bootstrap.py)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the interpreter the venv was made from, without any site-packages (-S): certainly no mindspore
BARE = [getattr(sys, "_base_executable", None) or sys.executable, "-S"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "YOUZHI_REEXEC")}
    env.update(extra)
    return env


def _run(argv, cwd, **extra):
    return subprocess.run(argv, cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=300)


def test_bare_python_has_no_mindspore():
    r = _run(BARE + ["-c", "import mindspore"], ROOT)
    assert r.returncode != 0 and "No module named 'mindspore'" in r.stderr  # what the tools would otherwise show


@pytest.mark.skipif(not os.access(os.path.join(ROOT, ".venv", "bin", "python"), os.X_OK),
                    reason="needs the project's .venv (run_scripts/setup_env.sh)")
def test_restarts_with_the_project_venv():
    r = _run(BARE + ["tools/plan_concurrency.py", "--help"], ROOT)
    assert r.returncode == 0, r.stderr
    assert "usage: plan_concurrency.py" in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: mindspore is not installed for "), r.stderr
    assert ".venv/bin/python" in lines[0] and ". .venv/bin/activate" in lines[0]
    # a real run, not only --help: the restarted tool imports mindspore and does its work
    r = _run(BARE + ["tools/generate.py"], ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == "error: give --model DIR or --mindir DIR"


def _checkout_without_venv(tmp_path):
    shutil.copytree(os.path.join(ROOT, "tools"), tmp_path / "tools")
    return tmp_path


def test_no_venv_one_error_line(tmp_path):
    root = _checkout_without_venv(tmp_path)
    r = _run(BARE + ["tools/generate.py", "--model", "x"], root)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: mindspore is not installed for ")
    assert "bash run_scripts/setup_env.sh" in r.stderr and ". .venv/bin/activate" in r.stderr


def test_no_restart_loop(tmp_path):
    """A .venv that itself lacks mindspore (its set-up was interrupted): one error line, not a restart loop."""
    root = _checkout_without_venv(tmp_path)
    os.makedirs(root / ".venv" / "bin")
    os.symlink(BARE[0], root / ".venv" / "bin" / "python")  # runs without mindspore, like an unfinished venv
    r = _run(BARE + ["tools/generate.py", "--model", "x"], root)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("note: mindspore is not installed") and len(lines) == 2, r.stderr
    assert lines[1].startswith("error: the project's environment .venv has no mindspore")
