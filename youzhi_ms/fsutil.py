"""Atomic output directories: a job writes into a hidden temp sibling and renames it into place only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from youzhi_ms.errors import YouzhiError


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = True):
    """Yield a temp directory next to `path`; on success it replaces `path`, on any exception it is removed.

    The temp dir lives in the same parent so the final step is a rename on one filesystem, never a copy.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise YouzhiError(f"output path {path} exists and is a file; choose a directory path")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise YouzhiError(f"output directory {path} is not empty; remove it or pass --overwrite")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(path, old)
    os.rename(tmp, path)
    os.chmod(path, 0o755)
    if old:
        shutil.rmtree(old, ignore_errors=True)
