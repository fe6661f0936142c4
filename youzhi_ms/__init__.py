"""youzhi_ms: GQA -> MLA (YouZhi) on MindSpore."""
from youzhi_ms.blas_kernel import choose_openblas_kernel

__version__ = "0.1.0"
choose_openblas_kernel()  # before anything imports numpy (blas_kernel.py says why)
