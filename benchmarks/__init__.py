"""Benchmarks against kyutai's moshi (see README.md there)."""
