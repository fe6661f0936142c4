"""Nothing lost on any path (#19), through the tools as a user runs them (subprocesses on tiny models built by
transformers): `--overwrite` removes exactly what an earlier run wrote (its marker lists it, training included) and
refuses, in one `error:` line naming them, anything else; an existing folder is reused, never swapped (its inode, mode
and group stay the user's); two runs into one output at once: the second is refused at once and the first finishes
bit-identical to a lone run; a full disk ends in one line saying so and what was kept.

Every refusal: exit 2, exactly one short `error:` line, no traceback, and every input and user file byte-identical.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, tiny_llama_with_text, one_error_line

from youzhi_ms.fsutil import MARKER, read_marker

V = 96
TOOLS = os.path.join(ROOT, "tools")


def run(name, *args, wait=True):
    p = subprocess.Popen([sys.executable, os.path.join(TOOLS, name), *map(str, args)], cwd=ROOT, text=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return p
    out, err = p.communicate(timeout=600)
    return p.returncode, out, err


def one_error(r, *expect):
    """Exit 2 and the tool's last stderr line is its only `error:` line (short, naming what is expected); no traceback
    and no library `[ERROR]` line. What a run logs before it fails (progress, MindSpore's compile [WARNING]s, the
    training's step lines, the conversion's deployment warnings about the tiny model) is not an error line."""
    lines = [ln for ln in r[2].splitlines() if ln.strip()]
    assert r[0] == 2 and lines and "Traceback" not in r[2], (r[0], r[2][-3000:])
    assert [ln for ln in lines if ln.startswith(("error", "[ERROR]"))] == [lines[-1]], r[2][-3000:]
    line = one_error_line(2, lines[-1], *expect)
    assert len(line) < 600, line  # one short line
    return line


def digest(*paths) -> dict:
    """{file: sha256} of every file under the given paths, plus each directory's (mode, uid, gid, inode)."""
    out = {}
    for p in map(str, paths):
        for root, dirs, files in ([(os.path.dirname(p), [], [os.path.basename(p)])] if os.path.isfile(p)
                                  else os.walk(p)):
            st = os.stat(root)
            out[root] = (st.st_mode, st.st_uid, st.st_gid, st.st_ino)
            for f in files:
                out[os.path.join(root, f)] = hashlib.sha256(open(os.path.join(root, f), "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(teacher dir, text file): a tiny one-layer Llama saved by transformers, with a character tokenizer."""
    return tiny_llama_with_text(tmp_path_factory.mktemp("nothing_lost"), layers=1, paragraphs=60, vocab_size=V)


def convert_args(tiny, out, *extra):
    return ("--hf-dir", tiny[0], "--output-dir", out, "--kv-lora-rank", 16, "--qk-rope-dim", 4, "--freqfold", 2,
            "--calib-text", tiny[1], "--calib-tokens", 512, "--calib-seq-len", 32, "--quiet", *extra)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """A lone conversion of the tiny model (the reference for the two-runs test, and the student for training)."""
    out = tmp_path_factory.mktemp("lone") / "mla"
    r = run("convert_gqa_to_mla.py", *convert_args(tiny, out))
    assert r[0] == 0, r[2]
    return out


def train_args(tiny, student, out, *extra):
    sets = [f"output_dir={out}", f"model.student={student}", f"distill.teacher={tiny[0]}",
            f"train_dataset.data_path={tiny[1]}", "runner_config.seq_length=16", "runner_config.batch_size=2",
            "runner_config.max_steps=2", "runner_config.progress=false", "lr_schedule.warmup_steps=1",
            "distill.max_new_tokens=4", "distill.lmbda=0.0", "callbacks.CheckpointMonitor.save_checkpoint_steps=1",
            *extra]
    return ["--config", "yaml_configs/distill_smollm2_mla.yaml"] + [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tiny, converted, tmp_path_factory):
    """A finished two-step training run (train.py), kept pristine: tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = run("train.py", *train_args(tiny, converted, out))
    assert r[0] == 0, r[2]
    return out


# ------------------------------------------------------------------------------------------------- what is removed
def test_a_training_run_lists_what_it_wrote_and_overwrite_keeps_user_files(tiny, converted, trained, tmp_path):
    """The run's marker lists every file it wrote (checkpoints through their own markers); a user's notes, LoRA
    folder and a file inside checkpoint/ stop any later --overwrite (training's or another tool's), listed."""
    marker = read_marker(str(trained))
    assert {"run_config.yaml", "loss_log.jsonl", "loss_curve.png", "hf_model/", "checkpoint/",
            "checkpoint/step_00000002/", "ranks/rank_0.json", MARKER} <= set(marker["files"])
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "notes.md").write_text("my results")
    (run_dir / "lora").mkdir()
    (run_dir / "lora" / "adapter.safetensors").write_bytes(b"weights")
    (run_dir / "checkpoint" / "step_00000002" / "mine.txt").write_text("x")
    (run_dir / "config.json.old-v1").write_text("old config")  # named like a leftover of the tools, but not one
    before = digest(run_dir, tiny[0], converted)
    line = one_error(run("train.py", *train_args(tiny, converted, run_dir), "--overwrite"),
                     "not replaced even with --overwrite", "checkpoint/step_00000002/mine.txt", "config.json.old-v1",
                     "lora/")
    assert "notes.md" in line or "..." in line
    one_error(run("convert_hf_weights.py", "--input-dir", tiny[0], "--output-dir", run_dir, "--overwrite"),
              "not replaced even with --overwrite")
    assert digest(run_dir, tiny[0], converted) == before


def test_overwrite_of_a_clean_run_keeps_the_folder(tiny, converted, trained, tmp_path):
    """A run holding only what it wrote is started over in place: same inode, mode and group."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    os.chmod(run_dir, 0o700)
    os.chown(run_dir, -1, 100) if os.geteuid() == 0 else None
    st = os.stat(run_dir)
    r = run("convert_hf_weights.py", "--input-dir", tiny[0], "--output-dir", run_dir, "--overwrite")
    assert r[0] == 0, r[2]
    st2 = os.stat(run_dir)
    assert (st2.st_ino, st2.st_mode, st2.st_gid) == (st.st_ino, st.st_mode, st.st_gid)
    assert "checkpoint" not in os.listdir(run_dir) and set(read_marker(str(run_dir))["files"]) == \
        set(os.listdir(run_dir))


def test_resume_adopting_a_foreign_folder_lists_only_what_it_writes(tiny, converted, trained, tmp_path):
    """A user copies a run's checkpoint into their own folder (no marker) beside their notes and resumes there: the
    marker then lists only what the resumed run wrote, so --overwrite refuses instead of removing the notes."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    shutil.copytree(trained / "checkpoint", mine / "checkpoint")
    shutil.rmtree(mine / "checkpoint" / "step_00000002")
    notes = digest(mine / "notes.md")
    r = run("train.py", *train_args(tiny, converted, mine), "--resume")
    assert r[0] == 0, r[2]
    listed = read_marker(str(mine))["files"]
    assert "notes.md" not in listed and "checkpoint/" not in listed and "hf_model/" in listed
    before = digest(mine)
    one_error(run("train.py", *train_args(tiny, converted, mine), "--overwrite"), "notes.md")
    assert digest(mine) == before and digest(mine / "notes.md") == notes


def test_an_empty_user_folder_is_filled_not_swapped(tiny, tmp_path):
    out = tmp_path / "empty"
    out.mkdir(mode=0o700)
    os.chmod(out, 0o700)
    if os.geteuid() == 0:
        os.chown(out, -1, 100)
    st = os.stat(out)
    for extra in ((), ("--overwrite",)):
        r = run("convert_hf_weights.py", "--input-dir", tiny[0], "--output-dir", out, *extra)
        assert r[0] == 0, r[2]
        st2 = os.stat(out)
        assert (st2.st_ino, st2.st_mode, st2.st_uid, st2.st_gid) == (st.st_ino, st.st_mode, st.st_uid, st.st_gid)
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no temp, lock or set-aside sibling left


def test_leftover_names_and_the_legacy_marker_grant_nothing(tiny, tmp_path):
    """A user's `config.json.old-v1` / `model.safetensors.tmp-notes` in an earlier output, and a `cp dir/* new/` copy
    (the legacy provenance file without the dot-file marker) plus the user's own file: --overwrite refuses."""
    out = tmp_path / "out"
    assert run("convert_hf_weights.py", "--input-dir", tiny[0], "--output-dir", out)[0] == 0
    names = sorted(read_marker(str(out))["files"])
    (out / "config.json.old-v1").write_text("v1")
    (out / "model.safetensors.tmp-notes").write_text("notes")
    (out / ".config.json.old-v1").write_text("hidden v1")
    before = digest(out, tiny[0])
    one_error(run("convert_hf_weights.py", "--input-dir", tiny[0], "--output-dir", out, "--overwrite"),
              ".config.json.old-v1, config.json.old-v1, model.safetensors.tmp-notes")
    assert digest(out, tiny[0]) == before
    copy = tmp_path / "copy"
    copy.mkdir()
    for n in names:
        if n != MARKER:
            shutil.copy(out / n, copy / n)
    (copy / "youzhi_source.json").write_text("{}")
    (copy / "thesis.tex").write_text("years of work")
    before = digest(copy)
    from youzhi_ms.checkpoint.gguf import LEGACY_OUTPUT
    from youzhi_ms.errors import YouzhiError
    from youzhi_ms.fsutil import check_output_dir
    with pytest.raises(YouzhiError, match="thesis.tex"):
        check_output_dir(str(copy), True, legacy_marker=LEGACY_OUTPUT)
    assert digest(copy) == before


# ------------------------------------------------------------------------------------------------- two runs at once
def test_two_conversions_into_one_output_at_once(tiny, converted, tmp_path):
    """Started together: exactly one succeeds, bit-identical to a lone run; the other ends in one line. Then once more
    with the second started while the first holds the output's lock (so the lock, not the finished output, refuses)."""
    import time
    for attempt in ("together", "while held"):
        out = tmp_path / attempt / "mla"
        out.parent.mkdir()
        first = run("convert_gqa_to_mla.py", *convert_args(tiny, out), wait=False)
        if attempt == "while held":
            t0 = time.time()
            while not (out.parent / ".mla.lock").exists() and first.poll() is None and time.time() - t0 < 120:
                time.sleep(0.05)
            assert first.poll() is None, "the first run ended before the second could start"
        second = run("convert_gqa_to_mla.py", *convert_args(tiny, out), wait=False)
        res = [(p, *p.communicate(timeout=600)) for p in (first, second)]
        res = [(p.returncode, o, e) for p, o, e in res]
        assert sorted(r[0] for r in res) == [0, 2], [r[2] for r in res]
        line = one_error(next(r for r in res if r[0] == 2), "--output-dir")
        if attempt == "while held":
            assert res[1][0] == 2 and "is being written by another youzhi_ms run right now" in line, line
        for name in os.listdir(converted):
            if name.endswith((".safetensors", ".json")) and name not in (MARKER, "conversion_report.json"):
                assert (out / name).read_bytes() == (converted / name).read_bytes(), name
        assert sorted(os.listdir(out.parent)) == ["mla"]


# ------------------------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A fresh filesystem to fill: a tmpfs (as root), else a folder on the test's own filesystem (the test then fills
    it up to the free space it needs)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True)
    yield d
    if r.returncode == 0:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(disk, leave: int) -> None:
    """Fill `disk` so that `leave` bytes stay free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        left = free - leave
        while left > 0:
            f.write(b"\0" * min(left, 1 << 20))
            left -= min(left, 1 << 20)


@pytest.mark.parametrize("leave,kept", [(40_000, "nothing was kept"), (170_000, "converted layer(s) are kept")])
def test_full_disk_during_conversion(tiny, converted, small_disk, leave, kept):
    """The layer journal (little room) or the sharded writer (room for the journal, not the output): one line."""
    fill(small_disk, leave)
    before = digest(tiny[0], tiny[1])
    line = one_error(run("convert_gqa_to_mla.py", *convert_args(tiny, small_disk / "mla")), "the disk is full",
                     kept, "MiB free")
    assert digest(tiny[0], tiny[1]) == before
    assert "mla" not in os.listdir(small_disk), line
    if "kept" in kept and "layer" in kept:
        os.remove(small_disk / "filler")
        r = run("convert_gqa_to_mla.py", *convert_args(tiny, small_disk / "mla"))
        assert r[0] == 0, r[2]  # resumed from the kept layer: the same bytes as a lone run
        assert (small_disk / "mla" / "model.safetensors").read_bytes() == (converted / "model.safetensors").read_bytes()


def test_full_disk_in_convert_hf_weights(tiny, small_disk):
    """Clearly too little room: refused before writing, with the size needed; the disk filling up meanwhile (the
    check passes, then another process takes the space): the writer's error says the disk is full."""
    fill(small_disk, 20_000)
    line = one_error(run("convert_hf_weights.py", "--input-dir", tiny[0], "--output-dir", small_disk / "ms"),
                     "needs about", "MiB free")
    assert sorted(os.listdir(small_disk)) == ["filler"], line
    os.remove(small_disk / "filler")
    env = dict(os.environ, PYTHONPATH=ROOT)
    # the space check sees an empty disk, then a filler takes all but 20 kB before the first tensor is written
    code = (f"import os, runpy, sys; sys.path.insert(0, {TOOLS!r}); import youzhi_ms.fsutil as fs\n"
            "check = fs.check_free_space\n"
            "def then_fill(path, need, what):\n"
            "    check(path, need, what)\n"
            f"    f = open({str(small_disk / 'filler')!r}, 'wb')\n"
            "    free = os.statvfs(os.path.dirname(path)).f_bavail * os.statvfs(os.path.dirname(path)).f_frsize\n"
            "    f.write(bytes(free - 20000)); f.close()\n"
            "import youzhi_ms.checkpoint.mindspore_ckpt as m; m.check_free_space = then_fill\n"
            f"sys.argv = ['convert_hf_weights.py', '--input-dir', {str(tiny[0])!r}, '--output-dir', "
            f"{str(small_disk / 'ms')!r}]\n"
            f"runpy.run_path({os.path.join(TOOLS, 'convert_hf_weights.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = one_error((r.returncode, r.stdout, r.stderr), "the disk is full", "the unfinished output had reached")
    assert sorted(os.listdir(small_disk)) == ["filler"], line


def test_full_disk_during_training_keeps_the_last_checkpoint(tiny, converted, trained, small_disk):
    """Room for one checkpoint, not two: the error names the kept one, and --resume finishes once there is room."""
    ck = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(trained / "checkpoint" / "step_00000001")
             for f in fs)
    fill(small_disk, int(ck * 1.5) + 20_000)
    out = small_disk / "run"
    line = one_error(run("train.py", *train_args(tiny, converted, out)), "the disk is full",
                     "step_00000001 is kept", "--resume")
    assert os.listdir(out / "checkpoint") == ["step_00000001"], line
    os.remove(small_disk / "filler")
    r = run("train.py", *train_args(tiny, converted, out), "--resume")
    assert r[0] == 0, r[2]


