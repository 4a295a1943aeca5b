"""Benchmarks of farmer: each ``bench_*`` module measures, prints and writes JSON to benchmarks/results/.

Run from the repository root, e.g. ``python -m benchmarks.run_all --quick --threads 1``.
"""
