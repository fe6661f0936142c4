"""Where tools may write, and writing there atomically.

The output rule every tool follows (README, "Output paths"):

- an output that is, contains or lies inside one of the tool's inputs is refused (writing it would replace or alter
  the input);
- a directory output is written as a new directory, or into an existing empty one. An existing non-empty directory is
  refused unless `--overwrite` is given, and even then it is replaced only if it is a previous youzhi_ms output: it
  carries `MARKER` (written into every output directory) and holds nothing but what that output listed. A directory
  the tools did not create is never deleted or replaced;
- a file output (`--json`, `--out`) is refused if it exists unless `--overwrite` is given: the path names exactly the
  one file that gets replaced, so nothing else can be lost.

The checks run twice: when the tool parses its arguments (so a bad path fails before any computation) and right
before the final rename (something may have appeared at the path meanwhile). A directory is written into a hidden
temp sibling and renamed into place only when complete, so an interrupted job leaves no half-written output; the temp
sibling is removed on any error or interrupt, and one left by a killed process (SIGKILL) is removed by the next run
writing the same output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Iterable, Optional, Sequence, Tuple, Union

from youzhi_ms.errors import YouzhiError, raise_if_interrupted

MARKER = ".youzhi_ms_output.json"

Inputs = Iterable[Union[str, Tuple[str, Optional[str]]]]


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _inputs(inputs: Inputs):
    """(label, path) pairs of the inputs that exist on disk (names such as 'wiki-eval' or 'smollm2' are not paths)."""
    for item in inputs or ():
        label, path = item if isinstance(item, tuple) else ("input", item)
        if path and isinstance(path, str) and os.path.exists(path):
            yield label, path


def check_not_input(path: str, inputs: Inputs, flag: str) -> None:
    """Refuse an output path that is, contains or lies inside an input (after resolving symbolic links)."""
    out = _real(path)
    for label, inp in _inputs(inputs):
        src = _real(inp)
        if out == src:
            raise YouzhiError(f"{flag} {path} is the input {label} {inp}; writing there would replace it: "
                              "choose a new path")
        if _within(src, out):
            raise YouzhiError(f"{flag} {path} contains the input {label} {inp}; writing there would replace it: "
                              "choose a path outside it")
        if os.path.isdir(src) and _within(out, src):
            raise YouzhiError(f"{flag} {path} lies inside the input {label} {inp}; outputs never go into an input: "
                              "choose a path outside it")


def _check_parent(path: str, flag: str) -> None:
    """The nearest existing ancestor must be a writable directory (missing parents are created when writing)."""
    p = os.path.dirname(_real(path))
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise YouzhiError(f"{flag} {path}: {p} is a file, not a directory; choose another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise YouzhiError(f"{flag} {path}: cannot write into {p} (permission denied); choose another path")


def _describe(path: str, names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"


def read_marker(path: str) -> Optional[dict]:
    """The marker of a previous youzhi_ms output directory, or None (absent, unreadable or not ours)."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("written_by") == "youzhi_ms" else None


