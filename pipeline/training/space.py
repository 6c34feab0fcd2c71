"""From `train.models` to trials: grid expansion into variants, checks against the registry, Tune domains.

A *variant* is one model entry at one point of its `grid` values (`pointnet-so3`, `mamba_hybrid-hilbert`):
the unit the study compares and keeps a best checkpoint of. Sampled values (`choice` and ranges) and
`num_samples` make several trials of a variant; those are a search, and ASHA may stop the weak ones. Every
variant trains once per training seed (`seeds`): the study compares variants over seeds, not single runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from perception.data.canvas import CHANNELS
from perception.models import FAMILIES, ModelConfigError
from perception.rotations import MODES as AUGMENTS
from pipeline.config import (
    TASKS,
    TRIAL_KEYS,
    ConfigError,
    Domain,
    ModelEntry,
    StudyConfig,
    check_entry_setting,
)

# Settings a trial reads from `train` unless its model entry overrides them.
TRAINING_KEYS = (
    "epochs", "lr", "weight_decay", "batch_size", "points_per_cloud", "warmup_epochs", "grad_clip",
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    name: str  # entry name, then its grid values: "pointnet-so3"
    model: str  # the `train.models` entry
    family: str  # the registered family
    input_kind: str  # "image" or "points"
    fixed: dict[str, Any] = field(default_factory=dict)  # setting -> value, grid values resolved
    searched: dict[str, Domain] = field(default_factory=dict)  # setting -> sampled domain

    @property
    def dataset(self) -> str:
        """What it trains on: "points" (the shape clouds), "images" (the shape renders) or "proximity"."""
        return dataset_of(self.input_kind, self.fixed.get("task", "shapes"))

    def as_trial(self) -> dict[str, Any]:
        """The variant as it goes into Tune's search space (sampled settings still domains)."""
        return {"name": self.name, "model": self.model, "family": self.family, **self.fixed, **self.searched}


def expand(config: StudyConfig) -> list[Variant]:
    """Every variant of every model entry, in the file's order; grid settings vary fastest last.

    With `train.all_families`, registered families that no entry names follow, one variant each.
    """
    entries = list(config.train.models)
    if config.train.all_families:
        named = {entry.family for entry in entries} | {entry.name for entry in entries}
        entries += [ModelEntry(name, name, ()) for name in FAMILIES if name not in named]
    variants = []
    for entry in entries:
        family = FAMILIES.get(entry.family)
        if family is None:
            raise ConfigError(
                f"train.models.{entry.name}.family = {entry.family!r} is not allowed: "
                f"expected a registered family: {', '.join(FAMILIES)}"
            )
        if not any(key == "size" for key, _ in entry.settings) and config.train.size not in family.sizes:
            raise ConfigError(
                f"train.size = {config.train.size!r} is not allowed: expected one of "
                f"{', '.join(family.sizes)} (the sizes of {entry.family})"
            )
        fixed = {"size": config.train.size}
        if family.input_kind == "points":
            fixed["augment"] = "none"
        grids, searched = {}, {}
        for key, value in entry.settings:
            if isinstance(value, Domain) and value.kind == "grid":
                grids[key] = value.values
            elif isinstance(value, Domain):
                searched[key] = value
            else:
                fixed[key] = value
        for point in itertools.product(*grids.values()):
            grid_values = dict(zip(grids, point, strict=True))
            name = "-".join([entry.name, *(str(v) for v in point)])
            variants.append(
                Variant(name, entry.name, entry.family, family.input_kind, {**fixed, **grid_values}, searched)
            )
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"train.models: two variants are both named {duplicate!r}; rename an entry")
    return variants


def dataset_of(input_kind: str, task: str) -> str:
    """The prepared dataset a model of `input_kind` trains on for `task` (config.TASKS)."""
    if input_kind == "points":
        return "points"
    return "proximity" if task == "proximity" else "images"


