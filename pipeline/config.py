"""The study's configuration: `params.yaml` validated into typed, frozen pydantic models.

Every knob lives in `params.yaml`, grouped by stage, with a top-level `seed`. `load_config` validates the
whole file before any stage does work: an unknown key, a wrong type or an out-of-range value raises
`ConfigError` with one line that names the key, the value and what is allowed (pydantic finds the problem;
`_one_line` says it in those words). `StudyConfig.flat()` is the one flat resolved dict that goes unchanged
to Ray Tune, MLflow and checkpoints. `params_schema()` is the JSON Schema editors check params.yaml against
(`params.schema.json`, written by `python -m pipeline schema`).
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from annotated_types import Ge, GroupedMetadata, Le, MinLen
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from perception.data.shapes import SHAPE_NAMES

# Thirteen classes in near pairs (box / rounded_box, sphere / icosahedron, cylinder / prism, cone / pyramid):
# confusable, yet told apart by shape alone, so the default data do not saturate.
DEFAULT_CLASSES = (
    "box", "rounded_box", "sphere", "icosahedron", "cylinder", "prism", "capsule", "cone", "pyramid", "torus",
    "tetrahedron", "octahedron", "arrow",
)  # fmt: skip
MESH_SUFFIXES = (".off", ".obj", ".ply", ".stl")
if TYPE_CHECKING:
    ShapeName = str  # a type checker cannot read a Literal made from a tuple; pydantic checks the names
else:
    ShapeName = Literal[SHAPE_NAMES]


class ConfigError(ValueError):
    """A bad value in params.yaml. The message is one line: key, value, what is allowed."""


# ---------------------------------------------------------------------------------------------------------
# Value types: what a key accepts, with its bounds, as pydantic checks them and JSON Schema publishes them.


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's true is an int to Python; a number knob never means it
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


def _no_repeats(items: tuple) -> tuple:
    if len(set(items)) != len(items):
        raise PydanticCustomError("repeats", "Items should not repeat")
    return items


@dataclass(frozen=True)
class whole(GroupedMetadata):
    """An integer (never a bool, nor a string of digits) in [lo, hi]: `Annotated[int, whole(lo, hi)]`."""

    lo: int
    hi: int | None = None
    help: str = ""

    def __iter__(self) -> Iterator[Any]:
        yield Strict()
        yield Ge(self.lo)
        if self.hi is not None:
            yield Le(self.hi)
        if self.help:
            yield Field(description=self.help)


@dataclass(frozen=True)
class number(GroupedMetadata):
    """A finite number in [lo, hi]: `Annotated[float, number(lo, hi)]`. `1e-3` written as a string (YAML 1.1
    reads it so) is read as one."""

    lo: float
    hi: float
    help: str = ""

    def __iter__(self) -> Iterator[Any]:
        yield from (AllowInfNan(False), Ge(self.lo), Le(self.hi), BeforeValidator(_not_bool))
        if self.help:
            yield Field(description=self.help)


@dataclass(frozen=True)
class _Listed(GroupedMetadata):
    def __iter__(self) -> Iterator[Any]:
        yield from (MinLen(1), AfterValidator(_no_repeats))


# A non-empty list without repeats (a tuple once read): `Annotated[tuple[T, ...], LISTED]`.
LISTED = _Listed()


Flag = Annotated[bool, Strict()]
Name = Annotated[str, Strict(), MinLen(1)]  # a non-empty string
Text = Annotated[str, Strict()]  # a string, "" allowed


class Section(BaseModel):
    """A params.yaml section: frozen, unknown keys refused, a missing or empty section is its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, data: Any) -> Any:
        return {} if data is None else data

    def plain(self) -> dict[str, Any]:
        """The section as plain JSON values (lists for tuples), e.g. for a dataset's manifest."""
        return self.model_dump(mode="json")


