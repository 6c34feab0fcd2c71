"""Cost measurement: FLOP and attention-entry counts, memory, exponents with intervals, the crossover.

No timing assertions: timings are benchmarks, not tests. Memory on CPU is deterministic (the profiler's
count of the allocator's bytes), so memory comparisons are allowed, at tiny sizes.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from perception.evaluation.cost import (
    ESSAY_TABLE,
    CostRow,
    CostStudy,
    Crossover,
    attention_entries,
    busiest,
    cost_study,
    count_flops,
    default_cost_models,
    essay_rows,
    find_crossover,
    fit_exponent,
    latency_exponent,
    latency_ratio_exponent,
    loglog_slopes,
    measure_resolution,
    model_flops,
    peak_memory_mb,
    resample_medians,
    resample_quantiles,
    scan_flops,
    study_input,
    summarise,
    time_interleaved,
)
from perception.layers.attention import set_fused_attention
from perception.models import build
from perception.ops.scan import native_available, resolve_backend

DIM, DEPTH, HEADS, PATCH = 32, 2, 2, 8
CPU = torch.device("cpu")


def _models() -> dict:
    return default_cost_models(dim=DIM, depth=DEPTH, heads=HEADS, patch_size=PATCH, image_size=64)


# ------------------------------------------------------------------------------------ exponents, bootstrap


def _noisy_times(tokens, repeats: int, rng: np.random.Generator, sigma: float = 0.1) -> list[np.ndarray]:
    """Timings of y = 3e-6 * tokens^2, each repeat multiplied by lognormal noise."""
    return [3e-6 * t**2 * rng.lognormal(0.0, sigma, size=repeats) for t in tokens]


def test_fit_exponent_and_local_slopes_on_exact_power_laws():
    tokens = [64, 196, 576, 1024, 4096]
    assert fit_exponent(tokens, [7.0 * t**2 for t in tokens]) == pytest.approx(2.0)
    assert fit_exponent([1, 2, 4, 8], [3, 6, 12, 24]) == pytest.approx(1.0)
    assert loglog_slopes([1, 2, 4], [1, 4, 16]) == pytest.approx([2.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        loglog_slopes([1, 2], [0, 1])
    with pytest.raises(ValueError, match="distinct"):
        fit_exponent([4, 4], [1, 2])


def test_latency_exponent_interval_contains_the_true_exponent_under_noise():
    tokens = [64, 196, 576, 1024, 4096]
    times = _noisy_times(tokens, repeats=30, rng=np.random.default_rng(1))
    exponent, samples = latency_exponent(tokens, times, min_tokens=576, resamples=1000)
    assert exponent.tokens == (576, 1024, 4096)
    assert exponent.lo <= 2.0 <= exponent.hi
    assert exponent.lo <= exponent.value <= exponent.hi
    assert exponent.value == pytest.approx(2.0, abs=0.05)
    assert samples.shape == (1000,)
    full, _ = latency_exponent(tokens, times, resamples=1000)
    assert full.tokens == tuple(tokens) and full.lo <= 2.0 <= full.hi


def test_bootstrap_interval_narrows_with_more_repeats():
    tokens = [576, 1024, 4096]
    widths = []
    for repeats in (8, 200):
        times = _noisy_times(tokens, repeats, np.random.default_rng(2), sigma=0.2)
        exponent, _ = latency_exponent(tokens, times, resamples=1000, rng=np.random.default_rng(3))
        widths.append(exponent.hi - exponent.lo)
    assert widths[1] < widths[0] / 2


def test_resample_medians_is_seeded_and_resamples_within_each_group():
    groups = [[1.0, 2.0, 3.0], [10.0, 20.0]]
    a = resample_medians(groups, 50, np.random.default_rng(7))
    b = resample_medians(groups, 50, np.random.default_rng(7))
    assert a.shape == (50, 2) and np.array_equal(a, b)
    assert a[:, 0].min() >= 1.0 and a[:, 0].max() <= 3.0
    assert a[:, 1].min() >= 10.0 and a[:, 1].max() <= 20.0
    with pytest.raises(ValueError, match="no measurements"):
        resample_medians([[]], 5, np.random.default_rng(0))


def test_latency_exponent_needs_two_token_counts_above_the_fit_threshold():
    with pytest.raises(ValueError, match="two distinct token counts"):
        latency_exponent([64, 196, 576], [[1.0], [2.0], [3.0]], min_tokens=576, resamples=10)


# ------------------------------------------------------------------------------------------- crossover


def _row(model: str, tokens: int, median: float, lo: float, hi: float) -> CostRow:
    return CostRow(
        model=model,
        resolution=int(tokens**0.5) * 16,
        tokens=tokens,
        batch=1,
        latency_ms=median,
        latency_ms_lo=lo,
        latency_ms_hi=hi,
        latency_ms_median=median,
        latency_ms_q25=lo,
        latency_ms_q75=hi,
        latency_ms_blocks=(lo, median, hi),
        forwards_per_block=1,
        others_cpu=0.01,
        own_cpu=0.9,
        gpu_other_processes=None,
        peak_memory_mb=1.0,
        memory_method="synthetic",
        flops_counted=1,
        scan_flops=0,
        flops_total=1,
        attention_entries=0,
    )


def _rows(vit: list[tuple[float, float, float]], mamba: list[tuple[float, float, float]]) -> list[CostRow]:
    """Rows of ViT and Mamba at the swept token counts, each (median, lo, hi)."""
    tokens = [64, 196, 576, 1024, 4096]
    rows = [_row("vit", t, *v) for t, v in zip(tokens, vit, strict=True)]
    return rows + [_row("mamba", t, *m) for t, m in zip(tokens, mamba, strict=True)]


VIT = [(5, 4.8, 5.2), (9, 8.5, 9.5), (28, 27, 29), (62, 60, 64), (540, 530, 550)]


def test_crossover_where_mamba_becomes_faster_and_its_intervals_separate():
    mamba = [(9, 8.8, 9.2), (18, 17, 19), (47, 45, 49), (55, 50, 61), (380, 370, 390)]
    crossover = find_crossover(_rows(VIT, mamba))
    assert crossover.tokens == 1024  # median 55 < 62
    assert not crossover.holds_with_intervals  # 61 (Mamba's hi) is not below 60 (ViT's lo)
    assert crossover.tokens_with_intervals == 4096


def test_crossover_holds_with_intervals_when_they_separate():
    mamba = [(9, 8.8, 9.2), (18, 17, 19), (47, 45, 49), (50, 49, 51), (380, 370, 390)]
    crossover = find_crossover(_rows(VIT, mamba))
    assert (crossover.tokens, crossover.holds_with_intervals, crossover.tokens_with_intervals) == (
        1024,
        True,
        1024,
    )


def test_no_crossover_within_the_sweep_and_a_small_count_win_that_does_not_last():
    slower = [(4, 3.9, 4.1), (18, 17, 19), (47, 45, 49), (90, 85, 95), (600, 590, 610)]
    crossover = find_crossover(_rows(VIT, slower))  # faster at 64 tokens only: no crossover
    assert crossover.tokens is None and not crossover.holds_with_intervals
    assert crossover.tokens_with_intervals is None


def test_crossover_needs_both_models_at_the_same_token_counts():
    rows = _rows(VIT, VIT)[:-1]  # drops Mamba's 4096
    with pytest.raises(ValueError, match="same token counts"):
        find_crossover(rows)


TOKENS = (64, 196, 576, 1024, 4096)


def _timed_rows(
    model: str, scale: float, exponent: float, rng: np.random.Generator, load: np.ndarray | None = None
) -> list[CostRow]:
    """Rows whose 20 block times are scale * tokens^exponent with 10% lognormal noise, each block
    multiplied by `load` [token counts, rounds] (the machine's slowdown in that round; none by default)."""
    rows = []
    for i, t in enumerate(TOKENS):
        slowdown = np.ones(20) if load is None else load[i]
        times = tuple(scale * t**exponent * rng.lognormal(0.0, 0.1, size=20) * slowdown)
        row = _row(model, t, float(np.quantile(times, 0.2)), 0.0, 0.0)
        rows.append(replace(row, latency_ms_blocks=times, peak_memory_mb=1e-3 * t**exponent))
    return rows


def test_summarise_fits_each_model_and_the_gap_from_per_round_ratios():
    rng = np.random.default_rng(4)
    vit, mamba = _timed_rows("vit", 1e-4, 2.0, rng), _timed_rows("mamba", 1e-2, 1.0, rng)
    study = summarise(vit + mamba, {}, bootstrap_seed=0, resamples=500)
    fits = study.fits
    assert fits["vit"].latency.lo <= 2.0 <= fits["vit"].latency.hi
    assert fits["mamba"].latency.lo <= 1.0 <= fits["mamba"].latency.hi
    assert fits["vit"].memory.value == pytest.approx(2.0) == fits["vit"].memory.hi  # the point
    gap = study.latency_gap
    assert gap.lo <= 1.0 <= gap.hi and "per-round latency ratio vit / mamba" in gap.interval
    assert gap == latency_ratio_exponent(study.rows, "vit", "mamba", 0, 500)
    for row in study.rows:  # a row's latency is the 20th percentile of its blocks, with its interval
        assert row.latency_ms == pytest.approx(np.quantile(row.latency_ms_blocks, 0.2))
        assert row.latency_ms_lo <= row.latency_ms <= row.latency_ms_hi
    # 1e-2 t < 1e-4 t^2 from t = 100: from 196 tokens on, far beyond the noise
    assert study.crossover == Crossover("mamba", "vit", 196, True, 196)
    # A model's intervals do not depend on the other models in the rows.
    other = _timed_rows("vit_explicit", 1e-4, 2.0, rng)
    again = summarise(vit + other + mamba, {}, bootstrap_seed=0, resamples=500)
    assert again.fits["mamba"] == fits["mamba"] and again.latency_gaps["vit"] == gap


def test_a_slowdown_shared_by_a_round_cancels_in_the_ratio_but_bends_each_models_fit():
    """The failure the alternating blocks answer: load that grows from one token count to the next (a
    second job starting mid-sweep) hits both models of a round alike. Each model's own fit bends with it;
    their ratio does not."""
    rng = np.random.default_rng(5)
    load = np.stack([np.full(20, 1.0 + 0.8 * i) for i in range(len(TOKENS))])  # 1x .. 4.2x, by token count
    load *= rng.uniform(1.0, 1.5, size=load.shape)  # and it comes and goes within a token count
    vit = _timed_rows("vit", 1e-4, 2.0, np.random.default_rng(6), load)
    mamba = _timed_rows("mamba", 1e-2, 1.0, np.random.default_rng(7), load)
    study = summarise(vit + mamba, {}, bootstrap_seed=0, resamples=500)
    assert study.fits["mamba"].latency.lo > 1.1  # Mamba looks superlinear: the load grew with tokens
    gap = study.latency_gap
    assert gap.lo <= 1.0 <= gap.hi and gap.hi - gap.lo < 0.2  # the ratio still sees the true gap of 1


def test_the_ratio_gap_needs_blocks_timed_in_the_same_rounds():
    rng = np.random.default_rng(8)
    vit, mamba = _timed_rows("vit", 1e-4, 2.0, rng), _timed_rows("mamba", 1e-2, 1.0, rng)
    mamba[0] = replace(mamba[0], latency_ms_blocks=mamba[0].latency_ms_blocks[:-1])
    with pytest.raises(ValueError, match="same rounds"):
        latency_ratio_exponent(vit + mamba, "vit", "mamba", 0, 10)


def test_resample_quantiles_at_the_median_is_resample_medians():
    groups = [[1.0, 2.0, 3.0, 10.0], [5.0, 6.0]]
    a = resample_quantiles(groups, 0.5, 30, np.random.default_rng(2))
    assert np.array_equal(a, resample_medians(groups, 30, np.random.default_rng(2)))
    low = resample_quantiles(groups, 0.2, 30, np.random.default_rng(2))
    assert (low <= a).all()  # the same draws, a lower quantile


def test_the_busiest_row_among_the_fitted_ones():
    rows = _rows(VIT, VIT)
    rows[0] = replace(rows[0], others_cpu=0.9)  # 64 tokens: below the fit, does not count
    rows[7] = replace(rows[7], others_cpu=0.4, gpu_other_processes=1)
    worst = busiest(rows, fit_min_tokens=196)
    assert (worst.others_cpu, worst.model, worst.tokens, worst.gpu_other_processes) == (0.4, "mamba", 576, 1)


# ----------------------------------------------------------------------------------------------- FLOPs


def _pure_mamba(backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build("mamba_hybrid", dim=16, depth=2, heads=2, patch_size=8, attn_layers=0, scan_backend=backend)


BACKENDS = [
    "ref",
    "chunked",
    pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="no C compiler")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_flops_per_scan_backend_match_the_hand_count(backend):
    """flops_total = (counted - what the counter saw of the scans) + 9*B*L*D*N per scan, for every backend.

    The counter sees chunked's output contraction (a bmm: 2*B*L*D*N per scan) and nothing of ref
    (elementwise ops) or native (one C call). The native count once subtracted chunked's bmm anyway.
    """
    model = _pure_mamba(backend).eval()
    batch, resolution = 2, 32
    tokens = (resolution // 8) ** 2
    x = study_input(model, resolution, batch, CPU)
    c = model.config
    D = 2 * c.expand * c.dim  # the bidirectional mixer: one grouped scan over both directions
    per_scan = 9 * batch * tokens * D * c.d_state
    seen_per_scan = {"ref": 0, "chunked": 2 * batch * tokens * D * c.d_state, "native": 0}[backend]
    counted, scans, total = model_flops(model, x, tokens)
    assert scans == c.depth * per_scan == scan_flops(model, tokens, batch)
    assert total == counted - c.depth * seen_per_scan + c.depth * per_scan
    chunked = _pure_mamba("chunked").eval()  # same model, the counter sees its scans' bmm
    assert total == model_flops(chunked, x, tokens)[2]


def test_scan_flops_zero_for_vit_and_attention_entries_count_the_class_token():
    models = _models()
    vit, mamba, hybrid = models["vit"](), models["mamba"](), models["mamba_hybrid"]()
    assert scan_flops(vit, tokens=64, batch=2) == 0
    assert attention_entries(mamba, tokens=64) == 0
    assert attention_entries(vit, tokens=64) == HEADS * (64 + 1) ** 2 * DEPTH  # + class token
    assert attention_entries(models["vit_explicit"](), tokens=64) == attention_entries(vit, tokens=64)
    assert attention_entries(hybrid, tokens=64) == HEADS * 64**2 * 1  # no class token, one attention block


def test_counted_flops_include_fused_cpu_attention():
    """The fused SDPA kernel is counted like the explicit q k^T and (softmax) v matmuls."""
    vit = _models()["vit"]().eval()
    x = torch.randn(1, 4, 64, 64)
    fused = count_flops(vit, x)
    set_fused_attention(vit, False)
    assert count_flops(vit, x) == fused


# --------------------------------------------------------------------------------- explicit vs fused ViT


def test_explicit_and_fused_vit_share_weights_and_logits():
    models = _models()
    fused, explicit = models["vit"]().eval(), models["vit_explicit"]().eval()
    assert not explicit.config.fused_attention and fused.config.fused_attention
    for (k, a), (_, b) in zip(fused.state_dict().items(), explicit.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = study_input(fused, 128, 2, CPU)
    with torch.inference_mode():
        torch.testing.assert_close(explicit(x), fused(x), atol=1e-5, rtol=1e-5)


def test_explicit_attention_peak_memory_grows_faster_than_fused():
    models = _models()
    tokens = [64, 256, 1024]  # 64, 128, 256 px at patch 8
    exponents = {}
    for name in ("vit", "vit_explicit"):
        model = models[name]().eval()
        memory = []
        for t in tokens:
            x = study_input(model, int(t**0.5) * PATCH, 1, CPU)
            first, second = peak_memory_mb(model, x)[0], peak_memory_mb(model, x)[0]
            assert first == second > 0  # deterministic on CPU
            memory.append(first)
        exponents[name] = fit_exponent(tokens, memory)
    assert exponents["vit_explicit"] > 1.5  # the (T, T) scores dominate
    assert exponents["vit_explicit"] > exponents["vit"] + 0.4


# ------------------------------------------------------------------------------------- the study, small


@pytest.fixture(scope="module")
def small_study() -> CostStudy:
    threads = torch.get_num_threads()
    study = cost_study(
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
        patch_size=PATCH,
        resolutions=(64, 32, 128),  # 16, 64, 256 tokens; sorted by the study
        device=CPU,
        bootstrap_seed=0,
        resamples=200,
        threads=1,
        min_run_time=0.02,
        min_blocks=3,
        fit_min_tokens=64,
    )
    assert torch.get_num_threads() == threads  # set for the study, then restored
    return study


def test_study_rows_cover_every_model_and_resolution_with_intervals(small_study):
    rows = small_study.rows
    assert [r.tokens for r in rows] == [16] * 4 + [64] * 4 + [256] * 4  # by resolution
    assert {r.model for r in rows} == {"vit", "vit_explicit", "mamba_hybrid", "mamba"}
    for r in rows:
        assert len(r.latency_ms_blocks) >= 3 and r.forwards_per_block >= 1
        assert r.latency_ms_lo <= r.latency_ms <= r.latency_ms_hi
        assert (
            r.latency_ms <= r.latency_ms_median
            and r.latency_ms_q25 <= r.latency_ms_median <= r.latency_ms_q75
        )
        assert 0 <= r.others_cpu <= 1.0 and 0 < r.own_cpu <= 1.5 and r.gpu_other_processes is None
        assert r.peak_memory_mb > 0 and r.flops_total > 0 and r.memory_method.startswith("cpu")
    for t in (16, 64, 256):  # every model at a token count was timed in the same rounds
        assert len({len(r.latency_ms_blocks) for r in rows if r.tokens == t}) == 1


def test_study_fits_gaps_and_crossover_are_consistent(small_study):
    for fit in small_study.fits.values():
        assert fit.latency.tokens == (64, 256) and fit.latency_full.tokens == (16, 64, 256)
        assert fit.latency.lo <= fit.latency.value <= fit.latency.hi
        assert fit.memory.lo == fit.memory.value == fit.memory.hi  # deterministic: the point
        assert len(fit.latency_slopes) == len(fit.memory_slopes) == 2
    gap = small_study.latency_gap
    assert gap.lo <= gap.value <= gap.hi and gap.tokens == (64, 256)
    assert set(small_study.latency_gaps) == {"vit", "vit_explicit", "mamba_hybrid"}
    assert small_study.crossover_tokens in (None, 16, 64, 256)
    assert small_study.setting["threads"] == 1 and small_study.setting["resolutions"] == [32, 64, 128]


def test_study_as_dict_is_json(small_study):
    d = json.loads(json.dumps(small_study.as_dict(), allow_nan=False))
    assert set(d) >= {"setting", "rows", "fits", "latency_gap", "crossover", "crossover_tokens", "essay"}
    assert set(d["busiest"]) == {"others_cpu", "model", "tokens", "gpu_other_processes"}
    assert set(d["fits"]["vit"]) >= {"latency", "memory", "latency_full", "memory_full"}
    assert set(d["latency_gap"]) == {"value", "lo", "hi", "tokens", "interval"}


def test_study_and_measurement_reject_bad_settings():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit = _models()["vit"]()
        measure_resolution({"vit": vit}, resolution=60, patch_size=PATCH, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="fit_min_tokens"):
        cost_study(DIM, DEPTH, HEADS, PATCH, (32, 64), CPU, 0, 10, fit_min_tokens=576)


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
def test_the_study_measures_the_gpu_with_its_allocator():
    study = cost_study(
        DIM, DEPTH, HEADS, PATCH, (32, 64, 128), torch.device("cuda"), 0, 100,
        min_run_time=0.05, min_blocks=3, fit_min_tokens=64,
    )  # fmt: skip
    for row in study.rows:
        assert "cuda" in row.memory_method and row.peak_memory_mb > 0
        assert row.latency_ms_lo <= row.latency_ms <= row.latency_ms_hi
    assert study.setting["scan_backend"] == resolve_backend("auto", "cuda")  # triton where it imports


# ------------------------------------------------------------------------------ alternating blocks


def test_models_are_timed_in_alternating_rounds_in_a_seeded_random_order():
    order: list[str] = []

    def forward(name: str):
        return lambda: order.append(name)

    names = ["vit", "vit_explicit", "mamba_hybrid", "mamba"]

    def run(seed: int) -> tuple[list[str], object]:
        order.clear()
        timed = time_interleaved(
            {n: forward(n) for n in names}, CPU, 1e-12, 6, 1, np.random.default_rng(seed), block_s=1e-9
        )
        return list(order), timed

    first, timed = run(3)
    warmups, rounds = first[:4], first[4:]
    assert warmups == names  # one untimed forward each, then the rounds
    assert all(timed.forwards_per_block[n] == 1 for n in names)
    blocks = [rounds[i : i + 4] for i in range(0, len(rounds), 4)]
    assert all(sorted(b) == sorted(names) for b in blocks)  # every model once per round
    assert len({tuple(b) for b in blocks}) > 1  # in an order drawn anew for each round
    assert all(len(timed.times[n]) == len(blocks) == 6 for n in names)
    assert run(3)[0] == first and run(4)[0] != first  # seeded
