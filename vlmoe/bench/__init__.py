"""Benchmarks (scripts, not timed tests): ``vlmoe bench <what>``."""
