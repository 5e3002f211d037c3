"""Shoal benchmarks: ``python -m bench`` prints figures (bench/README.md); nothing asserts."""
