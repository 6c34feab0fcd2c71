"""Which backbone the robot should run: the decision table's rules, from measured accuracies and latencies.

For each task and condition (points unrotated and under arbitrary rotation; shape images in distribution
and on a larger canvas), among the models that learned their task:

- **best**: the highest accuracy (point estimate; a tie goes to the faster);
- **fastest within the best's interval**: among the models whose accuracy interval overlaps the best's
  (those the measurement cannot tell from the best), the one with the lowest median latency, or the most
  accurate of those whose latency interval overlaps its (as fast, within the measurement): a latency tie
  is not broken by the microseconds that the next run reverses;
- **within the budget**: the most accurate model whose median batch-1 latency is at most
  `report.latency_budget_ms`; none when no model is that fast, and the row says what the fastest takes.

A model below the adequacy floor (`pipeline.evaluation.verdicts.ModelFit`) is never chosen; the row names it.
The Pareto front (no other model both at least as fast and at least as accurate, one of them strictly) is
marked in the trade-off figure. Pure: numbers in, choices out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from perception.evaluation.intervals import Estimate
from pipeline.evaluation.results import Decision, DecisionChoice, DecisionRecord, Results


@dataclass(frozen=True)
class Candidate:
    """One trained model under one condition: its accuracy (fraction) and batch-1 latency (ms), each with
    its interval, and whether it learned its task (the adequacy gate)."""

    name: str
    accuracy: Estimate
    latency_ms: Estimate
    adequate: bool = True


@dataclass(frozen=True)
class DecisionRow:
    task: str
    condition: str
    best: Candidate | None
    fastest_within_interval: Candidate | None
    tied_with_best: tuple[str, ...]  # every candidate whose accuracy interval overlaps the best's
    as_fast: tuple[str, ...]  # of those, every one whose latency interval overlaps the quickest's
    within_budget: Candidate | None
    budget_note: str  # why `within_budget` is what it is
    excluded: tuple[str, ...]  # did not learn the task: never chosen
    # A model more accurate than `within_budget` whose median is over the budget but whose latency
    # interval reaches it: the measurement cannot say whether it fits.
    budget_edge: str | None = None


def overlaps(a: Estimate, b: Estimate) -> bool:
    """Whether two intervals share a point."""
    return a.lo <= b.hi and b.lo <= a.hi


def _by_accuracy(c: Candidate) -> tuple[float, float, str]:
    return (-c.accuracy.value, c.latency_ms.value, c.name)  # most accurate, then faster, then by name


def _by_latency(c: Candidate) -> tuple[float, float, str]:
    return (c.latency_ms.value, -c.accuracy.value, c.name)


def decide(task: str, condition: str, candidates: Sequence[Candidate], budget_ms: float) -> DecisionRow:
    """The decision table's row for one task and condition (the rules in the module docstring)."""
    usable = [c for c in candidates if c.adequate]
    excluded = tuple(sorted(c.name for c in candidates if not c.adequate))
    if not usable:
        note = "no model learned this task" if candidates else "no model was measured"
        return DecisionRow(task, condition, None, None, (), (), None, note, excluded)
    best = min(usable, key=_by_accuracy)
    tied = [c for c in usable if overlaps(c.accuracy, best.accuracy)]
    quickest = min(tied, key=_by_latency)
    as_fast = [c for c in tied if overlaps(c.latency_ms, quickest.latency_ms)]
    fastest = min(as_fast, key=_by_accuracy)
    affordable = [c for c in usable if c.latency_ms.value <= budget_ms]
    if affordable:
        within = min(affordable, key=_by_accuracy)
        note = f"{len(affordable)} of {len(usable)} models run within {budget_ms:g} ms"
    else:
        within = None
        overall = min(usable, key=_by_latency)
        note = (
            f"no model runs within {budget_ms:g} ms here; the fastest, {overall.name}, takes "
            f"{overall.latency_ms.value:.3g} ms"
        )
    tied_names = tuple(sorted(c.name for c in tied))
    edge = [
        c
        for c in usable
        if c.latency_ms.lo <= budget_ms < c.latency_ms.value
        and (within is None or _by_accuracy(c) < _by_accuracy(within))
    ]
    budget_edge = min(edge, key=_by_accuracy).name if edge else None
    as_fast_names = tuple(sorted(c.name for c in as_fast))
    return DecisionRow(
        task, condition, best, fastest, tied_names, as_fast_names, within, note, excluded, budget_edge
    )


