"""Serialising a 2D token grid into a 1D sequence, and measuring how much spatial proximity survives.

A sequence model (a Mamba scan) sees an image's patch grid as one sequence; the order decides which grid
neighbours end up far apart in the sequence. `scan_order(name, height, width)` returns a permutation
`order` with `order[i]` = the row-major index (y * width + x) of the token at sequence position i, for
the one-sequence orders (SEQUENCE_ORDERS):

- "rowmajor": left to right, top to bottom. Each row end jumps back across the whole grid.
- "snake": boustrophedon; odd rows run right to left, so consecutive tokens are always grid neighbours.
- "hilbert": the generalised Hilbert curve ("gilbert", after Jakub Červený's algorithm), which fills
  any rectangle, not only 2^k squares, and keeps 2D blocks together in 1D.
- "random": a fixed random permutation, the negative control (no spatial structure at all). It is drawn
  from `numpy.random.default_rng([height, width, 0x5CA9])`, so every model, run and process gets the same
  permutation for a given grid, and a different one for each grid size. (The draw depends on numpy's
  `Generator.permutation`; a test pins its value on a 3 x 3 grid, so a change would be noticed.)

A model scans in several directions at once. `scan_directions(name, height, width)` returns them as
`paths`, LongTensor[k, height*width], each row an order as above (SCAN_ORDERS, what `mamba_hybrid`'s
`scan_order` takes):

- each one-sequence order: k = 2, [order, reversed order] (Vim's bidirectional scan);
- "cross": k = 4, VMamba's cross-scan (SS2D; Liu et al. 2024, https://arxiv.org/abs/2401.10166):
  [row-major, column-major, reversed row-major, reversed column-major]. Every 4-neighbour pair is
  adjacent in one of the directions, and transposing the grid swaps the row- and column-major paths.
`serialize(x, paths)` / `deserialize(y, paths)` gather row-major tokens into the k sequences and scatter
each sequence's outputs back to grid positions; `deserialize_mean` averages them there, as the Mamba mixer
does. Row-major and its reverse need no gather at all, only a flip.

What holds for "hilbert" (checked for every size up to 32 x 32 in tests/test_serialization.py):
consecutive tokens are 4-neighbours on every grid except when the long side is odd and the short side
is even and at least 4 (e.g. 4 x 5); there the curve takes exactly one diagonal step. (A path of unit
steps from one end of the long side to the other does not exist there: colour the grid like a
chessboard; the path must alternate colours but its two ends do not fit the count.)

`locality_stats(order, height, width)` measures the "serialisation breaks spatial proximity" claim.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch

SEQUENCE_ORDERS = ("rowmajor", "snake", "hilbert", "random")  # one sequence each: scan_order
SCAN_ORDERS = (*SEQUENCE_ORDERS, "cross")  # sets of scan directions: scan_directions, mamba_hybrid
_RANDOM_SEED = 0x5CA9  # mixed with the grid size: the "random" order of an h x w grid is fixed


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _gilbert(x: int, y: int, ax: int, ay: int, bx: int, by: int) -> Iterator[tuple[int, int]]:
    """Fill the rectangle spanned from corner (x, y) by the major axis (ax, ay) and minor axis (bx, by).

    Yields (x, y) cells, starting at (x, y) and ending at the far end of the major axis. Splits the
    rectangle into two (if long and thin) or three sub-rectangles, each filled by a recursive call with
    rotated axes, choosing even split sizes where possible so the pieces join with unit steps.
    """
    w, h = abs(ax + ay), abs(bx + by)  # extents along the major and the minor axis
    dax, day = _sign(ax), _sign(ay)  # unit step along the major axis
    dbx, dby = _sign(bx), _sign(by)  # unit step along the minor axis
    if h == 1:  # a single row: walk along it
        for i in range(w):
            yield x + i * dax, y + i * day
        return
    if w == 1:  # a single column
        for i in range(h):
            yield x + i * dbx, y + i * dby
        return
    ax2, ay2 = ax // 2, ay // 2
    bx2, by2 = bx // 2, by // 2
    w2, h2 = abs(ax2 + ay2), abs(bx2 + by2)
    if 2 * w > 3 * h:
        # Long case: cut across the major axis into two halves walked one after the other.
        if w2 % 2 and w > 2:  # an even first half lets the second start next to the first's end
            ax2, ay2 = ax2 + dax, ay2 + day
        yield from _gilbert(x, y, ax2, ay2, bx, by)
        yield from _gilbert(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
    else:
        # Standard case: up the first half of the minor axis, across the far part, back down.
        if h2 % 2 and h > 2:
            bx2, by2 = bx2 + dbx, by2 + dby
        yield from _gilbert(x, y, bx2, by2, ax2, ay2)
        yield from _gilbert(x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
        yield from _gilbert(
            x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby), -bx2, -by2, -(ax - ax2), -(ay - ay2)
        )


def _hilbert(height: int, width: int) -> list[int]:
    # The major axis is the longer side, so the curve runs from the top-left to the end of that side.
    cells = _gilbert(0, 0, width, 0, 0, height) if width >= height else _gilbert(0, 0, 0, height, width, 0)
    return [y * width + x for x, y in cells]


@lru_cache(maxsize=256)
def _order(name: str, height: int, width: int) -> torch.Tensor:
    if name == "rowmajor":
        return torch.arange(height * width)
    if name == "snake":
        grid = torch.arange(height * width).view(height, width)  # [h, w] row-major indices
        grid[1::2] = grid[1::2].flip(-1)  # odd rows right to left
        return grid.flatten()  # [h*w]
    if name == "colmajor":  # top to bottom, left to right: one of cross's directions
        return torch.arange(height * width).view(height, width).t().flatten()  # [w, h] -> [h*w]
    if name == "random":
        rng = np.random.default_rng([height, width, _RANDOM_SEED])
        return torch.from_numpy(rng.permutation(height * width)).long()
    return torch.tensor(_hilbert(height, width), dtype=torch.long)


def _check_grid(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"grid {height}x{width} must be at least 1x1")


def scan_order(name: str, height: int, width: int) -> torch.Tensor:
    """LongTensor[height*width]: sequence position -> row-major token index, for a grid of h x w tokens.

    `name` is one of SEQUENCE_ORDERS. Apply as `tokens[:, order]` to tokens [B, h*w, dim] in row-major
    order. Cached per (name, h, w); a fresh copy is returned, so callers may modify it.
    """
    if name == "cross":
        raise ValueError("scan order 'cross' is four sequences, not one: use scan_directions")
    if name not in SEQUENCE_ORDERS:
        raise ValueError(f"scan order {name!r} is not one of {', '.join(SEQUENCE_ORDERS)}")
    _check_grid(height, width)
    return _order(name, int(height), int(width)).clone()


def num_directions(name: str) -> int:
    """k, the number of sequences `scan_directions(name, ...)` returns: 4 for "cross", else 2."""
    if name not in SCAN_ORDERS:
        raise ValueError(f"scan order {name!r} is not one of {', '.join(SCAN_ORDERS)}")
    return 4 if name == "cross" else 2


@lru_cache(maxsize=256)
def _directions(name: str, height: int, width: int) -> torch.Tensor:
    if name == "cross":
        row, col = _order("rowmajor", height, width), _order("colmajor", height, width)  # each [h*w]
        return torch.stack([row, col, row.flip(0), col.flip(0)])  # [4, h*w]
    order = _order(name, height, width)  # [h*w]
    return torch.stack([order, order.flip(0)])  # [2, h*w]


def scan_directions(name: str, height: int, width: int) -> torch.Tensor:
    """paths, LongTensor[k, height*width]: paths[j, i] = row-major index of the token at position i of
    direction j's sequence (k = num_directions(name); see the module doc). Cached; a fresh copy."""
    num_directions(name)  # validates the name
    _check_grid(height, width)
    return _directions(name, int(height), int(width)).clone()