# ------------------------------------------------------------------------------------------------- hostile inputs
def test_inputs_built_to_exhaust_memory_are_refused_before_work(tiny, tmp_path):
    """A batch of a billion windows, a chat template that builds a huge string / range / format, a yaml alias bomb:
    one short line each, before any allocation."""
    one_error(run("eval_ppl.py", "--model", tiny[0], "--text", tiny[1], "--seq-len", 32, "--batch-size", 10 ** 9),
              "--batch-size 1000000000 is more than the", "use at most")
    for template in ("{{ 'x' * 10000000000 }}", "{% for i in range(10**12) %}{% endfor %}",
                     "{{ '{:>9999999999}'.format(1) }}", "{{ 'x'|center(10**10) }}"):
        model = tmp_path / "chat"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(tiny[0], model)
        (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                 "chat_template": template}))
        before = digest(model)
        one_error(run("generate.py", "--model", model, "--chat", "--prompt", "hi"), "chat template failed",
                  "the template builds")
        assert digest(model) == before
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + \
        [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)] + ["seed: *a11"]
    bomb.write_text("\n".join(lines) + "\n")
    one_error(run("train.py", "--config", bomb), "more than 100 alias references")
    tag = tmp_path / "tag.yaml"
    tag.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    one_error(run("train.py", "--config", tag), "is not valid yaml")


