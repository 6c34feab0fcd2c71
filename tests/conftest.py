"""Shared fixtures: tiny params and mesh files the tests write themselves (nothing reads ../shared)."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported, and torch or e3nn may import it long before the
# scan's Triton tests run: set it here, first, so those tests run the kernels on CPU tensors. A GPU run of
# the `gpu` tests (benchmarks.gpu_check) sets PERCEPTION_TRITON_NATIVE to run them natively instead.
if not os.environ.get("PERCEPTION_TRITON_NATIVE"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pytest
import yaml

if TYPE_CHECKING:  # the GPU machine's tests run without pydantic: pipeline is imported where it is used
    from pipeline.config import StudyConfig

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")

TINY_PARAMS = {
    "seed": 7,
    "seeds": [0, 1],
    "points": {
        "classes": ["box", "sphere", "cone", "torus"],
        "train_per_class": 3,
        "test_per_class": 2,
        "num_points": 64,
    },
    "images": {"patch_size": 4, "train_resolution": 16, "object_size": 8, "eval_resolutions": [24, 32]},
    "proximity": {"size": 12, "segments": 3, "distractors": 2, "train_count": 16, "test_count": 12},
    "runtime": {"workers": 1, "progress": False},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture
def tiny_config(tmp_path: Path):
    from pipeline.config import parse_config

    def make(**sections) -> StudyConfig:
        return parse_config(merge(TINY_PARAMS, sections), tmp_path)

    return make


def write_params(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """A params.yaml of the tiny study with tiny trials, for the benchmarks' command lines."""
    return write_params(tmp_path / "params.yaml", merge(TINY_PARAMS, {"train": TINY_TRAIN}))


# --- a study repository of our own, for real `dvc repro` runs -----------------------------------------------

STUDY_FILES = [
    "pipeline",
    "perception",
    "plots_templates",
    "dvc.yaml",
    ".dvcignore",
    ".gitignore",
    "data/raw/README.md",
]

# Training on the tiny data: every family once, a grid of two where the study compares variants.
TINY_TRAIN = {
    "models": {
        "vit": {"pos_embed": {"grid": ["learned", "none"]}},
        "mamba_hybrid": {},
        "proximity_mamba": {
            "family": "mamba_hybrid",
            "task": "proximity",
            "attn_layers": 0,
            "scan_order": {"grid": ["rowmajor", "hilbert"]},
        },
        "e3nn": {},
        "pointnet": {"augment": {"grid": ["none", "so3"]}},
        "dgcnn": {},
    },
    "epochs": 2,
    "batch_size": 4,
    "points_per_cloud": 32,
    "grace_period": 1,
}


# A cost sweep small enough for CI: three token counts, a two-block model.
TINY_EVALUATE = {
    "rotation_draws": 2,
    "invariance_clouds": 4,
    "cost_resolutions": [32, 64, 128],
    "cost_patch_size": 16,
    "cost_dim": 16,
    "cost_depth": 2,
    "cost_heads": 2,
    "cost_min_run_time": 0.05,
    "cost_min_blocks": 3,
    "cost_fit_min_tokens": 16,
    "deploy_min_run_time": 0.02,
    "deploy_rounds": 2,
    "deploy_block_ms": 2,
}


def on_one_then_two_threads(run: Callable[[], T]) -> tuple[T, T]:
    """run() on one torch thread, then on two, the caller's count restored after: a kernel that splits its
    work over threads must give the same bits either way."""
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        return one, run()
    finally:
        torch.set_num_threads(threads)


def tool_env(extra: dict | None = None) -> dict[str, str]:
    """The environment for a tool of this environment (dvc, python, mlflow): this venv first on PATH, no
    outside Ray cluster or MLflow store, then `extra`."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return {**env, **(extra or {})}


def run_command(
    cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run a tool of this environment (dvc, python) in `cwd`; fail the test with its output if it fails."""
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def make_study_repo(tmp_path: Path, override: dict | None = None, models: dict | None = None) -> Path:
    """A git + DVC repository with the study's code and the real params file shrunk to tiny sizes.

    `override` is merged into the params; `models` replaces `train.models` whole.
    """
    root = tmp_path / "study"
    for rel in STUDY_FILES:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    # The real params file, shrunk: dvc.yaml templates read keys from it (e.g. ${points.root}).
    real = yaml.safe_load((REPO / "params.yaml").read_text())
    params = merge(merge(real, TINY_PARAMS), {"runtime": {"workers": 2}})
    params["train"] = {**params["train"], **TINY_TRAIN}
    params["evaluate"] = {**params["evaluate"], **TINY_EVALUATE}
    params = merge(params, override or {})
    if models is not None:
        params["train"]["models"] = models
    write_params(root / "params.yaml", params)
    run_command(["git", "init", "-q"], root)
    run_command(["dvc", "init", "-q"], root)
    shutil.copy2(REPO / ".dvc/config", root / ".dvc/config")  # the project's: no analytics, offline plots
    return root


# --- mesh files -------------------------------------------------------------------------------------------

