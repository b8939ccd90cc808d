"""Benchmarks: run as ``python -m bench.NAME``; each prints a markdown table."""
