"""Developer tools: synthetic weights, the transformers oracle bridge, and benchmarks."""