CUBE_VERTICES = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=float
)
CUBE_QUADS = [[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [2, 3, 7, 6], [1, 2, 6, 5], [0, 4, 7, 3]]
CUBE_TRIANGLES = np.array([t for q in CUBE_QUADS for t in ([q[0], q[1], q[2]], [q[0], q[2], q[3]])])


def off_text(vertices: np.ndarray, faces: list, quirk: bool = False) -> str:
    counts = f"{len(vertices)} {len(faces)} 0"
    header = f"OFF{counts}\n" if quirk else f"OFF\n{counts}\n"
    rows = [" ".join(f"{c:g}" for c in v) for v in vertices]
    rows += [" ".join(map(str, [len(f), *f])) for f in faces]
    return header + "\n".join(rows) + "\n"


def stl_binary(triangles: np.ndarray) -> bytes:
    """triangles float[F, 3, 3] -> binary STL bytes."""
    data = bytearray(b"binary stl written by the tests".ljust(80, b" "))
    data += struct.pack("<I", len(triangles))
    for tri in triangles:
        data += struct.pack("<12fH", 0, 0, 0, *tri.reshape(-1), 0)
    return bytes(data)


def stl_ascii(triangles: np.ndarray, name: str = "solid0") -> str:
    lines = [f"solid {name}"]
    for tri in triangles:
        lines += ["facet normal 0 0 0", "outer loop", *[f"vertex {x:g} {y:g} {z:g}" for x, y, z in tri]]
        lines += ["endloop", "endfacet"]
    return "\n".join(lines + [f"endsolid {name}"]) + "\n"


def ply_binary(vertices: np.ndarray, faces: np.ndarray | None) -> bytes:
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(vertices)}"]
    header += ["property float x", "property float y", "property float z"]
    if faces is not None:
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    body = np.asarray(vertices, dtype="<f4").tobytes()
    if faces is not None:
        body += b"".join(struct.pack("<B3i", 3, *f) for f in faces)
    return ("\n".join(header + ["end_header"]) + "\n").encode() + body


def ply_ascii_points(vertices: np.ndarray) -> str:
    header = ["ply", "format ascii 1.0", f"element vertex {len(vertices)}"]
    header += ["property float x", "property float y", "property float z", "end_header"]
    return "\n".join(header + [" ".join(f"{c:g}" for c in v) for v in vertices]) + "\n"


# --- a whole smoke study, and its metrics without the timing-derived values ---------------------------------


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory) -> Path:
    """A tiny study (make_study_repo's defaults) after a whole `dvc repro` from scratch; its root."""
    root = make_study_repo(tmp_path_factory.mktemp("smoke"))
    run_command(["dvc", "repro"], root)
    return root


# Metric keys derived from wall-clock timing, as paths with "*" for any key; everything else in
# metrics/*.json (accuracies, invariance errors, FLOP exponents, the profiler's peak-memory exponents on CPU)
# repeats exactly between two runs with the same seeds.
TIMING_METRICS = [
    # the log-log fits of forward latency against tokens (timed forwards), their intervals, and the cost
    # claim's effect (a difference of latency exponents)
    *(
        ("evaluate", "cost", "*", f"{fit}_exponent{end}")
        for fit in ("latency", "latency_full")
        for end in ("", "_lo", "_hi")
    ),
    ("evaluate", "effects", "cost"),
    # every trained model's deployment cost: timed, but for its parameters and peak memory
    *(("evaluate", "deployment", "*", key) for key in ("latency_ms", "latency_ms_lo", "latency_ms_hi")),
    ("evaluate", "deployment", "*", "throughput_per_s"),
]


def _drop(tree: dict, path: tuple[str, ...]) -> None:
    head, *rest = path
    for key in list(tree) if head == "*" else [head]:
        if not rest:
            tree.pop(key, None)
        elif isinstance(tree.get(key), dict):
            _drop(tree[key], tuple(rest))


# Not measurements: which MLflow run holds a run's numbers (listed by `dvc exp show`), new on every run; and
# how busy the run kept its trial slots (wall-clock timing).
RUN_IDENTIFIERS = [("train", "mlflow_parent_run_id"), ("train", "slot_utilisation")]


def comparable_metrics(root: Path) -> dict:
    """{"train": metrics/train.json, "evaluate": metrics/evaluate.json} less TIMING_METRICS and
    RUN_IDENTIFIERS."""
    metrics = {
        name: json.loads((root / f"metrics/{name}.json").read_text()) for name in ("train", "evaluate")
    }
    for path in TIMING_METRICS + RUN_IDENTIFIERS:
        _drop(metrics, path)
    return metrics


# --- processes a test starts --------------------------------------------------------------------------------


@pytest.fixture
def spawn():
    """`subprocess.Popen` in a session of its own. When the test ends, however it ends, its whole group is
    killed (dvc, the stage, its worker processes, Ray's): a test that failed while it waited would otherwise
    leave a study running under the tests after it, and a leader that exited may leave children behind."""
    started: list[subprocess.Popen] = []

    def start(command: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        # An exited leader's children run on in its group, whose id is not reused while any of them lives.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    process: subprocess.Popen | None = None,
    what: str = "the condition",
    poll: float = 0.2,
) -> T:
    """`condition()`'s first truthy value, polled every `poll` s; an AssertionError naming `what` if `timeout`
    s pass first, or if `process` ends first (what it was to do will then never happen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


# --- a real MLflow tracking server -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a SQLite store, which a test can stop (SIGKILL) and start
    again on the same port."""

    def __init__(self, store: Path, artifacts: Path):
        self.store, self.artifacts, self.port = store, artifacts, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = store.parent / f"mlflow-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                ["mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.store}",
                 "--default-artifact-root", self.artifacts.as_uri()],
                cwd=self.store.parent, env=tool_env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mlflow server did not answer /health within {timeout:g} s")
            time.sleep(0.5)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
