"""Restructuring the converter must not change what it writes: a tiny conversion through the CLI (uniform F = 4,
adaptive, and TransMLA's auto search) is compared file by file with sha256 digests recorded before the restructuring
of issue 22.

The digests are bits of float arithmetic, so they hold for one numpy build on one OpenBLAS kernel: they are keyed by
both. On another platform the test says so and fails; record that platform's digests from a commit known to be good
(python tests/test_convert_digest.py prints them) and add them under its key.
"""
import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys

import youzhi_ms  # noqa: F401  (before numpy: it chooses numpy's OpenBLAS kernel, which decides the bits)
import numpy as np
import pytest

from helpers import ROOT, add_tiny_tokenizer, make_source

# the output files that are the conversion's result (the output-directory marker is fsutil's bookkeeping, not output)
FILES = ("config.json", "conversion_report.json", "conversion_report.md", "freqfold.png", "generation_config.json",
         "model.safetensors", "tokenizer.json")

# recorded at commit 8598fb0 (before issue 22's restructuring) for the weights, the plot and the side files; config.json
# and the reports re-recorded after merging issue 20 (config.json states the dense MoE keys) and issue 21 (the report
# names the FreqFold search mode and its first-round scores; later its coarse balance round): model.safetensors and
# freqfold.png are unchanged
DIGESTS = {
    "numpy 1.26.4 / OpenBLAS SkylakeX": {
        "4": {
            "config.json": "dc0de6c8d1420688fdcdc00e2079952936e86e1549d8e20dc24d055b13d72081",
            "conversion_report.json": "71d2495ad5e70224a1226694fd02a03a1b6da56e4c735a5c9e77b504637cb4ed",
            "conversion_report.md": "96911e57c1add3226842780e11eb8807dbe7ee7afc27e8819e3192548de7f61b",
            "freqfold.png": "e29385ad8642371c224ad49bc29e8aebf1518804d3e1f3b8d6d96b72da6ac43c",
            "generation_config.json": "89c1678d2e54c78b2e98842459d5bf4469a62ac0cf78b461607ffefcfd2840db",
            "model.safetensors": "5c856ce49a3bbc03eb76f7dfb127e5d0a33b90b367ce185ff0e4075fe982df55",
            "tokenizer.json": "9aaf644f3562e9e40351f95e3ff3259bf1af0777bc6d229f9b9a679ee0c17987"
        },
        "adaptive": {
            "config.json": "5d9f7543f2fcb50309f5584e7af7f12b8a35b2ba8fd7d4d8643ee65543ec658c",
            "conversion_report.json": "10913387dac5074e1a1f93cc1f509547f97b05aec47a63a37fc0c2080c2cfa69",
            "conversion_report.md": "67f002a6df36650d2df7f45f5417888d92eca1b54b7aad98569db410135b1221",
            "freqfold.png": "31f6b06e6b79d8eabcff02ea2337cd64a39dca75e2d7eda30a39271ad9a80e60",
            "generation_config.json": "89c1678d2e54c78b2e98842459d5bf4469a62ac0cf78b461607ffefcfd2840db",
            "model.safetensors": "54e6d0d05078b95f907bc34d4432b22bc2d269056c00dfa7e88fba09a9a3632e",
            "tokenizer.json": "9aaf644f3562e9e40351f95e3ff3259bf1af0777bc6d229f9b9a679ee0c17987"
        },
        "auto": {
            "config.json": "38fa5dc6d7a49257e7127f577ebc209d7a3f9b4f135b6c596472f4504d6c8dc5",
            "conversion_report.json": "fc5ed1d00cf2828e5e0be80b47e28d4ccff592361f869e41222438b4dd0a284a",
            "conversion_report.md": "f6d260ff9bb1c1a661e3a97ec4ce94593c1d10c4a0e153baca00bcbe02efc34d",
            "freqfold.png": "4878f63aa697a0dd83d59f3ffe792a54b61c8e286b42565b8a728226d0168f5e",
            "generation_config.json": "89c1678d2e54c78b2e98842459d5bf4469a62ac0cf78b461607ffefcfd2840db",
            "model.safetensors": "9879d424e553307af5ef25363fa65ab1f57d96afc2cb4386b45b9a8d8ae331d9",
            "tokenizer.json": "9aaf644f3562e9e40351f95e3ff3259bf1af0777bc6d229f9b9a679ee0c17987"
        }
    }
}


def platform_key() -> str:
    """numpy's version and the OpenBLAS kernel it picked for this CPU: what decides the float bits."""
    # the OpenBLAS numpy has loaded, found in this process's memory map: opening the file under another path (as
    # numpy.libs/../ globbing did) loads a second, separately initialised copy, which on a CPU model its DYNAMIC_ARCH
    # table does not list reports the generic Prescott kernel while numpy's copy runs SkylakeX
    with open("/proc/self/maps") as maps:
        libs = sorted({line.split()[-1] for line in maps if "libopenblas" in line})
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
