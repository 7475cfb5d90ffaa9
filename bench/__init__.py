"""``kvstore bench``: data-path benchmarks with same-run baselines, printed as ratio tables."""
