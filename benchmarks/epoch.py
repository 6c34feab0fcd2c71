"""One training epoch of every family at its default size, on the default study's data, before and after the
step-level changes of this version, in one run:

    python -m benchmarks.epoch --json epoch.json          # about 4 minutes on 2 cores

"before" runs the reference paths these changes kept beside their fast ones, or the code they replaced, each
named so that `--before NAME ...` can revert some of them only (the default: all):
- `serialize`: `serialize_ref`, the advanced indexing that put a token grid in scan order, and `deserialize`
  then a mean over the directions;
- `causal_conv`: Mamba's causal convolution as `nn.Conv1d` then SiLU (`causal_conv1d_silu_ref`) rather than
  the fused kernel of `perception.ops.causal_conv`;
- `no_grad`: validation under `torch.no_grad` rather than `torch.inference_mode`;
- `edge_block`: DGCNN's `forward_per_edge`, BatchNorm and LeakyReLU on every edge before the max over
  neighbours;
- `tensor_product`: e3nn's own TensorProduct in place of the fused kernel of `perception.ops.tensor_product`,
  its messages summed by `index_add_`;
- `summed_messages`: the fused kernel's per-edge messages, then summed by `index_add_`, rather than summed
  into their targets inside the kernel (`tensor_product_sum`);
- `smallest_k`: torch's `topk` in place of `smallest_k` for the k nearest neighbours;
- `farthest_points`: farthest point sampling (DGCNN's and e3nn's) as a loop of torch ops rather than the
  kernel of `farthest_points.c`;
- `per_point`: PointNet's shared MLP as the paper's 1x1 convolutions over [B, C, N] (`per_point_ref`)
  rather than Linear layers over B * N rows;
- `adamw`: AdamW one parameter at a time (`adamw_ref`, torch's default on a CPU) rather than fused;
- `rope`: RoPE's rotation as products of the real halves of each channel pair (`apply_rope_ref`) rather than
  one complex product;
- `scan_backward`: the native selective scan as its C source stood at commit KERNELS_BEFORE (read with
  `git show`, so it needs this repository's history), whose backward ran its softplus and sigmoid scalar
  and read each state back from memory;
- `tp_transposes`: the fused tensor product as its C source stood at KERNELS_BEFORE, which moved each
  chunk's rows into SIMD lanes and back element by element.
Both compute the same bits as the kernels now (tests/test_epoch_bench.py).
"after" the code as it is. Each family trains
one epoch (and validates) on one thread, as a trial does, alternating before / after three times on the same
data, model and seed; the median of each is reported with their ratio. The image models also predict the whole
test set on the larger canvas (the evaluate stage's work), before and after, the same way. The data are the
default params' datasets, prepared into a temporary folder first.

    python -m benchmarks.epoch --before rope   # this version's change alone
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import perception.layers.attention as attention
import perception.models.dgcnn as dgcnn
import perception.models.equivariant as equivariant
import perception.models.mamba_hybrid as mamba_hybrid
import perception.models.pointnet as pointnet
import perception.ops.graphs as graphs
import perception.ops.scan.native as native_scan
import perception.ops.tensor_product as tensor_product
import perception.training as training
import pipeline.training.trainable as trainable
from perception.data.arrays import open_dataset
from perception.layers.rope import apply_rope_ref
from perception.ops.causal_conv import causal_conv1d_silu_ref
from perception.ops.native import Kernel
from perception.ops.serialization import deserialize, serialize_ref
from perception.ops.tensor_product import tensor_product as fused_tensor_product
from pipeline.config import load_config
from pipeline.stages.prepare_images import prepare_images
from pipeline.stages.prepare_points import prepare_points
from pipeline.stages.prepare_proximity import prepare_proximity
from pipeline.training import space
from pipeline.training.inputs import array_stems, split_data
from pipeline.training.trainable import build_model, step_settings, trial_optimizer

REPO = Path(__file__).resolve().parents[1]
# One variant per family (and the proximity task's pure Mamba, the study's most numerous trials).
VARIANTS = (
    "e3nn",
    "dgcnn",
    "pointnet-none",
    "vit-learned",
    "vit-rope",  # the rotation of q and k in every block
    "mamba_hybrid",
    "mamba",
    "proximity_mamba-rowmajor",
    "proximity_mamba-cross",  # four scan directions: serialisation's largest share
)
PREDICT_STEM = "test_fov_r64"  # the default's larger canvas, same field of view: 16x16 tokens
KERNELS_BEFORE = "b2d8c58"  # the C kernels' sources before this version mended their loops


_fast_predict = training.predict  # the inference-mode predict, whose body `no_grad` reruns under no_grad


@torch.no_grad()
def _predict_no_grad(model, inputs, batch_size, device, bf16=False):
    return _fast_predict.__wrapped__(model, inputs, batch_size, device, bf16)


def _e3nn_products_summed(tp, terms, x1, x2, weight, edge_dst, num_targets):
    return graphs.sum_by_target_ref(tp(x1, x2, weight), edge_dst, num_targets)


def _kernel_products_summed(tp, terms, x1, x2, weight, edge_dst, num_targets):
    return graphs.sum_by_target_ref(fused_tensor_product(tp, terms, x1, x2, weight), edge_dst, num_targets)


# The reversions whose "before" is a kernel's earlier source, read from git, and that source's path.
KERNEL_SOURCES = {
    "scan_backward": "perception/ops/scan/native_scan.c",
    "tp_transposes": "perception/ops/tensor_product.c",
}


def _source_before(path: str) -> str:
    """The text of `path` (from the repository's root) at KERNELS_BEFORE."""
    try:
        shown = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{KERNELS_BEFORE}:{path}"], capture_output=True, text=True
        )
    except FileNotFoundError:  # no git on this machine
        shown = subprocess.CompletedProcess([], 1, "", "git is not installed")
    if shown.returncode != 0:
        detail = shown.stderr.strip().splitlines()[-1] if shown.stderr.strip() else "git show failed"
        raise RuntimeError(
            f"{path} at commit {KERNELS_BEFORE} is not in this checkout's git history ({detail}): run from a"
            f" clone with its history, or leave {', '.join(KERNEL_SOURCES)} out of --before"
        )
    return shown.stdout


