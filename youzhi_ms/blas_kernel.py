"""The OpenBLAS kernel numpy's matrix products run with, chosen from the CPU's instruction sets before numpy loads.

Why: OpenBLAS (0.3.23, the one numpy 1.26's wheels bundle) picks its kernel from a table of CPU models. A model newer
than the table (e.g. the Xeons of family 6 model 207 that these machines run) gets the generic Prescott (SSE3) kernel:
float32 products 4.5x slower than with the SkylakeX kernel the same CPU supports (34 against 151 GFLOPS on one core,
docs/benchmarks.md section 2), and the converter is numpy products. OPENBLAS_CORETYPE names the kernel instead; this
sets it from the instruction sets the CPU reports (AVX-512 F/BW/VL/DQ: SkylakeX; AVX2 + FMA: Haswell) when the user has
not set it, on Linux x86-64 only, and only before numpy is imported (OpenBLAS reads it once, when it loads). A CPU that
the table knows gets the kernel it would have got: these are the kernels OpenBLAS uses for every model with these sets.
"""
from __future__ import annotations

import os
import platform
import sys

ENV = "OPENBLAS_CORETYPE"


def kernel_for(flags: set) -> str:
    """The OpenBLAS kernel for a CPU with these /proc/cpuinfo flags ('' = leave OpenBLAS's own choice)."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return ""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_openblas_kernel() -> str:
    """Set OPENBLAS_CORETYPE for this process and its children when it can still take effect; returns what it set."""
    if ENV in os.environ or "numpy" in sys.modules or sys.platform != "linux" or platform.machine() != "x86_64":
        return ""
    kernel = kernel_for(_cpu_flags())
    if kernel:
        os.environ[ENV] = kernel
    return kernel
