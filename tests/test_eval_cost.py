"""Cost measurement: tokens, FLOP and attention-entry counts, latency/memory sanity, log-log exponents."""

from __future__ import annotations

import pytest
import torch

from perception.evaluation.cost import (
    ESSAY_TABLE,
    CostPoint,
    attention_entries,
    cost_sweep,
    count_flops,
    default_cost_models,
    essay_rows,
    fit_exponent,
    loglog_slopes,
    measure_cost,
    scan_flops,
)
from perception.layers.attention import set_fused_attention

DIM, DEPTH, HEADS, PATCH = 32, 2, 2, 8
RESOLUTIONS = (64, 128)  # 64 and 256 tokens at patch 8


def _models() -> dict:
    torch.manual_seed(0)
    return default_cost_models(dim=DIM, depth=DEPTH, heads=HEADS, patch_size=PATCH, image_size=64)


@pytest.fixture(scope="module")
def sweep() -> dict[str, list[CostPoint]]:
    points = cost_sweep(_models(), resolutions=RESOLUTIONS, patch_size=PATCH, repeats=3)
    by_model: dict[str, list[CostPoint]] = {}
    for p in points:
        by_model.setdefault(p.model, []).append(p)
    return by_model


def test_sweep_covers_every_model_and_resolution_with_tokens_from_the_patch_grid(sweep):
    assert set(sweep) == {"vit", "mamba_hybrid", "mamba"}
    for points in sweep.values():
        assert [p.resolution for p in points] == list(RESOLUTIONS)
        assert [p.tokens for p in points] == [(r // PATCH) ** 2 for r in RESOLUTIONS]
        assert set(points[0].as_dict()) >= {"latency_ms", "peak_memory_mb", "flops_total", "memory_method"}


def test_latency_is_ordered_and_flops_and_memory_grow_with_tokens(sweep):
    for points in sweep.values():
        for p in points:
            assert 0 < p.latency_ms_min <= p.latency_ms <= p.latency_ms_max
            assert p.repeats == 3 and p.memory_method
        small, large = points
        assert 0 < small.flops_counted < large.flops_counted
        assert small.flops_total < large.flops_total
        assert 0 < small.peak_memory_mb < large.peak_memory_mb


def test_scan_flops_zero_for_vit_and_formula_for_pure_mamba(sweep):
    models = _models()
    vit, mamba = models["vit"](), models["mamba"]()
    assert scan_flops(vit, tokens=64, batch=2) == 0
    c = mamba.config
    assert c.attn_layers == 0
    d_inner = c.expand * c.dim
    # depth Mamba blocks x 2 scans (one per direction) x 9 FLOPs per (batch, token, channel, state).
    expected = c.depth * 2 * 9 * 2 * 64 * d_inner * c.d_state
    assert scan_flops(mamba, tokens=64, batch=2) == expected
    for p in sweep["mamba"]:
        per_scan_seen = 2 * p.tokens * d_inner * c.d_state  # the counter sees the scan's C contraction (bmm)
        assert p.scan_flops == c.depth * 2 * 9 * p.tokens * d_inner * c.d_state
        assert p.flops_total == p.flops_counted + p.scan_flops - c.depth * 2 * per_scan_seen
    assert all(p.scan_flops == 0 and p.flops_total == p.flops_counted for p in sweep["vit"])


def test_attention_entries_zero_for_pure_mamba_and_class_token_counted_for_vit(sweep):
    models = _models()
    assert attention_entries(models["mamba"](), tokens=64) == 0
    assert attention_entries(models["vit"](), tokens=64) == HEADS * (64 + 1) ** 2 * DEPTH  # + class token
    assert attention_entries(models["mamba_hybrid"](), tokens=64) == HEADS * 64**2 * 1  # no class token
    for p in sweep["vit"]:
        assert p.attention_entries == HEADS * (p.tokens + 1) ** 2 * DEPTH


def test_counted_flops_include_fused_cpu_attention():
    """The fused SDPA kernel is counted like the explicit q k^T and (softmax) v matmuls."""
    vit = _models()["vit"]().eval()
    x = torch.randn(1, 4, 64, 64)
    fused = count_flops(vit, x)
    set_fused_attention(vit, False)
    assert count_flops(vit, x) == fused


def test_measure_cost_rejects_resolution_not_divisible_by_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        measure_cost("vit", _models()["vit"](), resolution=60, patch_size=PATCH)


def test_loglog_slopes_and_fit_exponent():
    assert loglog_slopes([1, 2, 4], [1, 4, 16]) == pytest.approx([2.0, 2.0])
    assert fit_exponent([1, 2, 4, 8], [3, 6, 12, 24]) == pytest.approx(1.0)
    assert fit_exponent([196, 576, 1024, 4096], [t**2 for t in (196, 576, 1024, 4096)]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        loglog_slopes([1, 2], [0, 1])


def test_essay_rows_quote_and_recompute_the_table():
    rows = essay_rows()
    assert len(rows) == len(ESSAY_TABLE) == 4
    assert [r["tokens"] for r in rows] == [196, 576, 1024, 4096]
    assert [r["tokens_essay"] for r in rows] == [196, 576, 1024, 4096]
    assert [r["attention_entries"] for r in rows] == [196**2, 576**2, 1024**2, 4096**2]
    assert rows[0]["relative_cost"] == 1.0
    for r in rows:  # the essay's rounded numbers are within 5% of the exact ones
        assert r["attention_entries_essay"] == pytest.approx(r["attention_entries"], rel=0.05)
        assert r["relative_cost_essay"] == pytest.approx(r["relative_cost"], rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_sweep_measures_the_gpu_with_its_allocator():
    device = torch.device("cuda")
    points = cost_sweep(
        _models(),  # cost_sweep moves each model to the device
        resolutions=RESOLUTIONS,
        patch_size=PATCH,
        repeats=2,
        device=device,
    )
    for point in points:
        assert "cuda" in point.memory_method and point.peak_memory_mb > 0
        assert point.latency_ms_min <= point.latency_ms <= point.latency_ms_max
