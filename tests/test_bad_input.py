"""Every bad input ends in one clean error (#11): exit 2, one `error:` line naming the problem and the fix, no
traceback, and every input and unrelated file byte-identical afterwards.

The readers and option checks are driven in-process (fast, many cases: a fuzzer's view of each file format the tools
read: config.json, safetensors header and index, GGUF, yaml, jsonl, option values); each class of issue #11 is also
driven once or twice through a tool as a subprocess, on a tiny model made by transformers. The output rule has its
own module (test_output_rule.py), the config contract too (test_contract.py).
"""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from youzhi_ms.errors import YouzhiError

from helpers import ROOT, tiny_llama_with_text, calib, one_error_line

TOOLS = os.path.join(ROOT, "tools")
V = 96


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model dir, text file): a tiny Llama saved by transformers with a character-level tokenizer. Read-only: tests
    that damage a model copy it first (`copy_model`)."""
    return tiny_llama_with_text(tmp_path_factory.mktemp("bad_input"), layers=2, paragraphs=200, vocab_size=V)


def copy_model(tiny, dst):
    shutil.copytree(tiny[0], dst)
    return dst


def digest(*paths) -> dict:
    """{file: sha256} of every file under the given paths (the byte-identical check)."""
    out = {}
    for p in map(str, paths):
        files = [p] if os.path.isfile(p) else [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs]
        for f in files:
            out[f] = hashlib.sha256(open(f, "rb").read()).hexdigest()
    return out


def run_tool(name, *args, stdin=None, signal_after=None):
    """(returncode, stdout, stderr) of tools/<name> in a fresh process."""
    # SIGINT back to its default: a test run started in the background inherits it ignored, and Python then
    # (rightly) leaves it ignored
    p = subprocess.Popen([sys.executable, os.path.join(TOOLS, name), *map(str, args)], cwd=ROOT, text=True,
                         stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if signal_after is not None:
        time.sleep(signal_after[0])
        p.send_signal(signal_after[1])
    out, err = p.communicate(stdin, timeout=300)
    return p.returncode, out, err


def one_error(result, *expect) -> str:
    """`helpers.one_error_line` of a `run_tool` result."""
    rc, _, err = result
    return one_error_line(rc, err, *expect)


def tool_main(name):
    """A tool's main() imported in-process (for option checks that end before any model is touched)."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(TOOLS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def in_process_error(capsys, name, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        tool_main(name)([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------- option values
