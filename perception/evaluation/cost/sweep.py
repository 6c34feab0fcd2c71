"""The sweep: every model at every resolution (`cost_study`), its rows, fits, crossover and summary."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from perception.evaluation.cost.essay import essay_rows
from perception.evaluation.cost.fits import (
    COUNTED,
    DETERMINISTIC,
    Exponent,
    _bootstrap_interval,
    _fit_resampled,
    fit_exponent,
    loglog_slopes,
    resample_medians,
    resample_quantiles,
)
from perception.evaluation.cost.flops import attention_entries, model_flops
from perception.evaluation.cost.memory import peak_memory_mb
from perception.evaluation.cost.timing import time_interleaved, torch_threads
from perception.models import build
from perception.ops.scan import resolve_backend

# ------------------------------------------------------------------------------------------ one point

LATENCY_QUANTILE = 0.2  # the latency that decides: this quantile of a point's block times (see summarise)


@dataclass(frozen=True)
class CostRow:
    """The cost of one model at one resolution (forward only, batch `batch`)."""

    model: str
    resolution: int  # px per side (square images)
    tokens: int  # patch tokens, (resolution / patch_size)^2, without any class token
    batch: int
    latency_ms: float  # the LATENCY_QUANTILE of latency_ms_blocks: what the fits and the crossover use
    latency_ms_lo: float | None  # its bootstrap interval (None until the study resamples)
    latency_ms_hi: float | None
    latency_ms_median: float  # the median and quartiles of the blocks: their spread
    latency_ms_q25: float
    latency_ms_q75: float
    latency_ms_blocks: tuple[float, ...]  # every timed block's time per forward, in round order
    forwards_per_block: int
    others_cpu: float  # other processes' CPU use during this row's blocks, share of the machine
    own_cpu: float  # this process's CPU use during them, share of what its threads could use
    gpu_other_processes: int | None  # other processes on the GPU during them (NVML), None where unknown
    peak_memory_mb: float  # MiB above the pre-forward baseline, one (deterministic) measurement
    memory_method: str
    flops_counted: int  # FlopCounterMode's total for one forward
    scan_flops: int  # our count of the selective scans, 9*B*L*D*N each
    flops_total: int  # flops_counted + scan_flops, less the scan FLOPs the counter already saw
    attention_entries: int  # per image: sum over attention layers of heads * sequence_length^2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _in_channels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "in_channels", 4))  # the study's images: depth + 3 normal channels


def study_input(model: nn.Module, resolution: int, batch: int, device: torch.device) -> torch.Tensor:
    """float32[batch, C, resolution, resolution], the same for every model (seeded)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, _in_channels(model), resolution, resolution, generator=gen).to(device)