def _compiled_before(kernel: Kernel) -> ctypes.CDLL:
    """`kernel` compiled from its source at KERNELS_BEFORE, with its own prefix, headers, flags and
    signatures."""
    text = _source_before(kernel.source.relative_to(REPO).as_posix())
    with tempfile.TemporaryDirectory(prefix="kernel-before-") as tmp:
        source = Path(tmp) / kernel.source.name
        source.write_text(text)
        then = Kernel(source, kernel.signatures, kernel.fallback, kernel.prefix, kernel.headers, kernel.flags)
        return then.loaded()


@functools.cache
def previous_scan_library(n: int) -> ctypes.CDLL:
    """The native scan kernel for N = n states, compiled from its source at KERNELS_BEFORE."""
    return _compiled_before(native_scan._kernel(n))


@functools.cache
def previous_tensor_product_library() -> ctypes.CDLL:
    """The fused tensor product kernel, compiled from its source at KERNELS_BEFORE."""
    return _compiled_before(tensor_product.KERNEL)


# name -> the (owner, attribute, reference) swaps that time it as before. Applied in this order, so that
# `tensor_product` replaces what `summed_messages` put in where both are named.
REFERENCE_PATHS: dict[str, list[tuple[object, str, object]]] = {
    "serialize": [
        (mamba_hybrid, "serialize", serialize_ref),
        (mamba_hybrid, "deserialize_mean", lambda y, paths: deserialize(y, paths).mean(dim=1)),
    ],
    "causal_conv": [(mamba_hybrid, "causal_conv1d_silu", causal_conv1d_silu_ref)],
    "no_grad": [(training, "predict", _predict_no_grad)],
    "edge_block": [(dgcnn.DynamicEdgeBlock, "forward", dgcnn.DynamicEdgeBlock.forward_per_edge)],
    "summed_messages": [(equivariant, "tensor_product_sum", _kernel_products_summed)],
    "tensor_product": [(equivariant, "tensor_product_sum", _e3nn_products_summed)],
    "smallest_k": [(graphs, "smallest_k", lambda dist, k: dist.topk(k, dim=-1, largest=False).indices)],
    # an attribute of the instance over the class's method; put back by deleting it
    "farthest_points": [(graphs.FARTHEST_POINTS, "library", lambda: None)],
    "per_point": [(pointnet, "per_point", pointnet.per_point_ref)],
    "adamw": [(trainable, "adamw", training.adamw_ref)],
    "rope": [(attention, "apply_rope", apply_rope_ref)],
    "scan_backward": [(native_scan, "_native_lib", previous_scan_library)],
    "tp_transposes": [
        (tensor_product.KERNEL, "library", previous_tensor_product_library),
        (tensor_product.KERNEL, "loaded", previous_tensor_product_library),
    ],
}
REVERSIONS = tuple(REFERENCE_PATHS)


def check_reversions(names: Collection[str]) -> None:
    """Refuse, in one line, a name that is not one of REVERSIONS."""
    unknown = sorted(set(names) - set(REVERSIONS))
    if unknown:
        raise ValueError(f"--before {' '.join(unknown)}: unknown; one or more of {', '.join(REVERSIONS)}")


