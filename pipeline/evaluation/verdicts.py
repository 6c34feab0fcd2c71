"""Verdict rules: one pure function per claim, from typed evidence to `holds`, `does not hold` or
`inconclusive`, with the rule in words and what would change the verdict.

A verdict is only worth printing if it could have come out otherwise (SPEC, "What makes a verdict"), so
every rule compares an effect's interval with a threshold stated here, not in prose elsewhere:
  - `holds` when the whole interval lies beyond the threshold, in the claim's direction;
  - `does not hold` when the whole interval lies within the equivalence margin of no effect;
  - `inconclusive` otherwise, or when a model the rule needs did not learn its task (the adequacy gate).

Accuracy effects arrive in fraction units (as the evaluation measures them) and are judged and reported in
percentage points. Pure: dataclasses in, dataclasses out; no I/O and no torch, ray, mlflow or dvc, so the
rules can be unit-tested for every outcome.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from perception.evaluation.intervals import Estimate

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive"
OUTCOMES = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)

POINTS = 100.0  # fraction -> percentage points

# The adequacy gate: a model may decide only if its in-distribution accuracy is at least halfway from
# chance to 100%. Judged on the point estimate: the gate asks whether the model learned its task at all,
# not whether it beat the floor significantly.
FLOOR_FRACTION = 0.5

# Claim 1, points, on the proximity task (two classes, chance 50%). Row-major and the random permutation must
# each fall more than 5 points below the best locality-preserving scan (snake, Hilbert or cross-scan): a
# loss a user would notice, beyond the seed-to-seed spread of a small model on 500 test images.
SERIALISATION_THRESHOLD = 5.0
SERIALISATION_MARGIN = 2.0  # every order within +/-2 points of the best: serialisation does not matter here
# The best scan must learn the task (a stricter floor than the general gate's 75% for two classes): a task
# nothing learns cannot show that an order breaks it.
SERIALISATION_BEST_FLOOR = 0.85
LOCALITY_PRESERVING = ("snake", "hilbert", "cross")  # the orders the best is chosen from
SERIALISATION_CONTROLS = ("rowmajor", "random")  # must each lose to the best for the claim to hold

# Claim 2, points, on test set (b) (a larger canvas at the training pixel scale: new grid positions only).
# "Do not transfer" means a loss a user would notice: the learned table without help must lose 5 points more
# than the structural encodings (fixed sin-cos, RoPE, none, and the Mamba models), the weakest of them.
POSITION_THRESHOLD = 5.0
POSITION_MARGIN = 2.0  # within +/-2 points of the structural ones: it transfers as well

# Claim 3, exponent units of cost ~ tokens^k. Quadratic against linear is a gap of 1 asymptotically; at the
# study's token counts the O(N d^2) projections still weigh on ViT, so a third of that gap is required.
COST_GAP_THRESHOLD = 0.3
COST_GAP_MARGIN = 0.1  # exponents within 0.1 of each other: the same scaling, within timing noise
COST_LINEAR_CEILING = 1.3  # "linear": pure Mamba's latency exponent interval must lie below this
MEMORY_SUPERLINEAR = 1.2  # context only: a memory exponent whose lower end exceeds this grows superlinearly
# The busy gate, beside the adequacy gate: timings decide only if, while any fitted row was timed, other
# processes used at most a fifth of the machine's CPU time (a quiet machine shows a few percent; a second
# job on a laptop's cores, half or more), and no other process was on the GPU. Timings alternate the models
# in short blocks, so load that hits them alike cancels; load this heavy does not hit them alike.
BUSY_CPU_THRESHOLD = 0.2

# Claim 4, points. "Fail to generalise" is a large loss: the weakest un-augmented baseline must lose 10
# points more than e3nn under SO(3) rotations.
ROTATION_THRESHOLD = 10.0
ROTATION_MARGIN = 3.0  # baselines within +/-3 points of e3nn's drop: they fare no worse
EQUIVARIANT_DROP_MARGIN = 3.0  # "generalises by construction": each e3nn drop within +/-3 points of none

TITLES = {
    1: "Flattening a 2D image into a 1D sequence breaks spatial proximity",
    2: "Learned position embeddings do not transfer across resolutions",
    3: "Attention is quadratic in tokens; SSMs are linear",
    4: "Models without 3D structure fail under 3D rotations; equivariant ones do not",
}
# claim -> (threshold, margin, unit of the effect): for verdicts that have no evidence to judge.
_SCALES = {
    1: (SERIALISATION_THRESHOLD, SERIALISATION_MARGIN, "points"),
    2: (POSITION_THRESHOLD, POSITION_MARGIN, "points"),
    3: (COST_GAP_THRESHOLD, COST_GAP_MARGIN, ""),
    4: (ROTATION_THRESHOLD, ROTATION_MARGIN, "points"),
}

_UNMEASURED = Estimate(math.nan, math.nan, math.nan)  # a model the rule needs but the evaluation lacks

GATE_RULE = (
    "Only models whose in-distribution accuracy (point estimate) is at least halfway from chance to 100% "
    "may decide; if any model the rule needs is below that floor, the verdict is inconclusive."
)


# ------------------------------------------------------------------------------------------ the evidence


@dataclass(frozen=True)
class ModelFit:
    """Adequacy input for one model variant, pooled over its seeds."""

    name: str
    accuracy: Estimate  # in-distribution test accuracy, fraction 0..1
    chance: float  # 1 / num_classes
    required: float | None = None  # a rule's own floor, replacing the general one (claim 1's best scan)

    @property
    def floor(self) -> float:
        if self.required is not None:
            return self.required
        return self.chance + FLOOR_FRACTION * (1.0 - self.chance)

    @property
    def adequate(self) -> bool:
        return self.accuracy.value >= self.floor  # False for NaN: an unmeasured model cannot decide


@dataclass(frozen=True)
class SerialisationEvidence:
    """Claim 1: pure Mamba per scan order on the proximity task, against the best locality-keeping order."""

    models: tuple[ModelFit, ...]  # every proximity variant (orders and the attention reference)
    best_order: str  # the best of LOCALITY_PRESERVING on the point estimate
    effects: dict[str, Estimate]  # order -> accuracy(best order) - accuracy(order), paired, fraction
    accuracies: dict[str, Estimate] = field(default_factory=dict)  # order -> accuracy, fraction
    locality: dict[str, Any] = field(default_factory=dict)  # order -> locality statistic: context only
    reference: str = ""  # the attention model on the same task: context only
    reference_accuracy: Estimate | None = None
    # "<order>, horizontal" / "<order>, vertical" -> accuracy on the images whose segments lie along that
    # axis: context, a check that the task measures 2D proximity (row-major keeps horizontal neighbours only)
    by_orientation: dict[str, Estimate] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolutionEvidence:
    """Claim 2: accuracy drops on test set (b), a larger canvas at the training pixel scale.

    A drop is accuracy on the training distribution minus accuracy on (b), the object at the centre and in
    the far corner averaged per test instance, at the largest test canvas."""

    models: tuple[ModelFit, ...]  # the unhelped learned table and every structural variant
    effect: Estimate | None  # drop(unhelped) - drop(weakest structural), paired, fraction
    unhelped: str  # ViT with the learned table at its own positions (pos_embed learned_fixed)
    weakest_structural: str  # the structural variant with the largest drop (point estimate)
    train_canvas: int
    canvas: int
    drops: dict[str, Estimate] = field(default_factory=dict)  # every shape-image variant's (b) drop
    # Context, never decides: the usual fix (bicubic resampling of the table), against the same variant.
    resampled: str = ""
    resampled_effect: Estimate | None = None


@dataclass(frozen=True)
class CostEvidence:
    """Claim 3: fitted log-log exponents of latency and peak memory against tokens (no trained models)."""

    latency_exponent_gap: Estimate | None  # ViT latency exponent - pure Mamba's, upper token range
    vit_latency_exponent: Estimate | None
    mamba_latency_exponent: Estimate | None
    memory_exponents: dict[str, Estimate] = field(default_factory=dict)  # e.g. vit_fused, vit_explicit
    crossover_tokens: int | None = None  # context: tokens from which pure Mamba is faster than ViT
    # The busiest the machine was while the fitted rows were timed (None: not measured).
    others_cpu: float | None = None  # other processes' share of the machine's CPU time, 0..1
    busiest_row: str = ""  # which row that was, e.g. "mamba at 4096 tokens"
    gpu_other_processes: int | None = None  # other processes on the GPU (NVML); None where unknown


@dataclass(frozen=True)
class RotationEvidence:
    """Claim 4: accuracy drops from no rotation to SO(3) rotations, per un-augmented model."""

    models: tuple[ModelFit, ...]  # point models, unrotated (in-distribution) accuracy
    baseline_drops: dict[str, Estimate]  # un-augmented non-equivariant models: acc(none) - acc(so3)
    equivariant_drops: dict[str, Estimate]  # the same for e3nn
    effect: Estimate | None  # smallest baseline drop (by value) - e3nn drop, paired, fraction
    # Context, never decides: e3nn's unrotated accuracy - the best un-augmented baseline's, paired, fraction
    # (an equivariant model far below the baselines would make the comparison a strawman's).
    equivariant_gap: Estimate | None = None
    best_baseline: str = ""
    # Context, never decides: e3nn's accuracy under SO(3) - the best SO(3)-augmented baseline's, paired,
    # fraction: the baselines' answer to rotation, trained for every pose, without the canonical pose's help.
    augmented_gap: Estimate | None = None
    best_augmented: str = ""


# ------------------------------------------------------------------------------------------ the verdict


@dataclass(frozen=True)
class Verdict:
    claim: int
    title: str
    verdict: str  # one of OUTCOMES
    rule: str  # the rule in words, with its thresholds' numbers
    effect: Estimate | None  # the effect judged; accuracy effects in percentage points
    effect_name: str
    threshold: float
    margin: float
    models_used: tuple[str, ...]
    excluded: tuple[str, ...]  # e.g. "vit (41.2% < floor 55.0%)"
    would_change: str  # which result would change the verdict, with numbers
    measured: tuple[str, ...] = ()  # context lines
    unit: str = "points"  # of effect, threshold and margin; "" for exponents

    def as_dict(self) -> dict[str, Any]:
        """For reports/verdicts.json."""
        return {
            "claim": self.claim,
            "title": self.title,
            "verdict": self.verdict,
            "rule": self.rule,
            "effect_name": self.effect_name,
            "effect": None if self.effect is None else self.effect.value,
            "interval": None if self.effect is None else [self.effect.lo, self.effect.hi],
            "unit": self.unit,
            "threshold": self.threshold,
            "margin": self.margin,
            "models_used": list(self.models_used),
            "excluded": list(self.excluded),
            "would_change": self.would_change,
            "measured": list(self.measured),
        }


def render_effect(v: Verdict) -> str:
    """E.g. "+7.3 points [4.1, 10.2]"; exponents with two decimals and no unit."""
    return _estimate_text(v.effect, v.unit, sign=True)


# ------------------------------------------------------------------------------------------ the rules


def judge(effect: Estimate, threshold: float, margin: float) -> str:
    """One effect against its threshold; a positive effect supports the claim.

    holds: lo > threshold; does not hold: -margin <= lo and hi <= margin; inconclusive otherwise (also for a
    NaN interval, which compares false both ways)."""
    if not 0.0 <= margin <= threshold:
        raise ValueError(f"need 0 <= margin <= threshold, got margin={margin}, threshold={threshold}")
    if effect.lo > threshold:
        return HOLDS
    if within(effect, margin):
        return DOES_NOT_HOLD
    return INCONCLUSIVE


def within(effect: Estimate, margin: float) -> bool:
    """Whether the whole interval lies within +/-margin of no effect."""
    return -margin <= effect.lo and effect.hi <= margin


def combine(outcomes: Iterable[str]) -> str:
    """A claim that needs several effects: it holds when every one holds, does not hold when any one does
    not, and is inconclusive otherwise."""
    outcomes = list(outcomes)
    if outcomes and all(o == HOLDS for o in outcomes):
        return HOLDS
    if DOES_NOT_HOLD in outcomes:
        return DOES_NOT_HOLD
    return INCONCLUSIVE


def gate(models: Sequence[ModelFit]) -> tuple[list[str], list[str]]:
    """(names of the models that may decide, descriptions of those that may not, with accuracy and floor)."""
    used = [m.name for m in models if m.adequate]
    excluded = [_excluded(m) for m in models if not m.adequate]
    return used, excluded


def no_evidence(claim: int, title: str, reason: str) -> Verdict:
    """The verdict of a claim whose effect the evaluation did not measure: inconclusive, saying why."""
    threshold, margin, unit = _SCALES[claim]
    return Verdict(
        claim=claim,
        title=title,
        verdict=INCONCLUSIVE,
        rule=f"No rule could be applied: {reason}.",
        effect=None,
        effect_name="not measured",
        threshold=threshold,
        margin=margin,
        models_used=(),
        excluded=(),
        would_change="Measuring the claim's effect (train and evaluate the models this claim compares).",
        unit=unit,
    )


def claim_serialisation(ev: SerialisationEvidence) -> Verdict:
    """Claim 1: on a task whose label depends on 2D adjacency, row-major order and a random permutation
    both lose to the best locality-preserving scan; only the best scan is gated, with its own floor."""
    t, m, floor = SERIALISATION_THRESHOLD, SERIALISATION_MARGIN, SERIALISATION_BEST_FLOOR
    effects = {order: _points(e) for order, e in ev.effects.items()}
    best = ev.best_order
    rule = (
        "On the proximity task (the label depends on which pixels are 2D neighbours): holds when the whole "
        f"interval of accuracy({best}, the best of {', '.join(LOCALITY_PRESERVING)}) - accuracy(order) lies "
        f"above +{t:g} points for both row-major and the random permutation; does not hold when that "
        f"difference lies within +/-{m:g} points for every order; inconclusive otherwise. The best scan must "
        f"learn the task (accuracy at least {100 * floor:g}%); row-major and the permutation are not gated "
        "(falling short is what the rule measures). Locality statistics are properties of the orders by "
        "construction, and the attention model is a reference: context, never decide."
    )
    controls = [o for o in SERIALISATION_CONTROLS if o in effects]
    if len(controls) < len(SERIALISATION_CONTROLS):
        outcome, would_change = INCONCLUSIVE, "Train pure Mamba in row-major and random order as well."
    else:
        outcomes = [judge(effects[o], t, m) for o in controls]
        if all(o == HOLDS for o in outcomes):
            outcome = HOLDS
        elif all(within(e, m) for e in effects.values()):
            outcome = DOES_NOT_HOLD
        else:
            outcome = INCONCLUSIVE
        weakest = min(controls, key=lambda o: effects[o].lo)
        would_change = _would_change(outcome, effects[weakest], t, m, "points", label=f"the {weakest} effect")
    best_fit = next((f for f in ev.models if f.name.endswith(f"-{best}") or f.name == best), None)
    gated = () if best_fit is None else (dataclasses.replace(best_fit, required=floor),)
    measured = [f"best locality-preserving order (chosen on the point estimate): {best}"]
    measured += [
        f"accuracy({best}) - accuracy({order}): {_estimate_text(e, 'points')}" for order, e in effects.items()
    ]
    measured += [f"accuracy, {order}: {_pct_estimate(a)}" for order, a in ev.accuracies.items()]
    if ev.reference and ev.reference_accuracy is not None:
        measured.append(
            f"attention reference ({ev.reference}, context): {_pct_estimate(ev.reference_accuracy)}"
        )
    if ev.by_orientation:
        measured.append(
            "accuracy by segment axis (context: row-major keeps horizontal neighbours together, not vertical "
            "ones): " + "; ".join(f"{k} {_pct_estimate(e)}" for k, e in ev.by_orientation.items())
        )
    if ev.locality:
        measured.append(
            "locality of each order, the fraction of 2D-neighbour pairs within one conv1d window in the "
            "sequence (context, never decides): "
            + "; ".join(f"{order}: {_context(value)}" for order, value in ev.locality.items())
        )
    return _verdict(
        claim=1,
        rule=rule,
        outcome=outcome,
        effect=effects.get("rowmajor"),
        effect_name=f"accuracy({best}) - accuracy(row-major), points (and against the random permutation)",
        threshold=t,
        margin=m,
        gated=gated,
        would_change=would_change,
        measured=measured,
    )


def claim_position_embedding(ev: ResolutionEvidence) -> Verdict:
    """Claim 2: on a larger canvas at the training pixel scale (new grid positions only), ViT's learned
    table at its own positions loses more accuracy than every structural position encoding."""
    t, m = POSITION_THRESHOLD, POSITION_MARGIN
    effect = _points(ev.effect)
    canvas = f"{ev.train_canvas} px -> {ev.canvas} px canvas, object at its training pixel size"
    rule = (
        f"Test set (b), {canvas} (centre and far corner averaged per instance). Holds when the whole "
        f"interval of drop({ev.unhelped}, the learned table without help) - drop({ev.weakest_structural}, "
        "the structural variant that drops most: sin-cos, RoPE, none, Mamba) lies above "
        f"+{t:g} points; does not hold when it lies within +/-{m:g} points; inconclusive otherwise. The "
        f"resampled table is reported beside it, never decides. {GATE_RULE}"
    )
    outcome = judge(effect, t, m) if effect is not None else INCONCLUSIVE
    measured = [f"(b) drop, {name}: {_estimate_text(_points(d), 'points')}" for name, d in ev.drops.items()]
    if ev.resampled and ev.resampled_effect is not None:
        measured.append(
            f"the usual fix, {ev.resampled} (bicubic resampling): drop - drop({ev.weakest_structural}) = "
            f"{_estimate_text(_points(ev.resampled_effect), 'points')} (context, never decides)"
        )
    return _verdict(
        claim=2,
        rule=rule,
        outcome=outcome,
        effect=effect,
        effect_name=f"(b) accuracy drop: {ev.unhelped} - {ev.weakest_structural}, points",
        threshold=t,
        margin=m,
        gated=ev.models,
        would_change=_would_change(outcome, effect, t, m, "points"),
        measured=measured + _accuracies(ev.models),
    )


def busy(ev: CostEvidence) -> str | None:
    """Why the timings cannot decide (the machine was busy while they ran), or None."""
    reasons = []
    if ev.others_cpu is not None and ev.others_cpu > BUSY_CPU_THRESHOLD:
        reasons.append(
            f"other processes used {ev.others_cpu:.0%} of the CPUs while {ev.busiest_row} was timed, "
            f"above {BUSY_CPU_THRESHOLD:.0%}"
        )
    if ev.gpu_other_processes:
        reasons.append(f"{ev.gpu_other_processes} other process(es) were on the GPU")
    return f"the machine was busy during timing ({'; '.join(reasons)})" if reasons else None


def claim_cost(ev: CostEvidence) -> Verdict:
    """Claim 3: ViT's latency grows faster with tokens than pure Mamba's, and Mamba's is about linear.

    No trained model decides it, so there is no adequacy gate; the busy gate stands in its place: timings
    taken while other processes loaded the machine decide nothing. Memory exponents are context."""
    t, m, ceiling = COST_GAP_THRESHOLD, COST_GAP_MARGIN, COST_LINEAR_CEILING
    gap, mamba = ev.latency_exponent_gap, ev.mamba_latency_exponent
    rule = (
        "Holds when the whole interval of the latency exponent gap (ViT - pure Mamba, log-log slope over "
        f"the upper token range) lies above +{t:g} and the whole interval of pure Mamba's latency exponent "
        f"lies below {ceiling:g} (about linear); does not hold when the gap's interval lies within +/-{m:g}; "
        "inconclusive otherwise. The gap is fitted from the per-round ratios of ViT's and Mamba's block "
        "times (timed back to back, so shared load cancels), each model's exponent from the 20th percentile "
        "of its block times (added load only lengthens a block). The busy gate: if other processes used "
        f"more than {BUSY_CPU_THRESHOLD:.0%} of the CPUs while any fitted row was timed, or another process "
        "was on the GPU, the verdict is inconclusive. No trained models, so no adequacy gate; memory is "
        "context."
    )
    gap_outcome = judge(gap, t, m) if gap is not None else INCONCLUSIVE
    mamba_linear = mamba is not None and mamba.hi < ceiling
    if gap_outcome == HOLDS and not mamba_linear:
        outcome = INCONCLUSIVE
        now = "not measured" if mamba is None else f"now {mamba.hi:.2f}"
        would_change = (
            f"The gap clears +{t:g}, but pure Mamba's latency exponent is not shown to be linear: an upper "
            f"end below {ceiling:g} ({now}) would make it hold; a gap interval within +/-{m:g} would make "
            "it not hold."
        )
    else:
        outcome = gap_outcome
        would_change = _would_change(outcome, gap, t, m, "", label="the gap")
        if outcome == HOLDS and mamba is not None:  # holding needs mamba_linear, so mamba is measured
            would_change += (
                f" An upper end of pure Mamba's latency exponent at or above {ceiling:g} "
                f"(now {mamba.hi:.2f}) would also make it inconclusive."
            )
        elif not mamba_linear and gap is not None:
            now = "not measured" if mamba is None else f"now {mamba.hi:.2f}"
            would_change += f" Holding also needs pure Mamba's latency exponent below {ceiling:g} ({now})."
    measured = [
        f"latency exponent, ViT: {_estimate_text(ev.vit_latency_exponent, '')}; "
        f"pure Mamba: {_estimate_text(mamba, '')}"
    ]
    measured += _memory_lines(ev.memory_exponents)
    measured.append(
        f"latency crossover (pure Mamba faster from): {ev.crossover_tokens} tokens"
        if ev.crossover_tokens is not None
        else "latency crossover: none within the measured token range"
    )
    if ev.others_cpu is not None:
        gpu = "" if ev.gpu_other_processes is None else f"; other GPU processes: {ev.gpu_other_processes}"
        measured.append(
            f"contention: other processes used at most {ev.others_cpu:.1%} of the CPUs while a fitted row "
            f"was timed ({ev.busiest_row}; the busy gate's threshold is {BUSY_CPU_THRESHOLD:.0%}){gpu}"
        )
    reason = busy(ev)
    if reason is not None:
        # The rule never hands down an effect it could not measure: an effect timed on a busy machine is
        # reported, but decides nothing.
        outcome = INCONCLUSIVE
        would_change = f"Timing on a quiet machine: {reason}."
    verdict = _verdict(
        claim=3,
        rule=rule,
        outcome=outcome,
        effect=gap,
        effect_name="latency exponent: ViT - pure Mamba (log-log slope over the upper token range)",
        threshold=t,
        margin=m,
        gated=(),
        would_change=would_change,
        measured=measured,
        unit="",
    )
    return verdict if reason is None else dataclasses.replace(verdict, excluded=(f"timings: {reason}",))


def claim_rotation(ev: RotationEvidence) -> Verdict:
    """Claim 4: un-augmented baselines lose far more accuracy under SO(3) than e3nn, which loses ~none.

    Only the un-augmented baselines and e3nn are gated; models trained with rotation augmentation are
    context (the claim is about models without 3D structure, not about augmentation)."""
    t, m, e3nn_margin = ROTATION_THRESHOLD, ROTATION_MARGIN, EQUIVARIANT_DROP_MARGIN
    effect = _points(ev.effect)
    drops = {name: _points(d) for name, d in ev.baseline_drops.items()}
    e3nn_drops = {name: _points(d) for name, d in ev.equivariant_drops.items()}
    weakest = min(drops, key=lambda name: drops[name].value) if drops else "none measured"
    rule = (
        f"Holds when the whole interval of (smallest un-augmented baseline drop) - (e3nn drop), drops being "
        f"accuracy without rotation minus under SO(3), lies above +{t:g} points and every e3nn drop's "
        f"interval lies within +/-{e3nn_margin:g} points; does not hold when the effect's interval lies "
        f"within +/-{m:g} points (the baselines fare no worse than e3nn); inconclusive otherwise. {GATE_RULE}"
    )
    effect_outcome = judge(effect, t, m) if effect is not None else INCONCLUSIVE
    stable = [name for name, d in e3nn_drops.items() if within(d, e3nn_margin)]
    e3nn_stable = bool(e3nn_drops) and len(stable) == len(e3nn_drops)
    unstable = ", ".join(
        f"{n} {_estimate_text(d, 'points')}" for n, d in e3nn_drops.items() if n not in stable
    )
    if effect_outcome == HOLDS and not e3nn_stable:
        outcome = INCONCLUSIVE
        would_change = (
            f"The baselines lose more than e3nn, but e3nn's own drop is not shown to be within "
            f"+/-{e3nn_margin:g} points ({unstable or 'not measured'}): such an interval would make it hold."
        )
    else:
        outcome = effect_outcome
        would_change = _would_change(outcome, effect, t, m, "points")
        if outcome == HOLDS:
            would_change += (
                f" An e3nn drop interval reaching beyond +/-{e3nn_margin:g} points would also make it "
                "inconclusive."
            )
        elif unstable:
            would_change += (
                f" Holding also needs every e3nn drop within +/-{e3nn_margin:g} points ({unstable})."
            )

    e3nn_names = " / ".join(e3nn_drops) or "e3nn"
    fits = {f.name: f for f in ev.models}
    needed = [*drops, *e3nn_drops]
    gated = tuple(fits.get(name, ModelFit(name, _UNMEASURED, math.nan)) for name in needed)
    measured = [f"SO(3) drop, {n} (un-augmented): {_estimate_text(d, 'points')}" for n, d in drops.items()]
    measured += [
        f"SO(3) drop, {n} (equivariant): {_estimate_text(d, 'points')}" for n, d in e3nn_drops.items()
    ]
    if ev.equivariant_gap is not None:
        measured.append(
            f"unrotated accuracy, {e3nn_names} - {ev.best_baseline} (the best un-augmented baseline; "
            f"context, never decides): {_estimate_text(_points(ev.equivariant_gap), 'points')}"
        )
    if ev.augmented_gap is not None:
        measured.append(
            f"under SO(3), {e3nn_names} - {ev.best_augmented} (the best baseline trained with SO(3) "
            f"augmentation; context, never decides): {_estimate_text(_points(ev.augmented_gap), 'points')}"
        )
    measured += _accuracies(gated)
    context = [f for f in ev.models if f.name not in needed]
    if context:
        measured.append(
            "context only, not gated (trained with rotation augmentation): "
            + ", ".join(f"{f.name} {_pct(f.accuracy.value)}" for f in context)
        )
    return _verdict(
        claim=4,
        rule=rule,
        outcome=outcome,
        effect=effect,
        effect_name=f"SO(3) accuracy drop: {weakest} (smallest un-augmented baseline) - {e3nn_names}, points",
        threshold=t,
        margin=m,
        gated=gated,
        would_change=would_change,
        measured=measured,
    )


# ------------------------------------------------------------------------------------------ helpers


def _verdict(
    *,
    claim: int,
    rule: str,
    outcome: str,
    effect: Estimate | None,
    effect_name: str,
    threshold: float,
    margin: float,
    gated: Sequence[ModelFit],
    would_change: str,
    measured: Sequence[str],
    unit: str = "points",
) -> Verdict:
    """The rule's outcome, overruled by the adequacy gate: an undertrained model makes it inconclusive."""
    used, excluded = gate(gated)
    if excluded:
        failing = [f for f in gated if not f.adequate]
        outcome = INCONCLUSIVE
        would_change = (
            "Train "
            + ", ".join(f"{f.name} (now {_pct(f.accuracy.value)})" for f in failing)
            + " until in-distribution accuracy reaches the floor ("
            + ", ".join(f"{_pct(f.floor)} for {f.name}" for f in failing)
            + f"); the rule then judges the effect (now {_estimate_text(effect, unit)})."
        )
    return Verdict(
        claim=claim,
        title=TITLES[claim],
        verdict=outcome,
        rule=rule,
        effect=effect,
        effect_name=effect_name,
        threshold=threshold,
        margin=margin,
        models_used=tuple(used),
        excluded=tuple(excluded),
        would_change=would_change,
        measured=tuple(measured),
        unit=unit,
    )


