"""Metrics: pure functions (arrays in, numbers out), no I/O."""
