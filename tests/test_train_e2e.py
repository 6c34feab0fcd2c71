"""The train stage for real: `dvc repro` with in-process Ray, a trial fault and its retry, MLflow's server.

One module-scoped study run (tiny data, every family, 2 epochs) backs several tests; each test asserts one
behaviour of that run.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, MlflowServer, make_study_repo, run_command

pytestmark = pytest.mark.slow

VARIANTS = {
    "vit-learned",
    "vit-none",
    "mamba_hybrid",
    "proximity_mamba-rowmajor",
    "proximity_mamba-hilbert",
    "e3nn",
    "pointnet-none",
    "pointnet-so3",
    "dgcnn",
}
SEEDS = (0, 1)  # conftest's TINY_PARAMS
EXPERIMENT = "e2e-study"
POINT_MODELS = ("e3nn", "pointnet-none", "pointnet-so3", "dgcnn")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = make_study_repo(
        tmp_path_factory.mktemp("train"), {"train": {"fault": {"model": "pointnet", "epoch": 2}}}
    )
    # As a DVC experiment (`dvc exp run` is `dvc repro` that also records the run as experiment EXPERIMENT).
    run_command(["git", "add", "-A"], root)
    run_command(
        ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "study"], root
    )
    result = run_command(["dvc", "exp", "run", "-n", EXPERIMENT], root)
    return root, result


def _trials(root: Path) -> list[dict]:
    with open(root / "data/train/trials.csv") as handle:
        return list(csv.DictReader(handle))


def test_dvc_repro_trains_every_variant_and_locks_the_outputs(trained):
    root, result = trained
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert [o["path"] for o in lock["stages"]["train"]["outs"]] == ["data/train", "metrics/train.json"]
    rows = _trials(root)
    assert {r["variant"] for r in rows} == VARIANTS
    assert all(r["status"] == "TERMINATED" and r["epochs"] == "2" for r in rows)
    # Every variant once per training seed, in the same Tune run.
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted((v, s) for v in VARIANTS for s in "01")
    for name in VARIANTS:
        for seed in SEEDS:
            assert (root / f"data/train/models/{name}/seed-{seed}.pt").is_file()
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert set(metrics["val_accuracy"]) == VARIANTS
    assert all(set(by_seed) == {"0", "1"} for by_seed in metrics["val_accuracy_by_seed"].values())
    shown = run_command(["dvc", "metrics", "show"], root).stdout
    assert "val_accuracy.vit-none" in shown


def test_the_live_status_replaces_rays_tables(trained):
    _, result = trained
    assert "[train " in result.stdout and f"{2 * len(VARIANTS)}/{2 * len(VARIANTS)} done" in result.stdout
    assert "Configuration for experiment" not in result.stdout + result.stderr
    assert "Trial status" not in result.stdout


def test_the_stages_print_no_profiler_chatter(trained):
    # torch's profiler measures the cost sweep's and the deployed models' CPU peak memory; kineto would print
    # "USDT: ... profiler_start" and "... profiler_stop" at every use.
    _, result = trained
    assert "evaluate: cost" in result.stdout  # the cost sweep ran, and with it the profiler
    assert "profiler_start" not in result.stdout + result.stderr


def test_a_failed_trial_is_retried_from_its_checkpoint_and_the_retry_is_recorded(trained):
    root, result = trained
    rows = _trials(root)
    for row in rows:
        expected = 1 if row["variant"].startswith("pointnet") else 0
        assert int(row["retries"]) == expected, row
    assert "retrying from its last checkpoint" in result.stdout


# Run in a fresh interpreter: args {root, variants, seeds}; prints "rebuilt <count>".
REBUILD_SCRIPT = """
import json, sys, numpy, torch
from perception.models.checkpoint import load_checkpoint
args = json.loads(sys.argv[1])
prepared = args["root"] + "/data/prepared"
inputs = {
    "points": torch.from_numpy(numpy.load(prepared + "/points/test_points.npy"))[:3],
    "images": torch.from_numpy(numpy.load(prepared + "/images/test_r16.npy"))[:3],
    "proximity": torch.from_numpy(numpy.load(prepared + "/proximity/test_r12.npy"))[:3],
}
count = 0
for name in args["variants"]:
    for seed in args["seeds"]:
        saved = load_checkpoint(args["root"] + f"/data/train/models/{name}/seed-{seed}.pt")
        assert saved.training["variant"] == name and saved.training["seed"] == seed, saved.training
        assert saved.training["data_seed"] == 7 and saved.metrics["epoch"] >= 1, saved.metrics
        classes = 2 if saved.training["dataset"] == "proximity" else 4  # the tiny shapes; the binary task
        with torch.no_grad():
            assert saved.build()(inputs[saved.training["dataset"]]).shape == (3, classes)
        count += 1
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"pipeline", "ray", "mlflow", "dvc"})
assert not loaded, loaded
print("rebuilt", count)
"""


def test_best_checkpoints_rebuild_with_perception_alone(trained):
    """Every exported checkpoint is `{format, family, config, state_dict, training, metrics}` and rebuilds
    in a fresh interpreter that imports nothing from `pipeline` (nor Ray, MLflow or DVC)."""
    root, _ = trained
    args = json.dumps({"root": str(root), "variants": list(VARIANTS), "seeds": list(SEEDS)})
    result = subprocess.run(
        [sys.executable, "-c", REBUILD_SCRIPT, args], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"rebuilt {len(VARIANTS) * len(SEEDS)}" in result.stdout


def test_the_recorded_best_epoch_is_the_exported_weights_epoch(trained):
    """study.json, the trials table and the exported weights name one best epoch, ties included (two epochs
    on tiny data tie often). tests/test_trial_table.py has the tie that Ray's eviction resolves later."""
    import torch

    root, _ = trained
    study = json.loads((root / "data/train/study.json").read_text())
    tied = 0
    for name, by_seed in study["variants"].items():
        for seed, row in by_seed.items():
            saved = torch.load(root / "data/train" / row["checkpoint_file"], weights_only=True)["metrics"]
            assert (saved["epoch"], saved["val_accuracy"]) == (row["best_epoch"], row["val_accuracy"]), (
                name,
                seed,
            )
            tied += row["val_curve"].count(max(row["val_curve"])) > 1
    assert tied, "no tie in this run: the test would not tell"
    rows = {(r["variant"], int(r["seed"])): r for r in _trials(root)}
    for name, by_seed in study["variants"].items():
        for seed, row in by_seed.items():
            assert int(rows[name, int(seed)]["best_epoch"]) == row["best_epoch"], (name, seed)


