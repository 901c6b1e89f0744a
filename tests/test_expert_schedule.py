"""kernels/triton/expert_schedule.schedule (torch ops only, so it runs on the CPU): the chunk's
(token, slot) pairs sorted by expert and cut into tiles of one expert each."""

import pytest
import torch

sched = pytest.importorskip("dsv4.kernels.triton.expert_schedule")


@pytest.mark.parametrize("S,k,E,block", [(37, 6, 16, 8), (5, 2, 64, 4), (200, 4, 8, 64)])
def test_schedule_tiles_each_experts_pairs_in_order(S, k, E, block):
    g = torch.Generator().manual_seed(S + E)
    ids = torch.randint(0, E, (S, k), generator=g)
    order, tile_e, lo, hi = sched.schedule(ids, E, block)
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


@pytest.mark.parametrize("S,k,E,block,G", [(37, 6, 16, 8, 5), (5, 2, 64, 4, 64), (200, 4, 8, 64, 1), (90, 3, 12, 16, 4)])
def test_staged_group_spans_cover_the_groups_tiles(S, k, E, block, G):
    """group_spans: group j's tiles are schedule's tiles of experts [j G, (j + 1) G), in one run."""
    g = torch.Generator().manual_seed(S * E)
    ids = torch.randint(0, E, (S, k), generator=g)
    ids[:, 0] = 3  # an expert with many pairs (several tiles), and likely some without any
    _, tile_e, _, _ = sched.schedule(ids, E, block)
    spans = sched.group_spans(sched.expert_counts(ids, E), block, G).tolist()
    assert len(spans) == (E + G - 1) // G + 1 and spans[0] == 0
    for j in range(len(spans) - 1):
        inside = ((tile_e >= j * G) & (tile_e < (j + 1) * G)).nonzero().flatten().tolist()
        assert inside == list(range(spans[j], spans[j + 1]))
