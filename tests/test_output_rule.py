"""The output rule (youzhi_ms/fsutil.py): no tool deletes or replaces anything it did not write.

In-process checks of the rule itself (fast), then the tools that write directories, driven as subprocesses on a tiny
model made by transformers: every refusal is exit 2 with one `error:` line, and the inputs and unrelated files are
byte-identical afterwards.
"""
import hashlib
import os
import subprocess
import sys

import pytest

from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import (MARKER, atomic_output_dir, atomic_output_file, check_output_dir, check_output_file,
                              claim_run_dir, read_marker, record_written)

from helpers import ROOT, one_error_line


def tree_digest(path) -> dict:
    """{relative path: sha256} of every file under `path` (the path itself if it is a file)."""
    path = str(path)
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _write_into(path, **kw):
    with atomic_output_dir(str(path), **kw) as tmp:
        with open(os.path.join(tmp, "result.txt"), "w") as f:
            f.write("new")


# ------------------------------------------------------------------------------------------------- the rule
def test_new_and_empty_directories_are_written_and_marked(tmp_path):
    _write_into(tmp_path / "a" / "b")  # missing parents are created
    assert (tmp_path / "a" / "b" / "result.txt").read_text() == "new"
    m = read_marker(str(tmp_path / "a" / "b"))
    assert m["written_by"] == "youzhi_ms" and m["files"] == sorted(["result.txt", MARKER])
    (tmp_path / "empty").mkdir()
    _write_into(tmp_path / "empty")
    assert (tmp_path / "empty" / "result.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["a", "empty"]  # no temp siblings left


def test_non_empty_directory_needs_overwrite_and_our_marker(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = tree_digest(foreign)
    with pytest.raises(YouzhiError, match="not empty .*thesis.tex.*--overwrite"):
        _write_into(foreign)
    with pytest.raises(YouzhiError, match="not replaced even with --overwrite: it was not written by youzhi_ms"):
        _write_into(foreign, overwrite=True)
    assert tree_digest(foreign) == before
    ours = tmp_path / "ours"
    _write_into(ours)
    with pytest.raises(YouzhiError, match="--overwrite"):
        _write_into(ours)
    _write_into(ours, overwrite=True)  # an earlier youzhi_ms output: replaced
    # ... unless someone put their own file into it since
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(YouzhiError, match=r"entries youzhi_ms did not write there \(notes.txt\)"):
        _write_into(ours, overwrite=True)
    assert (ours / "notes.txt").read_text() == "mine"
    assert sorted(p for p in os.listdir(tmp_path)) == ["foreign", "ours"]


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_output_is_contains_or_lies_inside_an_input(tmp_path, where):
    model = tmp_path / "models" / "src"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = {"same": model, "parent": tmp_path / "models", "inside": model / "out", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        os.symlink(model, out)
    before = tree_digest(tmp_path)
    word = {"same": "is the input", "parent": "contains the input", "inside": "lies inside the input",
            "symlink": "is the input"}[where]
    for overwrite in (False, True):
        with pytest.raises(YouzhiError, match=f"--output-dir .* {word} --hf-dir"):
            _write_into(out, overwrite=overwrite, inputs=[("--hf-dir", str(model))])
    assert tree_digest(tmp_path) == before


def test_files(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("input")
    with pytest.raises(YouzhiError, match="is the input --text"):
        check_output_file(str(data), True, [("--text", str(data))])
    (tmp_path / "m").mkdir()
    with pytest.raises(YouzhiError, match="lies inside the input --model"):
        check_output_file(str(tmp_path / "m" / "r.json"), False, [("--model", str(tmp_path / "m"))])
    with pytest.raises(YouzhiError, match="is a directory"):
        check_output_file(str(tmp_path / "m"))
    with pytest.raises(YouzhiError, match="already exists; choose a new file name, or pass --overwrite"):
        check_output_file(str(data))
    with atomic_output_file(str(data), overwrite=True) as tmp:
        open(tmp, "w").write("replaced")
    assert data.read_text() == "replaced"
    with pytest.raises(RuntimeError):
        with atomic_output_file(str(tmp_path / "new.json")) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["data.txt", "m"]


def test_parent_that_is_a_file_or_read_only_fails_before_any_work(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(YouzhiError, match="is a file, not a directory"):
        check_output_file(str(tmp_path / "f" / "r.json"))
    with pytest.raises(YouzhiError, match="exists and is a file"):
        check_output_dir(str(tmp_path / "f"))
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores the mode
            with pytest.raises(YouzhiError, match="permission denied"):
                check_output_dir(str(ro / "out"))
    finally:
        os.chmod(ro, 0o700)


def test_failure_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    _write_into(out)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "result.txt"), "w").write("half")
            raise KeyboardInterrupt
    assert (out / "result.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_something_appearing_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(YouzhiError, match="not empty"):
        with atomic_output_dir(str(out)) as tmp:
            open(os.path.join(tmp, "result.txt"), "w").write("x")
            out.mkdir()
            (out / "other.txt").write_text("someone else's")
    assert (out / "other.txt").read_text() == "someone else's" and sorted(os.listdir(tmp_path)) == ["out"]


def test_training_run_directory(tmp_path):
    run = tmp_path / "run"
    claim_run_dir(str(run), False, False, [])
    record_written(str(run), ["loss_log.jsonl", "checkpoint/"])
    (run / "loss_log.jsonl").write_text("{}\n")
    (run / ".loss_log.jsonl.tmp-999999999-abcd_123").write_text("")  # a temp of the run's own, named as fsutil does
    with pytest.raises(YouzhiError, match="--overwrite"):
        claim_run_dir(str(run), False, False, [])
    mode = os.stat(run).st_mode
    os.chmod(run, 0o700)
    ino = os.stat(run).st_ino
    claim_run_dir(str(run), True, False, [])
    assert os.listdir(run) == [MARKER] and os.stat(run).st_ino == ino and os.stat(run).st_mode & 0o777 == 0o700
    os.chmod(run, mode)
    record_written(str(run), ["loss_log.jsonl", "checkpoint/"])
    (run / "my_notes.md").write_text("x")
    (run / "loss_log.jsonl.old-v1").write_text("x")  # named like a leftover, but not as the tools name theirs
    with pytest.raises(YouzhiError, match="loss_log.jsonl.old-v1, my_notes.md"):
        claim_run_dir(str(run), True, False, [])
    other = tmp_path / "other"
    other.mkdir()
    (other / "a").write_text("a")
    with pytest.raises(YouzhiError, match="not written by youzhi_ms"):
        claim_run_dir(str(other), True, False, [])
    assert (other / "a").read_text() == "a"
    with pytest.raises(YouzhiError, match="lies inside the input model.student"):
        claim_run_dir(str(other / "run"), False, True, [("model.student", str(other))])


# ------------------------------------------------------------------------------------------------- the tools
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved by transformers (config.json + model.safetensors), in its own folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(d)
    return d


def _tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _one_error(r, *expect):
    """`helpers.one_error_line` of a `_tool` result."""
    one_error_line(r.returncode, r.stderr, *expect)


def test_tools_never_replace_inputs_or_foreign_directories(tiny, tmp_path):
    """convert_hf_weights into its own input's parent, then into a foreign folder, then (--overwrite) into the same
    folder: refused every time, nothing changed; into a fresh folder it works, and --overwrite replaces that one."""
    parent = os.path.dirname(tiny)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    before = {str(p): tree_digest(p) for p in (parent, foreign)}
    _one_error(_tool("convert_hf_weights.py", "--input-dir", tiny, "--output-dir", parent),
               "contains the input --input-dir")
    _one_error(_tool("convert_hf_weights.py", "--input-dir", tiny, "--output-dir", foreign, "--overwrite"),
               "not replaced even with --overwrite", "keep.txt")
    assert {str(p): tree_digest(p) for p in (parent, foreign)} == before
    out = tmp_path / "ms"
    assert _tool("convert_hf_weights.py", "--input-dir", tiny, "--output-dir", out).returncode == 0
    _one_error(_tool("convert_hf_weights.py", "--input-dir", tiny, "--output-dir", out), "--overwrite")
    r = _tool("convert_hf_weights.py", "--input-dir", tiny, "--output-dir", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["foreign", "ms"]


def test_temp_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path):
    """SIGKILL leaves the hidden temp sibling behind; the next run writing the same output removes it, but never the
    temp of a process that is still alive, nor anything not named like its own temps."""
    import subprocess as sp
    dead = sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".out.tmp-{pid}-abc").mkdir()
    (tmp_path / f".out.tmp-{pid}-abc" / "half.safetensors").write_text("x")
    (tmp_path / f".out.tmp-1-live").mkdir()  # pid 1 is alive
    (tmp_path / ".out.tmp-notes").mkdir()
    _write_into(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == [".out.tmp-1-live", ".out.tmp-notes", "out"]


def test_markers_without_a_file_list_and_nested_outputs(tmp_path):
    """A marker from before #19 with `files: null` (training runs) grants nothing; one listing top-level names still
    lets --overwrite replace exactly those; a listed folder with its own marker is checked against that marker."""
    import json
    old = tmp_path / "old_run"
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"written_by": "youzhi_ms", "kind": "run", "files": None}))
    (old / "loss_log.jsonl").write_text("{}\n")
    with pytest.raises(YouzhiError, match="older youzhi_ms that did not record which files"):
        check_output_dir(str(old), True)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / MARKER).write_text(json.dumps({"written_by": "youzhi_ms", "files": ["a.json", "sub", MARKER]}))
    (flat / "a.json").write_text("{}")
    _write_into(tmp_path / "flat_sub")
    os.rename(tmp_path / "flat_sub", flat / "sub")  # a folder with its own marker listing its files
    check_output_dir(str(flat), True)
    (flat / "sub" / "mine.txt").write_text("x")
    with pytest.raises(YouzhiError, match=r"sub/mine.txt"):
        check_output_dir(str(flat), True)


def test_a_second_writer_of_the_same_output_is_refused_at_once(tmp_path):
    """The lock is per output path and per process (re-entrant); another process holding it refuses ours."""
    from youzhi_ms.fsutil import output_lock
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from youzhi_ms.fsutil import output_lock\n"
                               f"with output_lock({str(out)!r}):\n print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(YouzhiError, match=rf"being written by another youzhi_ms run right now "
                                              rf"\(pid {holder.pid}\)"):
            _write_into(out)
        assert sorted(os.listdir(tmp_path)) == [".out.lock"]
    finally:
        holder.kill()
        holder.wait()
    with output_lock(str(out)):  # the killed holder's lock file is taken over, then removed
        _write_into(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]