def measure_resolution(
    models: dict[str, nn.Module],
    resolution: int,
    patch_size: int,
    rng: np.random.Generator,
    batch: int = 1,
    min_run_time: float = 1.0,
    min_blocks: int = 7,
    threads: int | None = None,
) -> list[CostRow]:
    """Measure every model (already on its device, in eval mode) at `resolution` px: their forwards timed
    together in alternating blocks (`time_interleaved`, order drawn from `rng`), then one forward each
    under FlopCounterMode and one for peak memory. Latency intervals are left None: they come from the
    study's bootstrap."""
    if resolution % patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch_size}")
    if batch < 1 or min_blocks < 1 or min_run_time <= 0:
        raise ValueError(
            f"need batch >= 1, min_blocks >= 1, min_run_time > 0; got {batch}, {min_blocks}, {min_run_time}"
        )
    device = next(next(iter(models.values())).parameters()).device
    threads = threads or torch.get_num_threads()
    tokens = (resolution // patch_size) ** 2
    inputs = {name: study_input(model, resolution, batch, device) for name, model in models.items()}

    def forward_of(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        def forward() -> None:
            with torch.inference_mode():
                model(x)

        return forward

    forwards = {name: forward_of(model, inputs[name]) for name, model in models.items()}
    timed = time_interleaved(forwards, device, min_run_time, min_blocks, threads, rng)
    rows = []
    for name, model in models.items():
        blocks_ms = [t * 1e3 for t in timed.times[name]]
        low, q25, q50, q75 = np.quantile(blocks_ms, [LATENCY_QUANTILE, 0.25, 0.5, 0.75]).tolist()
        counted, scans, total = model_flops(model, inputs[name], tokens)
        memory_mb, method = peak_memory_mb(model, inputs[name])
        busy = timed.contention[name]
        rows.append(
            CostRow(
                model=name,
                resolution=resolution,
                tokens=tokens,
                batch=batch,
                latency_ms=low,
                latency_ms_lo=None,
                latency_ms_hi=None,
                latency_ms_median=q50,
                latency_ms_q25=q25,
                latency_ms_q75=q75,
                latency_ms_blocks=tuple(blocks_ms),
                forwards_per_block=timed.forwards_per_block[name],
                others_cpu=busy.others,
                own_cpu=busy.own,
                gpu_other_processes=busy.gpu_other_processes,
                peak_memory_mb=memory_mb,
                memory_method=method,
                flops_counted=counted,
                scan_flops=scans,
                flops_total=total,
                attention_entries=attention_entries(model, tokens),
            )
        )
    return rows


# ------------------------------------------------------------------------------------------- crossover


@dataclass(frozen=True)
class Crossover:
    """Where `model` (pure Mamba) becomes faster than `reference` (ViT) within the sweep."""

    model: str
    reference: str
    # The smallest swept token count from which model's median latency is below reference's, at it and at
    # every larger swept count; None: not within the sweep.
    tokens: int | None
    # Whether at `tokens` the two medians' bootstrap intervals separate (model's hi < reference's lo).
    holds_with_intervals: bool
    # The smallest swept count from which the intervals separate at every larger count; None: nowhere.
    tokens_with_intervals: int | None


def find_crossover(rows: Sequence[CostRow], model: str = "mamba", reference: str = "vit") -> Crossover:
    """The crossover of `model` below `reference` in median latency (a pure function of the rows)."""
    mine = {r.tokens: r for r in rows if r.model == model}
    theirs = {r.tokens: r for r in rows if r.model == reference}
    if not mine or set(mine) != set(theirs):
        raise ValueError(
            f"models {model!r} and {reference!r} need rows at the same token counts; got "
            f"{sorted(mine)} and {sorted(theirs)}"
        )

    def separated(t: int) -> bool:
        a, b = mine[t], theirs[t]
        if a.latency_ms_hi is None or b.latency_ms_lo is None:
            raise ValueError(f"row {model!r} at {t} tokens has no latency interval yet")
        return a.latency_ms_hi < b.latency_ms_lo

    def first_from(holds: Callable[[int], bool]) -> int | None:
        first = None
        for t in sorted(mine, reverse=True):  # walk down from the largest count while it holds
            if not holds(t):
                break
            first = t
        return first

    tokens = first_from(lambda t: mine[t].latency_ms < theirs[t].latency_ms)
    return Crossover(
        model=model,
        reference=reference,
        tokens=tokens,
        holds_with_intervals=tokens is not None and separated(tokens),
        tokens_with_intervals=first_from(separated),
    )


# ------------------------------------------------------------------------------------------ the study


@dataclass(frozen=True)
class ModelFit:
    """One model's exponents: over tokens >= fit_min_tokens, and (`_full`) over the whole sweep."""

    latency: Exponent
    memory: Exponent
    latency_full: Exponent
    memory_full: Exponent
    flops: Exponent  # counted FLOPs, context only
    latency_slopes: tuple[float, ...]  # local log-log slopes of the medians between neighbouring counts
    memory_slopes: tuple[float, ...]


@dataclass(frozen=True)
class Busiest:
    """The busiest the machine was while the fitted rows were timed: the row whose blocks saw the most
    CPU use by other processes, and the most other processes seen on the GPU."""

    others_cpu: float  # share of the machine's CPU time other processes used, 0..1
    model: str
    tokens: int
    gpu_other_processes: int | None  # None where NVML could not say (or on CPU)


@dataclass(frozen=True)
class CostStudy:
    rows: tuple[CostRow, ...]  # (resolution, model) order
    fits: dict[str, ModelFit]  # by model
    # <model> latency exponent minus pure Mamba's, for every other model, from their per-round ratios
    latency_gaps: dict[str, Exponent]
    crossover: Crossover  # pure Mamba below ViT (fused)
    busiest: Busiest
    setting: dict[str, Any]
    wall_s: float  # the whole study, measuring and resampling

    @property
    def latency_gap(self) -> Exponent:
        """ViT (fused) minus pure Mamba latency exponent over the upper sweep."""
        return self.latency_gaps["vit"]

    @property
    def crossover_tokens(self) -> int | None:
        return self.crossover.tokens

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable: rows, fits, gaps, crossover, setting, the essay's table and the wall time."""
        return {
            "setting": dict(self.setting),
            "rows": [r.as_dict() for r in self.rows],
            "fits": {name: asdict(fit) for name, fit in self.fits.items()},
            "latency_gap": asdict(self.latency_gap),
            "latency_gaps": {name: asdict(gap) for name, gap in self.latency_gaps.items()},
            "crossover": asdict(self.crossover),
            "crossover_tokens": self.crossover_tokens,
            "busiest": asdict(self.busiest),
            "essay": essay_rows(),
            "wall_s": self.wall_s,
        }


def _point_fit(rows: Sequence[CostRow], key: str, interval: str) -> Exponent:
    """The exponent of one deterministic number per row (memory, FLOPs): its interval is the point."""
    tokens = [r.tokens for r in rows]
    return Exponent.point(fit_exponent(tokens, [getattr(r, key) for r in rows]), tokens, interval)


def default_cost_models(
    dim: int,
    depth: int,
    heads: int,
    num_classes: int = 8,
    in_channels: int = 4,
    patch_size: int = 16,
    image_size: int = 224,
    seed: int = 0,
) -> dict[str, Callable[[], nn.Module]]:
    """Factories for "vit", "vit_explicit", "mamba_hybrid" and "mamba" (attn_layers=0), one width and depth.

    vit_explicit is vit with explicit softmax attention; both are built from `seed`, so they have the same
    weights. The hybrid puts max(1, depth // 4) attention blocks after its Mamba blocks (the registry's
    tiny size is 1 in 4; MambaVision also uses a minority of attention blocks, last), but always keeps one
    Mamba block. `image_size` is ViT's training grid; other resolutions resample its position embedding.
    Building does not touch the global RNG.
    """
    if depth < 2:
        raise ValueError(f"depth must be >= 2 so the hybrid has both block kinds; got {depth}")
    common: dict[str, Any] = {"dim": dim, "depth": depth, "heads": heads, "patch_size": patch_size}
    common |= {"num_classes": num_classes, "in_channels": in_channels}
    hybrid_attn = min(max(1, depth // 4), depth - 1)

    def seeded(family: str, **hparams: Any) -> Callable[[], nn.Module]:
        def factory() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return build(family, **common, **hparams)

        return factory

    return {
        "vit": seeded("vit", image_size=image_size),
        "vit_explicit": seeded("vit", image_size=image_size, fused_attention=False),
        "mamba_hybrid": seeded("mamba_hybrid", attn_layers=hybrid_attn),
        "mamba": seeded("mamba_hybrid", attn_layers=0),
    }


CPU_RESOLUTIONS = (128, 224, 384, 512, 1024)  # 64 .. 4096 tokens at patch 16: 64x, 1-1.5 min on 2 cores
GPU_RESOLUTIONS = (*CPU_RESOLUTIONS, 2048)  # + 16384 tokens (explicit attention: 3.2 GB per head-matrix set)


def default_resolutions(device: torch.device) -> tuple[int, ...]:
    return GPU_RESOLUTIONS if device.type == "cuda" else CPU_RESOLUTIONS


def cost_study(
    dim: int,
    depth: int,
    heads: int,
    patch_size: int,
    resolutions: Sequence[int],
    device: torch.device,
    bootstrap_seed: int,
    resamples: int,
    progress: Callable[[str], None] | None = None,
    *,
    threads: int | None = None,
    min_run_time: float = 1.0,
    min_blocks: int = 7,
    fit_min_tokens: int = 576,
    level: float = 0.95,
    models: dict[str, Callable[[], nn.Module]] | None = None,
) -> CostStudy:
    """Measure every model (`default_cost_models` unless `models` is given) at every resolution, batch 1,
    and fit the exponents, the ViT - Mamba gap and the crossover.

    Models are built once; at each resolution they are timed together in alternating short blocks
    (`measure_resolution`, the models' order in each round drawn from a generator seeded by
    `bootstrap_seed`), so that load that comes and goes hits them alike. `threads` (default: torch's
    current number) is set for the whole study and restored after. `min_run_time` is each point's timing
    budget in seconds, `min_blocks` the number of rounds a slow point still gets (see `time_interleaved`).
    The numbers are then summarised by `summarise` (bootstrap seeded by `bootstrap_seed`).
    """
    if models is None:
        models = default_cost_models(dim=dim, depth=depth, heads=heads, patch_size=patch_size)
    for key in ("vit", "mamba"):
        if key not in models:
            raise ValueError(f"cost_study needs a model named {key!r}; got {sorted(models)}")
    for resolution in resolutions:
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch_size}")
    fitted = {t for t in ((r // patch_size) ** 2 for r in resolutions) if t >= fit_min_tokens}
    if len(fitted) < 2:
        raise ValueError(
            f"fit_min_tokens = {fit_min_tokens} leaves {len(fitted)} token count(s) of resolutions "
            f"{list(resolutions)} at patch {patch_size} to fit; need at least 2"
        )
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    began = time.monotonic()
    threads = threads or torch.get_num_threads()
    resolutions = sorted(set(resolutions))
    rows: list[CostRow] = []
    with torch_threads(threads):
        built = {name: factory().to(device).eval() for name, factory in models.items()}
        order = np.random.default_rng([bootstrap_seed, 0xB10C])  # the models' order in every round
        for resolution in resolutions:
            point = measure_resolution(
                built, resolution, patch_size, order, 1, min_run_time, min_blocks, threads
            )
            rows.extend(point)
            for row in point:
                if progress is None:
                    break
                progress(
                    f"cost {row.model} {resolution}px ({row.tokens} tokens): {row.latency_ms:.1f} ms "
                    f"(median {row.latency_ms_median:.1f}, IQR {row.latency_ms_q25:.1f}-"
                    f"{row.latency_ms_q75:.1f}, {len(row.latency_ms_blocks)} blocks; other processes "
                    f"{row.others_cpu:.0%} of the CPUs), {row.peak_memory_mb:.1f} MiB, "
                    f"{row.flops_total / 1e9:.2f} GFLOP"
                )
        del built

    setting = {
        "dim": dim,
        "depth": depth,
        "heads": heads,
        "patch_size": patch_size,
        "resolutions": list(resolutions),
        "batch": 1,
        "models": list(models),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        ),
        "threads": threads,
        # what backend "auto" runs on this device
        "scan_backend": resolve_backend("auto", device),
        "torch": torch.__version__,
        "timer": "alternating blocks of timeit runs, one warm-up forward each; rounds in a seeded order",
        "latency_statistic": f"{LATENCY_QUANTILE:g}-quantile of the block times",
        "min_run_time_s": min_run_time,
        "min_blocks": min_blocks,
        "fit_min_tokens": fit_min_tokens,
        "level": level,
        "bootstrap_seed": bootstrap_seed,
        "resamples": resamples,
    }
    study = summarise(rows, setting, bootstrap_seed, resamples, fit_min_tokens, level)
    return replace(study, wall_s=time.monotonic() - began)


def summarise(
    rows: Sequence[CostRow],
    setting: dict[str, Any],
    bootstrap_seed: int,
    resamples: int,
    fit_min_tokens: int = 576,
    level: float = 0.95,
) -> CostStudy:
    """The study from measured rows (a pure function of them and the seed): every row's median interval,
    every model's exponents, each model's latency exponent minus pure Mamba's, and the crossover.

    One bootstrap per model, its generator seeded by (bootstrap_seed, the model's name), so a model's
    intervals do not depend on which other models are in the rows. The rows need models "mamba" and
    "vit"; wall_s is left 0.
    """
    models = list(dict.fromkeys(r.model for r in rows))
    if "mamba" not in models:
        raise ValueError(f"the rows need a model named 'mamba' to compare against; got {models}")
    fits, with_intervals = {}, {}
    q = LATENCY_QUANTILE
    for name in models:
        mine = sorted((r for r in rows if r.model == name), key=lambda r: r.tokens)
        tokens = [r.tokens for r in mine]
        times = [r.latency_ms_blocks for r in mine]
        rng = np.random.default_rng([bootstrap_seed, *name.encode()])
        lows = resample_quantiles(times, q, resamples, rng)  # [R, token counts]
        lo, hi = np.quantile(lows, [(1 - level) / 2, (1 + level) / 2], axis=0).tolist()
        for row, a, b in zip(mine, lo, hi, strict=True):
            with_intervals[(name, row.tokens)] = replace(row, latency_ms_lo=a, latency_ms_hi=b)
        interval = f"{_bootstrap_interval(level, resamples)}, of their {q:g}-quantile"
        latency, _ = _fit_resampled(tokens, times, lows, fit_min_tokens, level, q, interval)
        latency_full, _ = _fit_resampled(tokens, times, lows, 0, level, q, interval)
        upper = [r for r in mine if r.tokens >= fit_min_tokens]
        fits[name] = ModelFit(
            latency=latency,
            memory=_point_fit(upper, "peak_memory_mb", DETERMINISTIC),
            latency_full=latency_full,
            memory_full=_point_fit(mine, "peak_memory_mb", DETERMINISTIC),
            flops=_point_fit(upper, "flops_total", COUNTED),
            latency_slopes=tuple(loglog_slopes(tokens, [r.latency_ms for r in mine])),
            memory_slopes=tuple(loglog_slopes(tokens, [r.peak_memory_mb for r in mine])),
        )
    rows = [with_intervals[(r.model, r.tokens)] for r in rows]
    gaps = {
        name: latency_ratio_exponent(rows, name, "mamba", bootstrap_seed, resamples, fit_min_tokens, level)
        for name in models
        if name != "mamba"
    }
    return CostStudy(
        rows=tuple(rows),
        fits=fits,
        latency_gaps=gaps,
        crossover=find_crossover(rows, "mamba", "vit"),
        busiest=busiest(rows, fit_min_tokens),
        setting=dict(setting),
        wall_s=0.0,
    )


def latency_ratio_exponent(
    rows: Sequence[CostRow],
    model: str,
    reference: str,
    bootstrap_seed: int,
    resamples: int,
    fit_min_tokens: int = 576,
    level: float = 0.95,
) -> Exponent:
    """k(model) - k(reference), fitted from their per-round latency ratios: the log-log slope of the median
    ratio against tokens over tokens >= fit_min_tokens, with a bootstrap that resamples the rounds within
    each token count.

    Block j of both models at one token count was timed in round j, one right after the other in a random
    order, so a slowdown of the machine that lasts a round multiplies both and cancels in their ratio; the
    median of the ratios is not moved by the few rounds that load hit unevenly.
    """
    mine = sorted((r for r in rows if r.model == model), key=lambda r: r.tokens)
    theirs = {r.tokens: r for r in rows if r.model == reference}
    tokens = [r.tokens for r in mine]
    if set(tokens) != set(theirs):
        raise ValueError(f"models {model!r} and {reference!r} need rows at the same token counts")
    ratios = []
    for row in mine:
        other = theirs[row.tokens].latency_ms_blocks
        if len(other) != len(row.latency_ms_blocks):
            raise ValueError(
                f"{model!r} and {reference!r} at {row.tokens} tokens were not timed in the same rounds"
            )
        ratios.append([a / b for a, b in zip(row.latency_ms_blocks, other, strict=True)])
    rng = np.random.default_rng([bootstrap_seed, *f"{model}/{reference}".encode()])
    medians = resample_medians(ratios, resamples, rng)  # [R, token counts]
    interval = (
        f"{level:.0%} percentile bootstrap, {resamples} resamples of the rounds within each token count, "
        f"of the median per-round latency ratio {model} / {reference}"
    )
    return _fit_resampled(tokens, ratios, medians, fit_min_tokens, level, 0.5, interval)[0]


def busiest(rows: Sequence[CostRow], fit_min_tokens: int = 0) -> Busiest:
    """The row of tokens >= fit_min_tokens during whose blocks other processes used the most CPU, and the
    most other GPU processes seen."""
    fitted = [r for r in rows if r.tokens >= fit_min_tokens] or list(rows)
    worst = max(fitted, key=lambda r: r.others_cpu)
    gpu = [r.gpu_other_processes for r in fitted if r.gpu_other_processes is not None]
    return Busiest(worst.others_cpu, worst.model, worst.tokens, max(gpu) if gpu else None)
