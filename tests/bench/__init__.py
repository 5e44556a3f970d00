"""Benchmarks: scripts that print numbers, run with `python -m tests.bench.<name>`; never collected as tests."""
