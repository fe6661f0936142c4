"""Make `python tools/x.py` work from a source checkout without installing the package, and make Ctrl-C / SIGTERM
during the imports that follow end quietly (130 / 143, one line) instead of with a traceback: nothing has been written
yet. The tool's `cli_main` replaces these handlers with the ones that clean up.

Run by a Python that has no MindSpore (the system `python3`, the venv not activated), a tool restarts itself with the
project's `.venv/bin/python` when that exists, saying so in one line on stderr; otherwise it stops with one `error:`
line (exit 2) saying how to create and activate the environment, instead of a ModuleNotFoundError traceback."""
import importlib.util
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
_REEXEC = "YOUZHI_REEXEC"  # set on the restart, so that a broken .venv cannot make the tool restart itself forever


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _show(path):
    """path as the user would type it here: relative below the working directory, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _ensure_environment():
    if importlib.util.find_spec("mindspore") is not None:  # looks the package up without importing it
        return
    venv_python = os.path.join(VENV, "bin", "python")
    tool = sys.argv[0] if sys.argv and sys.argv[0] else "the tool"
    inside = _same_file(sys.prefix, VENV)
    if not inside and os.environ.get(_REEXEC) != "1" and os.access(venv_python, os.X_OK):
        sys.stderr.write(f"note: mindspore is not installed for {sys.executable}; running {tool} with the "
                         f"project's {_show(venv_python)} (or activate it first: `. {_show(VENV)}/bin/activate`)\n")
        sys.stderr.flush()
        env = dict(os.environ, **{_REEXEC: "1"})
        try:
            os.execve(venv_python, [venv_python, *sys.argv], env)
        except OSError as exc:
            sys.stderr.write(f"error: could not start {venv_python} ({exc.strerror}); re-create the environment with "
                             "`bash run_scripts/setup_env.sh`\n")
            sys.exit(2)
    if inside or os.environ.get(_REEXEC) == "1":
        sys.stderr.write(f"error: the project's environment {_show(VENV)} has no mindspore (did its set-up finish?); "
                         f"run `bash {_show(ROOT + '/run_scripts/setup_env.sh')}` again, then the tool\n")
    else:
        sys.stderr.write(f"error: mindspore is not installed for {sys.executable} and the project has no .venv yet; "
                         f"create it with `bash {_show(ROOT + '/run_scripts/setup_env.sh')}`, activate it with "
                         f"`. {_show(VENV)}/bin/activate` and run the tool again\n")
    sys.exit(2)


_ensure_environment()
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# status lines on stdout arrive when they are printed, also in a pipe or a log file (block-buffered otherwise)
if hasattr(sys.stdout, "reconfigure"):
    sys.stdout.reconfigure(line_buffering=True)


def _quit(signum, frame):
    sys.stderr.write(f"\ninterrupted ({'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}) while starting; "
                     "nothing was written\n")
    os._exit(143 if signum == signal.SIGTERM else 130)


for _sig in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_sig) not in (signal.SIG_IGN, None):
        signal.signal(_sig, _quit)