class PointsConfig(Section):
    """Stage `prepare-points`: the point-cloud dataset (and the meshes it is sampled from)."""

    # procedural: shapes made here. folder: <root>/<class>/{train,test}/* of meshes (OFF, OBJ, PLY, STL) and
    # point clouds (PLY, PCD, XYZ, PTS, TXT, NPY). modelnet40_h5: PointNet's modelnet40_ply_hdf5_2048 folder.
    # scanobjectnn: ScanObjectNN's h5_files folder.
    source: Literal["procedural", "folder", "modelnet40_h5", "scanobjectnn"] = "procedural"
    root: Name = "data/raw"  # for every source but procedural (relative to params.yaml)
    # The axis that points up in the source's data; `y` data are turned so that +z is up, as everywhere
    # (the HDF5 releases of ModelNet40 and ScanObjectNN are y-up). Procedural shapes are made +z up.
    up_axis: Literal["z", "y"] = "z"
    # scanobjectnn: obj_only (main_split_nobg), obj_bg (main_split), pb_t50_rs (main_split,
    # *_augmentedrot_scale75); and whether to drop the points its mask marks as background.
    variant: Literal["obj_only", "obj_bg", "pb_t50_rs"] = "obj_bg"
    drop_background: Flag = False
    # At most this many instances per class and split (0 = all), drawn with the data seed: a laptop's slice
    # of a large dataset. (procedural: train_per_class and test_per_class say how many.)
    max_per_class: Annotated[int, whole(0, 10_000_000)] = 0
    classes: Annotated[tuple[ShapeName, ...], LISTED] = DEFAULT_CLASSES
    train_per_class: Annotated[int, whole(1, 100_000)] = 64
    test_per_class: Annotated[int, whole(1, 100_000)] = 50
    num_points: Annotated[int, whole(8, 1_000_000)] = 256
    # Each axis of a procedural instance is scaled by a factor drawn from [1 - a, 1 + a].
    anisotropy: Annotated[float, number(0.0, 0.9)] = 0.3
    # Strength of each procedural instance's own taper, twist about z and bend (0 = the undeformed primitive;
    # 1 = taper +/-0.5, twist +/-45 degrees, bend +/-0.4 of the half-height). z stays the axis: +z is up.
    deformation: Annotated[float, number(0.0, 1.0)] = 0.3
    # Standard deviation of Gaussian noise added to every point, in units of the unit ball's radius.
    noise_std: Annotated[float, number(0.0, 0.5)] = 0.0
    # True: a partial single-view scan by ray casting from a random viewpoint, instead of the whole surface.
    partial: Flag = False


