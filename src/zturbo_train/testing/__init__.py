"""Tiny and synthetic models built from the real classes, for tests and benchmarks."""
