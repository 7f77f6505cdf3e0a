"""Benchmark scripts (figures in BENCHMARKS.md). Each runs as ``python benchmarks/<name>.py`` or
``python -m benchmarks.<name>`` from the repository root; what they measure with is ``benchmarks/measure.py``."""
