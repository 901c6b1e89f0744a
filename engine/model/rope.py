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
    step's positions for each RoPE kind, and per token at the first position of the window it
    falls in, per compression ratio. ``once`` keeps other per-step values that every layer of a
    kind would otherwise recompute (cache rows of the token's entry, visibility masks).

    pos: [1] int64 device position of the step's first token; count: tokens in the step, at
    positions pos .. pos + count - 1 (MTP's batched verify runs 2). ``token(i)`` is the StepRope of
    the i-th token alone (count 1; itself when the step has one token)."""

    def __init__(self, tables: RopeTables, pos: torch.Tensor, count: int = 1):
        self.tables, self.pos, self.count = tables, pos, count
        self._cache: dict = {}

    def once(self, key, make):
        """make() the first time key is asked for in this step, the same tensor afterwards."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def positions(self) -> torch.Tensor:
        """[count] int64: the step's positions on the device."""
        if self.count == 1:
            return self.pos
        return self.once("positions", lambda: self.pos + torch.arange(self.count, device=self.pos.device))

    def token(self, i: int) -> "StepRope":
        """The i-th token's StepRope (position pos + i), made once per step."""
        if self.count == 1:
            return self
        return self.once(("token", i), lambda: StepRope(self.tables, self.positions[i:i + 1]))

    def at_pos(self, yarn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [count, rd/2] at the step's positions."""
        return self.once(("pos", yarn), lambda: self.tables.cos_sin(self.positions, yarn))

    def at_window(self, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
        """YaRN cos/sin [1, rd/2] at (pos // ratio) * ratio (compressed entries; one token's step)."""
        if self.count != 1:
            raise ValueError("at_window is per token: use StepRope.token(i)")
        return self.once(("window", ratio), lambda: self.tables.cos_sin(self.pos, True, ratio))
