"""Torch references: every op written for clarity; the math is the oracle for the GPU kernels."""
