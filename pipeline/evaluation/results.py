"""The evaluate and report stages' outputs as contracts: `results.json` and `verdicts.json`, pydantic models.

Read top to bottom: the shared pieces (an estimate is `perception.evaluation.intervals.Estimate`, {value, lo,
hi}; an angle bin; a model's adequacy record), then the tables the evaluation measures (rotation, resolution,
serialisation, cost), the typed evidence of each claim (the dataclasses of `pipeline.evaluation.verdicts`,
validated as they are), then `Results` and `Verdicts`, each with a schema version that its reader checks.

JSON has no NaN: the writers write null, and in an estimate null reads back as NaN. A file that does not fit
its model fails with one line that names the file, the field and the stage to rerun.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    model_validator,
)

from perception.data.arrays import DatasetError
from perception.evaluation.intervals import Estimate
from pipeline.evaluation.verdicts import (
    CostEvidence,
    ResolutionEvidence,
    RotationEvidence,
    SerialisationEvidence,
)
from pipeline.outputs import read_json

# 7: the machine reference's latency in the deployment table; 6: latency in windows of rounds;
# 5: every trained model's deployment cost and accuracy by condition; 4: cost rows timed in alternating
# blocks, with contention; 3: the typed contract of this module; 2: the
# hand-written dict before it
RESULTS_VERSION: Final = 7
VERDICTS_VERSION: Final = 1
DECISION_VERSION: Final = 1


class Contract(BaseModel):
    """A stage output's part: every field declared (an unknown key is an error), read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _absent_if_none(value: Any) -> bool:
    return value is None


# A free-form JSON object (a params section, the cost sweep's setting) as it reads back: tuples as lists.
JsonObject = Annotated[dict[str, JsonValue], BeforeValidator(lambda value: json.loads(json.dumps(value)))]


# ------------------------------------------------------------------------------------- shared pieces


class AngleBin(Contract):
    """Accuracy over the (cloud, draw) pairs whose rotation angle lies in [low_deg, high_deg); a bin with
    fewer than two members has no estimate (value, lo and hi are absent from the file)."""

    low_deg: float
    high_deg: float
    count: int
    value: float | None = Field(None, exclude_if=_absent_if_none)
    lo: float | None = Field(None, exclude_if=_absent_if_none)
    hi: float | None = Field(None, exclude_if=_absent_if_none)


class FitRecord(Contract):
    """A model's adequacy input (`pipeline.evaluation.verdicts.ModelFit`) with the floor the gate holds it
    to."""

    name: str
    accuracy: Estimate  # in-distribution test accuracy, fraction
    chance: float
    required: float | None = None  # a rule's own floor, replacing the general one
    floor: float

    @property
    def adequate(self) -> bool:
        return self.accuracy.value >= self.floor  # False for NaN: an unmeasured model cannot decide


# ------------------------------------------------------------------------------------------ the tables


class RotationRow(Contract):
    """A point model under no rotation, rotations about the up axis and SO(3) (`perception.rotations`)."""

    family: str
    augment: str  # the rotation augmentation it trained with
    accuracy: dict[str, Estimate]  # test rotation mode -> accuracy over seeds and clouds
    by_seed: dict[str, list[float]]  # mode -> accuracy per training seed
    invariance_error_float64: float
    angle_bins: dict[str, list[AngleBin]]  # "z", "so3" -> accuracy by rotation angle


class Drops(Contract):
    """Claim 2's accuracy drops from `in` at one test canvas, paired, fraction."""

    a: Estimate  # same field of view, more pixels
    b: Estimate  # larger canvas at the training pixel scale (centre and corner averaged)
    c: Estimate  # object scaled up on the training canvas
    b_plus_c: Estimate
    a_minus_b_c: Estimate  # how far (a) is the sum of its two parts


class ResolutionRow(Contract):
    """A shape-image model on the training distribution and on every paired test set."""

    family: str
    pos_embed: str | None
    attn_layers: int | None
    encoding: str  # "unhelped", "resampled" or "structural" (`evidence.VariantInfo.encoding`)
    train_resolution: int
    tokens: dict[str, int]  # "in" and each canvas -> patch tokens
    accuracy: dict[str, Estimate]  # test set -> accuracy
    by_seed: dict[str, list[float]]
    drops: dict[str, Drops]  # canvas (px, as a string) -> drops


class Locality(Contract):
    """How a scan order keeps 2D grid neighbours together in 1D (`perception.ops.serialization`)."""

    grid_nbr_seq_dist_mean: float
    grid_nbr_seq_dist_max: float
    grid_nbr_seq_dist_geomean: float
    grid_nbr_within_window_frac: float
    seq_nbr_grid_dist_mean: float
    seq_nbr_grid_dist_max: float
    seq_nbr_adjacent_frac: float


class ProximityRow(Contract):
    """A proximity-task model: accuracy, per seed and per segment axis, and its order's locality."""

    family: str
    scan_order: str | None  # None: the attention reference
    accuracy: Estimate
    by_seed: list[float]
    by_orientation: dict[str, Estimate] = {}  # "horizontal", "vertical" -> accuracy
    locality: Locality | None  # on the task's grid; None without an order


