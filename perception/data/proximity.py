"""A procedural image task whose label depends only on 2D proximity: segments, solid or broken.

Claim 1 of the study says that flattening a 2D image into a 1D token sequence breaks spatial proximity.
Whole-object classification cannot show it (every scan order scores ~99%), so here the label is a function
of which lit pixels are grid neighbours, and of nothing else. Each image holds `segments` straight segments
of `segment_length` lit pixels, all horizontal or all vertical, plus `distractors` isolated lit pixels:

- `task="gap"` (the study's task): label 1 = every segment is solid; 0 = every segment is broken by a
  one-pixel gap after its first `segment_length // 2` pixels. The orientation is drawn per image, so half
  the images need horizontal adjacency and half vertical. Transposing an image keeps its label; moving
  a broken segment's end pixel into its gap makes it solid.
- `task="orientation"`: all segments solid; label 0 = horizontal, 1 = vertical. Transposing flips the
  label. Caveat: a model can solve it from horizontal adjacency alone ("is there a horizontal run?"), which
  row-major order keeps, so it does not test vertical proximity.

Every lit pixel has the same intensity, every image of a task has the same number of lit pixels whatever
its label, and no two objects (segments, distractors) touch, not even diagonally. So the bag of pixel
values is the same for every label; only the 2D arrangement decides. Segments, not one segment: with a
single one, 4 of 256 tokens carry the label and nothing learned it within the study's budget.

With 1-pixel patches (one token per pixel), in row-major order a horizontal segment is `segment_length`
consecutive tokens, a vertical one the same number of tokens a whole row (`size` tokens) apart; a random
permutation scatters both. (With 2-pixel patches one patch already holds two adjacent segment pixels and
the patch embedding alone can see a gap or an orientation, so the scan order would not matter: use patch 1.)

Every instance is a pure function of (params, seed, key, label) through `instance_rng` (one independent
numpy stream per instance), so a split comes out byte-identical in any order and in any number of
processes. Images are float32[N, 1, size, size] with values in {0, 1} plus optional Gaussian `noise_std`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception.data.points import instance_rng

TASKS = ("orientation", "gap")
CHANNELS = ("intensity",)
SPLIT_KEYS = {"train": 0, "test": 1}  # the split's part of every instance's seed key
_MAX_TRIES = 1000  # placement attempts per instance before the params are called infeasible


class ProximityParamsError(ValueError):
    """A parameter outside its allowed range; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ProximityParams:
    """The task's parameters; __post_init__ rejects any bad value with a message naming the key."""

    task: str = "orientation"  # one of TASKS
    size: int = 16  # canvas side in pixels (16..64); with 1-px patches also the token grid side
    segments: int = 6  # straight segments per image, all of one orientation and one kind (1..)
    segment_length: int = 4  # lit pixels of each segment (2..size - 1)
    distractors: int = 8  # isolated lit pixels per image (0..)
    noise_std: float = 0.0  # Gaussian pixel noise added everywhere (0 = clean binary images)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ProximityParamsError(f"proximity.{key} = {getattr(self, key)!r}: expected {allowed}")

        def is_int(v: object) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        need(self.task in TASKS, "task", f"one of {', '.join(TASKS)}")
        need(is_int(self.size) and 8 <= self.size <= 64, "size", "an integer from 8 to 64")
        need(
            is_int(self.segment_length) and 2 <= self.segment_length < self.size,
            "segment_length",
            f"an integer from 2 to size - 1 = {self.size - 1}",
        )
        if self.task == "gap":  # a piece of one cell would look like a distractor
            need(
                self.segment_length >= 4,
                "segment_length",
                "an integer >= 4 for task 'gap' (two pieces of 2+)",
            )
        need(is_int(self.segments) and self.segments >= 1, "segments", "an integer >= 1")
        need(is_int(self.distractors) and self.distractors >= 0, "distractors", "an integer >= 0")
        noise_ok = isinstance(self.noise_std, (int, float)) and not isinstance(self.noise_std, bool)
        need(noise_ok and 0.0 <= self.noise_std < 1.0, "noise_std", "a number in [0, 1)")
        # Each object blocks at most its 8-neighbourhood box: 3 * (l + 3) per segment, 9 per distractor.
        # Random placement always succeeded up to this bound (checked at 16 and 32 px).
        blocked = self.segments * 3 * (self.segment_length + 3) + 9 * self.distractors
        need(
            blocked <= self.size**2,
            "distractors",
            f"few enough that segments and distractors fit in the {self.size}x{self.size} canvas with their "
            f"neighbourhoods: segments * 3 * (segment_length + 3) + 9 * distractors <= {self.size**2} "
            f"(it is {blocked})",
        )

    @property
    def lit_pixels(self) -> int:
        """Lit pixels per image, the same for every label."""
        return self.segments * self.segment_length + self.distractors


