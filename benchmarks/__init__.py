"""Benchmarks: every comparison is made against a baseline measured in the same run."""