def _would_change(
    outcome: str,
    effect: Estimate | None,
    threshold: float,
    margin: float,
    unit: str,
    label: str = "the effect",
) -> str:
    """Which interval would move a single-effect verdict, with the numbers now."""
    u = f" {unit}" if unit else ""
    up, band = f"+{_num(threshold, unit)}{u}", f"+/-{_num(margin, unit)}{u}"
    if effect is None:
        return f"Measuring {label} (it was not measured)."
    now = f"now [{_interval(effect, unit)}]"
    if outcome == HOLDS:
        return (
            f"A lower end of {label} at or below {up} (now {_num(effect.lo, unit, sign=True)}) would make it "
            f"inconclusive; an interval within {band} would make it not hold."
        )
    if outcome == DOES_NOT_HOLD:
        return (
            f"An interval of {label} reaching beyond {band} ({now}) would make it inconclusive; a lower end "
            f"above {up} would make it hold."
        )
    reversed_note = ""
    if effect.hi < -margin:
        reversed_note = (
            f"The whole interval lies below -{_num(margin, unit)}{u}: {label} runs against the claim, beyond "
            "the margin; the rule reserves 'does not hold' for no effect, so a reversal is inconclusive. "
        )
    return (
        reversed_note
        + f"A lower end of {label} above {up} (now {_num(effect.lo, unit, sign=True)}) would make it hold; "
        f"an interval within {band} ({now}) would make it not hold. "
        + (
            "Longer timing (evaluate.cost_min_run_time) or a quieter machine narrows the interval."
            if label == "the gap"
            else "More seeds or test samples narrow the interval."
        )
    )


