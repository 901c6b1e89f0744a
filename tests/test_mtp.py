"""The MTP block's forward against a hand-written computation."""

import torch

from dsv4.cache import CacheManager, CacheSchema
from dsv4.engine.model.block import block
from dsv4.engine.model.context import LayerContext
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.kernels.formats import Precision


def test_mtp_forward_matches_hand_computation(tiny_cfg, tiny_tensors):
    cfg, t = tiny_cfg, tiny_tensors
    model = Model.from_state_dict(cfg, t)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    s = Session(model, 64)
    s.cache.prepare(s.slot, 19)
    _, streams = model.forward(ids[:19], s.cache.handles(s.slot), 0, return_streams=True)

    schema = CacheSchema.from_config(cfg, "exact", include_mtp=True)
    mgr = CacheManager(schema, 64)
    slot = mgr.admit_request()
    mgr.prepare(slot, 19)
    out = model.mtp_forward(streams, ids[1:], mgr.handles(slot)[cfg.num_hidden_layers], 0)

    # by hand, with plain torch ops (the block itself is checked against transformers elsewhere)
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    e = rms(t["embed.weight"][ids[1:]], t["mtp.0.enorm.weight"]) @ t["mtp.0.e_proj.weight"].T
    h = rms(streams, t["mtp.0.hnorm.weight"]) @ t["mtp.0.h_proj.weight"].T
    x = e[:, None, :] + h
    mgr2 = CacheManager(schema, 64)
    slot2 = mgr2.admit_request()
    mgr2.prepare(slot2, 19)
    ctx = LayerContext(cfg, model.w, "mtp.0", cfg.mtp_layer(0), mgr2.handles(slot2)[cfg.num_hidden_layers],
                       torch.arange(19), ids[1:], model.rope, Precision.EXACT, 0, model.experts["mtp.0.ffn"])
    x = block(x, ctx)
    flat = x.reshape(19, -1)
    flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    pre = torch.sigmoid(flat @ t["mtp.0.hc_head_fn"].T * t["mtp.0.hc_head_scale"] + t["mtp.0.hc_head_base"]) + cfg.hc_eps
    y = rms((pre[..., None] * x).sum(1), t["mtp.0.norm.weight"])
    ref = y @ t["head.weight"].T
    assert out.shape == (19, cfg.vocab_size)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    # the MTP path really uses its own weights: a different hnorm changes the output
    model.w["mtp.0.hnorm.weight"] = t["mtp.0.hnorm.weight"] * 2
    mgr3 = CacheManager(schema, 64)
    slot3 = mgr3.admit_request()
    mgr3.prepare(slot3, 19)
    assert not torch.allclose(model.mtp_forward(streams, ids[1:], mgr3.handles(slot3)[cfg.num_hidden_layers], 0), out)
