"""The two RoPE tables of a model: plain (SWA layers) and YaRN at compress_rope_theta (CSA/HCA)."""

from __future__ import annotations

import torch

import kernels


class RopeTables:
    def __init__(self, cfg, device):
        rd = cfg.qk_rope_head_dim
        self.main = kernels.rope_inv_freq(rd, cfg.rope_theta).to(device)
        self.compress = kernels.rope_inv_freq(
            rd, cfg.compress_rope_theta, cfg.yarn_factor, cfg.yarn_original_max_position,
            cfg.yarn_beta_fast, cfg.yarn_beta_slow).to(device)

    def cos_sin(self, positions: torch.Tensor, yarn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] -> (cos, sin) [S, rd/2] float32 for the layer's RoPE kind."""
        return kernels.rope_cos_sin(positions, self.compress if yarn else self.main)
