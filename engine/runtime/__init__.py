"""The runtime that serves one request: tokenizer, chat encoding, sampling, the session (prefill,
decode, reset), the CUDA-graph decode runner and the conversation loop."""
