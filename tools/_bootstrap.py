"""Make `python tools/x.py` work from a source checkout without installing the package, and make Ctrl-C / SIGTERM
during the imports that follow end quietly (130 / 143, one line) instead of with a traceback: nothing has been written
yet. The tool's `cli_main` replaces these handlers with the ones that clean up."""
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _quit(signum, frame):
    sys.stderr.write(f"\ninterrupted ({'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}) while starting; "
                     "nothing was written\n")
    os._exit(143 if signum == signal.SIGTERM else 130)


for _sig in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_sig) not in (signal.SIG_IGN, None):
        signal.signal(_sig, _quit)
