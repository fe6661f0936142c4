"""youzhi_ms: GQA -> MLA (YouZhi) on MindSpore."""
__version__ = "0.1.0"
