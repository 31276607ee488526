"""Implementations of the op: ``chunked`` (any device) and the Triton kernels (CUDA)."""
