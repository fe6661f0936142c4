"""Compile-only checks of the Ascend training plans (MindSpore DryRun), per-rank memory, and the compile-only CANN
stand-in that lets MindSpore's Ascend plugin load on a machine without CANN. Nothing here runs unless
`tools/dryrun.py` (or a test of it) asks for it; importing this package imports neither MindSpore nor the stand-in.
"""
