"""Where tools may write, and writing there atomically.

The output rule every tool follows (README, "Output paths"):

- an output that is, contains or lies inside one of the tool's inputs is refused (writing it would replace or alter
  the input);
- a directory output is written as a new directory, or into an existing empty one (the folder is kept, never swapped).
  Every output directory carries `MARKER`, listing every entry the run wrote (recursively; a training run adds each
  before writing it, `record_written`). An existing non-empty directory is refused unless `--overwrite` is given, and
  then exactly the listed entries (and the tools' own exactly-named temp leftovers of them) are replaced; anything
  else in it stops the run, listed. A directory the tools did not create is never deleted or replaced;
- one run per output at a time (`output_lock`): a second is refused at once;
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
import errno
import fcntl
import json
import os
import re
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


def replace_json(path: str, obj, **dump_options) -> None:
    """Write `obj` to `path` through a pid-tagged temp sibling (named as the output rule knows its leftovers): a torn
    marker would make an output look foreign, a torn state file would lose a run's bookkeeping."""
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, **dump_options)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_marker(path: str, kind: str, files: Sequence[str], preexisting: Optional[Sequence[str]] = None) -> None:
    """`files`: every entry the output consists of, as paths relative to `path` ('/' between parts, a directory with a
    trailing '/'); `--overwrite` later removes these and refuses if the directory holds anything else. `preexisting`:
    what a folder adopted by `train --resume` held already (never listed in `files`, see record_written)."""
    m = {"written_by": "youzhi_ms", "kind": kind, "tool": os.path.basename(sys.argv[0] or "python"),
         "time": time.strftime("%Y-%m-%d %H:%M:%S"), "files": sorted(set(files) | {MARKER})}
    if preexisting:
        m["preexisting"] = sorted(preexisting)
    replace_json(os.path.join(path, MARKER), m)


def tree_entries(path: str) -> list:
    """Every entry under `path` as write_marker lists them (symbolic links as files, never followed)."""
    out = []
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        pre = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out += [pre + d + "/" for d in dirs] + [pre + f for f in files]
    return out


def record_written(path: str, entries: Iterable[str]) -> None:
    """Add `entries` (relative paths, directories with a trailing '/') to the marker of the directory `path` that a job
    fills over time (training), before the job writes them. An entry the folder held when `--resume` adopted it (the
    marker's `preexisting`) is someone else's and is never added, so `--overwrite` can never remove it."""
    marker = read_marker(path)
    if marker is None:
        return
    listed = set(marker.get("files") or ())
    # what was there when the folder was adopted (by name, not "exists now": another rank of this run may already
    # have made an entry that this rank records)
    before = set(marker.get("preexisting") or ())
    new = [e for e in entries if e not in listed and e not in before and e.rstrip("/") not in before]
    if new:
        marker["files"] = sorted(listed | set(new))
        replace_json(os.path.join(path, MARKER), marker)


# the hidden names the tools give their temporary and set-aside siblings of an entry NAME (tempfile's 8 random
# characters): only these exact forms count as our leftovers, so a user's 'config.json.old-v1' never does
_LEFTOVER = re.compile(r"\.(?P<base>.+)\.(?:tmp-\d+-[a-z0-9_]{8}|old-[a-z0-9_]{8}|lock)")


def _unknown_entries(path: str, marker: dict) -> list:
    """The entries under `path` that its marker does not list (a listed directory carrying its own marker is checked
    against that marker), nor are leftovers of a listed entry named exactly as the tools name their temps."""
    listed = set(marker.get("files") or ()) | {MARKER}
    unknown = []

    def walk(rel_dir: str) -> None:
        try:
            names = sorted(os.listdir(os.path.join(path, rel_dir)))
        except OSError:
            unknown.append(rel_dir or ".")
            return
        for name in names:
            rel = rel_dir + name
            full = os.path.join(path, rel)
            is_dir = os.path.isdir(full) and not os.path.islink(full)
            if is_dir and (rel + "/" in listed or rel in listed):  # markers before #19 listed folders without '/'
                sub = read_marker(full)
                if sub is not None and rel + "/" + MARKER not in listed:
                    unknown.extend(rel + "/" + u for u in _unknown_entries(full, sub))
                else:
                    walk(rel + "/")
                continue
            if not is_dir and rel in listed:
                continue
            m = _LEFTOVER.fullmatch(name)
            if m and (rel_dir + m.group("base") in listed or rel_dir + m.group("base") + "/" in listed):
                continue
            unknown.append(rel + ("/" if is_dir else ""))

    walk("")
    return unknown


