"""The evaluation's numbers shaped for DVC: headline metrics for `dvc metrics`, long tables for `dvc plots`.

Pure: a `pipeline.evaluation.results.Results` in, plain dicts and rows out (every number with its interval, no
NaN: JSON has none); `write_csv` writes one plot table.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from perception.evaluation.intervals import Estimate
from pipeline.evaluation.decision import DECISION_TASKS, candidates, pareto_front
from pipeline.evaluation.results import Exponent, Results


def _with_interval(name: str, estimate: Estimate | Exponent) -> dict[str, float | None]:
    """`name`, `name_lo`, `name_hi` from an estimate (no NaN: JSON has none)."""

    def clean(x: float | None) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)

    return {
        name: clean(estimate.value),
        f"{name}_lo": clean(estimate.lo),
        f"{name}_hi": clean(estimate.hi),
    }


def headline_metrics(results: Results) -> dict[str, Any]:
    """The numbers `dvc metrics show` lists and `dvc metrics diff` compares; every one with its interval."""
    rotation = {
        name: {
            **{
                k: v
                for mode, estimate in r.accuracy.items()
                for k, v in _with_interval(f"accuracy_{mode}", estimate).items()
            },
            "invariance_error_float64": float(f"{r.invariance_error_float64:.3e}"),
        }
        for name, r in results.rotation.items()
    }
    resolution = {
        name: {
            **{
                k: v
                for test_set, estimate in r.accuracy.items()
                for k, v in _with_interval(f"accuracy_{test_set}", estimate).items()
            },
            **{
                k: v
                for canvas, parts in r.drops.items()
                for part, estimate in parts
                for k, v in _with_interval(f"drop_{part}_{canvas}", estimate).items()
            },
        }
        for name, r in results.resolution.items()
    }
    serialisation = {
        name: _with_interval("accuracy", r.accuracy) for name, r in results.serialisation.models.items()
    }
    cost = {
        model: {
            k: v
            for key, exponent in fits
            if isinstance(exponent, Exponent)
            for k, v in _with_interval(f"{key}_exponent", exponent).items()
        }
        for model, fits in results.cost.fits.items()
    }
    evidence = results.evidence
    judged = {"position_embedding": evidence.position_embedding, "rotation": evidence.rotation}
    effects = {
        claim: _with_interval("effect", e.effect)
        for claim, e in judged.items()
        if e is not None and e.effect is not None
    }
    gap = evidence.rotation.equivariant_gap
    if gap is not None:  # context: e3nn unrotated - the best un-augmented baseline
        effects.setdefault("rotation", {}).update(_with_interval("equivariant_gap", gap))
    augmented_gap = evidence.rotation.augmented_gap
    if augmented_gap is not None:  # context: e3nn under SO(3) - the best SO(3)-augmented baseline there
        effects.setdefault("rotation", {}).update(_with_interval("augmented_gap", augmented_gap))
    orders, position = evidence.serialisation, evidence.position_embedding
    named = {
        ("serialisation", "effects"): orders.effects if orders else {},
        ("position_embedding", "drops"): position.drops if position else {},
    }
    for (claim, key), estimates in named.items():
        for name, estimate in estimates.items():
            effects.setdefault(claim, {}).update(_with_interval(f"{key}.{name}", estimate))
    deployment = {
        name: {
            "latency_ms": round(row.latency_ms, 4),
            "latency_ms_lo": round(row.latency_ms_lo, 4),
            "latency_ms_hi": round(row.latency_ms_hi, 4),
            "throughput_per_s": round(row.throughput_per_s, 1),
            "peak_memory_mb": round(row.peak_memory_mb, 3),
            "parameters": row.parameters,
        }
        for name, row in results.deployment.models.items()
    }
    return {
        "rotation": rotation,
        "resolution": resolution,
        "serialisation": serialisation,
        "cost": cost,
        "deployment": deployment,
        "effects": effects,
    }


def plot_tables(results: Results) -> dict[str, list[dict[str, Any]]]:
    """Long-format rows for `dvc plots` (one CSV per plot), each y with its interval (`_lo`, `_hi`)."""
    by_angle = []
    for name, r in results.rotation.items():
        for mode in ("z", "so3"):
            for b in r.angle_bins[mode]:
                if b.value is not None:
                    centre = (b.low_deg + b.high_deg) / 2
                    by_angle.append(
                        {
                            "model": f"{name} ({mode})",
                            "angle_deg": centre,
                            "accuracy": b.value,
                            "accuracy_lo": b.lo,
                            "accuracy_hi": b.hi,
                        }
                    )
    by_scale = []
    canvas = results.canvas
    train_res = canvas.train_resolution
    for name, row in results.resolution.items():
        for kind in ("fov", "centre", "corner", "scaled"):
            points = [(1.0, row.accuracy["in"])] + [
                (c / train_res, row.accuracy[f"{kind}_{c}"]) for c in canvas.canvases
            ]
            for scale, acc in points:
                by_scale.append(
                    {
                        "model": f"{name} ({kind})",
                        "scale": scale,
                        "accuracy": acc.value,
                        "accuracy_lo": acc.lo,
                        "accuracy_hi": acc.hi,
                    }
                )
    by_order = [
        {
            "model": name,
            "locality": row.locality.grid_nbr_within_window_frac,
            "accuracy": row.accuracy.value,
            "accuracy_lo": row.accuracy.lo,
            "accuracy_hi": row.accuracy.hi,
        }
        for name, row in results.serialisation.models.items()
        if row.locality  # the attention reference has no order, so no locality to plot against
    ]
    by_tokens = [
        {
            "model": row.model,
            "tokens": row.tokens,
            "latency_ms": row.latency_ms,
            "latency_ms_lo": row.latency_ms_lo,
            "latency_ms_hi": row.latency_ms_hi,
            "others_cpu": row.others_cpu,
            "peak_memory_mb": row.peak_memory_mb,
            "flops_total": row.flops_total,
        }
        for row in results.cost.rows
    ]
    return {
        "accuracy_by_angle": by_angle,
        "accuracy_by_scale": by_scale,
        "accuracy_by_scan_order": by_order,
        "cost_by_tokens": by_tokens,
        "accuracy_vs_latency": tradeoff_rows(results),
    }


def tradeoff_rows(results: Results) -> list[dict[str, Any]]:
    """The trade-off as long-format rows: every trained model under every condition of its task, accuracy
    and batch-1 latency each with its interval, and whether it is on that condition's Pareto front."""
    rows = []
    for task in DECISION_TASKS:
        for condition in (c.name for c in results.deployment.conditions.get(task, [])):
            found = candidates(results, task, condition)
            front = set(pareto_front([c for c in found if c.adequate]))
            rows += [
                {
                    "model": c.name,
                    "panel": f"{task}: {condition}",
                    "latency_ms": c.latency_ms.value,
                    "latency_ms_lo": c.latency_ms.lo,
                    "latency_ms_hi": c.latency_ms.hi,
                    "accuracy": c.accuracy.value,
                    "accuracy_lo": c.accuracy.lo,
                    "accuracy_hi": c.accuracy.hi,
                    "pareto": c.name in front,
                    "learned": c.adequate,
                }
                for c in found
            ]
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
