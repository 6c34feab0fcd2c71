"""The study's configuration: `params.yaml` validated into typed, frozen dataclasses.

Every knob lives in `params.yaml`, grouped by stage, with a top-level `seed`. `load_config` validates the
whole file before any stage does work: an unknown key, a wrong type or an out-of-range value raises
`ConfigError` with one line that names the key, the value and what is allowed. `StudyConfig.flat()` is the
one flat resolved dict that goes unchanged to Ray Tune, MLflow and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from perception.data.shapes import SHAPE_NAMES

# Thirteen classes in near pairs (box / rounded_box, sphere / icosahedron, cylinder / prism, cone / pyramid):
# confusable, yet told apart by shape alone, so the default data do not saturate.
DEFAULT_CLASSES = (
    "box", "rounded_box", "sphere", "icosahedron", "cylinder", "prism", "capsule", "cone", "pyramid", "torus",
    "tetrahedron", "octahedron", "arrow",
)  # fmt: skip
MESH_SUFFIXES = (".off", ".obj", ".ply", ".stl")

# YAML 1.1 reads `1e-3` (no dot) as a string; values that look like this are read as numbers.
_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A bad value in params.yaml. The message is one line: key, value, what is allowed."""


def _range(lo: float | None = None, hi: float | None = None, help: str = "") -> dict:
    return {"min": lo, "max": hi, "help": help}


@dataclass(frozen=True)
class PointsConfig:
    """Stage `prepare-points`: the point-cloud dataset (and the meshes it is sampled from)."""

    source: Literal["procedural", "folder"] = "procedural"
    # For `folder`: a dataset in ModelNet layout, <root>/<class>/{train,test}/*.{off,obj,ply,stl}.
    root: str = "data/raw"
    # The axis that points up in the folder's meshes; `y` meshes are turned so that +z is up, as everywhere.
    up_axis: Literal["z", "y"] = "z"
    classes: tuple[str, ...] = field(default=DEFAULT_CLASSES, metadata={"choices": SHAPE_NAMES})
    train_per_class: int = field(default=64, metadata=_range(1, 100_000))
    test_per_class: int = field(default=50, metadata=_range(1, 100_000))
    num_points: int = field(default=256, metadata=_range(8, 1_000_000))
    # Each axis of a procedural instance is scaled by a factor drawn from [1 - a, 1 + a].
    anisotropy: float = field(default=0.3, metadata=_range(0.0, 0.9))
    # Strength of each procedural instance's own taper, twist about z and bend (0 = the undeformed primitive;
    # 1 = taper +/-0.5, twist +/-45 degrees, bend +/-0.4 of the half-height). z stays the axis: +z is up.
    deformation: float = field(default=0.3, metadata=_range(0.0, 1.0))
    # Standard deviation of Gaussian noise added to every point, in units of the unit ball's radius.
    noise_std: float = field(default=0.0, metadata=_range(0.0, 0.5))
    # True: a partial single-view scan by ray casting from a random viewpoint, instead of the whole surface.
    partial: bool = False