@contextlib.contextmanager
def before(reverted: Collection[str] = REVERSIONS) -> Iterator[None]:
    """The reference paths named in `reverted` (see the module's docstring) in place of the fast ones, each
    put back on the way out (`mock.patch.object`, last in first out)."""
    check_reversions(reverted)
    with contextlib.ExitStack() as swaps:
        for name, paths in REFERENCE_PATHS.items():
            if name in reverted:
                for owner, attribute, reference in paths:
                    swaps.enter_context(mock.patch.object(owner, attribute, reference))
        yield


def one_epoch(flat: dict, data, seed: int) -> float:
    """Seconds for one epoch and its validation, from a freshly built model."""
    torch.manual_seed(seed)
    model = build_model(flat)
    step = step_settings(flat)
    optimizer = trial_optimizer(model, flat)
    x, y = torch.from_numpy(data.train_inputs), torch.from_numpy(data.train_labels)
    vx, vy = torch.from_numpy(data.val_inputs), torch.from_numpy(data.val_labels)
    generator = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    training.train_one_epoch(model, optimizer, x, y, step, generator, torch.device("cpu"))
    training.accuracy(model, vx, vy, step.batch_size, torch.device("cpu"))
    return time.perf_counter() - began


def one_prediction(flat: dict, inputs: np.ndarray, batch_size: int, seed: int) -> float:
    """Seconds to predict a test set (the evaluate stage's work per model and test set)."""
    torch.manual_seed(seed)
    model = build_model(flat).eval()
    began = time.perf_counter()
    training.predict(model, torch.from_numpy(inputs), batch_size, torch.device("cpu"))
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("epoch.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--before",
        nargs="+",
        default=list(REVERSIONS),
        metavar="NAME",
        help="the reference paths to time as before",
    )
    args = parser.parse_args(argv)
    try:
        check_reversions(args.before)
        for name in set(args.before) & set(KERNEL_SOURCES):  # before any data are prepared
            _source_before(KERNEL_SOURCES[name])
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    torch.set_num_threads(1)
    config = load_config(REPO / "params.yaml")
    variants = {v.name: v for v in space.expand(config)}
    study_flat = {k: v for k, v in config.flat().items() if not k.startswith("train.models.")}
    report: dict = {"threads": 1, "repeats": args.repeats, "before": sorted(args.before), "families": {}}
    with tempfile.TemporaryDirectory(prefix="epoch-bench-") as tmp:
        folders = {
            "points": Path(tmp) / "points",
            "images": Path(tmp) / "images",
            "proximity": Path(tmp) / "proximity",
        }
        prepare_points(config, folders["points"], REPO)
        prepare_images(config, folders["points"], folders["images"])
        prepare_proximity(config, folders["proximity"])
        datasets = {
            kind: open_dataset(folder, "images" if kind != "points" else "points")
            for kind, folder in folders.items()
        }
        stems = array_stems(config)
        for name in VARIANTS:
            variant = variants[name]
            kind = variant.dataset
            dataset = datasets[kind]
            data = split_data(config, dataset.array(f"train_{stems[kind]}"), dataset.array("train_labels"))
            classes = len(dataset.manifest["classes"]) if kind != "proximity" else 2
            flat = space.resolved(
                {**study_flat, "trial": variant.as_trial(), "trial_seed": 0,
                 "data.num_classes": classes, "data.in_channels": 4 if kind == "images" else 1}
            )  # fmt: skip
            one_epoch(flat, data, 0)  # warm-up: first-call allocations, lazy imports
            times: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(args.repeats):
                with before(args.before):
                    times["before"].append(one_epoch(flat, data, 0))
                times["after"].append(one_epoch(flat, data, 0))
            row = {which: round(float(np.median(t)), 3) for which, t in times.items()}
            row["speedup"] = round(row["before"] / row["after"], 3)
            report["families"][name] = row
            line = f"{name:26s} before {row['before']:6.2f} s  after {row['after']:6.2f} s"
            print(f"{line}  x{row['speedup']:.2f}", flush=True)
            if kind != "images":
                continue
            # The evaluate stage's side: the whole test set on the larger canvas (4x the tokens).
            canvas = np.asarray(dataset.array(PREDICT_STEM))
            batch = config.evaluate.batch_size
            one_prediction(flat, canvas, batch, 0)
            times = {"before": [], "after": []}
            for _ in range(args.repeats):
                with before(args.before):
                    times["before"].append(one_prediction(flat, canvas, batch, 0))
                times["after"].append(one_prediction(flat, canvas, batch, 0))
            row = {which: round(float(np.median(t)), 3) for which, t in times.items()}
            row["speedup"] = round(row["before"] / row["after"], 3)
            report.setdefault("predict", {})[name] = row
            line = f"{name + ' predict 64 px':26s} before {row['before']:6.2f} s  after {row['after']:6.2f} s"
            print(f"{line}  x{row['speedup']:.2f}", flush=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