@overload
def _points(effect: Estimate) -> Estimate: ...
@overload
def _points(effect: None) -> None: ...
def _points(effect: Estimate | None) -> Estimate | None:
    return None if effect is None else effect.scaled(POINTS)


def _num(x: float, unit: str, sign: bool = False) -> str:
    digits = 1 if unit == "points" else 2
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _interval(e: Estimate, unit: str) -> str:
    return f"{_num(e.lo, unit)}, {_num(e.hi, unit)}"


def _estimate_text(e: Estimate | None, unit: str, sign: bool | None = None) -> str:
    """E.g. "+7.3 points [4.1, 10.2]", "1.05 [1.00, 1.10]" (an exponent: unsigned), "not measured"."""
    if e is None:
        return "not measured"
    points = unit == "points"
    value = _num(e.value, unit, sign=points if sign is None else sign)
    return f"{value}{' points' if points else ''} [{_interval(e, unit)}]"


def _pct(x: float) -> str:
    return "not measured" if math.isnan(x) else f"{100 * x:.1f}%"


def _pct_estimate(e: Estimate) -> str:
    """E.g. "93.2% [90.1, 95.6]"."""
    return f"{_pct(e.value)} [{100 * e.lo:.1f}, {100 * e.hi:.1f}]"


def _excluded(m: ModelFit) -> str:
    if math.isnan(m.accuracy.value):
        return f"{m.name} (no in-distribution accuracy measured)"
    return f"{m.name} ({_pct(m.accuracy.value)} < floor {_pct(m.floor)})"


def _accuracies(models: Sequence[ModelFit]) -> list[str]:
    return [
        f"{f.name}: in-distribution accuracy {_pct(f.accuracy.value)} "
        f"[{100 * f.accuracy.lo:.1f}, {100 * f.accuracy.hi:.1f}], floor {_pct(f.floor)}"
        for f in models
        if not math.isnan(f.accuracy.value)
    ]


def _context(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_context(v)}" for k, v in value.items())
    return str(value)


def _memory_lines(exponents: dict[str, Estimate]) -> list[str]:
    """Which path's peak memory grows superlinearly (lower end above MEMORY_SUPERLINEAR), which ~linearly."""
    lines = []
    for name, e in exponents.items():
        if e.lo > MEMORY_SUPERLINEAR:
            growth = f"grows superlinearly (lower end above {MEMORY_SUPERLINEAR:g})"
        elif e.hi <= MEMORY_SUPERLINEAR:
            growth = f"stays about linear (upper end at or below {MEMORY_SUPERLINEAR:g})"
        else:
            growth = f"neither clearly (interval straddles {MEMORY_SUPERLINEAR:g})"
        lines.append(
            f"peak memory exponent, {name}: {_estimate_text(e, '')}: {growth} (context, never decides)"
        )
    return lines