def trial_dataset(flat: dict[str, Any]) -> str:
    """The prepared dataset of a trial, from its flat resolved config (`trial.family`, `trial.task`)."""
    return dataset_of(FAMILIES[flat["trial.family"]].input_kind, flat.get("trial.task", "shapes"))


def task_data(flat: dict[str, Any], input_kind: str, task: str) -> dict[str, Any]:
    """The data hparams of a model of `input_kind` on `task`, from a flat config that holds the shape data's
    `data.num_classes` / `data.in_channels` (the proximity task is binary and has one channel)."""
    if dataset_of(input_kind, task) == "proximity":
        return data_hparams(input_kind, 2, 1, flat["proximity.patch_size"], flat["proximity.size"])
    return data_hparams(
        input_kind,
        flat["data.num_classes"],
        flat["data.in_channels"],
        flat["images.patch_size"],
        flat["images.train_resolution"],
    )


def data_hparams(
    input_kind: str, num_classes: int, in_channels: int, patch_size: int, image_size: int
) -> dict[str, Any]:
    """Hparams that come from the data (classes, channels, the images' patch size and resolution)."""
    if input_kind == "image":
        return {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "patch_size": patch_size,
            "image_size": image_size,
        }
    return {"num_classes": num_classes}


def model_hparams(family_name: str, settings: dict[str, Any], from_data: dict[str, Any]) -> dict[str, Any]:
    """The family config's hparams for a resolved trial: its own settings, plus what its config takes
    from the data (a family without an `image_size` field does not get one)."""
    known = set(FAMILIES[family_name].config_cls.__dataclass_fields__)
    own = {k: v for k, v in settings.items() if k not in TRIAL_KEYS}
    return {**{k: v for k, v in from_data.items() if k in known}, **own}


def check(config: StudyConfig, variants: list[Variant], num_classes: int, in_channels: int) -> None:
    """Build every variant's model config (every listed value, every range's ends) before Ray starts."""
    for variant in variants:
        family = FAMILIES[variant.family]
        where = f"train.models.{variant.model}"
        if family.input_kind != "points" and "augment" in {**variant.fixed, **variant.searched}:
            raise ConfigError(
                f"{where}.augment: only point models take it; {variant.family} is an image model"
            )
        if "epochs" in variant.searched:
            raise ConfigError(
                f"{where}.epochs: only a fixed value is allowed (a whole number >= 1), not a search"
            )
        epochs = variant.fixed.get("epochs", config.train.epochs)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"{where}.epochs = {epochs!r} is not allowed: expected a whole number >= 1")
        warmup = variant.fixed.get("warmup_epochs", config.train.warmup_epochs)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < epochs:
            raise ConfigError(
                f"{where}.warmup_epochs = {warmup!r} is not allowed: expected a whole number from 0 to "
                f"epochs - 1 = {epochs - 1}"
            )
        clip = variant.fixed.get("grad_clip", config.train.grad_clip)
        if isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0:
            raise ConfigError(
                f"{where}.grad_clip = {clip!r} is not allowed: expected a number >= 0 (0: no clip)"
            )
        task = variant.fixed.get("task", "shapes")
        if "task" in variant.searched or task not in TASKS:
            raise ConfigError(
                f"{where}.task = {task!r} is not allowed: expected one of {', '.join(TASKS)} "
                "(a fixed value or a grid)"
            )
        if family.input_kind == "points" and task != "shapes":
            raise ConfigError(
                f"{where}.task = {task!r} is not allowed: {variant.family} is a point model; the proximity "
                "task is an image task"
            )
        augment = variant.fixed.get("augment", "none")
        if augment not in AUGMENTS:
            raise ConfigError(
                f"{where}.augment = {augment!r} is not allowed: expected one of {', '.join(AUGMENTS)}"
            )
        facts = {**config.flat(), "data.num_classes": num_classes, "data.in_channels": in_channels}
        samples = [variant.fixed] + [
            {**variant.fixed, key: value}
            for key, domain in variant.searched.items()
            for value in domain.candidates()
        ]
        for settings in samples:
            for key in TRAINING_KEYS:  # each by its train.* field's rule
                if key in settings:
                    check_entry_setting(where, key, settings[key])
            hparams = model_hparams(variant.family, settings, task_data(facts, family.input_kind, task))
            try:
                family.config(settings["size"], **hparams)
            except ModelConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            except TypeError as err:  # a value of the wrong type that the config's checks did not catch
                raise ConfigError(f"{where}: {err}") from None
    fault = config.train.fault
    if fault.model and fault.model not in {v.model for v in variants}:
        raise ConfigError(
            f"train.fault.model = {fault.model!r} is not allowed: expected one of "
            + ", ".join(sorted({v.model for v in variants}))
        )


