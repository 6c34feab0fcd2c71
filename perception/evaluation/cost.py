"""Compute cost of image backbones against the number of tokens: latency, peak memory, FLOPs.

The study tests the claim "attention cost grows quadratically with the number of tokens; state space
models (Mamba) grow linearly". `cost_sweep` measures each model at several resolutions (tokens =
(resolution / patch)^2) and `fit_exponent` / `loglog_slopes` turn the measurements into the exponent k of
cost ~ tokens^k, to set beside the essay's published table (`ESSAY_TABLE`, quoted, not computed).

What each number is:
  - latency: wall time of one forward under `torch.inference_mode`, median (and min, max) of `repeats`.
  - FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward, plus our own count of the selective
    scan (the counter sees only the scan's output contraction, a bmm, and none of its recurrence).
  - peak memory: CUDA's `max_memory_allocated` above the baseline; on CPU, torch.profiler's record of every
    c10 allocator alloc/free during one forward, and the peak of their running sum. Both count activations
    and workspaces only (the weights and the input exist before the forward starts).
  - attention entries: the attention-matrix entries an explicit implementation would materialise. The fused
    kernel (`F.scaled_dot_product_attention`) does not materialise them, so measured memory can grow far
    slower than this count.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from perception.layers.attention import Attention
from perception.models import build
from perception.models.mamba_hybrid import BiMamba
from perception.ops.scan import selective_scan

# ------------------------------------------------------------------------------------- the essay's table


@dataclass(frozen=True)
class EssayRow:
    """One row of the essay's table, as published (a citation: rounded numbers, not ours)."""

    resolution: int  # px per side
    tokens: int  # (resolution / 16)^2
    attention_entries: float  # tokens^2, as the essay rounds it
    relative_cost: float  # attention entries relative to 224 px


ESSAY_PATCH_SIZE = 16  # the essay's patch size (quoted)

# QUOTED from the essay, not computed: "38K / 332K / 1M / 16.8M" entries, "1x / 8.7x / 26x / 440x" cost.
ESSAY_TABLE: tuple[EssayRow, ...] = (
    EssayRow(224, 196, 38e3, 1.0),
    EssayRow(384, 576, 332e3, 8.7),
    EssayRow(512, 1024, 1e6, 26.0),
    EssayRow(1024, 4096, 16.8e6, 440.0),
)