def _legacy_unknown(path: str, legacy: Tuple[str, str]) -> Optional[list]:
    """An output written before markers existed: carries the file `legacy[0]`, and every entry must match the pattern
    `legacy[1]` of what that tool wrote (the same contents check as a marker's list). None: not such an output."""
    if not os.path.isfile(os.path.join(path, legacy[0])):
        return None
    pattern = re.compile(legacy[1])
    return [e for e in tree_entries(path) if not pattern.fullmatch(e)]


def _own_output(path: str, names: Sequence[str], legacy_marker: Optional[Tuple[str, str]]) -> Tuple[bool, str]:
    """(replaceable, why not): a marked directory holding only what its marker lists."""
    marker = read_marker(path)
    if marker is None:
        unknown = _legacy_unknown(path, legacy_marker) if legacy_marker else None
        if unknown is None:
            return False, f"it was not written by youzhi_ms (no {MARKER})"
    elif not isinstance(marker.get("files"), list):
        return False, (f"its {MARKER} was written by an older youzhi_ms that did not record which files it wrote, so "
                       "nothing in it can be told from your own files")
    else:
        unknown = _unknown_entries(path, marker)
    if unknown:
        return False, f"it holds entries youzhi_ms did not write there ({', '.join(unknown[:4])}" \
                      f"{', ...' if len(unknown) > 4 else ''})"
    return True, ""


def written_exactly(path: str) -> bool:
    """True if the directory `path` holds only what its marker lists (what a run may remove as its own)."""
    marker = read_marker(path)
    return marker is not None and isinstance(marker.get("files"), list) and not _unknown_entries(path, marker)


def check_output_dir(path: str, overwrite: bool = False, inputs: Inputs = (), flag: str = "--output-dir",
                     legacy_marker: Optional[Tuple[str, str]] = None) -> str:
    """Apply the output rule to a directory path; returns its resolved absolute path. Nothing is created.
    `legacy_marker`: (file name, regex of every entry) of an output written before markers existed."""
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
            ok, why = _own_output(real, names, legacy_marker)
            if not ok:
                raise YouzhiError(f"{flag} {path} is not replaced even with --overwrite: {why}; it holds {what}. "
                                  "Choose a new directory, or move that one away yourself")
    _check_parent(real, flag)
    return real


def check_free_space(path: str, need: int, what: str) -> None:
    """Refuse before the work when the disk that will hold `path` has clearly less than `need` bytes free (a full disk
    found at the end costs the whole run; what is free may still shrink meanwhile, which the writers report)."""
    p = os.path.dirname(_real(path))
    while not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return
    if free < need:
        raise YouzhiError(f"{what} needs about {need / 2**20:.1f} MiB but the disk holding {p} has {free / 2**20:.1f} "
                          "MiB free; free some space or choose an output on a larger disk")


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


_held_locks: dict = {}  # resolved output path -> [lock file path, fd, depth]: this process's output locks


