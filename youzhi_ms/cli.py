"""Argument parsing shared by the tools: errors are one `error:` line with exit status 2, like every other bad input,
and numeric options are checked when they are parsed, so that a value a tool would otherwise reinterpret silently
(0 meaning "no limit" or "the default", a negative count, NaN) is refused before any work starts."""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Optional

from youzhi_ms.errors import YouzhiError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors raised as YouzhiError (so `cli_main` prints them as one line, exit 2)."""

    def error(self, message):
        raise YouzhiError(f"{message} (see {self.prog} --help)")


def int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def number(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in [lo, hi] (open ends with lo_open / hi_open)."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    span = f"in {left}{'-inf' if lo is None else lo:g}, {'inf' if hi is None else hi:g}{right}" \
        if lo is not None and hi is not None else \
        (f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else f"{'<' if hi_open else '<='} {hi:g}")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {span}, got {text!r}") from None
        ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a number {span}, got {text}")
        return v
    parse.__name__ = f"number {span}"
    return parse


def nonempty(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty; give {what}")
        return text
    parse.__name__ = what
    return parse


def path_problem(path: str, want: str) -> str:
    """Why `path` is not the `want` ("folder" or "file") a tool expected, as the end of a sentence naming it: "does not
    exist", "is a file, not a folder" or "is a folder, not a file". A path that exists as the wrong kind must not be
    called missing: the user can see it."""
    if not os.path.exists(path):
        return "does not exist"
    return "is a file, not a folder" if want == "folder" else "is a folder, not a file"


POSITIVE = int_at_least(1)
NONNEGATIVE = int_at_least(0)


def yaml_config_parser(description: str, config_help: str, set_example: str = "") -> ArgumentParser:
    """The parser of a tool driven by a MindFormers-style yaml (train, pipeline, dryrun): --config and the repeatable
    --set SECTION.KEY=VALUE overrides, read by train/run_config.py's rules."""
    ap = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help=config_help)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config key (repeatable)" + (f", e.g. --set {set_example}" if set_example else ""))
    return ap


def add_run_dir_options(ap: argparse.ArgumentParser, resume_help: str) -> None:
    """--resume / --overwrite of a tool that fills an output_dir over time (train, pipeline)."""
    ap.add_argument("--resume", action="store_true", help=resume_help)
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in an output_dir that holds an earlier youzhi_ms run (exactly what that run "
                         "wrote is replaced; anything else there stops the run; a directory youzhi_ms did not create "
                         "never is)")
