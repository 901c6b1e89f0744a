"""kernels/triton/prefill_experts.schedule (torch ops only, so it runs on the CPU): the chunk's
(token, slot) pairs sorted by expert and cut into tiles of one expert each."""

import pytest
import torch

pe = pytest.importorskip("dsv4.kernels.triton.prefill_experts")


@pytest.mark.parametrize("S,k,E,block", [(37, 6, 16, 8), (5, 2, 64, 4), (200, 4, 8, 64)])
def test_schedule_tiles_each_experts_pairs_in_order(S, k, E, block):
    g = torch.Generator().manual_seed(S + E)
    ids = torch.randint(0, E, (S, k), generator=g)
    order, tile_e, lo, hi = pe.schedule(ids, E, block)
    flat = ids.reshape(-1)
    assert torch.equal(order, torch.argsort(flat, stable=True))
    assert tile_e.numel() == (S * k + block - 1) // block + E  # the fixed bound
    seen = []
    for e, a, b in zip(tile_e.tolist(), lo.tolist(), hi.tolist()):
        if e < 0:
            continue
        assert 0 < b - a <= block and (flat[order[a:b]] == e).all()
        seen += order[a:b].tolist()
    assert seen == order.tolist()  # every pair once, the tiles in order; unused tiles at the end
    used = (tile_e >= 0).sum().item()
    assert (tile_e[used:] == -1).all()
    counts = torch.tensor([(flat == e).sum().item() for e in range(E)])
    assert used == ((counts + block - 1) // block).sum().item()


@pytest.mark.parametrize("S,k,E,big,small", [(37, 6, 16, 8, 2), (300, 6, 8, 64, 16), (5, 2, 64, 4, 4), (90, 3, 4, 32, 8)])
def test_schedule_split_full_tiles_then_remainders(S, k, E, big, small):
    g = torch.Generator().manual_seed(S * E + big)
    ids = torch.randint(0, E, (S, k), generator=g)
    order, (be, blo, bhi), (te, tlo, thi) = pe.schedule_split(ids, E, big, small)
    flat = ids.reshape(-1)
    assert torch.equal(order, torch.argsort(flat, stable=True))
    counts = torch.tensor([(flat == e).sum().item() for e in range(E)])
    covered = []
    for tile_e, lo, hi, block, full in ((be, blo, bhi, big, True), (te, tlo, thi, small, False)):
        used = (tile_e >= 0).sum().item()
        assert (tile_e[:used] >= 0).all() and (tile_e[used:] == -1).all()
        for e, a, b in zip(tile_e[:used].tolist(), lo[:used].tolist(), hi[:used].tolist()):
            assert (b - a == block) if full else (0 < b - a <= block)
            assert (flat[order[a:b]] == e).all()
            covered += list(range(a, b))
    assert sorted(covered) == list(range(S * k))  # every pair exactly once
    assert (be >= 0).sum().item() == (counts // big).sum().item()
    assert (te >= 0).sum().item() == ((counts % big + small - 1) // small).sum().item()