def _free_cells(occupied: np.ndarray) -> np.ndarray:
    """bool[S, S]: cells that are not an occupied cell or one of its 8-neighbours."""
    padded = np.pad(occupied, 1)
    s = occupied.shape[0]
    near = np.zeros_like(occupied)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= padded[dy : dy + s, dx : dx + s]
    return ~near


def _segment_offsets(length: int, broken: bool) -> np.ndarray:
    """Cell offsets int[length] along a segment's axis: 0..length-1, or with a one-cell gap after the first
    length // 2 cells (the same `length` lit cells, spanning length + 1)."""
    steps = np.arange(length)
    return steps + (steps >= length // 2) if broken else steps


def _place_segment(
    occupied: np.ndarray, offsets: np.ndarray, vertical: bool, rng: np.random.Generator
) -> np.ndarray | None:
    """Cells (row, col) int[len(offsets), 2] of a segment whose every cell is free of `occupied` and its
    8-neighbours, or None if no place was found."""
    s, span = occupied.shape[0], int(offsets[-1]) + 1
    free = _free_cells(occupied)
    for _ in range(_MAX_TRIES):
        # Top-left cell: the long axis leaves room for the span, the short axis the whole side.
        r = int(rng.integers(0, s - (span - 1) * vertical))
        c = int(rng.integers(0, s - (span - 1) * (not vertical)))
        cells = np.stack([r + offsets * vertical, c + offsets * (not vertical)], axis=1)
        if free[cells[:, 0], cells[:, 1]].all():
            return cells
    return None


def _draw(params: ProximityParams, label: int, rng: np.random.Generator) -> np.ndarray | None:
    """One attempt at an instance of `label`: lit bool[S, S], or None if an object did not fit."""
    lit = np.zeros((params.size, params.size), dtype=bool)
    if params.task == "orientation":
        vertical, broken = bool(label), False
    else:  # "gap": the orientation is a nuisance drawn for every instance
        vertical, broken = bool(rng.integers(0, 2)), not label
    offsets = _segment_offsets(params.segment_length, broken)
    for _ in range(params.segments):
        cells = _place_segment(lit, offsets, vertical, rng)
        if cells is None:
            return None
        lit[cells[:, 0], cells[:, 1]] = True
    for _ in range(params.distractors):
        free = np.flatnonzero(_free_cells(lit))
        if len(free) == 0:
            return None
        lit.flat[free[int(rng.integers(0, len(free)))]] = True
    return lit


def proximity_instance(
    params: ProximityParams, seed: int, key: tuple[int, ...], label: int | None = None
) -> tuple[np.ndarray, int]:
    """One image float32[1, S, S] and its label, a pure function of (params, seed, key, label).

    `label` None draws it (0 or 1, equally likely) from the instance's stream; 0 or 1 fixes it.
    """
    rng = instance_rng(seed, key)
    if label is None:
        label = int(rng.integers(0, 2))
    if label not in (0, 1):
        raise ProximityParamsError(f"label = {label!r}: expected 0, 1 or None")
    for _ in range(_MAX_TRIES):
        lit = _draw(params, label, rng)
        if lit is not None:
            break
    else:  # only reachable for params near the packing bound of __post_init__
        raise ProximityParamsError(
            f"proximity: could not place {params.segments} segments of {params.segment_length} px and "
            f"{params.distractors} distractors on a {params.size}x{params.size} canvas; use fewer distractors"
        )
    image = lit.astype(np.float32)[None]  # (1, S, S)
    if params.noise_std > 0:
        image = image + rng.normal(scale=params.noise_std, size=image.shape).astype(np.float32)
    return image, label


def segment_orientation(image: np.ndarray) -> int:
    """1 if the image's segments are vertical, 0 if horizontal, read from the pixels: a segment's pieces are
    runs of at least 2 lit cells along its axis, and distractors are isolated, so the axis with a run of 2
    is the segments'. image: [1, S, S] (noise-free) or [S, S]."""
    lit = np.asarray(image).reshape(image.shape[-2:]) > 0.5
    horizontal_pair = bool((lit[:, 1:] & lit[:, :-1]).any())
    return 0 if horizontal_pair else 1


def make_split(params: ProximityParams, seed: int, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` instances of `split` ("train" or "test"): images float32[count, 1, S, S], labels int64[count].

    Instance i has the seed key (split id, i) and label i % 2, so the classes are balanced (exactly, for
    an even count), the splits are independent, and instance i is the same whatever `count` is or which
    process draws it.
    """
    if split not in SPLIT_KEYS:
        raise ProximityParamsError(f"split {split!r}: expected one of {', '.join(SPLIT_KEYS)}")
    if count < 0:
        raise ProximityParamsError(f"count = {count}: expected an integer >= 0")
    images = np.zeros((count, 1, params.size, params.size), dtype=np.float32)
    labels = np.zeros(count, dtype=np.int64)
    for i in range(count):
        images[i], labels[i] = proximity_instance(params, seed, (SPLIT_KEYS[split], i), label=i % 2)
    return images, labels
