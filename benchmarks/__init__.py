"""Benchmarks: each ``bench_*.py`` module has ``run(args) -> dict`` and prints its own ratios.

Every benchmark measures a baseline in the same run (for example a plain DuckDB load of the same
files) and prints our figure as a ratio of it. ``python -m benchmarks`` runs them all.
"""
