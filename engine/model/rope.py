"""The two RoPE tables of a model: plain (SWA layers) and YaRN at compress_rope_theta (CSA/HCA)."""

from __future__ import annotations

import torch

from dsv4 import kernels


class RopeTables:
    def __init__(self, cfg, device):
        rd = cfg.qk_rope_head_dim
        self.main = kernels.rope_inv_freq(rd, cfg.rope_theta).to(device)
        self.compress = kernels.rope_inv_freq(
            rd, cfg.compress_rope_theta, cfg.yarn_factor, cfg.yarn_original_max_position,
            cfg.yarn_beta_fast, cfg.yarn_beta_slow).to(device)

    def cos_sin(self, positions: torch.Tensor, yarn: bool, ratio: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] -> (cos, sin) [S, rd/2] float32 for the layer's RoPE kind (at each
        position's window start, positions // ratio * ratio, for ratio > 1)."""
        return kernels.rope_cos_sin(positions, self.compress if yarn else self.main, ratio)


class StepRope:
    """The cos/sin one decode step needs, made once per step and shared by all layers: at the
    token's position pos [1] (device) for each RoPE kind, and at the first position of the window
    the token falls in, per compression ratio. ``once`` keeps other per-step values that every
    layer of a kind would otherwise recompute (cache rows of the token's entry, visibility masks)."""

    def __init__(self, tables: RopeTables, pos: torch.Tensor):
        self.tables, self.pos = tables, pos
        self._cache: dict = {}

    def once(self, key, make):
        """make() the first time key is asked for in this step, the same tensor afterwards."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def at_pos(self, yarn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.once(("pos", yarn), lambda: self.tables.cos_sin(self.pos, yarn))

    def at_window(self, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
        """YaRN cos/sin [1, rd/2] at (pos // ratio) * ratio (compressed entries)."""
        return self.once(("window", ratio), lambda: self.tables.cos_sin(self.pos, True, ratio))