class SerialisationTable(Contract):
    orders: dict[str, dict[str, Locality]]  # order -> "locality_<g>x<g>" -> its statistics
    task_grid: str  # the key of the task's grid in `orders`
    task: JsonObject  # the params' proximity section, as the config resolved it
    models: dict[str, ProximityRow]


class CostRow(Contract):
    """One model at one resolution (`perception.evaluation.cost.CostRow`)."""

    model: str
    resolution: int
    tokens: int
    batch: int
    latency_ms: float  # the 20th percentile of the blocks (it decides), with its bootstrap interval
    latency_ms_lo: float | None
    latency_ms_hi: float | None
    latency_ms_median: float  # the blocks' median and quartiles: their spread
    latency_ms_q25: float
    latency_ms_q75: float
    latency_ms_blocks: list[float]  # in round order: block j of every model was timed in round j
    forwards_per_block: int
    others_cpu: float  # other processes' CPU use during the row's blocks, share of the machine
    own_cpu: float  # this process's CPU use during them, share of what its threads could use
    gpu_other_processes: int | None  # other processes on the GPU (NVML), None where unknown
    peak_memory_mb: float
    memory_method: str
    flops_counted: int
    scan_flops: int
    flops_total: int
    attention_entries: int


class DeploymentRow(Contract):
    """A trained variant's deployment cost (`perception.evaluation.deployment.DeploymentCost`, measured on
    its first seed's checkpoint: its seeds share the architecture) and its accuracy by condition."""

    task: str  # points | images | proximity
    family: str
    latency_ms: float  # batch 1, median over every timed round
    latency_ms_lo: float  # two-level bootstrap interval of the median (windows, then rounds)
    latency_ms_hi: float
    latency_ms_q25: float
    latency_ms_q75: float
    windows: int
    rounds: int  # in all windows
    throughput_per_s: float
    batch_size: int
    peak_memory_mb: float
    memory_method: str
    parameters: int
    checkpoint_bytes: int
    input_shape: list[int]
    device: str
    threads: int
    accuracy: dict[str, Estimate]  # condition (`DeploymentTable.conditions`) -> accuracy, fraction


class Condition(Contract):
    name: str  # the key of `DeploymentRow.accuracy`
    label: str  # as the report says it


class DeploymentTable(Contract):
    machine: str  # where the latencies were measured: host, CPU, cores
    # the fixed workload timed in the same rounds (`perception.evaluation.deployment.machine_reference`):
    # batch-1 milliseconds, [median, lo, hi]; two runs whose references disagree ran on machines of two speeds
    reference_ms: tuple[float, float, float]
    device: str
    threads: int
    conditions: dict[str, list[Condition]]  # task -> its conditions, in the decision table's order
    models: dict[str, DeploymentRow]


class Exponent(Contract):
    """k in cost ~ tokens^k (or a difference of two), with its interval and how it was obtained."""

    value: float
    lo: float
    hi: float
    tokens: list[int]
    interval: str


class CostFit(Contract):
    latency: Exponent  # over tokens >= fit_min_tokens
    memory: Exponent
    latency_full: Exponent  # over the whole sweep
    memory_full: Exponent
    flops: Exponent  # counted, context only
    latency_slopes: list[float]
    memory_slopes: list[float]


class Crossover(Contract):
    model: str
    reference: str
    tokens: int | None  # from which `model` is faster than `reference`; None: not within the sweep
    holds_with_intervals: bool
    tokens_with_intervals: int | None


class Busiest(Contract):
    """The busiest the machine was while the fitted rows were timed."""

    others_cpu: float
    model: str
    tokens: int
    gpu_other_processes: int | None


class EssayRow(Contract):
    """The essay's table (`_essay`: its rounded numbers) beside the exact ones."""

    resolution: int
    patch_size: int
    tokens_essay: int
    tokens: int
    attention_entries_essay: float
    attention_entries: int
    relative_cost_essay: float
    relative_cost: float


class CostTable(Contract):
    """The cost sweep (`perception.evaluation.cost.CostStudy.as_dict`)."""

    setting: JsonObject
    rows: list[CostRow]
    fits: dict[str, CostFit]  # by model
    latency_gap: Exponent  # ViT (fused) - pure Mamba, from their per-round latency ratios
    latency_gaps: dict[str, Exponent]
    crossover: Crossover
    crossover_tokens: int | None
    busiest: Busiest
    essay: list[EssayRow]
    wall_s: float


# ---------------------------------------------------------------------------------------- the evidence


class Evidence(Contract):
    """Each claim's typed evidence, as the rules of `pipeline.evaluation.verdicts` take it; a claim the
    evaluation could not measure (no pure Mamba orders, no unhelped ViT table) is absent."""

    serialisation: SerialisationEvidence | None = Field(None, exclude_if=_absent_if_none)
    position_embedding: ResolutionEvidence | None = Field(None, exclude_if=_absent_if_none)
    cost: CostEvidence
    rotation: RotationEvidence


# ------------------------------------------------------------------------------------ the two contracts


