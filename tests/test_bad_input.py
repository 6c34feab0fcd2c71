"""Bad input through the real stage commands: one line on stderr, exit 2, in seconds, and nothing written.

One study repo (its data prepared once) serves every case. Most rows call `pipeline.__main__.main` in this
process with the arguments dvc.yaml gives the stage (the command without a fresh interpreter, which costs
~4 s a row on two cores); the `DVC` rows run `dvc repro train` in a copy of the repo, to prove the path
`dvc repro` really takes. Each row checks: exit status 2, exactly one non-empty stderr line naming the key
and what is allowed, under 20 s, no file or folder of the repo new or changed, and no Ray session started.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from perception.data.arrays import MANIFEST, sha256_file
from pipeline.__main__ import main
from tests.conftest import make_study_repo, merge, run_command, write_params

SECONDS = 20  # generous: two loaded cores, and the train stage imports torch, Ray and MLflow first
DVC, MAIN = "dvc repro", "main"
REPO_TOKEN = "<repo>"  # stands for the study repo's absolute path in a row's params


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study repo with every dataset prepared, so the train and evaluate stages reach their own checks."""
    repo = make_study_repo(tmp_path_factory.mktemp("bad_input"))
    run_command(["dvc", "repro", "prepare_points", "prepare_images", "prepare_proximity"], repo)
    (repo / "data" / "empty-dataset").mkdir()  # a points.root without class folders
    return repo


def snapshot(repo: Path) -> dict[str, tuple[int, int] | None]:
    """Relative path -> (size, mtime_ns) of every file (None for a folder), but git's, DVC's temporaries and
    bytecode caches."""
    entries: dict[str, tuple[int, int] | None] = {}
    for path in repo.rglob("*"):
        rel = path.relative_to(repo)
        if rel.parts[0] == ".git" or rel.parts[:2] == (".dvc", "tmp") or "__pycache__" in rel.parts:
            continue
        stat = path.stat()
        entries[rel.as_posix()] = None if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return entries


def stage_argv(repo: Path, stage: str, params: Path, **paths: Path) -> list[str]:
    """The stage's arguments exactly as dvc.yaml gives them, paths absolute in `repo`, with --params and any
    path in `paths` (e.g. points=<a corrupted copy>) swapped in."""
    cmd = shlex.split(
        yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage.replace("-", "_")]["cmd"]
    )
    assert cmd[:4] == ["python", "-m", "pipeline", stage], cmd
    options = dict(zip(cmd[4::2], cmd[5::2], strict=True))
    options["--params"] = str(params)
    options.update({f"--{name}": str(path) for name, path in paths.items()})
    return [stage, *(arg for option, value in options.items() for arg in (option, str(repo / value)))]


def _fill(value: object, repo: Path) -> object:
    if isinstance(value, dict):
        return {k: _fill(v, repo) for k, v in value.items()}
    return value.replace(REPO_TOKEN, str(repo)) if isinstance(value, str) else value


def _ray_sessions(ray_tmp: Path) -> list[str]:
    return sorted(p.name for p in (ray_tmp / "ray").glob("session_*"))