def essay_rows() -> list[dict[str, Any]]:
    """The essay's rows beside the exact numbers: tokens = (res/16)^2, entries = tokens^2, cost vs 224 px.

    Keys ending in `_essay` are the essay's (rounded) numbers; the others are computed here. Like the essay,
    this counts one head and no class token.
    """
    base = (224 // ESSAY_PATCH_SIZE) ** 4
    rows = []
    for row in ESSAY_TABLE:
        tokens = (row.resolution // ESSAY_PATCH_SIZE) ** 2
        rows.append(
            {
                "resolution": row.resolution,
                "patch_size": ESSAY_PATCH_SIZE,
                "tokens_essay": row.tokens,
                "tokens": tokens,
                "attention_entries_essay": row.attention_entries,
                "attention_entries": tokens**2,
                "relative_cost_essay": row.relative_cost,
                "relative_cost": tokens**2 / base,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- one point


@dataclass(frozen=True)
class CostPoint:
    """The cost of one model at one resolution (batch `batch`, forward only)."""

    model: str
    resolution: int  # px per side (square images)
    tokens: int  # patch tokens, (resolution / patch_size)^2, without any class token
    batch: int
    latency_ms: float  # median over `repeats` timed forwards
    latency_ms_min: float
    latency_ms_max: float
    repeats: int
    peak_memory_mb: float  # MiB above the pre-forward baseline
    memory_method: str  # how peak_memory_mb was measured
    flops_counted: int  # FlopCounterMode's total for one forward
    scan_flops: int  # our count of the selective scans, 9*B*L*D*N each
    flops_total: int  # flops_counted + scan_flops, less the scan FLOPs the counter already saw
    attention_entries: int  # per image: sum over attention layers of heads * sequence_length^2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan_flops(model: nn.Module, tokens: int, batch: int) -> int:
    """FLOPs of every selective scan `model` runs on `batch` images of `tokens` tokens: 9*B*L*D*N each.

    Per step and channel a scan computes exp(dt*A), dt*B*x, h = dA*h + dBx and C.h over N states: about
    9 FLOPs per (b, l, d, n). Each BiMamba block runs two scans (forward and backward direction), each over
    d_inner channels; the code stacks them into one grouped scan of 2*d_inner channels, the same count.
    0 for a model without Mamba blocks.
    """
    total = 0
    for m in model.modules():
        if isinstance(m, BiMamba):
            total += 2 * 9 * batch * tokens * m.d_inner * m.d_state
    return total


def _prefix_tokens(model: nn.Module) -> int:
    """Tokens attention sees besides the patches: ViT's class token (cls_token is (1, n, dim)), else 0."""
    cls = getattr(model, "cls_token", None)
    return int(cls.shape[1]) if isinstance(cls, torch.Tensor) else 0


def attention_entries(model: nn.Module, tokens: int) -> int:
    """Attention-matrix entries per image an explicit implementation materialises: sum of heads * S^2.

    S = tokens plus the class token where the model has one (ViT; MambaHybrid has none). 0 for pure Mamba.
    """
    seq = tokens + _prefix_tokens(model)
    return sum(m.heads * seq * seq for m in model.modules() if isinstance(m, Attention))


# FlopCounterMode (torch 2.13) has formulas for the CUDA SDPA kernels only; CPU dispatches
# F.scaled_dot_product_attention to this op, whose FLOPs it would silently drop: the quadratic term.
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's total for one forward of `model` on `x` (CPU attention included)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=64)
def _scan_flops_seen(backend: str, b: int, d: int, L: int, n: int, g: int) -> int:
    """FLOPs FlopCounterMode attributes to one selective scan of this shape (the chunked path's bmm).

    Run on meta tensors: shapes only, so it costs Python steps and no arithmetic.
    """
    meta = torch.device("meta")
    u, delta = torch.empty(b, d, L, device=meta), torch.empty(b, d, L, device=meta)
    A = torch.empty(d, n, device=meta)
    B, C = torch.empty(b, g, n, L, device=meta), torch.empty(b, g, n, L, device=meta)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        selective_scan(u, delta, A, B, C, delta_softplus=True, backend=backend)
    return int(counter.get_total_flops())


def _counted_scan_flops(model: nn.Module, tokens: int, batch: int) -> int:
    """What the counter already saw of `scan_flops`, so flops_total does not count it twice."""
    return sum(
        _scan_flops_seen(m.scan_backend, batch, 2 * m.d_inner, tokens, m.d_state, 2)  # BiMamba's shapes
        for m in model.modules()
        if isinstance(m, BiMamba)
    )


def _cpu_peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes held by the c10 CPU allocator above the start, over one forward.

    torch.profiler(profile_memory=True) records each alloc (+bytes) and free (-bytes) with a timestamp;
    the running sum in time order is the bytes live, its maximum the peak. Exact for tensors; buffers
    allocated outside c10 (oneDNN/MKL scratch) are not seen.
    """
    from torch._C._profiler import _EventType  # the event tree torch's own memory profiler reads

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.inference_mode(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        model(x)
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


CPU_MEMORY_METHOD = "cpu: torch.profiler profile_memory, peak running sum of c10 alloc/free events"
CUDA_MEMORY_METHOD = "cuda: max_memory_allocated minus memory_allocated before the forward"


def _peak_memory(model: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[float, str]:
    """(peak MiB above the pre-forward baseline, method) for one forward."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20, CUDA_MEMORY_METHOD
    return _cpu_peak_bytes(model, x) / 2**20, CPU_MEMORY_METHOD


def _in_channels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "in_channels", 4))  # the study's images: depth + 3 normal channels


def measure_cost(
    name: str,
    model: nn.Module,
    resolution: int,
    patch_size: int,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),  # noqa: B008 (an immutable default)
) -> CostPoint:
    """Measure one forward of `model` on float32[batch, C, resolution, resolution] on `device`.

    `model` should already be on `device` and in eval mode. Runs `warmup` untimed forwards (first-call
    allocations and kernel selection), `repeats` timed ones, one under FlopCounterMode and one for memory.
    """
    if resolution % patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch_size}")
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, batch >= 1; got {repeats}, {warmup}, {batch}")
    tokens = (resolution // patch_size) ** 2
    gen = torch.Generator().manual_seed(0)  # the same input for every model
    x = torch.randn(batch, _in_channels(model), resolution, resolution, generator=gen).to(device)
    cuda = device.type == "cuda"

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(device)  # CUDA runs asynchronously: time the work, not the launch
            start = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)

    counted = count_flops(model, x)
    scans = scan_flops(model, tokens, batch)
    seen = _counted_scan_flops(model, tokens, batch) if scans else 0
    memory_mb, method = _peak_memory(model, x, device)
    return CostPoint(
        model=name,
        resolution=resolution,
        tokens=tokens,
        batch=batch,
        latency_ms=statistics.median(times),
        latency_ms_min=min(times),
        latency_ms_max=max(times),
        repeats=repeats,
        peak_memory_mb=memory_mb,
        memory_method=method,
        flops_counted=counted,
        scan_flops=scans,
        flops_total=counted - seen + scans,
        attention_entries=attention_entries(model, tokens),
    )