@contextlib.contextmanager
def output_lock(real: str, flag: str = "--output-dir"):
    """Hold an exclusive lock on the output `real` (a hidden `.NAME.lock` file next to it) for the block, so that a
    second run writing the same output is refused at once instead of racing the first (both would write the same
    temp names and work directory). Re-entrant within a process. The lock file is removed on release; a process killed
    meanwhile leaves it unlocked (the kernel drops the lock), and the next run takes it over."""
    real = _real(real)
    held = _held_locks.get(real)
    if held is not None:
        held[2] += 1
        try:
            yield
        finally:
            held[2] -= 1
        return
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    lock = os.path.join(parent, f".{os.path.basename(real)}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                pid = ""
            os.close(fd)
            raise YouzhiError(f"{flag} {real} is being written by another youzhi_ms run right now"
                              f"{f' (pid {pid})' if pid.isdigit() else ''}; wait for it to finish, or choose another "
                              "output path") from None
        try:  # the holder before us may have removed the file after we opened it: lock the file at the path
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[real] = [lock, fd, 1]
    try:
        yield
    finally:
        del _held_locks[real]
        with contextlib.suppress(OSError):
            os.remove(lock)  # while still locked, so nobody holds a lock on a removed file unnoticed
        os.close(fd)


def _move_entries(src: str, dst: str, names: Sequence[str]) -> list:
    """Rename the entries `names` from `src` into `dst` (one filesystem); returns those moved, in order."""
    moved = []
    for n in names:
        os.rename(os.path.join(src, n), os.path.join(dst, n))
        moved.append(n)
    return moved


def _fill_in_place(tmp: str, real: str) -> None:
    """Commit the complete temp directory `tmp` to `real`. A new path: one rename. An existing directory (empty, or
    an earlier output checked replaceable): the folder itself is kept (its inode, mode and owner are the user's); its
    entries are moved aside into a hidden `.NAME.old-*` sibling, the new entries are moved in with the marker last (an
    output without its marker never counts as complete), then the old entries are deleted. A failure part-way moves
    everything back."""
    if not os.path.lexists(real):
        os.chmod(tmp, 0o755)
        os.rename(tmp, real)
        return
    parent = os.path.dirname(real)
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.old-", dir=parent)
    olds = sorted(os.listdir(real), key=lambda n: n != MARKER)  # the marker out first
    news = sorted(os.listdir(tmp), key=lambda n: n == MARKER)  # and in last
    moved_out = moved_in = []
    try:
        moved_out = _move_entries(real, old, olds)
        moved_in = _move_entries(tmp, real, news)
    except BaseException:
        for n in reversed(moved_in):
            with contextlib.suppress(OSError):
                os.rename(os.path.join(real, n), os.path.join(tmp, n))
        for n in reversed(moved_out):
            with contextlib.suppress(OSError):
                os.rename(os.path.join(old, n), os.path.join(real, n))
        with contextlib.suppress(OSError):
            os.rmdir(old)
        raise
    os.rmdir(tmp)
    shutil.rmtree(old, ignore_errors=True)


def _enospc_note(exc: BaseException, tmp: str, real: str) -> None:
    """On a full disk: how much the unfinished output had reached (a lower bound of what it needs) and that it is gone.
    A write through a file object reports no file name: the output path stands in for it in the error line."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        size = 0
        for root, _, files in os.walk(tmp):
            for f in files:
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(root, f)).st_size
        if exc.filename is None:
            exc.filename = real
        exc.add_note(f"the unfinished output had reached {size / 1024:.0f} KiB (it needs more) and was removed")


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False, inputs: Inputs = (), flag: str = "--output-dir",
                      legacy_marker: Optional[Tuple[str, str]] = None, kind: str = "output"):
    """Yield a temp directory next to `path`; when the block completes it gets the marker (listing every entry written)
    and becomes `path` (see `_fill_in_place`; an earlier youzhi_ms output there is replaced only with `overwrite`, see
    the module docstring). On any exception the temp directory is removed and `path` is untouched. The output is
    locked for the block (`output_lock`): a second run writing the same path is refused at once.

    The temp dir lives in the same parent so the final step is a rename on one filesystem, never a copy.
    `legacy_marker`: see check_output_dir.
    """
    real = check_output_dir(path, overwrite, inputs, flag, legacy_marker)
    with output_lock(real, flag):
        check_output_dir(path, overwrite, inputs, flag, legacy_marker)
        parent = os.path.dirname(real)
        os.makedirs(parent, exist_ok=True)
        _remove_stale_temps(real)
        tmp = tempfile.mkdtemp(prefix=_temp_prefix(real), dir=parent)
        try:
            yield tmp
            raise_if_interrupted()
            check_output_dir(path, overwrite, inputs, flag, legacy_marker)
            write_marker(tmp, kind, tree_entries(tmp))
            _fill_in_place(tmp, real)
        except BaseException as exc:
            _enospc_note(exc, tmp, real)
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


def claim_run_dir(path: str, overwrite: bool, resume: bool, inputs: Inputs, flag: str = "output_dir") -> str:
    """A directory a job fills step by step (training): new or empty, or a run to resume, or (with `overwrite`) an
    earlier youzhi_ms run that is started over. Returns the resolved path; the directory exists and is marked after.

    The marker lists what the run writes, added by `record_written` before each new entry is written; `--overwrite`
    removes exactly those (a run holding anything else is refused) and keeps the folder itself. `resume` into a folder
    without a marker adopts it with an empty list: what was there before is never listed, so never removed."""
    if resume:
        check_not_input(path, inputs, flag)
        real = _real(path)
        os.makedirs(real, exist_ok=True)
        if read_marker(real) is None:
            write_marker(real, "run", [], preexisting=tree_entries(real))
        return real
    real = check_output_dir(path, overwrite, inputs, flag)
    if os.path.isdir(real) and os.listdir(real):  # replaceable (checked): its entries go, the folder stays
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.old-", dir=os.path.dirname(real))
        _move_entries(real, old, sorted(os.listdir(real), key=lambda n: n != MARKER))
        shutil.rmtree(old, ignore_errors=True)
    os.makedirs(real, exist_ok=True)
    write_marker(real, "run", [])
    return real


OVERWRITE_HELP = ("replace an existing output: in a directory, exactly the files an earlier youzhi_ms run wrote there "
                  f"(listed in its {MARKER}; anything else there stops the run), a file named by an output option "
                  "as given; inputs are never replaced")
