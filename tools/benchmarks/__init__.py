"""Benchmark implementations behind tools/benchmark.py, one module per area."""
