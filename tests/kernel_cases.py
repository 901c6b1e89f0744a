"""Random weights in every stored format, shared by the GPU kernel tests and the interpreter checks."""

import torch

from dsv4.cache import EntryFormat, EntryStore
from dsv4.kernels import quant
from dsv4.kernels.reference.linear import QWeight
from dsv4.kernels.reference.moe import ExpertSet

FORMATS = ("fp8", "fp8-f32", "mxfp4", "nvfp4", "bf16", "f32")


def weight(fmt: str, N: int, K: int, g: torch.Generator) -> QWeight:
    """A [N, K] weight ~ N(0, 1/K) in ``fmt`` (fp8-f32: FP8 with float32 block scales)."""
    w = torch.randn(N, K, generator=g) / K ** 0.5
    if fmt == "fp8":
        return QWeight("fp8", *quant.quant_fp8_block(w))
    if fmt == "fp8-f32":
        q, s = quant.quant_fp8_block(w)
        return QWeight("fp8", q, quant.ue8m0_to_float(s.view(torch.uint8)).float())
    if fmt == "mxfp4":
        return QWeight("mxfp4", *quant.quant_mxfp4(w))
    if fmt == "nvfp4":
        return QWeight("nvfp4", *quant.quant_nvfp4(w))
    return QWeight("dense", w.to(torch.bfloat16 if fmt == "bf16" else torch.float32))


def expert_set(fmt: str, E: int, inter: int, d: int, g: torch.Generator, device="cpu") -> ExpertSet:
    """E experts: w1, w3 [inter, d], w2 [d, inter] in ``fmt``."""
    mk = lambda N, K: weight(fmt, N, K, g).to(device)  # noqa: E731
    return ExpertSet([mk(inter, d) for _ in range(E)], [mk(inter, d) for _ in range(E)],
                     [mk(d, inter) for _ in range(E)])


def staged_values(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A staged weight's values (kernels/triton/staged_experts.py): e4m3 bytes q [N, K] x 2^(r - 133),
    r [N / 128, K / 128] the exponent byte of each 128 x 128 block (float32)."""
    return q.view(torch.float8_e4m3fn).float() * (r.float() - 133).exp2().repeat_interleave(128, 0) \
        .repeat_interleave(128, 1)


def e4m3_rows(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Rows of e4m3 bytes q [M, K] with one ue8m0 exponent byte per 128-slice e [M, K / 128] as float64
    (actquant.quantise_rows_fp8's form)."""
    return q.view(torch.float8_e4m3fn).double() * (e.double() - 127).exp2().repeat_interleave(128, 1)


def store(kind: str, rows: int, D: int, r: int, device="cpu") -> dict:
    """An empty entry store (kernels/entries.py layout) of ``rows`` entries of D channels, r of them
    RoPE: kind "kv", "fp4" or "f32"."""
    return EntryStore(rows, EntryFormat(D, r, kind), device).tensors


def index_select_case(kind: str, H: int, Di: int, n: int, k: int, visible: int, g: torch.Generator,
                      device="cpu") -> tuple:
    """Arguments of kernels.indexer_select_decode (q [H, Di], weights [H], store, rows [n], ok [n], k)
    whose scores are exact in any summation order, so the kernel must choose exactly the reference's
    entries: FP4 queries and keys (kind "fp4") or small integers (kind "f32"), power-of-two head
    weights of both signs. Ties on purpose: a run of entries share one key, others are zero (score
    0). Entries sit at scattered pool rows; the first ``visible`` may be seen."""
    if kind == "fp4":
        q = quant.fp4_quant_dequant(torch.randn(H, Di, generator=g))
        keys = torch.randn(n, Di, generator=g)
    else:
        q = torch.randint(-3, 4, (H, Di), generator=g).float()
        keys = torch.randint(-3, 4, (n, Di), generator=g).float()
    keys[n // 3: n // 3 + 5] = keys[n // 2]  # equal keys: equal scores, taken lowest entry first
    keys[torch.randperm(n, generator=g)[: n // 4]] = 0.0
    sign = torch.where(torch.rand(H, generator=g) < 0.3, -1.0, 1.0)
    weights = sign * torch.exp2(torch.randint(-2, 3, (H,), generator=g).float())
    st = EntryStore(n + 11, EntryFormat(Di, 0, kind), "cpu").tensors
    rows = torch.randperm(n + 11, generator=g)[:n]
    from dsv4.kernels.reference.entries import write_entries
    write_entries(st, rows, keys)
    ok = torch.arange(n) < visible
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(weights), {name: to(t) for name, t in st.items()}, to(rows), to(ok), k


def indexer_quant_mismatch(got: torch.Tensor, x: torch.Tensor, max_fraction: float = 1e-3) -> str | None:
    """None when ``got`` (a kernel's kernels.indexer_quant of x [..., Di]) equals the reference
    except at borderline roundings, else what is wrong. Borderline: the rotated value (float64)
    within 1e-5 of an e2m1 rounding midpoint at its group's scale, or the group's amax / 6 within
    1e-5 of a power of two (float32 sums in another order may round either way there); at most
    ``max_fraction`` of the values may differ."""
    ref = quant.indexer_quant_dequant(x.cpu()).float()
    diff = got.cpu().float() != ref
    if not diff.any():
        return None
    d = x.shape[-1]
    signs = torch.sign(quant.hadamard_matrix(d).double())
    y = (x.cpu().double().reshape(-1, d) @ signs / d ** 0.5).reshape(-1, 32)
    ratio = y.abs().amax(1).clamp(min=2.0 ** -100) / 6.0
    l2 = torch.log2(ratio)
    group_edge = (l2 - l2.round()).abs() < 1e-5
    v = y.abs() / torch.exp2(torch.ceil(l2 - 1e-9))[:, None]
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
    near_mid = ((v[..., None] - mids).abs().amin(-1) < 1e-5 * v.clamp(min=1.0))
    borderline = (near_mid | group_edge[:, None]).reshape(diff.shape)
    if (diff & ~borderline).any():
        i = (diff & ~borderline).nonzero()[0].tolist()
        return f"indexer_quant differs at {i}: {got.cpu().float()[tuple(i)].item()} vs {ref[tuple(i)].item()}"
    if diff.float().mean().item() > max_fraction:
        return f"indexer_quant: {diff.float().mean().item():.2e} of the values differ (borderline, but too many)"
    return None