def write_marker(path: str, kind: str, files: Optional[Sequence[str]]) -> None:
    """`files`: the top-level entries the output consists of (None: a directory that grows, e.g. a training run)."""
    with open(os.path.join(path, MARKER), "w", encoding="utf-8") as f:
        json.dump({"written_by": "youzhi_ms", "kind": kind, "tool": os.path.basename(sys.argv[0] or "python"),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S"), "files": None if files is None else sorted(files)},
                  f, indent=1)
        f.write("\n")


def _leftover_of(name: str) -> str:
    """The entry a temp / set-aside leftover belongs to ('.hf_model.tmp-x1' -> 'hf_model', 'a.json.tmp' -> 'a.json')."""
    base = name[1:] if name.startswith(".") else name
    for tag in (".tmp", ".old-"):
        if tag in base:
            base = base[:base.index(tag)]
    return base


def _own_output(path: str, names: Sequence[str], legacy_marker: Optional[str],
                allowed: Optional[Iterable[str]]) -> Tuple[bool, str]:
    """(replaceable, why not): a marked directory holding only what its marker (or `allowed`) lists."""
    marker = read_marker(path)
    if marker is None:
        if legacy_marker and os.path.isfile(os.path.join(path, legacy_marker)):
            return True, ""
        return False, f"it was not written by youzhi_ms (no {MARKER})"
    listed = marker.get("files")
    if listed is None and allowed is None:
        return True, ""
    known = set(listed if isinstance(listed, list) else []) | set(allowed or ()) | {MARKER}
    extra = sorted(n for n in names if n not in known and _leftover_of(n) not in known)
    if extra:
        return False, f"it holds entries youzhi_ms did not write there ({', '.join(extra[:4])})"
    return True, ""


def check_output_dir(path: str, overwrite: bool = False, inputs: Inputs = (), flag: str = "--output-dir",
                     legacy_marker: Optional[str] = None, allowed: Optional[Iterable[str]] = None) -> str:
    """Apply the output rule to a directory path; returns its resolved absolute path. Nothing is created."""
    if not isinstance(path, str) or not path.strip():
        raise YouzhiError(f"{flag} is empty; give a directory path")
    check_not_input(path, inputs, flag)
    real = _real(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise YouzhiError(f"{flag} {path} is a broken symbolic link; remove it or choose another path")
    if os.path.exists(real):
        if not os.path.isdir(real):
            raise YouzhiError(f"{flag} {path} exists and is a file; choose a directory path")
        try:
            names = os.listdir(real)
        except OSError as exc:
            raise YouzhiError(f"{flag} {path} cannot be read ({exc.strerror}); choose another directory") from None
        if names:
            what = _describe(real, names)
            if not overwrite:
                raise YouzhiError(f"{flag} {path} already exists and is not empty ({what}); choose a new directory, "
                                  "or pass --overwrite to replace an earlier youzhi_ms output there")
            ok, why = _own_output(real, names, legacy_marker, allowed)
            if not ok:
                raise YouzhiError(f"{flag} {path} is not replaced even with --overwrite: {why}; it holds {what}. "
                                  "Choose a new directory, or move that one away yourself")
    _check_parent(real, flag)
    return real


def check_output_file(path: str, overwrite: bool = False, inputs: Inputs = (), flag: str = "--json") -> str:
    """Apply the output rule to a file path; returns its resolved absolute path. Nothing is created."""
    if not isinstance(path, str) or not path.strip():
        raise YouzhiError(f"{flag} is empty; give a file path")
    check_not_input(path, inputs, flag)
    real = _real(path)
    if os.path.isdir(real) or path.endswith(os.sep):
        raise YouzhiError(f"{flag} {path} is a directory; give a file path (e.g. {os.path.join(path, 'out.json')})")
    if os.path.islink(path) and not os.path.exists(path):
        raise YouzhiError(f"{flag} {path} is a broken symbolic link; remove it or choose another path")
    if os.path.exists(real) and not overwrite:
        raise YouzhiError(f"{flag} {path} already exists; choose a new file name, or pass --overwrite to replace it")
    _check_parent(real, flag)
    return real


def _temp_prefix(real: str) -> str:
    """Temp siblings carry the writer's pid, so a later run can tell the leftovers of a killed one (SIGKILL, power
    loss: nothing could clean up) from the temp files of a job still running, and remove only the former."""
    return f".{os.path.basename(real)}.tmp-{os.getpid()}-"


def _remove_stale_temps(real: str) -> None:
    parent, base = os.path.dirname(real), f".{os.path.basename(real)}.tmp-"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name[len(base):].split("-", 1)[0]
        if not name.startswith(base) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (or the pid was reused): leave it
        except ProcessLookupError:
            pass
        except OSError:  # e.g. another user's live process
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isfile(path):
            with contextlib.suppress(OSError):
                os.remove(path)


def _swap_in(tmp: str, real: str) -> None:
    """Rename `tmp` to `real`; a directory already there (checked replaceable) is moved aside first, then deleted."""
    parent = os.path.dirname(real)
    old = None
    if os.path.exists(real):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(real, old)
    try:
        os.rename(tmp, real)
    except OSError:
        if old:
            os.rename(old, real)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False, inputs: Inputs = (), flag: str = "--output-dir",
                      legacy_marker: Optional[str] = None, kind: str = "output"):
    """Yield a temp directory next to `path`; when the block completes it gets the marker and is renamed to `path`
    (replacing an earlier youzhi_ms output there only with `overwrite`, see the module docstring). On any exception
    the temp directory is removed and `path` is untouched.

    The temp dir lives in the same parent so the final step is a rename on one filesystem, never a copy.
    `legacy_marker`: a file whose presence also identifies an output written before markers existed.
    """
    real = check_output_dir(path, overwrite, inputs, flag, legacy_marker)
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(real)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(real), dir=parent)
    try:
        yield tmp
        raise_if_interrupted()
        check_output_dir(path, overwrite, inputs, flag, legacy_marker)
        write_marker(tmp, kind, os.listdir(tmp) + [MARKER])
        os.chmod(tmp, 0o755)
        _swap_in(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(path: str, overwrite: bool = False, inputs: Inputs = (), flag: str = "--json"):
    """Yield a temp file path next to `path`; renamed over `path` when the block completes, removed on failure."""
    real = check_output_file(path, overwrite, inputs, flag)
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(real)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(real), dir=parent)
    os.close(fd)
    try:
        yield tmp
        raise_if_interrupted()
        check_output_file(path, overwrite, inputs, flag)
        os.chmod(tmp, 0o644)
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_output(path: str, obj, overwrite: bool = False, inputs: Inputs = (), flag: str = "--json") -> None:
    """A tool's JSON result file, written atomically under the output rule."""
    with atomic_output_file(path, overwrite, inputs, flag) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")


def claim_run_dir(path: str, overwrite: bool, resume: bool, inputs: Inputs, allowed: Iterable[str],
                  flag: str = "output_dir") -> str:
    """A directory a job fills step by step (training): new or empty, or a run to resume, or (with `overwrite`) an
    earlier youzhi_ms run that is started over. Returns the resolved path; the directory exists and is marked after.

    `allowed`: the entries a run directory may hold (what a run writes), so a directory with anything else is never
    started over."""
    if resume:
        check_not_input(path, inputs, flag)
        real = _real(path)
        os.makedirs(real, exist_ok=True)
        if read_marker(real) is None:
            write_marker(real, "run", None)
        return real
    real = check_output_dir(path, overwrite, inputs, flag, allowed=allowed)
    if os.path.isdir(real) and os.listdir(real):  # replaceable (checked): move the old run aside, then delete it
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.old-", dir=os.path.dirname(real))
        os.rmdir(old)
        os.rename(real, old)
        shutil.rmtree(old, ignore_errors=True)
    os.makedirs(real, exist_ok=True)
    write_marker(real, "run", None)
    return real


OVERWRITE_HELP = ("replace an existing output: a directory only if an earlier youzhi_ms run wrote it (it carries "
                  f"{MARKER}), a file named by an output option as given; inputs are never replaced")
