"""Benchmarks of jaxdiff_info (run as scripts: python -m benchmarks.<name>)."""
