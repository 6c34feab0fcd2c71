"""The proximity task (claim 1): the label is a 2D-adjacency rule; determinism; geometry; class balance."""

from __future__ import annotations

import numpy as np
import pytest

from perception.data.proximity import (
    TASKS,
    ProximityParams,
    ProximityParamsError,
    make_split,
    proximity_instance,
    segment_orientation,
)

COUNT = 200


def _components(lit: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of the lit cells, each a list of (row, col), found by flood fill."""
    seen, out = np.zeros_like(lit), []
    for start in zip(*np.nonzero(lit), strict=True):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            comp.append((int(r), int(c)))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    q = (r + dr, c + dc)
                    if 0 <= q[0] < lit.shape[0] and 0 <= q[1] < lit.shape[1] and lit[q] and not seen[q]:
                        seen[q] = True
                        stack.append(q)
        out.append(comp)
    return out


def _longest_run(lit: np.ndarray) -> tuple[int, int]:
    """Longest horizontal and longest vertical run of consecutive lit cells: (horizontal, vertical)."""

    def longest(rows: np.ndarray) -> int:
        best = 0
        for row in rows:
            run = 0
            for v in row:
                run = run + 1 if v else 0
                best = max(best, run)
        return best

    return longest(lit), longest(lit.T)


def _rule(task: str, lit: np.ndarray, length: int) -> int:
    """The label from the 2D arrangement alone: what a model must compute."""
    horizontal, vertical = _longest_run(lit)
    if task == "orientation":
        return int(vertical > horizontal)
    return int(max(horizontal, vertical) >= length)  # gap: 1 = solid segment, 0 = broken


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size,length,distractors", [(16, 4, 8), (16, 5, 12), (24, 6, 20)])
def test_the_label_is_the_2d_rule_and_transposing_acts_on_it(task, size, length, distractors):
    params = ProximityParams(task=task, size=size, segment_length=length, distractors=distractors)
    images, labels = make_split(params, seed=3, split="train", count=COUNT)
    for image, label in zip(images, labels, strict=True):
        lit = image[0] > 0.5
        assert _rule(task, lit, length) == label
        # Transposing turns a horizontal segment vertical: orientation flips, a gap stays a gap.
        assert _rule(task, lit.T, length) == (1 - label if task == "orientation" else label)


@pytest.mark.parametrize("task", TASKS)
def test_every_image_has_the_same_pixels_whatever_its_label(task):
    params = ProximityParams(task=task, noise_std=0.0)
    images, labels = make_split(params, seed=0, split="test", count=COUNT)
    assert set(np.unique(images)) == {0.0, 1.0}
    assert (images.sum(axis=(1, 2, 3)) == params.lit_pixels).all()
    # Any statistic blind to position is the same for both labels: the sorted pixel values are identical.
    sorted_values = np.sort(images.reshape(COUNT, -1), axis=1)
    assert (sorted_values == sorted_values[0]).all() and len(np.unique(labels)) == 2


@pytest.mark.parametrize("task", TASKS)
def test_segment_is_inside_and_distractors_are_isolated(task):
    params = ProximityParams(task=task, size=16, segments=5, segment_length=4, distractors=10)
    images, labels = make_split(params, seed=1, split="train", count=COUNT)
    for image, label in zip(images, labels, strict=True):
        comps = _components(image[0] > 0.5)  # 8-connected: touching objects would merge
        pieces = [np.array(c) for c in comps if len(c) > 1]
        singles = [c for c in comps if len(c) == 1]
        assert len(singles) == params.distractors  # no distractor touches another or a segment
        if task == "gap" and label == 0:
            assert [len(p) for p in pieces] == [2] * 10  # 4 cells broken in two by a one-cell gap
        else:
            assert [len(p) for p in pieces] == [4] * 5
        # Straight, and all of one orientation.
        assert all(len(np.unique(p[:, 0])) == 1 for p in pieces) or all(
            len(np.unique(p[:, 1])) == 1 for p in pieces
        )


@pytest.mark.parametrize("label", [0, 1])
def test_the_segment_axis_is_read_from_the_pixels_and_transposing_flips_it(label):
    """segment_orientation (what the evaluation splits accuracy by) agrees with the segments themselves."""
    params = ProximityParams(task="gap", size=16, segments=8, segment_length=4, distractors=4)
    axes = []
    for i in range(60):
        image, _ = proximity_instance(params, seed=2, key=(1, i), label=label)
        lit = image[0] > 0.5
        pieces = [np.array(c) for c in _components(lit) if len(c) > 1]
        vertical = all(len(np.unique(p[:, 1])) == 1 for p in pieces)  # one column each: vertical
        assert segment_orientation(image) == int(vertical)
        assert segment_orientation(image[0].T) == 1 - int(vertical)
        axes.append(vertical)
    assert 0 < sum(axes) < len(axes)  # both axes occur: the orientation is a per-image nuisance


def test_a_closed_gap_flips_the_label():
    """Moving one end cell of a broken segment into its gap makes it solid: the rule's label flips."""
    params = ProximityParams(task="gap", size=16, segments=1, segment_length=4, distractors=6)
    for i in range(40):
        image, label = proximity_instance(params, seed=5, key=(9, i), label=0)
        lit = image[0] > 0.5
        pieces = [np.array(c) for c in _components(lit) if len(c) > 1]
        cells = np.concatenate(pieces)
        axis = 0 if len(np.unique(cells[:, 1])) == 1 else 1  # the axis the segment runs along
        order = cells[np.argsort(cells[:, axis])]
        gap = order[1].copy()
        gap[axis] += 1
        assert not lit[tuple(gap)]
        lit[tuple(gap)], lit[tuple(order[-1])] = True, False
        assert label == 0 and _rule("gap", lit, 4) == 1


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_byte_identical_and_keyed_by_split_and_index(task):
    params = ProximityParams(task=task, noise_std=0.05)
    a_images, a_labels = make_split(params, seed=11, split="train", count=50)
    b_images, b_labels = make_split(params, seed=11, split="train", count=50)
    assert a_images.tobytes() == b_images.tobytes() and a_labels.tobytes() == b_labels.tobytes()
    assert a_images.dtype == np.float32 and a_labels.dtype == np.int64 and a_images.shape == (50, 1, 16, 16)
    # Instance i depends only on (seed, split, i): a shorter split is a prefix, drawn in any order.
    short, _ = make_split(params, seed=11, split="train", count=20)
    assert short.tobytes() == a_images[:20].tobytes()
    alone, label = proximity_instance(params, 11, (0, 37), label=37 % 2)
    assert alone.tobytes() == a_images[37].tobytes() and label == a_labels[37]
    # Another split or another seed gives other images.
    test_images, _ = make_split(params, seed=11, split="test", count=50)
    other_seed, _ = make_split(params, seed=12, split="train", count=50)
    assert not np.array_equal(test_images, a_images) and not np.array_equal(other_seed, a_images)


@pytest.mark.parametrize("task", TASKS)
def test_classes_are_balanced(task):
    _, labels = make_split(ProximityParams(task=task), seed=0, split="train", count=101)
    assert np.bincount(labels).tolist() == [51, 50]
    # A drawn label (no label given) is 0 or 1, each about half the time.
    drawn = [proximity_instance(ProximityParams(task=task), 0, (2, i))[1] for i in range(400)]
    assert 0.4 < np.mean(drawn) < 0.6


@pytest.mark.parametrize(
    "override,key",
    [
        ({"task": "pathfinder"}, "task"),
        ({"size": 4}, "size"),
        ({"size": 16.0}, "size"),
        ({"segment_length": 1}, "segment_length"),
        ({"segment_length": 16}, "segment_length"),
        ({"distractors": -1}, "distractors"),
        ({"distractors": 40}, "distractors"),
        ({"noise_std": -0.1}, "noise_std"),
    ],
)
def test_bad_params_name_the_key(override, key):
    with pytest.raises(ProximityParamsError, match=f"proximity.{key}"):
        ProximityParams(**override)


def test_bad_split_and_label_are_refused():
    with pytest.raises(ProximityParamsError, match="split"):
        make_split(ProximityParams(), 0, "val", 4)
    with pytest.raises(ProximityParamsError, match="label"):
        proximity_instance(ProximityParams(), 0, (0, 0), label=2)
