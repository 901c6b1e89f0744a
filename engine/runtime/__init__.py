"""The runtime that serves one request: tokenizer, chat encoding (chat.py) and the completion parser
(completion.py), conversation files (messages.py), sampling, the session (prefill, decode, reset), the
one decode loop (generate.py), the CUDA-graph decode runner (decode.py), the conversation loop, MTP
speculative decoding, and the multi-rank runtime (parallel/)."""