class ImagesConfig(Section):
    """Stage `prepare-images`: depth + normal renders of the same instances from a canonical camera."""

    # The image models' patch size: every resolution must be a multiple of it.
    patch_size: Annotated[int, whole(1, 1024)] = 4
    # The training canvas. Each object is rendered at `object_size` px and placed at a random position on
    # it; the test sets of claim 2 (perception.data.canvas) are made from the same test instances.
    train_resolution: Annotated[int, whole(8, 4096)] = 32
    object_size: Annotated[int, whole(2, 4096)] = 16
    # Test canvases: each gives a scale k = R / train_resolution and the paired sets (a) (b) (c) at it.
    eval_resolutions: Annotated[tuple[Annotated[int, whole(8, 4096)], ...], LISTED] = (48, 64)
    camera_distance: Annotated[float, number(1.05, 100.0)] = 2.5
    camera_azimuth_deg: Annotated[float, number(-360.0, 360.0)] = -60.0
    camera_elevation_deg: Annotated[float, number(-89.0, 89.0)] = 25.0
    fov_deg: Annotated[float, number(1.0, 170.0)] = 50.0

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Every resolution the test split is rendered at, the training one included, ascending."""
        return tuple(sorted({self.train_resolution, *self.eval_resolutions}))


class ProximityConfig(Section):
    """Stage `prepare-proximity`: claim 1's image task, whose label depends on 2D adjacency alone
    (perception.data.proximity: every segment solid, or every one broken by a one-pixel gap)."""

    task: Literal["gap", "orientation"] = "gap"
    size: Annotated[int, whole(8, 64, "canvas side in pixels")] = 16
    # One token per pixel: with 2-px patches the patch embedding alone sees a gap and order cannot matter.
    patch_size: Annotated[int, whole(1, 64)] = 1
    segments: Annotated[int, whole(1, 1000)] = 8
    segment_length: Annotated[int, whole(2, 63)] = 4
    distractors: Annotated[int, whole(0, 10_000)] = 4
    noise_std: Annotated[float, number(0.0, 0.99)] = 0.0
    train_count: Annotated[int, whole(2, 10_000_000, "images, train.val_fraction held out")] = 500
    test_count: Annotated[int, whole(2, 10_000_000)] = 500


class RuntimeConfig(Section):
    """How the stages run; outputs never depend on these, so dvc.yaml does not track them."""

    workers: Annotated[int, whole(0, 1024, "0 means one per CPU core")] = 0
    progress: Flag = True


# ---------------------------------------------------------------------------------------------------------
# Training: the models to train and their search space.

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Keys of a `train.models` entry that are not the family's own hparams.
TRIAL_KEYS = (
    "family", "task", "size", "augment", "epochs", "lr", "weight_decay", "batch_size", "points_per_cloud",
    "warmup_epochs", "grad_clip",
)  # fmt: skip
# What a model entry trains on (`task`): image families the shape renders (default) or the proximity task;
# point families the shape clouds.
TASKS = ("shapes", "proximity")


@dataclass(frozen=True)
class Domain:
    """A searched value: `grid` (one trial per value, the study's comparisons), `choice`, or a range.

    `uniform`/`loguniform` are float ranges [lo, hi], `randint` an integer range [lo, hi).
    """

    kind: str
    values: tuple[Any, ...]

    def candidates(self) -> tuple[Any, ...]:
        """Values that stand for the domain when checking it: every listed value, or a range's ends."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values


@dataclass(frozen=True)
class ModelEntry:
    """One entry of `train.models`: a registered family and its settings, fixed values or Domains."""

    name: str
    family: str
    settings: tuple[tuple[str, Any], ...]  # (key, value or Domain), in the file's order


def _parse_value(key: str, value: Any) -> Any:
    if not isinstance(value, dict):
        if isinstance(value, list):
            raise ConfigError(
                f"{key} = {value!r} is not allowed: a list must say what it is, e.g. "
                f"{{grid: {value!r}}} (one trial per value) or {{choice: {value!r}}} (sampled)"
            )
        if value is None or not isinstance(value, int | float | str | bool):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected a number, a string or a search")
        return value
    if len(value) != 1 or next(iter(value)) not in DOMAIN_KINDS:
        raise ConfigError(
            f"{key} = {value!r} is not allowed: expected a fixed value or one of "
            + ", ".join(f"{{{k}: [...]}}" for k in DOMAIN_KINDS)
        )
    kind, values = next(iter(value.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{key}.{kind} = {values!r} is not allowed: expected a non-empty list")
    values = [_parse_value(f"{key}.{kind}[{i}]", v) for i, v in enumerate(values)]
    if kind in ("grid", "choice"):
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{key}.{kind} = {values!r} is not allowed: expected values without repeats")
        return Domain(kind, tuple(values))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if len(values) != 2 or not numeric or not values[0] < values[1]:
        raise ConfigError(f"{key}.{kind} = {values!r} is not allowed: expected [low, high] with low < high")
    if kind == "loguniform" and values[0] <= 0:
        raise ConfigError(f"{key}.{kind} = {values!r} is not allowed: expected 0 < low < high")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{key}.{kind} = {values!r} is not allowed: expected integers [low, high)")
    return Domain(kind, tuple(values))


def parse_models(key: str, data: Any) -> tuple[ModelEntry, ...]:
    """`train.models`: {name: {family: <registered name, default name>, <setting>: value or search}}."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"{key} = {data!r} is not allowed: expected a mapping of names to model settings, "
            "e.g. {vit: {}, pointnet: {augment: {grid: [none, so3]}}}"
        )
    entries = []
    for name, settings in data.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
            raise ConfigError(f"{key}: name {name!r} is not allowed: expected letters, digits, _ or -")
        settings = {} if settings is None else settings
        if not isinstance(settings, dict):
            raise ConfigError(f"{key}.{name} = {settings!r} is not allowed: expected a mapping of settings")
        family = settings.get("family", name)
        if not isinstance(family, str):
            raise ConfigError(f"{key}.{name}.family = {family!r} is not allowed: expected a family name")
        parsed = tuple(
            (k, _parse_value(f"{key}.{name}.{k}", v)) for k, v in settings.items() if k != "family"
        )
        entries.append(ModelEntry(name, family, parsed))
    return tuple(entries)


# The study's variants as params.yaml lists them (the file sets their schedules; this is the shape).
DEFAULT_MODELS = parse_models(
    "train.models",
    {
        "e3nn": {"epochs": 12, "lr": 5e-3},
        "dgcnn": {},
        "vit": {"pos_embed": {"grid": ["learned", "sincos", "rope", "none"]}},
        "mamba_hybrid": {},
        "mamba": {"family": "mamba_hybrid", "attn_layers": 0},
        "proximity_mamba": {
            "family": "mamba_hybrid",
            "task": "proximity",
            "attn_layers": 0,
            "scan_order": {"grid": ["rowmajor", "snake", "hilbert", "cross", "random"]},
        },
        "proximity_vit": {"family": "vit", "task": "proximity"},
        "pointnet": {"augment": {"grid": ["none", "z", "so3"]}},
    },
)


# What editors are told of `train.models` (its grammar is parse_models'; pydantic does not re-check it).
_SEARCH = {
    "oneOf": [
        {"type": ["number", "string", "boolean"]},
        {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "propertyNames": {"enum": list(DOMAIN_KINDS)},
            "additionalProperties": {"type": "array", "minItems": 1},
        },
    ]
}
MODELS_SCHEMA = {
    "type": "object",
    "minProperties": 1,
    "description": "name -> {family, <setting>: a value, or {grid|choice|uniform|loguniform|randint: [...]}}",
    "propertyNames": {"pattern": "^[A-Za-z][A-Za-z0-9_-]*$"},
    "additionalProperties": {
        "type": ["object", "null"],
        "properties": {"family": {"type": "string"}},
        "additionalProperties": _SEARCH,
    },
}


def _as_written(entries: tuple[ModelEntry, ...]) -> dict[str, dict[str, Any]]:
    """`train.models` in params.yaml's own form: name -> {family, setting: value or {kind: [values]}}."""
    return {
        entry.name: {
            "family": entry.family,
            **{k: {v.kind: list(v.values)} if isinstance(v, Domain) else v for k, v in entry.settings},
        }
        for entry in entries
    }


Models = Annotated[
    tuple[ModelEntry, ...],
    PlainValidator(lambda data: parse_models("train.models", data)),
    PlainSerializer(_as_written),
    WithJsonSchema(MODELS_SCHEMA),
]


class FaultConfig(Section):
    """Test-only: the first attempt of trials of model `model` fails at epoch `epoch` (0 = never), with an
    injected error (`error`) or as if the GPU ran out of memory there (`oom`); or stops there for
    `pause_seconds` (`pause`, nothing else changes), so a test can stop the driver while it is mid-run."""

    model: Text = ""
    epoch: Annotated[int, whole(0, 100_000)] = 0
    kind: Literal["error", "oom", "pause"] = "error"
    pause_seconds: Annotated[float, number(0.0, 3600.0)] = 30.0


class TrainConfig(Section):
    """Stage `train`: one Ray Tune run over every entry of `models`."""

    # name -> {family, size, augment, lr, ..., family hparams}; values fixed or searched (DOMAIN_KINDS).
    models: Models = DEFAULT_MODELS
    # True: every registered family that no entry names is trained too, with its defaults (so a new family
    # needs one file and one registry entry, nothing here).
    all_families: Flag = True
    size: Name = "tiny"  # every family's named size unless an entry sets its own
    epochs: Annotated[int, whole(1, 100_000)] = 8
    batch_size: Annotated[int, whole(1, 65_536)] = 32
    lr: Annotated[float, number(1e-8, 10.0)] = 2e-3
    weight_decay: Annotated[float, number(0.0, 10.0)] = 0.01
    # Fraction of every class of the train split held out to validate on (and to pick the best epoch).
    val_fraction: Annotated[float, number(0.0, 0.9)] = 0.2
    # Point models see a random subset of this many points of each cloud per step; 0 keeps all.
    points_per_cloud: Annotated[int, whole(0, 1_000_000)] = 0
    # Epochs of linear warmup before the cosine schedule (0 = none), and the gradient-norm clip (0 = none):
    # a ViT trained from scratch can collapse to a constant prediction in its first epochs without them.
    warmup_epochs: Annotated[int, whole(0, 100_000)] = 0
    grad_clip: Annotated[float, number(0.0, 1e6, "0 means no clipping")] = 0.0
    num_samples: Annotated[int, whole(1, 100_000, "trials per grid point")] = 1
    # auto: ASHA early stopping when a search is configured (a sampled value or num_samples > 1).
    scheduler: Literal["auto", "none", "asha"] = "auto"
    grace_period: Annotated[int, whole(1, 100_000, "epochs before ASHA may stop a trial")] = 2
    cpus_per_trial: Annotated[float, number(0.1, 1024.0)] = 1.0
    # Ray shares a GPU between trials by fractions up to 1; above 1 a trial takes whole GPUs.
    gpus_per_trial: Annotated[float, number(0.0, 64.0, "a fraction up to 1, or a whole number of GPUs")] = 0.0
    max_concurrent_trials: Annotated[int, whole(0, 100_000, "0: as resources allow")] = 0
    max_failures: Annotated[int, whole(0, 1000, "retries of a failed trial")] = 2
    bf16: Flag = False  # bfloat16 autocast in training and validation
    fault: FaultConfig = FaultConfig()


class EvaluateConfig(Section):
    """Stage `evaluate`: the claims measured on the trained models."""

    rotation_draws: Annotated[int, whole(1, 1000, "rotations per test sample and mode")] = 2
    invariance_clouds: Annotated[int, whole(1, 100_000)] = 16
    batch_size: Annotated[int, whole(1, 65_536)] = 64
    # The cost sweep: ViT, Mamba-hybrid and pure Mamba at one width and depth, over these resolutions.
    cost_resolutions: Annotated[tuple[Annotated[int, whole(16, 8192)], ...], LISTED] = (
        128,
        224,
        384,
        512,
        1024,
    )
    cost_patch_size: Annotated[int, whole(1, 1024)] = 16
    cost_dim: Annotated[int, whole(8, 8192)] = 192
    cost_depth: Annotated[int, whole(2, 1000, "the hybrid needs a Mamba and an attention block")] = 4
    cost_heads: Annotated[int, whole(1, 256)] = 3
    # Timing: at each point the models alternate in short blocks, round after round, until every model has
    # spent this many seconds (and there are at least cost_min_blocks rounds); exponents are fitted over
    # token counts >= cost_fit_min_tokens.
    cost_min_run_time: Annotated[float, number(0.001, 3600.0, "seconds per model and point")] = 0.5
    cost_min_blocks: Annotated[int, whole(2, 10_000, "rounds of timed blocks per point")] = 7
    cost_fit_min_tokens: Annotated[int, whole(1, 10_000_000)] = 576
    # Deployment cost of every trained model. Batch-1 latency: every model timed in rounds of one block
    # (about deploy_block_ms long) each, deploy_rounds rounds in each of six windows (two fresh processes at
    # each of three points of the stage), on deploy_threads intra-op threads (0: torch's default, all
    # cores). Throughput: deploy_min_run_time seconds of batch timing per model.
    deploy_rounds: Annotated[int, whole(1, 10_000, "rounds per window")] = 4
    deploy_block_ms: Annotated[float, number(0.1, 60_000.0, "milliseconds per timed block")] = 20.0
    deploy_threads: Annotated[int, whole(0, 1024, "0 means torch's default")] = 1
    deploy_min_run_time: Annotated[float, number(0.01, 3600.0, "seconds of batch timing per model")] = 0.2
    # Intervals: a hierarchical bootstrap (seeds, then test samples within each seed) with this many
    # resamples, drawn from a generator seeded with bootstrap_seed.
    bootstrap_resamples: Annotated[int, whole(100, 1_000_000)] = 2000
    bootstrap_seed: Annotated[int, whole(0, 2**32 - 1)] = 0


class ReportConfig(Section):
    """Stage `report`: the verdicts and the decision table."""

    # The decision table's frame budget: the most accurate model whose batch-1 latency (median, on the
    # machine evaluate ran on) is at most this.
    latency_budget_ms: Annotated[float, number(0.001, 1e7, "milliseconds per frame at batch 1")] = 20.0


class RayConfig(Section):
    """Where trials run. Not tracked by DVC: results do not depend on where they ran."""

    # "" starts Ray in-process with this machine's CPUs; an address (or RAY_ADDRESS) joins a cluster.
    address: Text = ""
    # Trial checkpoints and results; "" is data/ray_results. On a multi-node cluster: a shared path or URI.
    storage: Text = ""


class MlflowConfig(Section):
    # "" uses MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db.
    tracking_uri: Text = ""
    experiment: Name = "perception-study"
    # How long the end of a stage keeps retrying an unreachable tracking server before it reports what was
    # not logged (trial results stay on disk; a rerun logs them without training again).
    wait_seconds: Annotated[float, number(0.0, 86_400.0)] = 120.0


class StudyConfig(Section):
    # The data seed: every dataset instance's generator derives from it.
    seed: Annotated[int, whole(0, 2**32 - 1)] = 0
    # Training seeds: every variant trains once per seed (initialisation, batch order, augmentation), so
    # the evaluation's intervals cover the spread between training runs as well as the test samples.
    seeds: Annotated[tuple[Annotated[int, whole(0, 2**31 - 1)], ...], LISTED] = (0, 1, 2)
    points: PointsConfig = PointsConfig()
    images: ImagesConfig = ImagesConfig()
    proximity: ProximityConfig = ProximityConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def flat(self) -> dict[str, Any]:
        """One flat dict, `section.key: value`, lists for tuples: for Ray Tune, MLflow and checkpoints."""
        return _flatten(self)


def _flatten(section: BaseModel, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key in type(section).model_fields:
        value = getattr(section, key)
        if isinstance(value, BaseModel):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif key == "models":  # train.models: name -> its settings, as written
            for entry in value:
                flat[f"{prefix}models.{entry.name}.family"] = entry.family
                for setting, v in entry.settings:
                    name = f"{prefix}models.{entry.name}.{setting}"
                    if isinstance(v, Domain):  # `...scan_order.grid: [rowmajor, snake]`
                        flat[f"{name}.{v.kind}"] = list(v.values)
                    else:
                        flat[name] = v
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def params_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml (draft 2020-12), for editors and `params.schema.json`."""
    schema = StudyConfig.model_json_schema()
    # pydantic writes a default as the Python value; the entries' default, as params.yaml writes it:
    schema["$defs"]["TrainConfig"]["properties"]["models"]["default"] = _as_written(DEFAULT_MODELS)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "params.yaml"}


# ---------------------------------------------------------------------------------------------------------
# pydantic's findings in the project's words: the key, the value, what is allowed.


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """`Annotated[T, m1, m2]` -> (T, [m1, m2]), nested Annotated flattened."""
    metadata: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        metadata = extra + metadata
    return tp, _expand(metadata)


def _expand(metadata: list[Any]) -> list[Any]:
    """Grouped metadata (`whole(...)`, `number(...)`, `LISTED`) as the constraints it stands for."""
    return [m for group in metadata for m in (group if isinstance(group, GroupedMetadata) else [group])]


def _describe(tp: Any, metadata: list[Any]) -> str:
    tp, inner = _unwrap(tp)
    metadata = inner + _expand(metadata)
    lo = next((m.ge for m in metadata if isinstance(m, Ge)), None)
    hi = next((m.le for m in metadata if isinstance(m, Le)), None)
    help = next((m.description for m in metadata if getattr(m, "description", None)), "")
    bounds = (
        f" from {lo} to {hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
    )
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        item, _ = _unwrap(typing.get_args(tp)[0])
        if typing.get_origin(item) is Literal:
            return "a list of names from: " + ", ".join(typing.get_args(item))
        return f"a non-empty list, each {_describe(typing.get_args(tp)[0], [])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping of keys to values"
    name = {int: "an integer", float: "a number", bool: "a boolean (true or false)", str: "a string"}[tp]
    return f"{name}{bounds}" + (f" ({help})" if help else "")


def _field_at(loc: tuple) -> tuple[Any, list[Any]]:
    """The annotation and metadata (bounds, the field's help) of the value at pydantic's error location."""
    tp: Any = StudyConfig
    metadata: list[Any] = []
    for part in loc:
        base = _unwrap(tp)[0]
        if isinstance(part, int):  # an item of a list: its own annotation carries its bounds
            tp, metadata = typing.get_args(base)[0], []
        else:
            field = base.model_fields[part]
            tp, metadata = field.annotation, [*field.metadata, field]
    return tp, metadata


def _one_line(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    value = error["input"]
    if error["type"] == "value_error" and isinstance(error.get("ctx", {}).get("error"), ConfigError):
        return str(error["ctx"]["error"])  # train.models' own grammar said it already
    if error["type"] == "extra_forbidden":
        where = "".join(f".{p}" for p in loc[:-1]).lstrip(".") or "params"
        section = _unwrap(_field_at(loc[:-1])[0])[0]
        return f"{key}: unknown key; allowed in {where}: {', '.join(section.model_fields)}"
    tp, metadata = _field_at(loc)
    if loc and isinstance(loc[-1], int) and typing.get_origin(_unwrap(tp)[0]) is Literal:
        names = ", ".join(typing.get_args(_unwrap(tp)[0]))
        return f"{key.rsplit('[', 1)[0]}: unknown name {value!r}; allowed: {names}"
    why = ", without repeats" if error["type"] == "repeats" else ""
    return f"{key or 'params'} = {value!r} is not allowed: expected {_describe(tp, metadata)}{why}"


def check_entry_setting(where: str, key: str, value: Any) -> None:
    """One value a `train.models` entry gives a `train.*` setting (`lr`, `batch_size`, ...), held to that
    setting's own rule, with its one-line message naming the entry."""
    field = TrainConfig.model_fields[key]
    try:
        rule: Any = Annotated[(field.annotation, *field.metadata)]  # the field's type with its bounds
        TypeAdapter(rule).validate_python(value)
    except ValidationError:
        expected = _describe(field.annotation, [*field.metadata, field])
        raise ConfigError(f"{where}.{key} = {value!r} is not allowed: expected {expected}") from None


def _check_cross_fields(config: StudyConfig, base_dir: Path) -> None:
    from perception.data.canvas import check_geometry
    from perception.data.proximity import ProximityParamsError

    images = config.images
    for key, res in [("images.train_resolution", images.train_resolution)] + [
        (f"images.eval_resolutions[{i}]", r) for i, r in enumerate(images.eval_resolutions)
    ]:
        if res % images.patch_size:
            raise ConfigError(
                f"{key} = {res} is not allowed: "
                f"expected a multiple of images.patch_size = {images.patch_size}"
            )
    problem = check_geometry(
        images.train_resolution, images.object_size, images.eval_resolutions, images.patch_size
    )
    if problem:
        raise ConfigError(f"images.{problem}")
    proximity = config.proximity
    try:
        proximity_params(proximity)
    except ProximityParamsError as err:
        raise ConfigError(str(err)) from None
    if proximity.size % proximity.patch_size:
        raise ConfigError(
            f"proximity.patch_size = {proximity.patch_size} is not allowed: expected a divisor of "
            f"proximity.size = {proximity.size}"
        )
    gpus = config.train.gpus_per_trial
    if gpus > 1 and not gpus.is_integer():
        raise ConfigError(
            f"train.gpus_per_trial = {gpus:g} is not allowed: expected a fraction up to 1 "
            "(trials share a GPU) or a whole number of GPUs"
        )
    evaluate = config.evaluate
    for i, res in enumerate(evaluate.cost_resolutions):
        if res % evaluate.cost_patch_size:
            raise ConfigError(
                f"evaluate.cost_resolutions[{i}] = {res} is not allowed: "
                f"expected a multiple of evaluate.cost_patch_size = {evaluate.cost_patch_size}"
            )
    tokens = {(r // evaluate.cost_patch_size) ** 2 for r in evaluate.cost_resolutions}
    fitted = sorted(t for t in tokens if t >= evaluate.cost_fit_min_tokens)
    if len(fitted) < 2:
        raise ConfigError(
            f"evaluate.cost_fit_min_tokens = {evaluate.cost_fit_min_tokens} is not allowed with "
            f"evaluate.cost_resolutions = {list(evaluate.cost_resolutions)}: the exponents need at least 2 "
            f"token counts at or above it, and these give {fitted or 'none'}; lower it or add resolutions"
        )
    if evaluate.cost_dim % evaluate.cost_heads:
        raise ConfigError(
            f"evaluate.cost_dim = {evaluate.cost_dim} is not allowed: "
            f"expected a multiple of evaluate.cost_heads = {evaluate.cost_heads}"
        )
    points = config.points
    if points.source == "procedural" and points.up_axis != "z":
        raise ConfigError(
            f"points.up_axis = {points.up_axis!r} is not allowed with points.source = 'procedural': the "
            "procedural shapes are made with +z up; expected 'z'"
        )
    if points.source in ("modelnet40_h5", "scanobjectnn"):
        _check_benchmark_root(points, base_dir)
    if points.source == "folder":
        root = resolve_path(points.root, base_dir)
        if not root.is_dir():
            raise ConfigError(
                f"points.root = {points.root!r} is not allowed: "
                "expected an existing folder in ModelNet layout "
                "(<root>/<class>/train/*, <root>/<class>/test/*)"
            )
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ConfigError(
                f"points.root = {points.root!r} is not allowed: it holds no class folders "
                "(expected <root>/<class>/train/* and <root>/<class>/test/*)"
            )
        for class_dir in class_dirs:
            for split in ("train", "test"):
                if not (class_dir / split).is_dir():
                    raise ConfigError(
                        f"points.root = {points.root!r} is not allowed: {class_dir.name}/{split}/ is missing "
                        "(every class folder needs train/ and test/)"
                    )


def _check_benchmark_root(points: PointsConfig, base_dir: Path) -> None:
    """The benchmark's folder and files exist: one line naming the key and the file that is missing."""
    from perception.data import benchmarks
    from perception.data.arrays import DatasetError

    root = resolve_path(points.root, base_dir)
    expected = {
        "modelnet40_h5": "PointNet's modelnet40_ply_hdf5_2048 folder (ply_data_*.h5, shape_names.txt)",
        "scanobjectnn": "ScanObjectNN's h5_files folder (main_split/, main_split_nobg/)",
    }[points.source]
    if not root.is_dir():
        raise ConfigError(
            f"points.root = {points.root!r} is not allowed with points.source = {points.source!r}: no such "
            f"folder; expected {expected}"
        )
    try:
        if points.source == "modelnet40_h5":
            benchmarks.modelnet40_files(root)
        else:
            benchmarks.scanobjectnn_files(root, points.variant)
    except DatasetError as err:
        raise ConfigError(f"points.root = {points.root!r} ({points.source}): {err}") from None


def proximity_params(proximity: ProximityConfig):
    """The generator's parameters (perception.data.proximity.ProximityParams, which validates them)."""
    from perception.data.proximity import ProximityParams

    return ProximityParams(
        proximity.task,
        proximity.size,
        proximity.segments,
        proximity.segment_length,
        proximity.distractors,
        proximity.noise_std,
    )


def resolve_path(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def home_repo(repo: Path) -> Path:
    """The repository the user runs DVC in, where what outlives an experiment goes (the MLflow store, Ray's
    trial folders).

    A queued (`dvc exp run --queue`, then `dvc queue start`) or `--temp` experiment runs its stages in a
    temporary clone, `<repository>/.dvc/tmp/exps/[standalone/]tmpXXXX`, that DVC deletes when it ends. DVC
    names the repository it was started in as DVC_ROOT in every stage's environment; when `repo` lies in
    that repository's experiment folder, that repository is home. Otherwise (`dvc repro`, a plain
    `dvc exp run`, the stage run by hand) `repo` is.
    """
    root = os.environ.get("DVC_ROOT")
    if not root:
        return repo
    root_path, here = Path(root).resolve(), repo.resolve()
    return root_path if (root_path / ".dvc" / "tmp" / "exps") in here.parents else repo


def parse_config(data: Any, base_dir: Path | str = ".") -> StudyConfig:
    """Validate a params mapping (as read from YAML) into a StudyConfig, or raise ConfigError."""
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err.errors()[0])) from None
    _check_cross_fields(config, Path(base_dir))
    return config


class _Yaml12Floats(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string; YAML 1.2 (and DVC) read it as a number, as here."""


_Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def read_params(path: Path | str = "params.yaml") -> Any:
    """A params file as YAML 1.2 reads it (DVC's reading), not yet validated."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the params file ({err.strerror})") from None
    try:
        return yaml.load(text, Loader=_Yaml12Floats)  # noqa: S506 (a SafeLoader with one more resolver)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None


def load_config(path: Path | str = "params.yaml") -> StudyConfig:
    """Read and validate a params file. Relative data paths are relative to the file's folder."""
    path = Path(path)
    data = read_params(path)
    try:
        return parse_config(data, path.resolve().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# Benchmark profiles: params.yaml with a points section of their own.

PROFILES = ("modelnet40", "scanobjectnn")  # profiles/<name>.yaml that follow params.yaml (gpu.yaml does not)


def _section_span(text: str, key: str) -> tuple[int, int]:
    """Where the top-level `key:` section of a YAML text starts and where the next top-level key starts."""
    match = re.search(rf"^{key}:", text, re.MULTILINE)
    if match is None:
        raise ConfigError(f"no top-level {key}: section")
    following = re.search(r"^[A-Za-z_]\w*:", text[match.end() :], re.MULTILINE)
    return match.start(), match.end() + following.start() if following else len(text)


def synced_profile(profile: str, params: str) -> str:
    """A benchmark profile brought up to date with params.yaml: the profile's opening comments and its own
    `points:` section, every other line params.yaml's as written (comments included)."""
    header = profile[: _section_span(profile, "seed")[0]]
    start, end = _section_span(profile, "points")
    body = params[_section_span(params, "seed")[0] :]
    params_start, params_end = _section_span(body, "points")
    return header + body[:params_start] + profile[start:end] + body[params_end:]