def test_each_epochs_per_sample_validation_record_gives_its_curve_and_the_plateau_call(trained):
    # Also across the pointnet trials' retry from their checkpoint (train.fault): one record per epoch.
    from perception.evaluation.plateau import PLATEAU_CALLS
    from perception.training import unpack_correct

    root, _ = trained
    study = json.loads((root / "data/train/study.json").read_text())
    for name, by_seed in study["variants"].items():
        for row in by_seed.values():
            assert len(row["val_correct"]) == len(row["val_curve"]) == 2, name
            for packed, accuracy in zip(row["val_correct"], row["val_curve"], strict=True):
                correct = unpack_correct(packed, row["val_samples"])
                assert abs(correct.mean() - accuracy) < 1e-6, name
    report = (root / "reports/report.md").read_text()
    training = report.split("\n## Training")[1].split("\n## ")[0]
    table = [line.split(" | ") for line in training.splitlines() if line.startswith("| ")][1:]  # no header
    assert {cells[0].lstrip("| ") for cells in table} == VARIANTS
    # A call, and for a model below the adequacy floor (two epochs here: most are) a note after it.
    assert all(cells[-1].rstrip(" |").split("; ")[0] in PLATEAU_CALLS for cells in table)


@pytest.fixture(scope="module")
def mlflow_server(trained):
    root, _ = trained
    server = MlflowServer(root / "mlflow.db", root / "mlartifacts")
    server.start()
    yield server.uri
    server.stop()