_rowmajor_pairs: dict[int, tuple[int, bool]] = {}  # id(paths) -> (its version, the answer), while it lives


def _rowmajor_pair(paths: torch.Tensor) -> bool:
    """Whether paths is [row-major, reversed row-major], checked on CPU only: a comparison on a GPU would
    wait for it, and could not be captured in a CUDA graph. Other orders keep the gathers: for them a
    gather, a flip and a scatter took 1.3x as long as the gathers at batch 1 (and 0.9x at batch 16). The
    answer is kept per paths tensor (until it changes in place or dies): comparing took 5 us a call, 1.4%
    of a proximity model's batch-1 forward."""
    if paths.device.type != "cpu" or paths.dim() != 2 or paths.shape[0] != 2:
        return False
    known = _rowmajor_pairs.get(id(paths))
    if known is not None and known[0] == paths._version:
        return known[1]
    forward = torch.arange(paths.shape[1])
    answer = torch.equal(paths[0], forward) and torch.equal(paths[1], forward.flip(0))
    if known is None:  # forget it with the tensor, before its id can name another one
        weakref.finalize(paths, _rowmajor_pairs.pop, id(paths), None)
    _rowmajor_pairs[id(paths)] = (paths._version, answer)
    return answer


def serialize(x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """Row-major tokens x (B, C, L) -> k sequences stacked on channels (B, k*C, L), direction j in
    channels [j*C, (j+1)*C), its tokens in the order paths[j]. paths: LongTensor[k, L] on x's device.

    Tokens are gathered as rows: x is viewed (B, L, C), so one `index_select` over the flattened paths
    copies C contiguous values per token, and its backward is an `index_add` of rows. The advanced
    indexing of `serialize_ref` gathers single values along the last axis and backs up through a sorted,
    accumulating `index_put`: 1.5-4x slower forward, up to 2x slower with its backward, on CPU
    (benchmarks/epoch.py). The same values and gradients (tests/test_serialization.py).
    """
    B, C, L = x.shape
    k = paths.shape[0]
    if _rowmajor_pair(paths):  # the tokens as they are, and flipped: no gather
        return torch.cat([x, x.flip(-1)], dim=1)  # (B, 2*C, L)
    # rows[b, j*L + i] = x[b, :, paths[j, i]]
    rows = x.transpose(1, 2).index_select(1, paths.reshape(-1))  # (B, k*L, C)
    return rows.view(B, k, L, C).permute(0, 1, 3, 2).reshape(B, k * C, L)  # (B, k*C, L)


def serialize_ref(x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """`serialize` by advanced indexing: the reference it is tested against."""
    B, C, L = x.shape
    k = paths.shape[0]
    seqs = x[..., paths]  # (B, C, k, L): seqs[b, c, j, i] = x[b, c, paths[j, i]]
    return seqs.transpose(1, 2).reshape(B, k * C, L)  # (B, k*C, L)


def deserialize(y: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """The inverse of `serialize`: sequences (B, k*C, L) -> (B, k, C, L), each direction's outputs back
    at their row-major token positions."""
    B, kC, L = y.shape
    k = paths.shape[0]
    position = torch.argsort(paths, dim=-1)  # (k, L): row-major token -> its position in direction j
    index = position.view(1, k, 1, L).expand(B, k, kC // k, L)  # (B, k, C, L)
    return y.view(B, k, kC // k, L).gather(-1, index)  # (B, k, C, L)


def deserialize_mean(y: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """`deserialize(y, paths).mean(dim=1)`, (B, k*C, L) -> (B, C, L): the directions' outputs back at their
    row-major tokens, averaged. For row-major and its reverse the reverse is flipped back onto the first:
    the same values, without the (B, k, C, L) gather (tests/test_serialization.py)."""
    if not _rowmajor_pair(paths):
        return deserialize(y, paths).mean(dim=1)
    first, second = y.chunk(2, dim=1)  # each (B, C, L)
    return (first + second.flip(-1)) / 2  # (B, C, L)


def locality_stats(order: torch.Tensor, height: int, width: int, window: int = 4) -> dict[str, float]:
    """How well a serialisation keeps grid neighbours together. order: LongTensor[h*w] as from scan_order,
    or paths [k, h*w] as from scan_directions: then a pair's gap is its smallest gap over the k
    directions (a pair is as close as the direction that keeps it closest), and the steps of all k
    sequences are pooled. [order, reversed order] therefore gives the same numbers as `order` alone.

    Returns, over the 4-neighbour pairs of grid cells and their |sequence distance| ("gap", 1 is ideal):
      grid_nbr_seq_dist_mean / _max: the mean and max gap
      grid_nbr_seq_dist_geomean: the geometric mean gap. The arithmetic mean is ruled by the few pairs on
        either side of a big seam: on 16 x 16 it is 8.5 for rowmajor but 9.9 for hilbert, although
        hilbert keeps most neighbours much closer (geometric mean 2.7 vs 4.0)
      grid_nbr_within_window_frac: the fraction of pairs with gap < `window`, i.e. both inside one causal
        conv1d window of that width (Mamba's d_conv, 4 by default)
    and over consecutive tokens and their Manhattan grid distance ("step", 1 is ideal):
      seq_nbr_grid_dist_mean / _max: the mean and max step
      seq_nbr_adjacent_frac: the fraction of steps of length 1
    """
    n = height * width
    paths = order.long().cpu()
    paths = paths.view(1, -1) if paths.dim() == 1 else paths  # [k, n]
    perms = paths.dim() == 2 and paths.shape[1] == n and paths.shape[0] >= 1
    if not perms or not torch.equal(paths.sort(dim=-1).values, torch.arange(n).expand_as(paths)):
        raise ValueError(f"order must be a permutation of range({n}), or a [k, {n}] stack of them")
    pos = torch.argsort(paths, dim=-1)  # [k, n] token -> sequence position in each direction
    grid = pos.view(-1, height, width)  # [k, h, w] sequence position of each cell
    horizontal = (grid[:, :, 1:] - grid[:, :, :-1]).flatten(1)  # [k, h*(w-1)]
    vertical = (grid[:, 1:] - grid[:, :-1]).flatten(1)  # [k, (h-1)*w]
    gaps = torch.cat([horizontal, vertical], dim=1).abs().amin(dim=0)  # [pairs], the closest direction
    ys, xs = paths // width, paths % width  # [k, n] grid coordinates in sequence order
    steps = ((ys[:, 1:] - ys[:, :-1]).abs() + (xs[:, 1:] - xs[:, :-1]).abs()).flatten()  # [k*(n-1)]
    one = torch.ones(1, dtype=torch.long)  # a 1x1 grid has neither neighbours nor steps: count it ideal
    gaps, steps = (gaps if gaps.numel() else one), (steps if steps.numel() else one)
    return {
        "grid_nbr_seq_dist_mean": gaps.double().mean().item(),
        "grid_nbr_seq_dist_max": float(gaps.max()),
        "grid_nbr_seq_dist_geomean": gaps.double().log().mean().exp().item(),
        "grid_nbr_within_window_frac": (gaps < window).double().mean().item(),
        "seq_nbr_grid_dist_mean": steps.double().mean().item(),
        "seq_nbr_grid_dist_max": float(steps.max()),
        "seq_nbr_adjacent_frac": (steps == 1).double().mean().item(),
    }