def test_weights_that_are_not_finite_are_refused_by_name(tiny, tmp_path):
    """An Inf in one embedding row (fp32) and a NaN in a bf16 copy: refused with the tensor's name by every reader."""
    import numpy as np
    from youzhi_ms.checkpoint.hf import HFCheckpoint, save_safetensors
    bad = tmp_path / "bad"
    shutil.copytree(tiny[0], bad)
    ck = HFCheckpoint(str(tiny[0]))
    tensors = [(n, ck.get(n)) for n in ck.names()]
    tensors = [(n, np.where(np.arange(a.size).reshape(a.shape) == 5, np.inf, a).astype(np.float32)
                if n == "model.embed_tokens.weight" else a) for n, a in tensors]
    save_safetensors(str(bad / "model.safetensors"), tensors)
    before = digest(bad)
    one_error(run("convert_hf_weights.py", "--input-dir", bad, "--output-dir", tmp_path / "ms"),
              "tensor model.embed_tokens.weight holds 1 NaN/Inf value(s)")
    line = one_error(run("convert_gqa_to_mla.py", *convert_args((bad, tiny[1]), tmp_path / "mla")),
                     "model.embed_tokens.weight holds 1 NaN/Inf")
    if (tmp_path / ".mla.partial").exists():  # the damaged row was not among the calibration tokens: found when
        assert "converted layer(s) are kept" in line  # the embedding is copied, after the layers (kept, and said so)
        shutil.rmtree(tmp_path / ".mla.partial")
    one_error(run("eval_ppl.py", "--model", bad, "--text", tiny[1], "--seq-len", 32), "NaN/Inf")
    bf = tmp_path / "bf16"
    shutil.copytree(tiny[0], bf)
    tensors = [(n, np.full_like(a, np.nan) if n.endswith("mlp.down_proj.weight") else a) for n, a in
               ((n, ck.get(n)) for n in ck.names())]
    save_safetensors(str(bf / "model.safetensors"), tensors, dtype="bf16")
    one_error(run("convert_hf_weights.py", "--input-dir", bf, "--output-dir", tmp_path / "ms2", "--dtype", "fp32"),
              "mlp.down_proj.weight holds")
    assert digest(bad) == before and sorted(os.listdir(tmp_path)) == ["bad", "bf16"]


