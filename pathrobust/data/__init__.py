"""Readers of the real on-disk formats, and synthetic data generators built on real H&E."""
