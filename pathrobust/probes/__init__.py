"""Trained readouts on frozen features: linear probes, ridge regression, leakage probes,
attention-MIL heads and segmentation decoders.

``pathrobust.metrics`` scores (arrays in, numbers out, nothing trained); the modules here
fit something first and then score with those metrics.
"""
