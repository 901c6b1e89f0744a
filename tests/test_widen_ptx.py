"""The prefill expert kernel's FP4 widening (kernels/triton/prefill_experts.WIDEN_*), run by a small
interpreter of the PTX instructions it uses over every packed byte and a range of block scales, with
its inputs made as _fp4_tile makes them: each lane must hold the bf16 of e2m1 x scale exactly.
(The GPU tests run the same text on the hardware; this catches a wrong constant or shift on the CPU.)"""

import re

import pytest
import torch
from conftest import import_or_skip

import_or_skip("triton")  # skipped without it, a failure in CI (CI=true)
from dsv4.kernels.triton import prefill_experts as pe  # noqa: E402

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
M32 = 0xFFFFFFFF


def _bf16(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item() if bits < 0x8000 \
        else torch.tensor([bits - 0x10000], dtype=torch.int16).view(torch.bfloat16).item()


def _bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out & M32


def run_ptx(text: str, args: dict) -> dict:
    """Execute the straight-line PTX of WIDEN_* on 32-bit integers; args maps "$2", "$3" to values.
    -> the registers, "$0" / "$1" the 16-bit outputs."""
    reg = dict(args)

    def val(tok: str) -> int:
        tok = tok.strip()
        return reg[tok] if tok in reg else int(tok, 0) & M32

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            outs, src = re.match(r"\{(.*)\},\s*(\S+)", rest).groups()
            lo, hi = (o.strip() for o in outs.split(","))
            reg[lo], reg[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        d, *src = (t.strip() for t in rest.split(","))
        s = [val(t) for t in src]
        if op == "mov.b32":
            reg[d] = s[0]
        elif op == "mul.lo.u32":
            reg[d] = (s[0] * s[1]) & M32
        elif op == "shl.b32":
            reg[d] = (s[0] << s[1]) & M32
        elif op == "shr.b32":
            reg[d] = s[0] >> s[1]
        elif op == "and.b32":
            reg[d] = s[0] & s[1]
        elif op == "lop3.b32":
            reg[d] = _lop3(*s)
        elif op == "mul.rn.bf16x2":  # per 16-bit lane, rounded to nearest bf16 (products here are exact)
            lanes = [_bits(_bf16(s[0] >> k & 0xFFFF) * _bf16(s[1] >> k & 0xFFFF)) for k in (0, 16)]
            reg[d] = lanes[0] | lanes[1] << 16
        else:
            raise AssertionError(f"no interpreter for {op}")
    return reg


def _e2m1(n: int) -> float:
    return (-1.0 if n & 8 else 1.0) * E2M1[n & 7]


def _mxfp4_mismatches(text: str, one_mul: bool, s: int) -> list:
    """(byte, lane) pairs whose widened value is not e2m1 x 2^(s-127), the multiplier made as
    _fp4_tile makes it for scale byte s."""
    m = ((s + 126) << 7) if one_mul else ((s << 7) + (64 if s == 0 else 0))
    bad = []
    for b in range(256):
        out = run_ptx(text, {"$2": b, "$3": m * 65537})
        for lane, nib in (("$0", b & 15), ("$1", b >> 4)):
            if _bf16(out[lane]) != _e2m1(nib) * 2.0 ** (s - 127):
                bad.append((b, lane))
    return bad


@pytest.mark.parametrize("one_mul", [True, False])
def test_widen_ptx_gives_exact_mxfp4_values(one_mul):
    text = pe.WIDEN_ONE_MUL.value if one_mul else pe.WIDEN_TWO_MUL.value
    for s in [1, 2, 60, 100, 119, 127, 128] + ([] if one_mul else [0, 129, 140, 200, 250]):
        assert _mxfp4_mismatches(text, one_mul, s) == [], (one_mul, s)


def test_widen_ptx_gives_exact_nvfp4_values():
    """NVFP4: the two-multiply form with the e4m3 block scale as the bf16 multiplier."""
    for code in (0x08, 0x30, 0x38, 0x41, 0x5F, 0x7E):  # e4m3 bytes from 2^-6 to 448
        sv = torch.tensor([code], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
        m = _bits(sv)
        for b in range(256):
            out = run_ptx(pe.WIDEN_TWO_MUL.value, {"$2": b, "$3": m * 65537})
            assert _bf16(out["$0"]) == _e2m1(b & 15) * sv and _bf16(out["$1"]) == _e2m1(b >> 4) * sv, (code, b)


def test_ptx_interpreter_catches_wrong_text():
    """The check can fail: a mask one bit wider, or a shift one off, gives wrong values."""
    text = pe.WIDEN_ONE_MUL.value
    assert _mxfp4_mismatches(text.replace("0x01C001C0", "0x03C003C0"), True, 127)
    assert _mxfp4_mismatches(text.replace("shl.b32 b, v, 12", "shl.b32 b, v, 11"), True, 127)