def check_before_data(config: StudyConfig) -> list[Variant]:
    """Every variant, checked as the train stage checks it (`check`), before any data are prepared
    (`python -m pipeline check-params`), with the channels the renders carry and two classes: the count
    is the data's, and a model config asks only that it be at least two."""
    variants = expand(config)
    check(config, variants, 2, len(CHANNELS))
    return variants


def variant_epochs(config: StudyConfig, variant: Variant) -> int:
    """The epochs a checked variant trains: its entry's own `epochs`, else `train.epochs`."""
    return int(variant.fixed.get("epochs", config.train.epochs))


def max_epochs(config: StudyConfig, variants: list[Variant]) -> int:
    """The most epochs any variant trains."""
    return max(variant_epochs(config, v) for v in variants)


def trial_epochs(config: StudyConfig, trial_config: dict[str, Any] | None) -> int:
    """The epochs of one trial, from its Tune config."""
    return int((trial_config or {}).get("trial", {}).get("epochs", config.train.epochs))


def is_search(config: StudyConfig, variants: list[Variant]) -> bool:
    return config.train.num_samples > 1 or any(v.searched for v in variants)


def tune_domain(domain: Domain) -> Any:
    from ray import tune

    if domain.kind == "choice":
        return tune.choice(list(domain.values))
    if domain.kind == "uniform":
        return tune.uniform(*domain.values)
    if domain.kind == "loguniform":
        return tune.loguniform(*domain.values)
    if domain.kind == "randint":
        return tune.randint(*domain.values)
    raise ValueError(f"no Tune domain for {domain.kind!r}")  # grid is expanded into variants


def param_space(config: StudyConfig, variants: list[Variant], study_flat: dict[str, Any]) -> dict[str, Any]:
    """Tune's search space: the study's flat config, a grid over variants, and each trial's seed."""
    from ray import tune

    trials = []
    for variant in variants:
        trial = variant.as_trial()
        trials.append({k: tune_domain(v) if isinstance(v, Domain) else v for k, v in trial.items()})
    space: dict[str, Any] = {**study_flat, "trial": tune.grid_search(trials)}
    # Every variant once per training seed (`seeds`); `num_samples` > 1 repeats each (variant, seed) with
    # fresh draws of the sampled settings.
    space["trial_seed"] = tune.grid_search(list(config.seeds))
    return space


def trial_label(trial_config: dict[str, Any]) -> str:
    """`<variant>-s<seed>`: how a trial is named in Tune, MLflow and the trials table."""
    return f"{trial_config['trial']['name']}-s{trial_config['trial_seed']}"


def resolved(trial_config: dict[str, Any]) -> dict[str, Any]:
    """A trial's one flat resolved config: the study's keys, `trial.<setting>` and `trial.seed`."""
    flat = {k: v for k, v in trial_config.items() if k not in ("trial", "trial_seed")}
    flat.update({f"trial.{k}": v for k, v in trial_config["trial"].items()})
    flat["trial.seed"] = trial_config["trial_seed"]
    return flat
