"""The model as math over weights in their stored formats: config and layer schedule, the blocks
(mHC, attention with compressors and the Lightning Indexer, MoE), RoPE, weight handling."""
