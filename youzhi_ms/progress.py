"""Status lines for steps that can take more than a few seconds, so no stretch of a tool's run is silent, and the
progress bar every tool uses.

`step("compiling the decode graph (first call only)")` says what is running once it has taken a second (quicker
steps, and input errors found at once, stay silent), then a line every ~10 s while it lasts (a graph compile is one
blocking call into MindSpore, which a progress bar cannot see into; MindSpore releases the interpreter often enough for
a timer thread to print), and how long it took. Lines go to stderr so a tool's own output (generated text, JSON) stays
clean on stdout.

`ProgressBar` is tqdm on a terminal. Written to a pipe or a file (a CI log, `2>&1 | tee`), tqdm's carriage-return
redraws pile up into one line thousands of characters long; there it prints a plain line instead: one when it starts, one
every PLAIN_EVERY_SECONDS while it runs (also when no item finishes in that time: the line's elapsed time moves on and
its postfix says what the current item is doing), and one when it ends.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

TICK_SECONDS = 10.0
QUIET_BELOW_SECONDS = 1.0
PLAIN_EVERY_SECONDS = 10.0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def step(what: str, every: float = TICK_SECONDS, quiet_below: float = QUIET_BELOW_SECONDS):
    t0 = time.time()
    stop = threading.Event()
    announced = threading.Event()

    def tick():
        if stop.wait(quiet_below):
            return
        say(f"{what} ...")
        announced.set()
        wait = every - quiet_below  # ticks at every, 2 * every, ... from the start
        while not stop.wait(wait):
            say(f"  ... {what}: {time.time() - t0:.0f} s")
            wait = every

    ticker = threading.Thread(target=tick, name="youzhi-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
    if announced.is_set():
        say(f"{what}: done in {time.time() - t0:.1f} s")


def _on_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar(tqdm):
    """tqdm, with plain lines instead of redraws when its stream is not a terminal (see the module docstring).
    `every`: seconds between plain lines (default PLAIN_EVERY_SECONDS)."""

    PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"

    def __init__(self, *args, every: float | None = None, **kwargs):
        self._plain = not _on_terminal(kwargs.get("file") or sys.stderr)
        self._started = False
        self._stop = threading.Event()
        self._ticker = None
        super().__init__(*args, **kwargs)
        if self._plain and not self.disable:
            self._ticker = threading.Thread(target=self._tick, args=(every or PLAIN_EVERY_SECONDS,), daemon=True,
                                            name="youzhi-progress-bar")
            self._ticker.start()

    def _plain_line(self) -> None:
        self.bar_format = self.PLAIN_FORMAT if self.total else self.PLAIN_FORMAT_NO_TOTAL
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self._plain_line()

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        if msg == "":  # tqdm clearing its line: a plain log has nothing to clear
            return False
        if not self._started:  # the first display, from tqdm's __init__: the work has started
            self._started = True
            self._plain_line()
        return True  # later redraws: the ticker prints instead, at its own pace

    def clear(self, nolock=False):
        if not self._plain:
            super().clear(nolock)

    def close(self):
        if getattr(self, "_plain", False) and not self.disable:
            self._stop.set()
            if self._ticker is not None and self._ticker is not threading.current_thread():
                self._ticker.join()
            self._ema_dt = lambda: None  # the final line gives the overall rate, as tqdm's last redraw does
            self._plain_line()
            self.leave = False  # tqdm's own close then only "clears" the line, which display() skips
        super().close()
