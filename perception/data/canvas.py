"""Objects placed on canvases: the resolution experiment's (claim 2) training images and paired test sets.

Claim 2 says learned position embeddings do not transfer across resolutions. Rendering the same scene with
more pixels (the usual protocol) mixes two shifts: the token grid grows *and* the object covers more
tokens. Here an object is rendered as a square sprite (its own camera view of the unit ball, background 0)
and pasted onto a larger black canvas, so each shift can be made on its own. With training canvas T,
object size S (pixels at the training scale) and a scale k = R / T for a test canvas R:

- `in`: the training distribution: canvas T, the object at S px at a random offset o in [0, T - S]^2
  (drawn per instance; training images are made the same way).
- (a) `fov`: same field of view, more pixels: canvas R, the object at k*S px at offset k*o. The whole
  training image, rendered k times finer: new grid positions *and* a larger apparent scale.
- (b) `centre` and `corner`: larger canvas at the training pixel scale: canvas R, the object at S px (the
  same pixels and tokens as in training) at the canvas centre, or in its bottom-right corner (grid
  positions beyond any the training canvas has). New grid positions only.
- (c) `scaled`: training canvas, the object scaled up: canvas T, the object at k*S px at the offset
  o * (T - kS) / (T - S) (the same relative placement). Apparent scale only, no new grid positions.

Needs k*S <= T (the scaled object fits the training canvas): `check_geometry` says so before any work.
Offsets are whole pixels; rendering at k*S px (not resampling the S px sprite) keeps every test image a
real render. Arrays are float32[C, H, W].
"""

from __future__ import annotations

import numpy as np

CHANNELS = ("depth", "normal_x", "normal_y", "normal_z")  # what every rendered pixel holds, in order
PLACEMENTS = ("fov", "centre", "corner", "scaled")  # the paired test sets of every scale, (a) (b) (b) (c)
CANVAS_PLACEMENTS = ("centre", "corner")  # (b): the canvas grows, the object keeps its training pixels


def check_geometry(train_canvas: int, object_size: int, canvases: tuple[int, ...], patch_size: int) -> str:
    """'' if the geometry works, else what is wrong, naming the value (the config turns it into an error)."""
    if not 2 <= object_size <= train_canvas:
        return f"object_size = {object_size}: expected 2 to train_resolution = {train_canvas}"
    for canvas in canvases:
        if canvas < train_canvas:
            return f"eval_resolutions: {canvas} is below train_resolution = {train_canvas}"
        if canvas % patch_size:
            return f"eval_resolutions: {canvas} is not a multiple of patch_size = {patch_size}"
        scaled = canvas * object_size / train_canvas
        if scaled != int(scaled):
            return (
                f"eval_resolutions: {canvas} gives a scaled object of {scaled:g} px "
                f"({canvas} * object_size {object_size} / train_resolution {train_canvas}); "
                "expected whole pixels"
            )
        if scaled > train_canvas:
            return (
                f"eval_resolutions: {canvas} scales the object to {int(scaled)} px, more than the training "
                f"canvas {train_canvas} holds (test (c)); expected at most "
                f"{train_canvas * train_canvas // object_size}"
            )
    return ""


def random_offsets(count: int, train_canvas: int, object_size: int, rng: np.random.Generator) -> np.ndarray:
    """int64[count, 2]: (row, col) top-left offsets, uniform over the positions where the object fits."""
    return rng.integers(0, train_canvas - object_size + 1, size=(count, 2))


def paste(sprite: np.ndarray, canvas: int, offset: tuple[int, int] | np.ndarray) -> np.ndarray:
    """float32[C, canvas, canvas]: black, with `sprite` [C, s, s] at (row, col) `offset`, inside it."""
    channels, size = sprite.shape[0], sprite.shape[-1]
    row, col = int(offset[0]), int(offset[1])
    if not (0 <= row <= canvas - size and 0 <= col <= canvas - size):
        raise ValueError(f"a {size} px sprite at ({row}, {col}) does not fit a {canvas} px canvas")
    out = np.zeros((channels, canvas, canvas), dtype=np.float32)
    out[:, row : row + size, col : col + size] = sprite
    return out


def placement(
    kind: str, offset: np.ndarray, train_canvas: int, object_size: int, canvas: int
) -> tuple[int, int, tuple[int, int]]:
    """(canvas side, object side, (row, col) offset) of test set `kind` at test canvas `canvas`, for an
    instance whose training-scale offset is `offset`; see the module doc."""
    scale = canvas / train_canvas
    big = int(round(scale * object_size))
    if kind == "fov":
        return canvas, big, (int(round(scale * offset[0])), int(round(scale * offset[1])))
    if kind == "centre":
        centre = (canvas - object_size) // 2
        return canvas, object_size, (centre, centre)
    if kind == "corner":
        return canvas, object_size, (canvas - object_size, canvas - object_size)
    if kind == "scaled":
        room = train_canvas - object_size
        fraction = offset / room if room else np.zeros(2)
        shift = train_canvas - big
        return train_canvas, big, (int(round(fraction[0] * shift)), int(round(fraction[1] * shift)))
    raise ValueError(f"placement {kind!r} is not one of {', '.join(PLACEMENTS)}")