# --------------------------------------------------------------------------------- sweeps and exponents


def loglog_slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Slope of log(y) against log(x) between neighbouring points (n - 1 values): the local exponent."""
    _check_positive(xs, ys)
    return [
        (math.log(ys[i + 1]) - math.log(ys[i])) / (math.log(xs[i + 1]) - math.log(xs[i]))
        for i in range(len(xs) - 1)
    ]


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) on log(x) over all points: k in y ~ x^k."""
    _check_positive(xs, ys)
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        raise ValueError("fit_exponent needs at least two distinct x values")
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx


def _check_positive(xs: Sequence[float], ys: Sequence[float]) -> None:
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two equally long sequences of >= 2 points; got {len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("log-log slopes need positive values")


def cost_sweep(
    models: dict[str, Callable[[], nn.Module]],
    resolutions: Sequence[int] = (224, 384, 512, 1024),
    patch_size: int = 16,
    batch: int = 1,
    repeats: int = 3,
    device: torch.device = torch.device("cpu"),  # noqa: B008 (an immutable default)
    progress: Callable[[str], None] | None = None,
) -> list[CostPoint]:
    """Build each model once and measure it at every resolution; points in (model, resolution) order.

    One model instance serves all resolutions: ViT resamples its position grid to the token grid itself,
    MambaHybrid needs nothing. Each model is freed before the next is built.
    """
    points = []
    for name, factory in models.items():
        model = factory().to(device).eval()
        for resolution in resolutions:
            point = measure_cost(name, model, resolution, patch_size, batch, repeats, device=device)
            points.append(point)
            if progress is not None:
                progress(
                    f"cost {name} {resolution}px ({point.tokens} tokens): {point.latency_ms:.1f} ms, "
                    f"{point.peak_memory_mb:.1f} MiB, {point.flops_total / 1e9:.2f} GFLOP"
                )
        del model
    return points


def default_cost_models(
    dim: int,
    depth: int,
    heads: int,
    num_classes: int = 8,
    in_channels: int = 4,
    patch_size: int = 16,
    image_size: int = 224,
) -> dict[str, Callable[[], nn.Module]]:
    """Factories for "vit", "mamba_hybrid" and "mamba" (attn_layers=0) at one common width and depth.

    The hybrid puts max(1, depth // 4) attention blocks after its Mamba blocks (the registry's tiny size
    is 1 in 4; MambaVision also uses a minority of attention blocks, last), but always keeps one Mamba block.
    `image_size` is ViT's training grid; other resolutions resample its position embedding.
    """
    if depth < 2:
        raise ValueError(f"depth must be >= 2 so the hybrid has both block kinds; got {depth}")
    common = {"dim": dim, "depth": depth, "heads": heads, "patch_size": patch_size}
    common |= {"num_classes": num_classes, "in_channels": in_channels}
    hybrid_attn = min(max(1, depth // 4), depth - 1)

    def vit() -> nn.Module:
        return build("vit", image_size=image_size, **common)

    def mamba_hybrid() -> nn.Module:
        return build("mamba_hybrid", attn_layers=hybrid_attn, **common)

    def mamba() -> nn.Module:
        return build("mamba_hybrid", attn_layers=0, **common)

    return {"vit": vit, "mamba_hybrid": mamba_hybrid, "mamba": mamba}
