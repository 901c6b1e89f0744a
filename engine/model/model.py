"""The DeepSeek-V4 model: embedding -> blocks -> hc head -> norm -> head, plus the MTP block.

Weights come by their published names (see engine/weights.py); all per-request state is read and
written through cache handles (cache/handles.py). Precision modes:
- "exact": no quantisation simulation (matches transformers' DeepseekV4 in float32);
- "faithful": KV entries (window and compressed) through FP8 e4m3 / BF16 RoPE, indexer q and keys
  through Hadamard + FP4 e2m1, as the model was trained; the inputs of the FP8 / FP4 linears
  through e4m3 per 1 x 128 slice with ue8m0 scales and the attention queries rounded to bf16, as
  DeepSeek's own inference computes (the BF16 linears: compressors, router, head, take them as they are).
"""

from __future__ import annotations

from collections import ChainMap

import torch

from dsv4 import kernels
from dsv4.kernels import dispatch
from dsv4.kernels.formats import Precision

from .attention import stacked_linears as attention_stacks
from .block import block
from .config import DSV4Config
from .context import ONE_RANK, Collectives, LayerContext
from .moe import layer_experts, stacked_linears as moe_stacks
from .rope import RopeTables, StepRope
from .weights import build_weights, fuse_rows


class Model:
    """mode: a Precision (or its name, parsed here once). comm: on one rank of several, the
    collectives that make partial sub-layer outputs and a vocabulary-split head whole (cfg is then
    the rank-local config and weights this rank's slices: engine/runtime/parallel/); ONE_RANK
    otherwise."""

    def __init__(self, cfg: DSV4Config, weights: dict, mode: Precision | str = Precision.EXACT, device="cpu",
                 dtype: torch.dtype = torch.float32, comm: Collectives = ONE_RANK):
        self.cfg, self.precision, self.comm = cfg, Precision.parse(mode), comm
        self.device, self.dtype = torch.device(device), dtype
        dispatch.require_kernels(self.device.type)
        self.rope = RopeTables(cfg, self.device)
        self.specs = cfg.schedule()
        self.w = weights

    @property
    def w(self) -> dict:
        """Published name -> QWeight / tensor (engine/weights.py)."""
        return self._w

    @w.setter
    def w(self, weights: dict) -> None:
        self._w, self._fused = weights, None
        prefixes = [f"layers.{s.index}.ffn" for s in self.specs] + (["mtp.0.ffn"] if "mtp.0.e_proj" in weights else [])
        self.experts = {p: layer_experts(weights, p, self.cfg.n_routed_experts) for p in prefixes}

    @property
    def mode(self) -> Precision:
        """The precision (a str enum: compares equal to "exact" / "faithful")."""
        return self.precision

    def _ctx(self, p: str, spec, handle, positions, token_ids, rope, start, before_token=None) -> LayerContext:
        return LayerContext(self.cfg, self._step_weights() if start is None else self.w, p, spec, handle, positions,
                            token_ids, rope, self.precision, start, self.experts[p + ".ffn"], self.comm, before_token)

    def _step_weights(self):
        """The weights with the decode step's stacked linears (built at the first step)."""
        if self._fused is None:
            self._fused = self._fuse()
        return ChainMap(self._fused, self.w)

    @classmethod
    def from_state_dict(cls, cfg: DSV4Config, tensors: dict, mode: Precision | str = Precision.EXACT, device="cpu",
                        dtype: torch.dtype = torch.float32) -> "Model":
        return cls(cfg, build_weights(tensors, device), mode, device, dtype)

    @property
    def has_mtp(self) -> bool:
        return "mtp.0.e_proj" in self.w

    def forward(self, token_ids: torch.Tensor, handles, start: int, last_only: bool = False,
                return_streams: bool = False, head: bool = True):
        """Run S new tokens at positions start..start+S-1 through every layer.

        token_ids: [S] int64; handles: per-layer cache handles of one slot (state before this call).
        Returns logits [S, vocab] float32 ([1, vocab] with last_only; None without the head: a prefill
        chunk before the last), and the final residual streams [S, hc_mult, d] if return_streams
        (the MTP block's input). Positions are int64 (contexts past 2^31 tokens stay exact).
        """
        cfg, w = self.cfg, self.w
        if self.device.type == "cuda" and token_ids.device.type == "cpu":  # queued without a host wait
            token_ids = token_ids.pin_memory()
        ids = token_ids.to(self.device, non_blocking=True)
        positions = torch.arange(start, start + ids.shape[0], dtype=torch.int64, device=self.device)
        h = w["embed.weight"][ids].to(self.dtype)
        streams = h.unsqueeze(1).expand(-1, cfg.hc_mult, -1).contiguous()
        for spec in self.specs:
            p = f"layers.{spec.index}"
            streams = block(streams, self._ctx(p, spec, handles[spec.index], positions, ids, self.rope, start))
        logits = self._head(streams[-1:] if last_only else streams, "") if head else None
        return (logits, streams) if return_streams else logits

    def decode_forward(self, token: torch.Tensor, pos: torch.Tensor, handles) -> torch.Tensor:
        """One decode token with static shapes: token [1] int64 and pos [1] int64 on the model's
        device (pos = tokens already cached). The same values as ``forward``, but no shape or
        branch depends on the position, so it can be captured in a CUDA graph (engine/decode.py).
        -> logits [1, vocab] float32."""
        return self.static_step(token, pos, handles)[0]

    def _fuse(self) -> dict:
        """Stacked linears for the decode step (engine/weights.fuse_rows; the originals become views):
        per layer, the groups engine/attention.stacked_linears and engine/moe.stacked_linears name,
        each group one GEMV launch."""
        fused = {}
        for spec in self.specs:
            p = f"layers.{spec.index}"
            groups = {**attention_stacks(p + ".attn", spec), **moe_stacks(p + ".ffn.shared_experts")}
            for name, parts in groups.items():
                q = fuse_rows(self.w, parts)
                if q is not None:
                    fused[name] = q
        return fused

    def _head(self, streams: torch.Tensor, p: str) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        y = kernels.hc_head(streams, w[p + "hc_head_fn"], w[p + "hc_head_base"], w[p + "hc_head_scale"],
                            cfg.hc_eps, cfg.rms_norm_eps)
        y = kernels.rms_norm(y, w[p + "norm.weight"], cfg.rms_norm_eps)
        return self.comm.gather_vocab(kernels.linear(y, w["head"]).float())

    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, handle, start: int) -> torch.Tensor:
        """Multi-token prediction: logits for the token after ``next_ids``.

        streams: [S, hc_mult, d] final main-model streams at positions start..; next_ids: [S] the
        tokens at positions start+1..; handle: cache handle for the MTP layer. -> [S, vocab].
        x = e_proj(enorm(embed(next_ids))) (broadcast over streams) + h_proj(hnorm(streams)),
        then one block, the MTP's own hc head and norm, and the shared head.
        """
        cfg, w, p = self.cfg, self.w, "mtp.0"
        ids = next_ids.to(self.device)
        positions = torch.arange(start, start + ids.shape[0], device=self.device)
        e = kernels.rms_norm(w["embed.weight"][ids].to(self.dtype), w[p + ".enorm.weight"], cfg.rms_norm_eps)
        hs = kernels.rms_norm(streams, w[p + ".hnorm.weight"], cfg.rms_norm_eps)
        aq = self.precision.faithful
        x = kernels.linear(e, w[p + ".e_proj"], act_quant=aq).unsqueeze(1) + kernels.linear(hs, w[p + ".h_proj"],
                                                                                              act_quant=aq)
        x = block(x, self._ctx(p, cfg.mtp_layer(0), handle, positions, ids, self.rope, start))
        return self._head(x, p + ".")

    # ------------------------------------------------ speculative decoding (engine/runtime/speculative.py)
    def static_step(self, token: torch.Tensor, pos: torch.Tensor, handles,
                    before_token=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode_forward`` for S consecutive tokens, also returning the final residual streams
        [S, hc_mult, d] (the MTP block's input). token [S] int64, pos [1] int64 (the first token's
        position) on the model's device; S is static (MTP's batched verify runs tok and its draft).
        S = 1: the same ops in the same order as decode_forward, so the logits [1, vocab] float32 are
        its bits. S > 1: the linears, norms and mHC run on all rows at once (on a GPU each row gets
        the bits it gets alone: the kernels compute rows independently), and the cache reads and
        writes token by token (engine/model/attention.decode_attention); before token i >= 1
        writes layer l's cache, before_token(l, i) is called. -> logits [S, vocab] float32, streams."""
        cfg = self.cfg
        rope = StepRope(self.rope, pos, token.shape[0])
        streams = self.w["embed.weight"][token].to(self.dtype).unsqueeze(1).expand(-1, cfg.hc_mult, -1).contiguous()
        for spec in self.specs:
            p = f"layers.{spec.index}"
            hook = None if before_token is None else (lambda i, layer=spec.index: before_token(layer, i))
            streams = block(streams, self._ctx(p, spec, handles[spec.index], rope.positions, token, rope, None, hook))
        return self._head(streams, ""), streams

    def mtp_step(self, streams: torch.Tensor, next_id: torch.Tensor, pos: torch.Tensor, handle,
                 head: bool = True) -> torch.Tensor:
        """``mtp_forward`` for one position with static shapes (CUDA-graph capturable): streams
        [1, hc_mult, d] the main model's final streams at device position pos [1]; next_id [1] the
        token at pos+1; handle: the MTP layer's cache handle. -> logits [1, vocab] float32 for pos+2,
        or with head=False only the cache update, returning the block's output streams [1, hc_mult, d]
        (the shared vocabulary head is the largest read of the step)."""
        cfg, w, p = self.cfg, self._step_weights(), "mtp.0"
        e = kernels.rms_norm(w["embed.weight"][next_id].to(self.dtype), w[p + ".enorm.weight"], cfg.rms_norm_eps)
        hs = kernels.rms_norm(streams, w[p + ".hnorm.weight"], cfg.rms_norm_eps)
        aq = self.precision.faithful
        x = kernels.linear(e, w[p + ".e_proj"], act_quant=aq).unsqueeze(1) + kernels.linear(hs, w[p + ".h_proj"],
                                                                                              act_quant=aq)
        x = block(x, self._ctx(p, cfg.mtp_layer(0), handle, pos, next_id, StepRope(self.rope, pos), None))
        return self._head(x, p + ".") if head else x