def dominates(o: Candidate, c: Candidate) -> bool:
    """`o` is measurably the better choice than `c`: not measurably slower nor less accurate (their
    intervals overlap, or `o` is ahead), and measurably faster or more accurate (the intervals apart).
    On the point estimates alone, models the measurement cannot tell apart would swap places on the front
    from one run to the next."""
    not_worse = o.latency_ms.lo <= c.latency_ms.hi and o.accuracy.hi >= c.accuracy.lo
    better = o.latency_ms.hi < c.latency_ms.lo or o.accuracy.lo > c.accuracy.hi
    return not_worse and better


def pareto_front(candidates: Sequence[Candidate]) -> list[str]:
    """The front, fastest first: from the most accurate down, a candidate joins unless one already on the
    front `dominates` it. Measured against the front only, because "not measurably different" does not
    chain: a model as accurate as the best within the intervals, and one as accurate as that, need not be
    as accurate as the best."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=_by_accuracy):
        if not any(dominates(o, c) for o in front):
            front.append(c)
    return [c.name for c in sorted(front, key=_by_latency)]


# ------------------------------------------------------------------------ from the evaluation's results

DECISION_TASKS = ("points", "images")  # the robot's tasks; the proximity task is claim 1's probe
# Times the trained models again, on the machine it runs on. `-s`: without it, `-f` reruns every stage
# upstream of its targets too, the data and the whole training.
RETIME_COMMAND = "dvc repro -f -s evaluate report"


def candidates(results: Results, task: str, condition: str) -> list[Candidate]:
    """Every trained variant of `task` under `condition`, from results.json's deployment table, with the
    adequacy gate of its in-distribution accuracy (`results.models`)."""
    out = []
    for name, row in results.deployment.models.items():
        if row.task != task or condition not in row.accuracy:
            continue
        fit = results.models.get(name)
        latency = Estimate(row.latency_ms, row.latency_ms_lo, row.latency_ms_hi)
        out.append(Candidate(name, row.accuracy[condition], latency, fit is not None and fit.adequate))
    return out


def _choice(c: Candidate | None) -> DecisionChoice | None:
    return None if c is None else DecisionChoice(model=c.name, accuracy=c.accuracy, latency_ms=c.latency_ms)


def decision_table(results: Results, budget_ms: float) -> Decision:
    """The decision table (`reports/decision.json`) from the evaluation's results and the frame budget."""
    table = results.deployment
    rows = []
    for task in DECISION_TASKS:
        for condition, label in ((c.name, c.label) for c in table.conditions.get(task, [])):
            found = candidates(results, task, condition)
            row = decide(task, condition, found, budget_ms)
            rows.append(
                DecisionRecord(
                    task=task,
                    condition=condition,
                    label=label,
                    best=_choice(row.best),
                    fastest_within_interval=_choice(row.fastest_within_interval),
                    tied_with_best=list(row.tied_with_best),
                    as_fast=list(row.as_fast),
                    within_budget=_choice(row.within_budget),
                    budget_note=row.budget_note,
                    budget_edge=row.budget_edge,
                    excluded=list(row.excluded),
                    pareto_front=pareto_front([c for c in found if c.adequate]),
                )
            )
    ref, ref_lo, ref_hi = table.reference_ms
    caveat = (
        f"Latencies are batch-1 medians measured on {table.machine} ({table.device}, {table.threads} "
        f"threads) at each model's training input size, where a fixed reference workload took {ref:.3f} ms "
        f"[{ref_lo:.3f}, {ref_hi:.3f}] (another run whose reference differs ran on a faster or slower "
        f"machine); on the robot's own hardware the order can differ: rerun `{RETIME_COMMAND}` there."
    )
    return Decision(
        latency_budget_ms=budget_ms,
        device=table.device,
        threads=table.threads,
        measured_on=table.machine,
        caveat=caveat,
        rows=rows,
    )
