"""benchmarks.epoch's "before": each named reference path, and only those named, in place while timed."""

from __future__ import annotations

import pytest
import torch

import perception.layers.attention as attention
import perception.layers.rope as rope
import perception.models.equivariant as equivariant
import perception.models.pointnet as pointnet
import perception.ops.graphs as graphs
import perception.training as training
import pipeline.training.trainable as trainable
from benchmarks.epoch import REVERSIONS, before, main
from perception.layers.rope import apply_rope_ref
from perception.models.equivariant import SIZES, E3nnConfig, E3nnNet


def test_one_reversion_swaps_that_path_only_and_puts_it_back() -> None:
    fast_sum, fast_predict, fast_k = equivariant.tensor_product_sum, training.predict, graphs.smallest_k
    with before(["summed_messages"]):
        assert equivariant.tensor_product_sum is not fast_sum
        assert training.predict is fast_predict and graphs.smallest_k is fast_k
    assert equivariant.tensor_product_sum is fast_sum
    with before(["farthest_points"]):
        assert graphs.FARTHEST_POINTS.library() is None and equivariant.tensor_product_sum is fast_sum
    assert graphs.FARTHEST_POINTS.library() is not None or not graphs.FARTHEST_POINTS.available()
    with before(["per_point"]):
        assert pointnet.per_point is pointnet.per_point_ref and graphs.smallest_k is fast_k
    assert pointnet.per_point is not pointnet.per_point_ref
    with before(["adamw"]):
        assert trainable.adamw is training.adamw_ref and pointnet.per_point is not pointnet.per_point_ref
    assert trainable.adamw is training.adamw
    with before(["rope"]):
        assert attention.apply_rope is apply_rope_ref and trainable.adamw is training.adamw
    assert attention.apply_rope is rope.apply_rope
    with before(REVERSIONS):
        assert training.predict is not fast_predict and graphs.smallest_k is not fast_k
    assert (equivariant.tensor_product_sum, training.predict, graphs.smallest_k) == (
        fast_sum,
        fast_predict,
        fast_k,
    )


@pytest.mark.parametrize(
    "names", [["summed_messages"], ["tensor_product"], ["tensor_product", "summed_messages"]]
)
def test_the_e3nn_reversions_compute_what_the_model_computes(names: list[str]) -> None:
    """ "before" times other code for the same model: its logits agree with the fast path's."""
    torch.manual_seed(0)
    model = E3nnNet(E3nnConfig(**{**SIZES["tiny"], "num_classes": 4})).eval()
    pos = torch.randn(3, 80, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(pos)
        with before(names):
            got = model(pos)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_an_unknown_name_is_refused_before_any_work(capsys) -> None:
    with pytest.raises(ValueError, match="--before fused: unknown; one or more of serialize"):
        with before(["fused"]):
            pass
    with pytest.raises(SystemExit):
        main(["--before", "summed_messages", "fused"])
    assert "--before fused: unknown" in capsys.readouterr().err