def _api(url: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
    full = f"{url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_server_shows_the_parent_run_and_one_child_per_trial(trained, mlflow_server):
    root, _ = trained
    study = json.loads((root / "data/train/study.json").read_text())
    experiment = _api(mlflow_server, "experiments/get-by-name", query={"experiment_name": "perception-study"})
    experiment_id = experiment["experiment"]["experiment_id"]

    parent = _api(mlflow_server, "runs/get", query={"run_id": study["mlflow"]["parent_run_id"]})["run"]
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert parent["info"]["status"] == "FINISHED"
    assert len(tags["dataset.points.sha256"]) == 64 and len(tags["dataset.images.sha256"]) == 64
    assert "git_commit" in tags and "mlflow.parentRunId" not in tags
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["seed"] == "7" and params["train.epochs"] == "2"

    children = _api(
        mlflow_server,
        "runs/search",
        {
            "experiment_ids": [experiment_id],
            "filter": f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'",
        },
    )["runs"]
    rows = _trials(root)
    trials = [c for c in children if any(t["key"] == "trial_id" for t in c["data"]["tags"])]
    assert len(trials) == len(rows) == len(VARIANTS) * len(SEEDS)
    by_variant = {}
    for child in trials:
        child_tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        by_variant[child_tags["variant"]] = child
        # The training seed is in the run's name and tags, as in the trials table.
        assert child["info"]["run_name"].startswith(f"{child_tags['variant']}-s{child_tags['seed']} (")
        metrics = {m["key"] for m in child["data"]["metrics"]}
        assert {"train_loss", "val_accuracy", "best_val_accuracy"} <= metrics
        history = _api(
            mlflow_server,
            "metrics/get-history",
            query={"run_id": child["info"]["run_id"], "metric_key": "val_accuracy"},
        )["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]  # a retry resumes; it does not log epoch 1 again
        assert child_tags["retries"] == ("1" if child_tags["variant"].startswith("pointnet") else "0")
        assert child["info"]["status"] == "FINISHED"
    assert set(by_variant) == VARIANTS


def test_every_trial_run_has_its_model(trained, mlflow_server):
    import mlflow

    root, _ = trained
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("perception-study")
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    runs = {row["mlflow_run_id"] for row in _trials(root)}
    assert runs <= {m.source_run_id for m in models}


# --- evaluate and report: the rest of the DAG, on the same run ----------------------------------------------


def test_the_whole_dag_ran_and_the_report_states_a_verdict_per_claim(trained):
    root, result = trained
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {
        "prepare_points",
        "prepare_images",
        "prepare_proximity",
        "train",
        "evaluate",
        "report",
    }
    report = (root / "reports/report.md").read_text()
    verdicts = json.loads((root / "reports/verdicts.json").read_text())["claims"]
    assert [v["claim"] for v in verdicts] == [1, 2, 3, 4]
    for verdict in verdicts:
        assert verdict["verdict"] in ("holds", "does not hold", "inconclusive")
        assert {"rule", "effect", "interval", "threshold", "models_used", "excluded"} <= set(verdict)
        assert f"{verdict['title']}: {verdict['verdict']}" in report and verdict["rule"] in report
    # Two epochs on 12 clouds learn nothing: every claim that rests on trained models is inconclusive
    # and names the undertrained models.
    for verdict in verdicts:
        if verdict["claim"] != 3:
            assert verdict["verdict"] == "inconclusive" and verdict["excluded"], verdict
    html = (root / "reports/report.html").read_text()
    figures = sorted(p.name for p in (root / "data/evaluation/figures").glob("*.png"))
    assert "tradeoff.png" in figures and len(figures) == 5
    # The report's folder holds them and its own training curves, and the HTML inlines every one.
    drawn = sorted(p.name for p in (root / "reports/figures").glob("*.png"))
    assert drawn == sorted([*figures, "training_curves.png"])
    assert html.count("data:image/png;base64,") == len(drawn)
    assert "![training_curves](figures/training_curves.png)" in report.split("\n## Training\n")[1]
    # The report opens with the decision table (the rows can be empty: nothing here learned its task).
    assert report.split("\n## ")[1].startswith("Which backbone")
    decision = json.loads((root / "reports/decision.json").read_text())
    assert (
        decision["schema_version"] == 1
        and [r["task"] for r in decision["rows"]] == ["points"] * 2 + ["images"] * 2
    )
    study = json.loads((root / "data/train/study.json").read_text())
    assert study["mlflow"]["parent_run_id"] in report
    assert "train" in report and "wall time" in report


def test_evaluation_metrics_hold_sane_values(trained):
    root, _ = trained
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert set(metrics["rotation"]) == {"e3nn", "pointnet-none", "pointnet-so3", "dgcnn"}
    for row in metrics["rotation"].values():
        for mode in ("none", "z", "so3"):
            x, lo, hi = (row[f"accuracy_{mode}{end}"] for end in ("", "_lo", "_hi"))
            assert 0.0 <= lo <= x <= hi <= 1.0
    # The equivariant model is invariant by construction; the baselines are not.
    assert metrics["rotation"]["e3nn"]["invariance_error_float64"] < 1e-9
    assert metrics["rotation"]["pointnet-none"]["invariance_error_float64"] > 1e-4
    sets = ["in"] + [f"{kind}_{c}" for c in (24, 32) for kind in ("fov", "centre", "corner", "scaled")]
    parts = [f"drop_{part}_{c}" for c in (24, 32) for part in ("a", "b", "c", "b_plus_c", "a_minus_b_c")]
    # vit-learned_fixed: the vit-learned checkpoints read with the table at its own positions
    assert set(metrics["resolution"]) == {"vit-learned", "vit-learned_fixed", "vit-none", "mamba_hybrid"}
    assert set(metrics["resolution"]["vit-none"]) == {
        f"{name}{end}" for name in [f"accuracy_{s}" for s in sets] + parts for end in ("", "_lo", "_hi")
    }
    assert set(metrics["serialisation"]) == {"proximity_mamba-rowmajor", "proximity_mamba-hilbert"}
    for row in [*metrics["serialisation"].values(), *metrics["resolution"].values()]:
        for name in [k for k in row if not k.endswith(("_lo", "_hi"))]:
            assert row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"], name
    assert "effects.rowmajor" in metrics["effects"]["serialisation"]  # best - row-major, with its interval
    assert set(metrics["cost"]) == {"vit", "vit_explicit", "mamba_hybrid", "mamba"}
    shown = run_command(["dvc", "metrics", "show"], root).stdout
    assert "rotation.e3nn.accuracy_so3" in shown


def test_dvc_plots_render_the_evaluation(trained):
    root, _ = trained
    for name in ("accuracy_by_angle", "accuracy_by_scale", "accuracy_by_scan_order", "cost_by_tokens"):
        with open(root / f"plots/{name}.csv") as handle:
            assert len(list(csv.DictReader(handle))) > 0
    run_command(["dvc", "plots", "show", "--out", "dvc_plots"], root)
    page = (root / "dvc_plots/index.html").read_text()
    assert "Accuracy against rotation angle" in page and "Forward latency against tokens" in page
    assert "Accuracy against scale" in page and "scan order" in page


def _study_runs(root: Path):
    """The client, the parent run, and its nested runs by name."""
    import mlflow

    study = json.loads((root / "data/train/study.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=study["mlflow"]["tracking_uri"])
    parent = client.get_run(study["mlflow"]["parent_run_id"])
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    children = client.search_runs([parent.info.experiment_id], query, max_results=500)
    return client, parent, {run.info.run_name.split(" (")[0]: run for run in children}


def test_the_study_reads_as_model_development_with_its_verdicts(trained):
    root, _ = trained
    client, parent, _ = _study_runs(root)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    verdicts = json.loads((root / "reports/verdicts.json").read_text())["claims"]
    for description in (experiment.tags["mlflow.note.content"], parent.data.tags["mlflow.note.content"]):
        for verdict in verdicts:
            assert f"Claim {verdict['claim']}, {verdict['title']}: **{verdict['verdict']}**" in description
        assert "workflowType=machine_learning" in description and "Group by" in description
    # The parent keeps the claim-level numbers: effect and bounds, and the verdict as a tag.
    for verdict in verdicts:
        n = verdict["claim"]
        effect, lo, hi = (parent.data.metrics[f"claim_{n}_effect{end}"] for end in ("", "_lo", "_hi"))
        assert [effect, lo, hi] == pytest.approx([verdict["effect"], *verdict["interval"]])
        assert parent.data.tags[f"claim_{n}"] == verdict["verdict"]
    assert not [k for k in parent.data.metrics if k.startswith(("eval.", "best_val_accuracy"))]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation/figures")}
    assert "evaluation/figures/rotation.png" in artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.html"}
    report_figures = {a.path for a in client.list_artifacts(parent.info.run_id, "report/figures")}
    assert report_figures == {"report/figures/training_curves.png"}
    images = {a.path for a in client.list_artifacts(parent.info.run_id, "images")}
    assert any(path.startswith("images/rotation") for path in images), images  # figures as MLflow images
    assert any(path.startswith("images/training_curves") for path in images), images


def test_datasets_are_the_runs_inputs_with_the_manifest_hash(trained):
    root, _ = trained
    client, parent, runs = _study_runs(root)
    study = json.loads((root / "data/train/study.json").read_text())

    def inputs(run) -> dict[str, tuple[str, str]]:
        return {
            d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for d in client.get_run(run.info.run_id).inputs.dataset_inputs
        }

    expected = {
        f"{kind}-{context}": (study["datasets"][kind][:32], context)
        for kind in ("points", "images", "proximity")
        for context in ("train", "validation", "test")
    }
    assert inputs(parent) == expected
    assert inputs(runs["e3nn-s0"]) == {k: v for k, v in expected.items() if k.startswith("points-")}
    assert inputs(runs["vit-none-s1"]) == {k: v for k, v in expected.items() if k.startswith("images-")}
    dataset = client.get_run(parent.info.run_id).inputs.dataset_inputs[0].dataset
    assert json.loads(dataset.profile)["features_shape"][0] > 0 and "tensor" in dataset.schema


def test_each_model_has_its_test_metrics_under_shared_names_on_its_own_run(trained):
    root, _ = trained
    client, _, runs = _study_runs(root)
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    for seed in SEEDS:
        for variant in ("e3nn", "pointnet-none", "pointnet-so3", "dgcnn"):
            got = runs[f"{variant}-s{seed}"].data.metrics
            for name in ("test_accuracy", "test_accuracy_z", "test_accuracy_so3"):
                assert got[f"{name}_lo"] <= got[name] <= got[f"{name}_hi"], (variant, name)
        for variant in ("vit-learned", "vit-none", "mamba_hybrid", "vit-learned_fixed"):
            got = runs[f"{variant}-s{seed}"].data.metrics
            assert {"test_accuracy", "test_accuracy_fov_32", "test_accuracy_corner_32"} <= set(got), variant
        got = runs[f"proximity_mamba-hilbert-s{seed}"].data.metrics
        assert "test_accuracy_proximity" in got and "test_accuracy" not in got
    # The runs' numbers are the per-seed parts of the pooled evaluation: their mean is the pooled accuracy.
    pooled = metrics["rotation"]["e3nn"]["accuracy_so3"] * 100
    per_seed = [runs[f"e3nn-s{s}"].data.metrics["test_accuracy_so3"] for s in SEEDS]
    assert sum(per_seed) / len(per_seed) == pytest.approx(pooled, abs=1e-3)  # evaluate.json: 6 decimals
    # Runs group by their `variant` tag; the derived reading points at what it reads.
    assert runs["vit-learned_fixed-s0"].data.tags["variant"] == "vit-learned_fixed"
    assert runs["e3nn-s1"].data.tags["variant"] == "e3nn"
    # The cost sweep: a run per model, latency and memory per token count as steps.
    history = client.get_metric_history(runs["cost vit"].info.run_id, "sweep_latency_ms")
    assert sorted(m.step for m in history) == [4, 16, 64]  # conftest: 32, 64, 128 px at patch 16
    assert {"cost vit", "cost mamba", "cost mamba_hybrid"} <= set(runs)


def test_each_trial_logs_its_own_processs_system_metrics(trained):
    root, _ = trained
    client, _, runs = _study_runs(root)
    for name in ("e3nn-s0", "vit-none-s1"):
        run = runs[name]
        history = client.get_metric_history(run.info.run_id, "system/trial_memory_rss_megabytes")
        assert sorted(m.step for m in history) == [1, 2] and all(m.value > 50 for m in history)
        assert "system/trial_cpu_percentage" in run.data.metrics
    assert "system/trial_memory_rss_megabytes" not in _study_runs(root)[1].data.metrics  # not the driver's


def test_dvc_and_mlflow_point_at_each_other(trained):
    root, _ = trained
    client, parent, runs = _study_runs(root)
    for run in (parent, runs["e3nn-s0"]):
        assert run.data.tags["dvc.exp_name"] == EXPERIMENT
        assert (
            run.data.tags["mlflow.source.name"] == f"python -m pipeline train (dvc exp run -n {EXPERIMENT})"
        )
    shown = run_command(["dvc", "exp", "show", "--json"], root).stdout
    assert EXPERIMENT in shown and parent.info.run_id in shown  # metrics/train.json: mlflow_parent_run_id


# --- a reviewer in a real browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install -y chromium): the MLflow UI is not checked")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_a_reviewer_sees_the_runs_their_datasets_and_a_chart_comparing_models(
    trained, mlflow_server, browser, tmp_path_factory, capsys
):
    """What a person sees in MLflow's UI (a real headless Chromium on a real `mlflow server`), saved as
    screenshots whose paths the test prints."""
    root, _ = trained
    _, parent, runs = _study_runs(root)
    shots = tmp_path_factory.mktemp("screenshots")
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    # The link the report stage prints: MLflow 3.17 otherwise opens the GenAI overview.
    page.goto(f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning")
    parent_row = page.get_by_text(parent.info.run_name, exact=True).first
    parent_row.wait_for(timeout=60_000)
    assert page.get_by_text("Which vision backbone: the study's verdicts").first.is_visible()
    if page.get_by_text("MLflow Assistant").first.is_visible():
        page.get_by_role("button", name="Close").click()  # a chat panel a first visit opens over the table

    # The trials are nested under the parent: expand it, and they appear with their datasets.
    page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
    trial = page.get_by_text(runs["e3nn-s0"].info.run_name, exact=True).first
    trial.wait_for(timeout=30_000)
    # The grid draws a row's pinned name cell and its other cells as two elements with the same row-id.
    row_id = page.locator('[role="row"]', has=trial).first.get_attribute("row-id")
    cells = " ".join(page.locator(f'[role="row"][row-id="{row_id}"]').all_inner_texts())
    assert "points-train" in cells, cells  # the Dataset column, filled
    page.screenshot(path=shots / "runs.png")

    # The chart view, with every run shown (the UI draws the first 10), for one test metric.
    page.goto(
        f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs"
        "?workflowType=machine_learning&compareRunsMode=CHART"
    )
    page.get_by_test_id("experiment-view-runs-visibility-column-header").click()
    page.get_by_text("Show all runs").first.click()
    page.get_by_placeholder("Search metric charts").fill("test_accuracy_so3")
    cards = page.get_by_test_id("experiment-view-compare-runs-card")
    cards.first.wait_for(timeout=30_000)
    page.wait_for_timeout(2000)  # the charts draw after their cards appear
    (chart,) = [c for c in cards.all() if c.inner_text().splitlines()[0] == "test_accuracy_so3"]
    page.screenshot(path=shots / "chart.png")
    # One bar per evaluated point model and seed, each named in the chart's legend; no other runs.
    point_runs = [runs[f"{v}-s{s}"].info.run_name for v in POINT_MODELS for s in SEEDS]
    assert chart.locator("g.point").count() == len(point_runs)
    legend = chart.inner_text()
    assert all(name in legend for name in point_runs), legend
    assert runs["vit-none-s0"].info.run_name not in legend

    # Deployment cost under one name for every trained model: one latency bar per trial run.
    page.get_by_placeholder("Search metric charts").fill("latency_ms")
    page.wait_for_timeout(2000)
    (latency,) = [c for c in cards.all() if c.inner_text().splitlines()[0] == "latency_ms"]
    latency.scroll_into_view_if_needed()  # the view draws a chart once it is on screen
    latency.locator("g.point").first.wait_for(timeout=30_000)
    timed = [run for run in runs.values() if "latency_ms" in run.data.metrics]
    trials = [run for run in runs.values() if "trial_id" in run.data.tags]
    assert trials and all(
        "latency_ms" in run.data.metrics and "parameters" in run.data.metrics for run in trials
    )
    assert latency.locator("g.point").count() == len(timed)  # the trials and the derived readings
    latency.screenshot(path=shots / "latency.png")
    with capsys.disabled():
        print(
            f"\nMLflow UI screenshots: {shots / 'runs.png'}, {shots / 'chart.png'}, {shots / 'latency.png'}"
        )


def test_dvc_reruns_only_what_changed(trained):
    root, _ = trained
    again = run_command(["dvc", "repro"], root)
    assert "Running stage" not in again.stdout
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["rotation_draws"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    partial = run_command(["dvc", "repro"], root)
    ran = {line.split("'")[1] for line in partial.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate", "report"}