def run_in_process(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`python -m pipeline <argv>` in this process: (exit status, stderr)."""
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = int(stop.code or 0)
    return code, capfd.readouterr().err


def assert_fails_cleanly(
    repo: Path, run: Callable[[], tuple[int, str]], expected: list[str], ray_tmp: Path | None = None
) -> str:
    """Run a failing stage; assert status 2, one stderr line holding every `expected` part, under SECONDS,
    nothing in `repo` new or changed and (where `ray_tmp` is Ray's temp root) no Ray session started."""
    before = snapshot(repo)
    began = time.monotonic()
    code, stderr = run()
    elapsed = time.monotonic() - began
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr)
    assert len(lines) == 1, stderr
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    after = snapshot(repo)
    changed = sorted(
        k for k in before.keys() | after.keys() if before.get(k, "absent") != after.get(k, "absent")
    )
    assert not changed, f"the failed stage touched {changed}"
    if ray_tmp is not None:
        assert not _ray_sessions(ray_tmp), "Ray was started before the bad input was found"
    return lines[0]


# --- bad params ---------------------------------------------------------------------------------------------


def row(name: str, override: dict, stage: str, expected: list[str], via: str = MAIN, marks=()):
    return pytest.param(override, stage, expected, via, id=name, marks=marks)


NO_CUDA_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")

BAD_PARAMS = [
    # unknown keys: top level, nested, and a family hparam in a model entry
    row(
        "unknown top-level key",
        {"trian": {"epochs": 1}},
        "train",
        ["trian: unknown key", "seed, seeds, points"],
    ),
    row(
        "unknown nested key",
        {"images": {"patch": 4}},
        "prepare-images",
        ["images.patch: unknown", "patch_size"],
    ),
    row(
        "unknown hparam of a model",
        {"train": {"models": {"vit": {"dmi": 30}}}},
        "train",
        ["train.models.vit: ViTConfig.dmi: unknown hparam", "allowed:", "dim"],
        via=DVC,
    ),
    # wrong types
    row("string for int", {"train": {"epochs": "8"}}, "train", ["train.epochs = '8'", "an integer from 1"]),
    row(
        "list for int",
        {"images": {"train_resolution": [16]}},
        "prepare-images",
        ["images.train_resolution = [16]", "an integer from 8 to 4096"],
    ),
    row(
        "bool for int",
        {"train": {"batch_size": True}},
        "train",
        ["train.batch_size = True", "an integer from 1"],
    ),
    row("string for float", {"train": {"lr": "fast"}}, "train", ["train.lr = 'fast'", "a number from 1e-08"]),
    row(
        "string for list",
        {"points": {"classes": "box"}},
        "prepare-points",
        ["points.classes = 'box'", "a list of names from: box, sphere"],
    ),
    row("string for section", {"points": "many"}, "prepare-points", ["points = 'many'", "a mapping"]),
    # negative and zero sizes
    row(
        "negative num_points",
        {"points": {"num_points": -5}},
        "prepare-points",
        ["points.num_points = -5", "an integer from 8 to 1000000"],
    ),
    row(
        "zero train_per_class",
        {"points": {"train_per_class": 0}},
        "prepare-points",
        ["points.train_per_class = 0", "from 1 to 100000"],
    ),
    row("zero epochs", {"train": {"epochs": 0}}, "train", ["train.epochs = 0", "from 1 to 100000"]),
    row("negative batch_size", {"train": {"batch_size": -4}}, "train", ["train.batch_size = -4", "from 1"]),
    row(
        "zero resolution",
        {"images": {"train_resolution": 0}},
        "prepare-images",
        ["images.train_resolution = 0", "from 8 to 4096"],
    ),
    row(
        "zero evaluate batch_size",
        {"evaluate": {"batch_size": 0}},
        "evaluate",
        ["evaluate.batch_size = 0", "from 1 to 65536"],
    ),
    row(
        "zero model depth",
        {"train": {"models": {"vit": {"depth": 0}}}},
        "train",
        ["train.models.vit: ViTConfig.depth = 0", "expected"],
    ),
    # unknown names
    row(
        "unknown model family",
        {"train": {"models": {"resnet": {}}}},
        "train",
        ["train.models.resnet.family = 'resnet'", "registered family: vit, mamba_hybrid, e3nn"],
        via=DVC,
    ),
    row(
        "unknown point class",
        {"points": {"classes": ["box", "blob"]}},
        "prepare-points",
        ["points.classes: unknown name 'blob'", "allowed: box, sphere"],
    ),
    row(
        "a model's epochs searched",
        {"train": {"models": {"vit": {"epochs": {"choice": [4, 8]}}}}},
        "train",
        ["train.models.vit.epochs: only a fixed value", "a whole number >= 1"],
    ),
    row(
        "a model's epochs zero",
        {"train": {"models": {"vit": {"epochs": 0}}}},
        "train",
        ["train.models.vit.epochs = 0 is not allowed", "a whole number >= 1"],
    ),
    row(
        "unknown augment",
        {"train": {"models": {"pointnet": {"augment": "x"}}}},
        "train",
        ["train.models.pointnet.augment = 'x'", "one of none, z, so3"],
    ),
    row(
        "unknown scheduler",
        {"train": {"scheduler": "hyperband"}},
        "train",
        ["train.scheduler = 'hyperband'", "one of 'auto', 'none', 'asha'"],
    ),
    row(
        "unknown default size",
        {"train": {"size": "huge"}},
        "train",
        ["train.size = 'huge'", "tiny, small, base"],
    ),
    # the patch size must divide every resolution
    row(
        "patch size vs train resolution",
        {"images": {"train_resolution": 18}},
        "prepare-images",
        ["images.train_resolution = 18", "a multiple of images.patch_size = 4"],
    ),
    row(
        "patch size vs eval resolution",
        {"images": {"eval_resolutions": [16, 30]}},
        "evaluate",
        ["images.eval_resolutions[1] = 30", "a multiple of images.patch_size = 4"],
    ),
    row(
        "a scaled object larger than the training canvas",
        {"images": {"eval_resolutions": [48]}},
        "prepare-images",
        ["images.eval_resolutions: 48 scales the object to 24 px", "expected at most 32"],
    ),
    row(
        "proximity objects that do not fit the canvas",
        {"proximity": {"segments": 40}},
        "prepare-proximity",
        ["proximity.distractors", "fit in the 12x12 canvas"],
    ),
    row(
        "an unknown task for a model",
        {"train": {"models": {"vit": {"task": "segmentation"}}}},
        "train",
        ["train.models.vit.task = 'segmentation'", "shapes, proximity"],
        via=DVC,
    ),
    row(
        "the proximity task for a point model",
        {"train": {"models": {"pointnet": {"task": "proximity"}}}},
        "train",
        ["train.models.pointnet.task = 'proximity'", "point model"],
        via=DVC,
    ),
    row(
        "cost patch vs cost resolution",
        {"evaluate": {"cost_resolutions": [32, 40]}},
        "evaluate",
        ["evaluate.cost_resolutions[1] = 40", "a multiple of evaluate.cost_patch_size = 16"],
    ),
    row(
        "cost sweep with too few token counts to fit",
        {"evaluate": {"cost_resolutions": [224, 512], "cost_fit_min_tokens": 576}},
        "evaluate",
        ["evaluate.cost_fit_min_tokens = 576", "[224, 512]", "at least 2 token counts", "[1024]"],
    ),
    row(
        "cost_dim vs cost_heads",
        {"evaluate": {"cost_dim": 17}},
        "evaluate",
        ["evaluate.cost_dim = 17", "a multiple of evaluate.cost_heads = 2"],
    ),
    # resources
    row(
        "GPU fraction above 1",
        {"train": {"gpus_per_trial": 1.5}},
        "train",
        ["train.gpus_per_trial = 1.5", "a fraction up to 1", "a whole number of GPUs"],
        via=DVC,
    ),
    row(
        "negative GPUs",
        {"train": {"gpus_per_trial": -1}},
        "train",
        ["train.gpus_per_trial = -1", "from 0.0 to 64.0", "a fraction up to 1"],
    ),
    row(
        "GPUs on a machine without",
        {"train": {"gpus_per_trial": 1}},
        "train",
        ["train.gpus_per_trial = 1", "no CUDA device", "use 0"],
        via=DVC,
        marks=NO_CUDA_ONLY,
    ),
    row(
        "more CPUs than the machine",
        {"train": {"cpus_per_trial": 1024}},
        "train",
        ["train.cpus_per_trial = 1024", f"at most {os.cpu_count()}"],
        via=DVC,
    ),
    # a folder dataset that is not there
    row(
        "data root missing",
        {"points": {"source": "folder", "root": f"{REPO_TOKEN}/data/no-such-dataset"}},
        "prepare-points",
        ["points.root = ", "no-such-dataset", "an existing folder in ModelNet layout"],
    ),
    row(
        "data root empty",
        {"points": {"source": "folder", "root": f"{REPO_TOKEN}/data/empty-dataset"}},
        "prepare-points",
        ["points.root = ", "empty-dataset", "holds no class folders", "<root>/<class>/train/*"],
    ),
    # searched values
    row(
        "range with one end",
        {"train": {"models": {"vit": {"lr": {"uniform": [1]}}}}},
        "train",
        ["train.models.vit.lr.uniform = [1]", "expected [low, high] with low < high"],
    ),
    row(
        "list without a search kind",
        {"train": {"models": {"vit": {"dim": [32, 64]}}}},
        "train",
        ["train.models.vit.dim = [32, 64]", "{grid: [32, 64]}", "{choice: [32, 64]}"],
    ),
    row(
        "unknown search kind",
        {"train": {"models": {"vit": {"dim": {"range": [32, 64]}}}}},
        "train",
        ["train.models.vit.dim = {'range': [32, 64]}", "{grid: [...]}, {choice: [...]}"],
    ),
]


# `python -m pipeline check-params` checks the model entries as the train stage does, before any data exist:
# every row of a model setting again, through it.
CHECK = "check-params"
BAD_PARAMS += [
    pytest.param(*case.values[:3], CHECK, id=f"{case.id}, check-params")
    for case in list(BAD_PARAMS)
    if case.values[1] == "train" and "models" in case.values[0].get("train", {})
]


@pytest.mark.parametrize("override,stage,expected,via", BAD_PARAMS)
def test_bad_params_fail_in_seconds_naming_the_key_and_writing_nothing(
    study: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    override: dict,
    stage: str,
    expected: list[str],
    via: str,
) -> None:
    params = merge(yaml.safe_load((study / "params.yaml").read_text()), _fill(override, study))
    if via in (MAIN, CHECK):
        written = write_params(tmp_path / "params.yaml", params)
        argv = stage_argv(study, stage, written) if via == MAIN else [CHECK, "--params", str(written)]
        assert_fails_cleanly(study, lambda: run_in_process(argv, capfd), expected)
        return
    # `dvc repro` runs dvc.yaml's command, which reads the repo's params.yaml: give it a copy of the repo.
    assert stage == "train" and set(override) == {"train"}, "dvc rows leave the data stages up to date"
    repo = tmp_path / "study"
    shutil.copytree(study, repo, symlinks=True)
    write_params(repo / "params.yaml", params)
    ray_tmp = Path(tempfile.mkdtemp(prefix="bad-input-ray-"))  # short: Ray's socket paths must fit 107 bytes

    def run() -> tuple[int, str]:
        result = run_command(["dvc", "repro", "train"], repo, check=False, env={"RAY_TMPDIR": str(ray_tmp)})
        # DVC adds its own summary line; the stage's exit status is in it.
        dvc_lines = [
            line for line in result.stderr.splitlines() if line.startswith("ERROR: failed to reproduce")
        ]
        assert result.returncode != 0 and len(dvc_lines) == 1, result.stderr
        code = 2 if dvc_lines[0].endswith("exited with 2") else result.returncode
        return code, "\n".join(line for line in result.stderr.splitlines() if line not in dvc_lines)

    try:
        assert_fails_cleanly(repo, run, expected, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_check_params_lists_the_variants_the_train_stage_runs(
    study: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from pipeline.config import load_config
    from pipeline.training import space

    capfd.readouterr()
    assert main(["check-params", "--params", str(study / "params.yaml")]) == 0
    out = capfd.readouterr().out
    config = load_config(study / "params.yaml")
    variants = space.expand(config)
    seeds, count = list(config.seeds), len(variants)
    assert f"variants: {count}, each trained on seeds {seeds}: {count * len(seeds)} trials" in out
    for variant in variants:
        epochs = space.variant_epochs(config, variant)
        assert f"  {variant.name}: {variant.family} on {variant.dataset}, {epochs} epochs\n" in out


# --- corrupted prepared data --------------------------------------------------------------------------------


def _rewrite(folder: Path, name: str, array: np.ndarray) -> None:
    """Replace `<name>.npy` and record it in the manifest as if the stage had written it: hash, shape, dtype
    all agree, so only a check of the content itself can refuse it."""
    path = folder / f"{name}.npy"
    np.save(path, array, allow_pickle=False)
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = {"sha256": sha256_file(path), "shape": list(array.shape), "dtype": str(array.dtype)}
    manifest["files"][path.name] = entry
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _truncate(folder: Path, name: str, consistent: bool) -> None:
    path = folder / f"{name}.npy"
    path.write_bytes(path.read_bytes()[:-100])
    if consistent:  # the manifest's hash follows, so the reader itself must notice
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["files"][path.name]["sha256"] = sha256_file(path)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _with_nan(folder: Path, name: str) -> None:
    array = np.load(folder / f"{name}.npy").copy()
    array.reshape(len(array), -1)[[5, 5, 7], [0, 4, 1]] = np.nan  # three values, in samples 5 and 7
    _rewrite(folder, name, array)


# case -> (dataset, corruption, file, parts of the message besides the file's path)
CORRUPTIONS: dict[str, tuple[str, Callable[[Path], None], str, list[str]]] = {
    "truncated, manifest hash stale": (
        "points",
        lambda d: _truncate(d, "train_points", consistent=False),
        "train_points.npy",
        ["content does not match its manifest hash"],
    ),
    "truncated, manifest hash updated": (
        "points",
        lambda d: _truncate(d, "train_points", consistent=True),
        "train_points.npy",
        ["unreadable", "rerun the stage that writes it"],
    ),
    "NaN points": (
        "points",
        lambda d: _with_nan(d, "train_points"),
        "train_points.npy",
        ["3 non-finite values (first in sample 5)", "rerun the stage that writes it"],
    ),
    "NaN test points": (
        "points",
        lambda d: _with_nan(d, "test_points"),
        "test_points.npy",
        ["3 non-finite values (first in sample 5)"],
    ),
    "NaN pixels": (
        "images",
        lambda d: _with_nan(d, "train_r16"),
        "train_r16.npy",
        ["3 non-finite values (first in sample 5)"],
    ),
    "points with two coordinates": (
        "points",
        lambda d: _rewrite(d, "train_points", np.load(d / "train_points.npy")[..., :2].copy()),
        "train_points.npy",
        ["shape [12, 64, 2]", "expected [samples, points, xyz] = [12, 64, 3]"],
    ),
    "images at the wrong resolution": (
        "images",
        lambda d: _rewrite(d, "train_r16", np.load(d / "train_r16.npy")[:, :, ::2, ::2].copy()),
        "train_r16.npy",
        ["shape [12, 4, 8, 8]", "expected [samples, channels, R, R] = [12, 4, 16, 16]"],
    ),
    "labels shorter than the samples": (
        "points",
        lambda d: _rewrite(d, "train_labels", np.load(d / "train_labels.npy")[:-1].copy()),
        "train_labels.npy",
        ["shape [11]", "expected [samples] = [12]"],
    ),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupted_prepared_data_fails_naming_the_file(
    study: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], case: str
) -> None:
    dataset, corrupt, file, expected = CORRUPTIONS[case]
    copy = tmp_path / dataset
    shutil.copytree(study / "data" / "prepared" / dataset, copy)  # the fixture's own data stay sound
    corrupt(copy)
    stage = "evaluate" if file.startswith("test_") else "train"  # the stage that reads that split
    argv = stage_argv(study, stage, study / "params.yaml", **{dataset: copy})
    line = assert_fails_cleanly(study, lambda: run_in_process(argv, capfd), expected)
    assert f"{copy / file}: " in line, line


# --- corrupted checkpoints ----------------------------------------------------------------------------------


def _checkpoint_config(repo: Path) -> dict:
    """What a pointnet trial of the study repo exports, but its weights: perception.models.checkpoint's
    family, model config and training record."""
    from perception.models import build
    from perception.models.checkpoint import model_config

    classes = yaml.safe_load((repo / "params.yaml").read_text())["points"]["classes"]
    training = {
        "variant": "pointnet",
        "seed": 0,
        "dataset": "points",
        "augment": "none",
        "points_per_cloud": 0,
    }
    return {"family": "pointnet", "config": model_config(build("pointnet", num_classes=len(classes))),
            "training": training}  # fmt: skip


def _checkpoint(parts: dict, **replace: object) -> dict:
    """A checkpoint as the train stage exports it, with any of its entries replaced."""
    from perception.models.checkpoint import FORMAT

    return {"format": FORMAT, **parts, "state_dict": _weights(parts), "metrics": {}, **replace}


def _weights(parts: dict, **hparams: object) -> dict:
    from perception.models import build

    return build(parts["family"], **{**parts["config"], **hparams}).state_dict()


def _truncated(config: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(_checkpoint(config), buffer)
    return buffer.getvalue()[:-200]


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# case -> (checkpoint bytes from a sound checkpoint's parts, part of the reason in the message)
BAD_CHECKPOINTS: dict[str, tuple[Callable[[dict], bytes], str]] = {
    "truncated": (_truncated, "failed reading zip archive"),
    "a list, not a dict": (lambda c: _saved([1, 2, 3]), "holds a list"),
    "no state_dict": (lambda c: _saved({"format": 2, **c}), "no 'state_dict'"),
    "no config": (lambda c: _saved({k: v for k, v in _checkpoint(c).items() if k != "config"}), "'config'"),
    "wrong tensor shapes": (
        lambda c: _saved(_checkpoint(c, state_dict=_weights(c, num_classes=7))),
        "size mismatch",
    ),
    "an hparam no family has": (
        lambda c: _saved(_checkpoint(c, config={**c["config"], "wdith": 3})),
        "PointNetConfig.wdith: unknown hparam",
    ),
    "the old flat-config format": (
        lambda c: _saved(
            {"state_dict": _weights(c), "config": {"trial.family": "pointnet", "trial.size": "tiny"}}
        ),
        "an older checkpoint",
    ),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_corrupted_checkpoint_fails_the_evaluate_stage_naming_the_file(
    study: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], case: str
) -> None:
    make, reason = BAD_CHECKPOINTS[case]
    config = _checkpoint_config(study)
    models = tmp_path / "train" / "models"
    (models / "a-sound").mkdir(parents=True)
    (models / "pointnet").mkdir(parents=True)
    # A sound checkpoint first, so the stage is refused for the bad one, not for holding nothing usable.
    (models / "a-sound" / "seed-0.pt").write_bytes(_saved(_checkpoint(config)))
    (models / "pointnet" / "seed-0.pt").write_bytes(make(config))
    argv = stage_argv(study, "evaluate", study / "params.yaml", train=tmp_path / "train")
    line = assert_fails_cleanly(
        study, lambda: run_in_process(argv, capfd), ["not a usable checkpoint", reason, "retrain"]
    )
    assert line.startswith(f"error: {models / 'pointnet' / 'seed-0.pt'}: "), line
