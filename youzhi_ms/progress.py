"""Status lines for steps that can take more than a few seconds, so no stretch of a tool's run is silent.

`step("compiling the decode graph (first call only)")` says what is running once it has taken a second (quicker
steps, and input errors found at once, stay silent), then a line every ~10 s while it lasts (a graph compile is one
blocking call into MindSpore, which a progress bar cannot see into; MindSpore releases the interpreter often enough for
a timer thread to print), and how long it took. Lines go to stderr so a tool's own output (generated text, JSON) stays
clean on stdout.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

TICK_SECONDS = 10.0
QUIET_BELOW_SECONDS = 1.0


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
