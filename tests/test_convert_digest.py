"""Restructuring the converter must not change what it writes: a tiny conversion through the CLI (uniform F = 4,
adaptive, and TransMLA's auto search) is compared file by file with sha256 digests recorded before the restructuring
of issue 22.

The digests are bits of float arithmetic, so they hold for one numpy build on one OpenBLAS kernel: they are keyed by
both. On another platform the test says so and fails; record that platform's digests from a commit known to be good
(python tests/test_convert_digest.py prints them) and add them under its key.
"""
import ctypes
import glob
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, add_tiny_tokenizer, make_source

# the output files that are the conversion's result (the output-directory marker is fsutil's bookkeeping, not output)
FILES = ("config.json", "conversion_report.json", "conversion_report.md", "freqfold.png", "generation_config.json",
         "model.safetensors", "tokenizer.json")

# recorded at commit 8598fb0 (before issue 22's restructuring)
DIGESTS = {
    "numpy 1.26.4 / OpenBLAS SkylakeX": {
        "4": {
            "config.json": "1e65d9bbfc01a32268c6e63d1e64a0707cd65e874026d6599332d9531631ed79",
            "conversion_report.json": "bc8a2776a98215a2c5ea27776021735ec85c3587454b00cd862b749dcebe00da",
            "conversion_report.md": "766b7717c99a7d203843cbb98ec2a547abb14095b59a13472346457349fa3abe",
            "freqfold.png": "e29385ad8642371c224ad49bc29e8aebf1518804d3e1f3b8d6d96b72da6ac43c",
            "generation_config.json": "89c1678d2e54c78b2e98842459d5bf4469a62ac0cf78b461607ffefcfd2840db",
            "model.safetensors": "5c856ce49a3bbc03eb76f7dfb127e5d0a33b90b367ce185ff0e4075fe982df55",
            "tokenizer.json": "9aaf644f3562e9e40351f95e3ff3259bf1af0777bc6d229f9b9a679ee0c17987"
        },
        "adaptive": {
            "config.json": "65fd49ee099e46e11fe54e5de495cee931d99cf45f923e913795ff24c3226a53",
            "conversion_report.json": "4b8b0551732bea97afdce50decdba69c8818d3f78f3557b047449ef57242c722",
            "conversion_report.md": "7a28f561cfd4072229d1b258c852808e519323c0ec5568f55a4971a513f98875",
            "freqfold.png": "31f6b06e6b79d8eabcff02ea2337cd64a39dca75e2d7eda30a39271ad9a80e60",
            "generation_config.json": "89c1678d2e54c78b2e98842459d5bf4469a62ac0cf78b461607ffefcfd2840db",
            "model.safetensors": "54e6d0d05078b95f907bc34d4432b22bc2d269056c00dfa7e88fba09a9a3632e",
            "tokenizer.json": "9aaf644f3562e9e40351f95e3ff3259bf1af0777bc6d229f9b9a679ee0c17987"
        },
        "auto": {
            "config.json": "73ee92b9e034af88dfeca480daf3cdd22210668a794353976b449af9a92dc04b",
            "conversion_report.json": "354941d27c9e91956a0bb8783399871a965749d027657d1ff79d1b798d31fac1",
            "conversion_report.md": "d0b924d79dabc10ac4609ba6846f3aeb28341d88692a803611aa47601a97d8c8",
            "freqfold.png": "4878f63aa697a0dd83d59f3ffe792a54b61c8e286b42565b8a728226d0168f5e",
            "generation_config.json": "89c1678d2e54c78b2e98842459d5bf4469a62ac0cf78b461607ffefcfd2840db",
            "model.safetensors": "9879d424e553307af5ef25363fa65ab1f57d96afc2cb4386b45b9a8d8ae331d9",
            "tokenizer.json": "9aaf644f3562e9e40351f95e3ff3259bf1af0777bc6d229f9b9a679ee0c17987"
        }
    },
}


def platform_key() -> str:
    """numpy's version and the OpenBLAS kernel it picked for this CPU: what decides the float bits."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libopenblas*"))
    core = "?"
    for lib in libs:
        for name in ("openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(ctypes.CDLL(lib), name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                core = fn().decode()
                break
    return f"numpy {np.__version__} / OpenBLAS {core}"


def _normalized(path: str, root: str) -> bytes:
    """The file's bytes, with what differs from run to run taken out: the temporary directory and the wall time."""
    data = open(path, "rb").read()
    if path.endswith((".json", ".md")):
        text = data.decode("utf-8").replace(root, "<ROOT>")
        text = re.sub(r'"seconds": [0-9.e+-]+', '"seconds": 0', text)
        text = re.sub(r"- time: [0-9.]+ s", "- time: 0 s", text)
        data = text.encode("utf-8")
    return data


def tiny_conversion_digests(root: str, freqfold: str) -> dict:
    """Convert the tests' tiny Llama (made in `root` if absent) with --freqfold `freqfold`; {file: sha256}."""
    src = os.path.join(root, "src")
    if not os.path.isdir(src):
        make_source("llama", src)
        add_tiny_tokenizer(src)
        rng = np.random.default_rng(0)
        words = ["".join(chr(97 + k) for k in rng.integers(0, 26, rng.integers(2, 8))) for _ in range(3000)]
        with open(os.path.join(root, "calib.txt"), "w") as f:
            f.write(" ".join(words))
    out = os.path.join(root, f"out_{freqfold}")
    r = subprocess.run([sys.executable, "tools/convert_gqa_to_mla.py", "--hf-dir", src, "--output-dir", out,
                        "--kv-lora-rank", "20", "--qk-rope-dim", "8", "--calib-text", os.path.join(root, "calib.txt"),
                        "--calib-tokens", "2048", "--calib-seq-len", "64", "--quiet", "--freqfold", freqfold],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == sorted(FILES)
    return {f: hashlib.sha256(_normalized(os.path.join(out, f), root)).hexdigest() for f in FILES}


@pytest.mark.parametrize("freqfold", ["4", "adaptive", "auto"])
def test_tiny_conversion_is_bit_identical_to_the_recorded_one(freqfold, tmp_path):
    key = platform_key()
    assert key in DIGESTS, (f"no digests recorded for {key} (recorded: {sorted(DIGESTS)}); record them from a "
                            "known-good commit with: python tests/test_convert_digest.py")
    got = tiny_conversion_digests(str(tmp_path), freqfold)
    want = DIGESTS[key][freqfold]
    assert got == want, {f: (got[f], want[f]) for f in FILES if got[f] != want[f]}


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps({platform_key(): {ff: tiny_conversion_digests(d, ff) for ff in ("4", "adaptive", "auto")}},
                         indent=4))