class TestSamples(Contract):
    points: int
    images: int
    proximity: int


class CanvasSetting(Contract):
    train_resolution: int
    object_size: int
    canvases: list[int]  # the test canvases, px
    test_sets: list[str]  # `in`, then `<kind>_<canvas>`


class BootstrapRecord(Contract):
    method: str  # in words, for the report
    resamples: int
    seed: int
    level: float


def _nan_for_null(data: Any) -> Any:
    """The raw file with null read back as NaN in every estimate (a dict holding a "value")."""
    if isinstance(data, list):
        return [_nan_for_null(item) for item in data]
    if not isinstance(data, dict):
        return data
    out = {key: _nan_for_null(value) for key, value in data.items()}
    if "value" in out:
        out.update({key: math.nan for key in ("value", "lo", "hi") if key in out and out[key] is None})
    return out


class Results(Contract):
    """`data/evaluation/results.json`: everything the evaluate stage measured, for the report, the figures
    and the DVC metrics and plots."""

    schema_version: Literal[7] = RESULTS_VERSION
    seed: int  # the data seed
    seeds: list[int]  # the training seeds
    evaluate: JsonObject  # the params' evaluate section, as the config resolved it
    num_classes: int
    test_samples: TestSamples
    canvas: CanvasSetting
    points_per_cloud: int  # as the point models trained
    bootstrap: BootstrapRecord
    models: dict[str, FitRecord]  # every evaluated variant's adequacy
    rotation: dict[str, RotationRow]
    resolution: dict[str, ResolutionRow]
    serialisation: SerialisationTable
    cost: CostTable
    deployment: DeploymentTable
    evidence: Evidence
    wall_seconds: float
    mlflow: dict[str, str]  # the study's tracking store and parent run; empty without one

    @model_validator(mode="before")
    @classmethod
    def nan_for_null(cls, data: Any) -> Any:
        return _nan_for_null(data)


class ClaimVerdict(Contract):
    """One claim's verdict as `pipeline.evaluation.verdicts.Verdict.as_dict` writes it."""

    claim: int
    title: str
    verdict: Literal["holds", "does not hold", "inconclusive"]
    rule: str
    effect_name: str
    effect: float | None  # in `unit`; None: not measured
    interval: tuple[float, float] | None
    unit: str  # "points" or "" (an exponent)
    threshold: float
    margin: float
    models_used: list[str]
    excluded: list[str]  # undertrained models, with accuracy and floor
    would_change: str
    measured: list[str]


class Verdicts(Contract):
    """`reports/verdicts.json`: the report stage's verdict on each claim."""

    schema_version: Literal[1] = VERDICTS_VERSION
    claims: list[ClaimVerdict]


class DecisionChoice(Contract):
    model: str
    accuracy: Estimate  # fraction
    latency_ms: Estimate  # batch-1 median with its interval


class DecisionRecord(Contract):
    """One row of the decision table (`pipeline.evaluation.decision.DecisionRow`)."""

    task: str
    condition: str
    label: str
    best: DecisionChoice | None
    fastest_within_interval: DecisionChoice | None
    tied_with_best: list[str]
    as_fast: list[str] = []  # of those, as fast as the quickest within the measurement (the pick among them)
    within_budget: DecisionChoice | None
    budget_note: str
    budget_edge: str | None = None  # more accurate, over the budget, its latency interval reaching it
    excluded: list[str]
    pareto_front: list[str]  # fastest first


class Decision(Contract):
    """`reports/decision.json`: which backbone, per task and condition, at what latency."""

    schema_version: Literal[1] = DECISION_VERSION
    latency_budget_ms: float
    device: str
    threads: int
    measured_on: str  # the machine the evaluate stage timed the models on
    caveat: str
    rows: list[DecisionRecord]


# ------------------------------------------------------------------------------------ writing, reading

Contracted = TypeVar("Contracted", bound=Contract)


def to_json(model: Contract, sort_keys: bool = False) -> str:
    """Indented JSON with NaN as null (pydantic's writer), then re-written by `json` to sort the keys."""
    return json.dumps(json.loads(model.model_dump_json()), indent=2, sort_keys=sort_keys) + "\n"


def read_contract(path: Path, model: type[Contracted], writer: str) -> Contracted:
    """`model` from the JSON file at `path` that stage `writer` wrote; a DatasetError of one line naming the
    file, the first field that does not fit and the stage to rerun otherwise."""
    path = Path(path)
    data = read_json(path, writer)
    expected = model.model_fields["schema_version"].default
    if data.get("schema_version") != expected:
        found = data.get("schema_version", "missing")
        raise DatasetError(
            f"{path}: schema_version {found}, expected {expected} (written by another version of the "
            f"{writer} stage); rerun dvc repro {writer}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise DatasetError(f"{path}: {field}: {first['msg']}{more}; rerun dvc repro {writer}") from None


def read_results(path: Path) -> Results:
    return read_contract(path, Results, "evaluate")


def read_verdicts(path: Path) -> Verdicts:
    return read_contract(path, Verdicts, "report")


def read_decision(path: Path) -> Decision:
    return read_contract(path, Decision, "report")
