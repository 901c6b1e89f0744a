"""Time kernels.apply_rope / rms_norm_rope at a prefill chunk's sizes with one row per program (the
earlier design) and with elementwise.ROPE_ROWS rows per program (whatever ROPE_ONE_ROW says), in the
same process (CUDA graphs of 20 calls). python3 bench/rope_rows.py"""

import torch

from dsv4.kernels.triton import elementwise as te
from tune_kernels import graph_time

cases = {"query heads 6400x64x512 bf16": torch.randn(6400, 64, 512, device="cuda").bfloat16(),
         "indexer heads 6400x64x128 bf16": torch.randn(6400, 64, 128, device="cuda").bfloat16(),
         "decode heads 1x64x512 f32": torch.randn(1, 64, 512, device="cuda")}
keep, one_row = te.ROPE_ROWS, te.ROPE_ONE_ROW
te.ROPE_ONE_ROW = 0
for name, x in cases.items():
    ang = torch.randn(x.shape[0], 32, device="cuda")
    cos, sin = ang.cos(), ang.sin()
    out = {}
    for rows in (1, keep):
        te.ROPE_ROWS = rows
        out[rows] = (graph_time(lambda: te.apply_rope_triton(x, cos, sin)) * 1e6, te.apply_rope_triton(x, cos, sin))
    te.ROPE_ROWS = keep
    same = torch.equal(out[1][1], out[keep][1])
    print(f"{name}: 1 row/program {out[1][0]:.1f} us, {keep} rows/program {out[keep][0]:.1f} us, equal outputs {same}")
te.ROPE_ONE_ROW = one_row
