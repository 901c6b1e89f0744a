"""Checkpoint I/O: the published safetensors layout (read, validate, write), shards, stored formats,
conversion to NVFP4/FP8, and loading a folder into a Model."""
