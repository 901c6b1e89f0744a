"""Triton kernels for CUDA (Hopper, sm_90), each registered against its torch reference."""