def test_library_messages_end_as_one_line(tiny, tmp_path):
    """A corrupt MindIR (MindSpore's own [ERROR] lines are held back) and an offline fetch of the default texts
    (pip's output): one `error:` line each."""
    from youzhi_ms.infer.mindir import FORMAT
    exp = tmp_path / "export"
    exp.mkdir()
    shutil.copy(tiny[0] / "config.json", exp / "config.json")
    shutil.copy(tiny[0] / "tokenizer.json", exp / "tokenizer.json")
    (exp / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "batch": 1, "max_seq_len": 16, "cache_seq_axis": 2,
        "graphs": {"prefill": {"file": "prefill.mindir"}, "decode": {"file": "decode.mindir"}}}))
    for g in ("prefill", "decode"):
        (exp / f"{g}.mindir").write_bytes(b"\x08\x01garbage, not a MindIR protobuf" * 20)
    before = digest(exp)
    one_error(run("generate.py", "--mindir", exp, "--prompt", "hi"), "could not be loaded by MindSpore")
    assert digest(exp) == before
    env = dict(os.environ, YOUZHI_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "eval_ppl.py"), "--model", tiny[0], "--text", "wiki-eval",
                        "--seq-len", "32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    one_error((r.returncode, r.stdout, r.stderr), "pip could not download gensim")


def test_degenerate_training_and_a_home_relative_output(tiny, converted, tmp_path):
    """seq_length=1 (no token to learn from) is refused; '~/x' writes into $HOME/x and leaves no './~'."""
    one_error(run("train.py", *train_args(tiny, converted, tmp_path / "run", "runner_config.seq_length=1",
                                          "distill.max_new_tokens=0")), "seq_length 1 leaves no token")
    assert not (tmp_path / "run").exists()
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = dict(os.environ, HOME=str(home))
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert_gqa_to_mla.py"),
                        *map(str, convert_args(tiny, "~/mla"))], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert os.listdir(cwd) == [] and "mla" in os.listdir(home)  # (matplotlib may add its own .cache / .config)
    assert [n for n in os.listdir(home) if "mla" in n] == ["mla"]
