"""Triton kernels (imported only on request: importing this package imports triton)."""
