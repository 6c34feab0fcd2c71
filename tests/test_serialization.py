"""Grid-to-sequence orders: permutations, which steps are unit steps, and the locality metrics."""

from __future__ import annotations

import pytest
import torch

from perception.ops.serialization import SCAN_ORDERS, locality_stats, scan_order

SIZES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (4, 5), (5, 4), (6, 9), (14, 14), (16, 16), (12, 20)]


def steps(order: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|dy| and |dx| of each step between consecutive tokens, each [h*w - 1]."""
    ys, xs = order // width, order % width
    return (ys[1:] - ys[:-1]).abs(), (xs[1:] - xs[:-1]).abs()


@pytest.mark.parametrize("name", SCAN_ORDERS)
@pytest.mark.parametrize("size", SIZES)
def test_each_order_is_a_permutation(name, size):
    h, w = size
    order = scan_order(name, h, w)
    assert order.dtype == torch.long and order.shape == (h * w,)
    assert torch.equal(order.sort().values, torch.arange(h * w))
    assert order[0] == 0  # every order starts at the top-left token


@pytest.mark.parametrize("size", SIZES)
def test_snake_steps_are_grid_neighbours(size):
    h, w = size
    dy, dx = steps(scan_order("snake", h, w), w)
    assert torch.all(dy + dx == 1)


@pytest.mark.parametrize("size", [(3, 5), (16, 16), (12, 20)])
def test_rowmajor_jumps_at_row_ends(size):
    h, w = size
    dy, dx = steps(scan_order("rowmajor", h, w), w)
    row_end = torch.arange(h * w - 1) % w == w - 1  # the step from (y, w-1) to (y+1, 0)
    assert torch.all(dy[row_end] == 1) and torch.all(dx[row_end] == w - 1)
    assert torch.all((dy + dx)[~row_end] == 1)


def test_hilbert_steps_for_every_grid_up_to_32():
    """Every step is a 4-neighbour step, except on grids whose long side is odd and whose short side is
    even and >= 4: there exactly one step is diagonal (Chebyshev 1, Manhattan 2). See the module doc."""
    for h in range(1, 33):
        for w in range(1, 33):
            dy, dx = steps(scan_order("hilbert", h, w), w)
            long, short = max(h, w), min(h, w)
            diagonal = long % 2 == 1 and short % 2 == 0 and short >= 4
            assert torch.all(torch.maximum(dy, dx) <= 1), (h, w)  # never more than one cell away
            assert int((dy + dx != 1).sum()) == (1 if diagonal else 0), (h, w)


@pytest.mark.parametrize("side", [4, 8, 16])
def test_hilbert_on_a_power_of_two_square_is_the_hilbert_curve(side):
    """The Hilbert curve's defining property: every aligned 2^j x 2^j block is one contiguous run."""
    order = scan_order("hilbert", side, side)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(side * side)
    grid = pos.view(side, side)  # [h, w] sequence position of each cell
    block = 2
    while block <= side:
        blocks = grid.view(side // block, block, side // block, block).permute(0, 2, 1, 3).flatten(2)
        span = blocks.amax(-1) - blocks.amin(-1)  # [side/block, side/block]
        assert torch.all(span == block * block - 1), block
        block *= 2


def test_hilbert_keeps_grid_neighbours_closer_than_rowmajor():
    """Locality on 16 x 16: hilbert keeps most neighbour pairs within a conv window and has a smaller
    geometric-mean gap. Its arithmetic-mean gap is LARGER (9.9 vs 8.5): a few pairs straddle the curve's
    big seams (up to 213 tokens apart), so the plain mean is the wrong summary for this claim."""
    row = locality_stats(scan_order("rowmajor", 16, 16), 16, 16)
    hil = locality_stats(scan_order("hilbert", 16, 16), 16, 16)
    snake = locality_stats(scan_order("snake", 16, 16), 16, 16)
    assert (
        hil["grid_nbr_seq_dist_geomean"]
        < snake["grid_nbr_seq_dist_geomean"]
        < row["grid_nbr_seq_dist_geomean"]
    )
    assert hil["grid_nbr_within_window_frac"] > 0.65 > 0.5 == row["grid_nbr_within_window_frac"]
    assert row["grid_nbr_seq_dist_mean"] == 8.5 and row["grid_nbr_seq_dist_max"] == 16
    assert hil["grid_nbr_seq_dist_mean"] > row["grid_nbr_seq_dist_mean"]  # the measured caveat above
    assert hil["seq_nbr_grid_dist_max"] == snake["seq_nbr_grid_dist_max"] == 1
    assert row["seq_nbr_grid_dist_max"] == 16 and row["seq_nbr_adjacent_frac"] == 240 / 255


def test_locality_stats_rejects_non_permutations():
    with pytest.raises(ValueError, match="permutation"):
        locality_stats(torch.zeros(16, dtype=torch.long), 4, 4)
    assert locality_stats(scan_order("hilbert", 1, 1), 1, 1)["seq_nbr_adjacent_frac"] == 1.0


def test_cached_orders_cannot_be_corrupted_by_callers():
    first = scan_order("hilbert", 6, 10)
    first[:] = 0
    assert torch.equal(scan_order("hilbert", 6, 10).sort().values, torch.arange(60))


def test_unknown_order_and_empty_grid_fail():
    with pytest.raises(ValueError, match="zigzag"):
        scan_order("zigzag", 4, 4)
    with pytest.raises(ValueError, match="0x4"):
        scan_order("snake", 0, 4)