@pytest.mark.parametrize("tool, args, expect", [
    ("eval_ppl", ["--model", "M", "--seq-len", "0"], "--seq-len: must be an integer >= 2, got 0"),
    ("eval_ppl", ["--model", "M", "--max-tokens", "0"], "--max-tokens: must be an integer >= 2, got 0"),
    ("eval_ppl", ["--model", "M", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    ("eval_ppl", ["--model", "M", "--seq-len", "1e3"], "must be an integer >= 2, got '1e3'"),
    ("eval_mcq", ["--model", "M", "--data", "D", "--limit", "0"], "--limit: must be an integer >= 1, got 0"),
    ("eval_mcq", ["--model", "M", "--data", "D", "--shots", "-1"], "--shots: must be an integer >= 0"),
    ("generate", ["--model", "M", "--prompt", ""], "--prompt: is empty"),
    ("generate", ["--model", "M", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens: must be"),
    ("generate", ["--model", "M", "--prompt", "hi", "--temperature", "-0.5"], "--temperature: must be a number >= 0"),
    ("generate", ["--model", "M", "--prompt", "hi", "--temperature", "nan"], "got nan"),
    ("generate", ["--model", "M", "--prompt", "hi", "--top-p", "1.5"], "--top-p: must be a number in (0, 1]"),
    ("generate", ["--model", "M", "--prompt", "hi", "--top-p", "0"], "--top-p: must be a number in (0, 1]"),
    ("generate", ["--model", "M", "--prompt", "hi", "--seed", "-1"], "--seed: must be an integer >= 0"),
    ("convert_gqa_to_mla", ["--hf-dir", "M", "--output-dir", "O", "--kv-lora-rank", "16", "--qk-rope-dim", "0"],
     "--qk-rope-dim: must be an integer >= 2, got 0"),
    ("convert_gqa_to_mla", ["--hf-dir", "M", "--output-dir", "O", "--kv-lora-rank", "16", "--qk-rope-dim", "-4"],
     "--qk-rope-dim: must be an integer >= 2, got -4"),
    ("convert_gqa_to_mla", ["--hf-dir", "M", "--output-dir", "O", "--kv-lora-rank", "16", "--calib-seq-len", "0"],
     "--calib-seq-len: must be an integer >= 2"),
    ("convert_gqa_to_mla", ["--hf-dir", "M", "--output-dir", "O", "--kv-lora-rank", "0"], "--kv-lora-rank: must be"),
    ("convert_gqa_to_mla", ["--hf-dir", "M", "--output-dir", "O"], "required: --kv-lora-rank"),
    ("export_mindir", ["--model", "M", "--output-dir", "O", "--max-seq-len", "1"], "--max-seq-len: must be"),
    ("make_sft_data", ["--n", "0"], "--n: must be an integer >= 1"),
    ("plan_concurrency", ["--model", "M", "--runtime-overhead-gib", "nan"], "--runtime-overhead-gib: must be"),
    ("plan_concurrency", ["--model", "M", "--memory-utilization", "1.5"], "--memory-utilization: must be"),
    ("plan_concurrency", ["--model", "M", "--target-ratio", "inf"], "--target-ratio: must be a number > 0"),
    ("train", ["--config", "C", "--resume", "--overwrite"], "either --resume"),
    ("gguf_to_hf", ["--gguf", "G", "--output-dir", "O", "--dtype", "int4"], "invalid choice: 'int4'"),
    ("eval_ppl", ["--model", "M", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_option_values_are_refused_at_parse_time(capsys, tool, args, expect):
    """Values a tool used to reinterpret silently (0 = no limit / default, negatives, NaN) or crash on; all refused
    while the arguments are parsed, before MindSpore starts or a file is read."""
    assert expect in in_process_error(capsys, tool, *args)


def test_run_config_values_of_the_wrong_kind(tmp_path):
    from youzhi_ms.train.run_config import load_run_config
    cases = [("resume_training: 'yes'\n", "resume_training must be true or false"),
             ("runner_config:\n  progress: 'no'\n", "runner_config.progress must be true or false"),
             ("train_dataset:\n  shuffle: 1\n", "train_dataset.shuffle must be true or false"),
             ("model:\n  student: 5\n", "model.student must be a directory path"),
             ("optimizer:\n  max_grad_norm: .nan\n", "optimizer.max_grad_norm must be a number (finite)"),
             ("optimizer:\n  betas: [false, 0.9]\n", "optimizer.betas must be two numbers"),
             ("context:\n  max_device_memory: 58\n", "context.max_device_memory must be a size")]
    for i, (text, expect) in enumerate(cases):
        (tmp_path / f"c{i}.yaml").write_text(text)
        with pytest.raises(YouzhiError, match=re.escape(expect)):
            load_run_config(str(tmp_path / f"c{i}.yaml"))
    (tmp_path / "latin1.yaml").write_bytes("seed: 1\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(YouzhiError, match="not UTF-8 text"):
        load_run_config(str(tmp_path / "latin1.yaml"))


def test_jsonl_and_text_files(tmp_path):
    from youzhi_ms.data.text import load_documents
    from youzhi_ms.train.data import _read_chat_jsonl
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "fine"}\n\xff\xfe\n')
    with pytest.raises(YouzhiError, match=r"bin.jsonl:2: not UTF-8 text"):
        load_documents(str(tmp_path / "bin.jsonl"))
    (tmp_path / "chat.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(YouzhiError, match="no assistant message"):
        _read_chat_jsonl(str(tmp_path / "chat.jsonl"))
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(YouzhiError, match=r"list.jsonl:1: expected an object"):
        load_documents(str(tmp_path / "list.jsonl"))


# ------------------------------------------------------------------------------------------------- safetensors
def _rewrite_header(path, edit):
    """Apply `edit(header dict, data bytes) -> (header, data) | raw file bytes` to a safetensors file."""
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    res = edit(json.loads(b[8:8 + n]), b[8 + n:])
    if isinstance(res, bytes):
        open(path, "wb").write(res)
        return
    header, data = res
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(hb)) + hb + data)


UP, GATE = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"


def _set(key, field, value):
    def edit(h, d):
        h[key][field] = value
        return h, d
    return edit


def _extra_tensor(h, d):
    h["model.layers.0.self_attn.q_norm.weight"] = {"dtype": "F32", "shape": [8], "data_offsets": [len(d), len(d) + 32]}
    return h, d + b"\0" * 32


def _drop(key):
    def edit(h, d):
        h.pop(key)
        return h, d
    return edit


SAFETENSORS_CASES = {
    "absurd header length": (lambda h, d: struct.pack("<Q", 1 << 60) + b"{}", "the header claims"),
    "header not JSON": (lambda h, d: struct.pack("<Q", 8) + b"\x00garbage" + d, "the header is not JSON"),
    "header a list": (lambda h, d: (lambda hb: struct.pack("<Q", len(hb)) + hb + d)(b"[1, 2, 3]       "),
                      "not a JSON object"),
    "too short": (lambda h, d: b"\x01\x02", "only 2 bytes"),
    "entry without offsets": (lambda h, d: ({**h, UP: {"dtype": "F32", "shape": [48, 32]}}, d), "lacks dtype"),
    "unknown dtype": (_set(UP, "dtype", "F8_E4M3"), "unsupported dtype 'F8_E4M3'"),
    "negative shape": (_set(UP, "shape", [-48, 32]), "has shape [-48, 32]"),
    "offsets past the end": (_set(UP, "data_offsets", [0, 1 << 40]), "outside the"),
    "offsets not matching shape": (_set(UP, "shape", [48, 31]), "bytes for shape [48, 31]"),
    "overlapping offsets": (lambda h, d: _set(UP, "data_offsets", h[GATE]["data_offsets"])(h, d), "share bytes"),
    "float labelled as int": (_set(UP, "dtype", "I32"), "stored as I32, not a floating-point type"),
    "extra q_norm tensor": (_extra_tensor, "q_norm.weight is not part of the llama model"),
    "missing tensor": (_drop("model.layers.1.mlp.down_proj.weight"), "down_proj.weight is missing"),
    "wrong shape for config": (lambda h, d: _set("model.norm.weight", "shape", [8, 4])(h, d), "expected (32,)"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_hostile_safetensors_headers(tiny, tmp_path, case):
    from youzhi_ms.checkpoint.hf import HFCheckpoint
    edit, expect = SAFETENSORS_CASES[case]
    d = copy_model(tiny, tmp_path / "m")
    _rewrite_header(d / "model.safetensors", edit)
    with pytest.raises(YouzhiError, match=re.escape(expect)):
        HFCheckpoint(str(d))


def _shard(tiny, d):
    """The tiny model split into two shards with an index, as save_pretrained(max_shard_size=...) writes it."""
    from youzhi_ms.checkpoint.hf import HFCheckpoint, save_safetensors
    ck = HFCheckpoint(str(tiny[0]))
    d.mkdir()
    shutil.copy(tiny[0] / "config.json", d)
    names = ck.names()
    parts = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for f, ns in parts.items():
        save_safetensors(str(d / f), [(n, ck.raw(n)) for n in ns], dtype="keep")
    wm = {n: f for f, ns in parts.items() for n in ns}
    return wm


@pytest.mark.parametrize("case, expect", [
    ("parent", "lies outside"), ("absolute", "lies outside"), ("not json", "not valid JSON"),
    ("no weight_map", "weight_map must be"), ("weight_map list", "weight_map must be"),
    ("duplicate", "is stored twice"), ("listed not stored", "is listed in model.safetensors.index.json but not"),
])
def test_hostile_shard_index(tiny, tmp_path, case, expect):
    """A shard index is followed only inside its own directory (a `../` or absolute shard name used to be read)."""
    from youzhi_ms.checkpoint.hf import HFCheckpoint, save_safetensors
    d = tmp_path / "m"
    wm = _shard(tiny, d)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(d / "model-00002-of-00002.safetensors", outside)
    index = {"metadata": {}, "weight_map": dict(wm)}
    if case == "parent":
        index["weight_map"] = {n: ("../elsewhere.safetensors" if "00002" in f else f) for n, f in wm.items()}
    elif case == "absolute":
        index["weight_map"] = {n: (str(outside) if "00002" in f else f) for n, f in wm.items()}
    elif case == "no weight_map":
        index = {"metadata": {}}
    elif case == "weight_map list":
        index["weight_map"] = list(wm)
    elif case == "duplicate":
        first = next(iter(wm))
        save_safetensors(str(d / "model-00002-of-00002.safetensors"),
                         [(n, HFCheckpoint(str(tiny[0])).raw(n)) for n in list(wm)[5:] + [first]], dtype="keep")
    elif case == "listed not stored":
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    text = "{oops" if case == "not json" else json.dumps(index)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(YouzhiError, match=expect):
        HFCheckpoint(str(d))
    # the same shards with the valid index read fine
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if case != "duplicate":
        assert sorted(HFCheckpoint(str(d)).names()) == sorted(wm)


# ------------------------------------------------------------------------------------------------- GGUF
def _gguf(path, heads=4, kv=2, tokens=None, merges=("a b",), extra=None, dims_hack=False):
    """A tiny Llama GGUF written with the gguf library (llama.cpp's writer), metadata overridable."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_uint32("llama.attention.head_count", heads) if isinstance(heads, int) else \
        w.add_string("llama.attention.head_count", heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens if tokens is not None else [chr(i + 33) for i in range(64)])
    w.add_token_merges(list(merges))
    for k, v in (extra or {}).items():
        w.add_uint32(k, v)
    rng = np.random.default_rng(0)
    shapes = [("token_embd.weight", (64, 32)), ("output_norm.weight", (32,))] + [
        (f"blk.0.{n}.weight", s) for n, s in (("attn_norm", (32,)), ("ffn_norm", (32,)), ("attn_q", (32, 32)),
                                              ("attn_k", (16, 32)), ("attn_v", (16, 32)), ("attn_output", (32, 32)),
                                              ("ffn_gate", (48, 32)), ("ffn_up", (48, 32)), ("ffn_down", (32, 48)))]
    for n, s in shapes:
        w.add_tensor(n, rng.normal(size=s).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case, kw, expect", [
    ("zero heads", dict(heads=0), "head_count = 0 must be a positive integer"),
    ("heads as a string", dict(heads="4"), "head_count = '4' must be a positive integer"),
    ("kv does not divide", dict(heads=4, kv=3), "not a multiple of num_key_value_heads=3"),
    ("bos id past the vocabulary", dict(extra={"tokenizer.ggml.bos_token_id": 500}), "not a token id below"),
    ("merge without a space", dict(merges=("ab",)), "not lists of strings"),
])
def test_hostile_gguf_metadata(tmp_path, case, kw, expect):
    from youzhi_ms.checkpoint.gguf import gguf_to_hf
    src = _gguf(tmp_path / "m.gguf", **kw)
    with pytest.raises(YouzhiError, match=expect):
        gguf_to_hf(str(src), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_hostile_gguf_structure(tmp_path):
    from youzhi_ms.checkpoint.gguf import GGUFFile
    good = _gguf(tmp_path / "good.gguf").read_bytes()
    GGUFFile(str(tmp_path / "good.gguf"))

    def variant(name, data, expect):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(YouzhiError, match=expect):
            GGUFFile(str(tmp_path / name))
    # tensor count 2^62 in the header: the reader runs out of header, never out of memory
    variant("many.gguf", good[:8] + struct.pack("<Q", 1 << 62) + good[16:], "corrupt|truncated GGUF|ends inside")
    # a metadata array nested 1000 deep (recursion), at the place of the first key/value
    nested = struct.pack("<Q", 3) + b"key" + struct.pack("<I", 9) + (struct.pack("<I", 9) + struct.pack("<Q", 1)) * 1000
    variant("nested.gguf", good[:16] + struct.pack("<Q", 1) + nested + b"\0" * 64, "nested more than")
    variant("short.gguf", good[:20], "too short|truncated|ends inside")


# ------------------------------------------------------------------------------------------------- torn logs
def test_torn_loss_log_tail_is_dropped_on_resume(tmp_path):
    from youzhi_ms.train.loss_log import append_row, read_loss_log, truncate_loss_log
    log = str(tmp_path / "loss_log.jsonl")
    for step in (1, 2, 3):
        append_row(log, {"step": step, "loss": 1.0 / step, "lr": 1e-3})
    with open(log, "a") as f:
        f.write('{"step": 4, "loss": 0.2')  # killed while appending step 4
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3]
    truncate_loss_log(log, 2)  # resume from the step-2 checkpoint
    append_row(log, {"step": 3, "loss": 0.3, "lr": 1e-3})
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3]
    with open(log, "a") as f:
        f.write('{"step": 4}\n')
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3, 4]  # a whole last line is kept


def test_damaged_loss_log_line_is_refused_with_its_number(tmp_path):
    from youzhi_ms.train.loss_log import truncate_loss_log
    log = tmp_path / "loss_log.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n\x00\x00garbage\n{"step": 2, "loss": 1}\n')
    before = log.read_bytes()
    with pytest.raises(YouzhiError, match="line 2 is not a loss-log row; the file is damaged"):
        truncate_loss_log(str(log), 1)
    assert log.read_bytes() == before


def test_damaged_checkpoint_state_names_the_fix(tmp_path):
    from youzhi_ms.train.checkpointing import STATE_FILE, RunCheckpoints
    step = tmp_path / "checkpoint" / "step_00000002"
    step.mkdir(parents=True)
    (step / STATE_FILE).write_text('{"step": 2, "signature": ')
    with pytest.raises(YouzhiError, match="is damaged .*delete .*step_00000002 to resume from the checkpoint before"):
        RunCheckpoints(str(tmp_path), 0, False).load(str(step), {}, [], [])


# ------------------------------------------------------------------------------------------------- leftovers
def test_invalid_conversion_leaves_no_hidden_directories(tiny, tmp_path):
    """#11.8: a conversion refused for its input leaves neither .partial nor .tmp-* behind."""
    from youzhi_ms.convert.pipeline import ConvertOptions, convert
    ids = calib(0, 2, 8, V)  # 16 tokens: too few for the PCA
    with pytest.raises(YouzhiError, match="too few"):
        convert(str(tiny[0]), str(tmp_path / "out"), ConvertOptions(kv_lora_rank=8, qk_rope_dim=4, freqfold="2",
                                                                    calib_ids=ids, progress=False))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------- through the tools
def test_class_config_and_weights_through_tools(tiny, tmp_path):
    """#11.2 / #11.4 as a user meets them: a config.json with head counts as strings, a float tensor labelled as an
    integer, a q_norm the converter used to drop silently; exit 2, one line, inputs untouched, no output."""
    bad_cfg = copy_model(tiny, tmp_path / "strings")
    cfg = json.loads((bad_cfg / "config.json").read_text())
    cfg["num_attention_heads"] = "4"
    (bad_cfg / "config.json").write_text(json.dumps(cfg))
    int_label = copy_model(tiny, tmp_path / "intlabel")
    _rewrite_header(int_label / "model.safetensors", _set(UP, "dtype", "I32"))
    qnorm = copy_model(tiny, tmp_path / "qnorm")
    _rewrite_header(qnorm / "model.safetensors", _extra_tensor)
    before = digest(tmp_path)
    one_error(run_tool("convert_hf_weights.py", "--input-dir", bad_cfg, "--output-dir", tmp_path / "o1"),
              "num_attention_heads must be a positive integer, got '4'")
    one_error(run_tool("convert_hf_weights.py", "--input-dir", int_label, "--output-dir", tmp_path / "o2"),
              "stored as I32, not a floating-point type")
    one_error(run_tool("convert_gqa_to_mla.py", "--hf-dir", qnorm, "--output-dir", tmp_path / "o3",
                       "--kv-lora-rank", 16), "q_norm.weight is not part of the llama model")
    assert digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["intlabel", "qnorm", "strings"]


def test_class_options_and_files_through_tools(tiny, tmp_path):
    """#11.2 / #11.3 / #11.7: a silently reinterpreted option, an empty prompt (used to die of SIGFPE), a non-UTF-8
    yaml, a --json into an input; all before any model is loaded."""
    model, text = tiny
    (tmp_path / "run.yaml").write_bytes("seed: 1\n# caf\xe9\n".encode("latin-1"))
    before = digest(model, text, tmp_path)
    one_error(run_tool("eval_ppl.py", "--model", model, "--text", text, "--max-tokens", 0), "--max-tokens")
    one_error(run_tool("generate.py", "--model", model, "--prompt", ""), "--prompt: is empty")
    one_error(run_tool("train.py", "--config", tmp_path / "run.yaml"), "not UTF-8 text")
    one_error(run_tool("eval_ppl.py", "--model", model, "--text", text, "--json", model / "ppl.json"),
              "lies inside the input --model")
    assert digest(model, text, tmp_path) == before


def test_training_output_dir_follows_the_output_rule(tiny, tmp_path):
    """#11.1 for training's output_dir: inside the student, or a foreign folder even with --overwrite: refused before
    any model is loaded, nothing touched."""
    model, text = tiny
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = digest(model, tmp_path)
    common = ["--config", os.path.join(ROOT, "yaml_configs", "distill_smollm2_mla.yaml"), "--set",
              f"model.student={model}", "--set", f"distill.teacher={model}", "--set", f"train_dataset.data_path={text}",
              "--set", "runner_config.seq_length=32"]
    one_error(run_tool("train.py", *common, "--set", f"output_dir={model / 'run'}"), "lies inside the input")
    one_error(run_tool("train.py", *common, "--set", f"output_dir={foreign}", "--overwrite"),
              "not replaced even with --overwrite", "notes.txt")
    assert digest(model, tmp_path) == before


def test_prompt_beyond_the_context_through_generate(tiny):
    """#11.2: a prompt plus --max-new-tokens past max_position_embeddings (64) is refused with the numbers."""
    model, _ = tiny
    one_error(run_tool("generate.py", "--model", model, "--prompt", "x" * 60, "--max-new-tokens", 8),
              "the prompt (60 tokens) plus --max-new-tokens 8 exceed the model's context of 64 tokens")


def test_a_file_where_a_folder_is_expected_and_the_other_way_round(tiny, tmp_path):
    """A path that exists as the wrong kind is named so ("is a file, not a folder"), not called missing."""
    from youzhi_ms.checkpoint.gguf import resolve_gguf
    from youzhi_ms.checkpoint.hf import read_config
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.train.run_config import load_run_config
    model, text = tiny
    config = os.path.join(model, "config.json")
    with pytest.raises(YouzhiError, match=re.escape(f"{config} is a file, not a folder; pass the model's folder, "
                                                    f"{model}")):
        read_config(config)
    with pytest.raises(YouzhiError, match=f"{re.escape(str(text))} is a file, not a folder$"):
        read_config(str(text))  # no config.json beside it: no folder to suggest
    with pytest.raises(YouzhiError, match="is a file, not a folder"):
        Tokenizer.from_dir(config)
    with pytest.raises(YouzhiError, match=f"GGUF file {re.escape(str(tmp_path))} is a folder, not a file"):
        resolve_gguf(str(tmp_path))
    with pytest.raises(YouzhiError, match="config file .* is a folder, not a file"):
        load_run_config(str(tmp_path))
    with pytest.raises(YouzhiError, match="does not exist"):
        read_config(str(tmp_path / "nope"))
    one_error(run_tool("generate.py", "--model", config, "--prompt", "hi"),
              f"error: model directory {config} is a file, not a folder; pass the model's folder, {model}")


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_is_one_line_and_its_exit_code(tiny, tmp_path, sig, code):
    """#11.5: Ctrl-C / SIGTERM while MindSpore starts or computes: one 'interrupted' line, 130 / 143, nothing written
    (it used to be a page of MindSpore exit-handler tracebacks and SIGABRT, or 143 without a word)."""
    model, text = tiny
    rc, _, err = run_tool("eval_ppl.py", "--model", model, "--text", text, "--seq-len", 32,
                          "--json", tmp_path / "r.json", signal_after=(2.5, getattr(signal, sig)))
    # the tool's own status lines ("compiling the perplexity graph (first call only) ...") may precede the signal
    # and so may the progress bar's plain lines ("ppl:   0% 0/4 [...]", youzhi_ms/progress.py: stderr is a pipe)
    status = re.compile(r"^(compiling|loading) .*( \.\.\.|: done in [0-9.]+ s)$|^ppl: +\d+% \d+/\d+ \[")
    lines = [ln for ln in err.splitlines() if ln.strip() and not status.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), (rc, err)
    # MindSpore's own SIGINT handler (installed at every graph compile and run) turns Ctrl-C into a SIGTERM; the
    # line then says so instead of guessing
    expect = {(code, "Ctrl-C" if code == 130 else "SIGTERM"), (143, "Ctrl-C or SIGTERM")}
    assert (rc, lines[0].split("(", 1)[1].split(")", 1)[0]) in expect, (rc, err)
    assert os.listdir(tmp_path) == []


def test_a_swallowed_interrupt_still_ends_the_tool_and_discards_its_output(tmp_path, monkeypatch):
    """An interrupt that MindSpore swallows inside a compile (the tool ran on, exit 0, stderr muted) or turns into a
    RuntimeError (a traceback) still ends as one 'interrupted' line, and no output is committed after it."""
    from youzhi_ms import errors, fsutil
    monkeypatch.setattr(errors, "_signalled", signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fsutil.write_json_output(str(tmp_path / "r.json"), {"a": 1})
    assert os.listdir(tmp_path) == []
    code = ("import os, signal, sys, time\nsys.path.insert(0, %r)\nfrom youzhi_ms.errors import cli_main\n"
            "@cli_main\ndef main(swallow):\n"
            "    try:\n        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
            "    except KeyboardInterrupt:\n"
            "        if swallow:\n            return\n        raise RuntimeError('see analyze_fail.ir')\n"
            "main(sys.argv[1] == 'swallow')\n") % ROOT
    for how in ("swallow", "convert"):
        p = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=60,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 130 and len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C)"), \
            (how, p.returncode, p.stderr)