@dataclass(frozen=True)
class ImagesConfig:
    """Stage `prepare-images`: depth + normal renders of the same instances from a canonical camera."""

    # The image models' patch size: every resolution must be a multiple of it.
    patch_size: int = field(default=4, metadata=_range(1, 1024))
    # The training canvas. Each object is rendered at `object_size` px and placed at a random position on
    # it; the test sets of claim 2 (perception.data.canvas) are made from the same test instances.
    train_resolution: int = field(default=32, metadata=_range(8, 4096))
    object_size: int = field(default=16, metadata=_range(2, 4096))
    # Test canvases: each gives a scale k = R / train_resolution and the paired sets (a) (b) (c) at it.
    eval_resolutions: tuple[int, ...] = field(default=(48, 64), metadata=_range(8, 4096))
    camera_distance: float = field(default=2.5, metadata=_range(1.05, 100.0))
    camera_azimuth_deg: float = field(default=-60.0, metadata=_range(-360.0, 360.0))
    camera_elevation_deg: float = field(default=25.0, metadata=_range(-89.0, 89.0))
    fov_deg: float = field(default=50.0, metadata=_range(1.0, 170.0))

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Every resolution the test split is rendered at, the training one included, ascending."""
        return tuple(sorted({self.train_resolution, *self.eval_resolutions}))


@dataclass(frozen=True)
class ProximityConfig:
    """Stage `prepare-proximity`: claim 1's image task, whose label depends on 2D adjacency alone
    (perception.data.proximity: every segment solid, or every one broken by a one-pixel gap)."""

    task: Literal["gap", "orientation"] = "gap"
    size: int = field(default=16, metadata=_range(8, 64, "canvas side in pixels"))
    # One token per pixel: with 2-px patches the patch embedding alone sees a gap and order cannot matter.
    patch_size: int = field(default=1, metadata=_range(1, 64))
    segments: int = field(default=8, metadata=_range(1, 1000))
    segment_length: int = field(default=4, metadata=_range(2, 63))
    distractors: int = field(default=4, metadata=_range(0, 10_000))
    noise_std: float = field(default=0.0, metadata=_range(0.0, 0.99))
    train_count: int = field(
        default=500, metadata=_range(2, 10_000_000, "images, train.val_fraction held out")
    )
    test_count: int = field(default=500, metadata=_range(2, 10_000_000))


@dataclass(frozen=True)
class RuntimeConfig:
    """How the stages run; outputs never depend on these, so dvc.yaml does not track them."""

    workers: int = field(default=0, metadata=_range(0, 1024, "0 means one per CPU core"))
    progress: bool = True


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
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            return float(value)
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


@dataclass(frozen=True)
class FaultConfig:
    """Test-only: the first attempt of trials of model `model` fails at epoch `epoch` (0 = never), with an
    injected error (`error`) or as if the GPU ran out of memory there (`oom`)."""

    model: str = field(default="", metadata={"empty": True})
    epoch: int = field(default=0, metadata=_range(0, 100_000))
    kind: Literal["error", "oom"] = "error"


@dataclass(frozen=True)
class TrainConfig:
    """Stage `train`: one Ray Tune run over every entry of `models`."""

    # name -> {family, size, augment, lr, ..., family hparams}; values fixed or searched (DOMAIN_KINDS).
    models: tuple[ModelEntry, ...] = field(default=DEFAULT_MODELS, metadata={"parser": parse_models})
    # True: every registered family that no entry names is trained too, with its defaults (so a new family
    # needs one file and one registry entry, nothing here).
    all_families: bool = True
    size: str = "tiny"  # every family's named size unless an entry sets its own
    epochs: int = field(default=8, metadata=_range(1, 100_000))
    batch_size: int = field(default=32, metadata=_range(1, 65_536))
    lr: float = field(default=2e-3, metadata=_range(1e-8, 10.0))
    weight_decay: float = field(default=0.01, metadata=_range(0.0, 10.0))
    # Fraction of every class of the train split held out to validate on (and to pick the best epoch).
    val_fraction: float = field(default=0.2, metadata=_range(0.0, 0.9))
    # Point models see a random subset of this many points of each cloud per step; 0 keeps all.
    points_per_cloud: int = field(default=0, metadata=_range(0, 1_000_000))
    # Epochs of linear warmup before the cosine schedule (0 = none), and the gradient-norm clip (0 = none):
    # a ViT trained from scratch can collapse to a constant prediction in its first epochs without them.
    warmup_epochs: int = field(default=0, metadata=_range(0, 100_000))
    grad_clip: float = field(default=0.0, metadata=_range(0.0, 1e6, "0 means no clipping"))
    num_samples: int = field(default=1, metadata=_range(1, 100_000, "trials per grid point"))
    # auto: ASHA early stopping when a search is configured (a sampled value or num_samples > 1).
    scheduler: Literal["auto", "none", "asha"] = "auto"
    grace_period: int = field(default=2, metadata=_range(1, 100_000, "epochs before ASHA may stop a trial"))
    cpus_per_trial: float = field(default=1.0, metadata=_range(0.1, 1024.0))
    # Ray shares a GPU between trials by fractions up to 1; above 1 a trial takes whole GPUs.
    gpus_per_trial: float = field(
        default=0.0, metadata=_range(0.0, 64.0, "a fraction up to 1, or a whole number of GPUs")
    )
    max_concurrent_trials: int = field(default=0, metadata=_range(0, 100_000, "0: as resources allow"))
    max_failures: int = field(default=2, metadata=_range(0, 1000, "retries of a failed trial"))
    bf16: bool = False  # bfloat16 autocast in training and validation
    fault: FaultConfig = FaultConfig()


@dataclass(frozen=True)
class EvaluateConfig:
    """Stage `evaluate`: the claims measured on the trained models."""

    rotation_draws: int = field(default=2, metadata=_range(1, 1000, "rotations per test sample and mode"))
    invariance_clouds: int = field(default=16, metadata=_range(1, 100_000))
    batch_size: int = field(default=64, metadata=_range(1, 65_536))
    # The cost sweep: ViT, Mamba-hybrid and pure Mamba at one width and depth, over these resolutions.
    cost_resolutions: tuple[int, ...] = field(default=(128, 224, 384, 512, 1024), metadata=_range(16, 8192))
    cost_patch_size: int = field(default=16, metadata=_range(1, 1024))
    cost_dim: int = field(default=192, metadata=_range(8, 8192))
    cost_depth: int = field(
        default=4, metadata=_range(2, 1000, "the hybrid needs a Mamba and an attention block")
    )
    cost_heads: int = field(default=3, metadata=_range(1, 256))
    # Timing: torch.utils.benchmark blocks until this many seconds are spent on a point (at least
    # cost_min_blocks blocks); exponents are fitted over token counts >= cost_fit_min_tokens.
    cost_min_run_time: float = field(default=0.5, metadata=_range(0.001, 3600.0, "seconds per point"))
    cost_min_blocks: int = field(default=7, metadata=_range(2, 10_000, "timed blocks per point"))
    cost_fit_min_tokens: int = field(default=576, metadata=_range(1, 10_000_000))
    # Intervals: a hierarchical bootstrap (seeds, then test samples within each seed) with this many
    # resamples, drawn from a generator seeded with bootstrap_seed.
    bootstrap_resamples: int = field(default=2000, metadata=_range(100, 1_000_000))
    bootstrap_seed: int = field(default=0, metadata=_range(0, 2**32 - 1))


@dataclass(frozen=True)
class RayConfig:
    """Where trials run. Not tracked by DVC: results do not depend on where they ran."""

    # "" starts Ray in-process with this machine's CPUs; an address (or RAY_ADDRESS) joins a cluster.
    address: str = field(default="", metadata={"empty": True})
    # Trial checkpoints and results; "" is data/ray_results. On a multi-node cluster: a shared path or URI.
    storage: str = field(default="", metadata={"empty": True})


@dataclass(frozen=True)
class MlflowConfig:
    # "" uses MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db.
    tracking_uri: str = field(default="", metadata={"empty": True})
    experiment: str = "perception-study"
    # How long the end of a stage keeps retrying an unreachable tracking server before it reports what was
    # not logged (trial results stay on disk; a rerun logs them without training again).
    wait_seconds: float = field(default=120.0, metadata=_range(0.0, 86_400.0))


@dataclass(frozen=True)
class StudyConfig:
    # The data seed: every dataset instance's generator derives from it.
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))
    # Training seeds: every variant trains once per seed (initialisation, batch order, augmentation), so
    # the evaluation's intervals cover the spread between training runs as well as the test samples.
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=_range(0, 2**31 - 1))
    points: PointsConfig = PointsConfig()
    images: ImagesConfig = ImagesConfig()
    proximity: ProximityConfig = ProximityConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def flat(self) -> dict[str, Any]:
        """One flat dict, `section.key: value`, lists for tuples: for Ray Tune, MLflow and checkpoints."""
        return _flatten(dataclasses.asdict(self))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "models" and isinstance(value, tuple):  # train.models: name -> its settings, as written
            for entry in value:
                flat[f"{prefix}models.{entry['name']}.family"] = entry["family"]
                for setting, v in entry["settings"]:
                    key = f"{prefix}models.{entry['name']}.{setting}"
                    if isinstance(v, dict):  # a Domain: `...scan_order.grid: [rowmajor, snake]`
                        flat[f"{key}.{v['kind']}"] = list(v["values"])
                    else:
                        flat[key] = v
        elif isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


# ---------------------------------------------------------------------------------------------------------
# Validation: a small typed reader; every message names the key, the value and what is allowed.


def _describe(tp: Any, meta: dict) -> str:
    origin = typing.get_origin(tp)
    lo, hi = meta.get("min"), meta.get("max")
    bounds = ""
    if lo is not None and hi is not None:
        bounds = f" from {lo} to {hi}"
    elif lo is not None:
        bounds = f" >= {lo}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if "choices" in meta:
            return "a list of names from: " + ", ".join(meta["choices"])
        return f"a non-empty list, each {_describe(inner, {})}{bounds}"
    name = {int: "an integer", float: "a number", bool: "a boolean (true or false)", str: "a string"}[tp]
    extra = f" ({meta['help']})" if meta.get("help") else ""
    return f"{name}{bounds}{extra}"


def _convert(key: str, value: Any, tp: Any, meta: dict) -> Any:
    def bad(why: str = "") -> ConfigError:
        allowed = _describe(tp, meta)
        return ConfigError(f"{key} = {value!r} is not allowed: expected {allowed}{why}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple) or not value:
            raise bad()
        items = tuple(
            _convert(f"{key}[{i}]", v, inner, {**meta, "choices": None}) for i, v in enumerate(value)
        )
        choices = meta.get("choices")
        for item in items:
            if choices and item not in choices:
                raise ConfigError(f"{key}: unknown name {item!r}; allowed: {', '.join(choices)}")
        if len(set(items)) != len(items):
            raise bad(", without repeats")
        return items
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif tp is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string: accept a numeric literal written that way.
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif tp is str:
        if not isinstance(value, str) or (not value and not meta.get("empty")):
            raise bad()
        return value
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad()
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "params"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} = {data!r} is not allowed: expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed in {where}: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        tp = hints[name]
        if "parser" in f.metadata:
            kwargs[name] = f.metadata["parser"](f"{prefix}{name}", data[name])
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(f"{prefix}{name}", data[name], tp, dict(f.metadata))
    return cls(**kwargs)


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


def parse_config(data: Any, base_dir: Path | str = ".") -> StudyConfig:
    """Validate a params mapping (as read from YAML) into a StudyConfig, or raise ConfigError."""
    config = _build(StudyConfig, data, "")
    _check_cross_fields(config, Path(base_dir))
    return config


def load_config(path: Path | str = "params.yaml") -> StudyConfig:
    """Read and validate a params file. Relative data paths are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the params file ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    try:
        return parse_config(data, path.resolve().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
