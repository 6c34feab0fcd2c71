"""pipeline.evaluation.results: the evaluate stage's results.json and the report's verdicts.json as validated
models.

One real evaluation (the evaluate stage's own function on tiny prepared data and untrained checkpoints, so no
training) serves every case: it must read back as the same `Results`, byte for byte; a malformed file must
fail with one line that names the file, the field and the stage to rerun, before the report does any work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from perception.data.arrays import DatasetError
from pipeline.__main__ import main
from pipeline.config import parse_config
from pipeline.evaluation.results import RESULTS_VERSION, Results, read_results, read_verdicts, to_json
from tests.conftest import TINY_EVALUATE, TINY_PARAMS, merge

# variant -> (family, dataset, augment, hparams beyond the data's): one decisive pair per claim
VARIANTS = {
    "pointnet-none": ("pointnet", "points", "none", {}),
    "e3nn": ("e3nn", "points", "none", {}),
    "vit-learned": ("vit", "images", "none", {"pos_embed": "learned"}),
    "mamba_hybrid": ("mamba_hybrid", "images", "none", {}),
    "proximity_mamba-rowmajor": ("mamba_hybrid", "proximity", "none", {"attn_layers": 0}),
    "proximity_mamba-hilbert": (
        "mamba_hybrid",
        "proximity",
        "none",
        {"attn_layers": 0, "scan_order": "hilbert"},
    ),
}


def _untrained_checkpoints(config, models: Path) -> None:
    """What the train stage exports, for every variant at two seeds, with the weights it starts from."""
    import torch

    from perception.models import FAMILIES, build
    from perception.models.checkpoint import ModelCheckpoint, model_config, save_checkpoint

    images, proximity = config.images, config.proximity
    data = {
        "points": {"num_classes": len(config.points.classes)},
        "images": {"num_classes": len(config.points.classes), "in_channels": 4,
                   "patch_size": images.patch_size, "image_size": images.train_resolution},
        "proximity": {"num_classes": 2, "in_channels": 1, "patch_size": proximity.patch_size,
                      "image_size": proximity.size},
    }  # fmt: skip
    for seed in (0, 1):
        for variant, (family, dataset, augment, hparams) in VARIANTS.items():
            known = set(FAMILIES[family].config_cls.__dataclass_fields__)
            torch.manual_seed(seed)
            model = build(family, **{k: v for k, v in data[dataset].items() if k in known}, **hparams)
            training = {"variant": variant, "seed": seed, "dataset": dataset, "augment": augment,
                        "points_per_cloud": 32}  # fmt: skip
            (models / variant).mkdir(parents=True, exist_ok=True)
            saved = ModelCheckpoint(family, model_config(model), model.state_dict(), training)
            save_checkpoint(models / variant / f"seed-{seed}.pt", saved)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    """(the evaluation folder, the Results the stage returned), from the real stage on tiny data."""
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.prepare_images import prepare_images
    from pipeline.stages.prepare_points import prepare_points
    from pipeline.stages.prepare_proximity import prepare_proximity

    root = tmp_path_factory.mktemp("results")
    config = parse_config(
        merge(TINY_PARAMS, {"evaluate": {**TINY_EVALUATE, "bootstrap_resamples": 200}}), root
    )
    prepare_points(config, root / "points")
    prepare_images(config, root / "points", root / "images")
    prepare_proximity(config, root / "proximity")
    _untrained_checkpoints(config, root / "train" / "models")
    out = root / "evaluation"
    results = evaluate(config, root / "points", root / "images", root / "proximity", root / "train", out,
                       root / "metrics.json", root / "plots")  # fmt: skip
    return out, results


def test_results_json_reads_back_as_the_same_results_byte_for_byte(evaluated):
    out, results = evaluated
    text = (out / "results.json").read_text()
    again = read_results(out / "results.json")
    assert again == results
    assert to_json(again, sort_keys=True) == text
    data = json.loads(text)
    assert data["schema_version"] == RESULTS_VERSION == 7
    assert list(data) == sorted(data)  # keys sorted, as before
    assert set(data["evidence"]) == {"serialisation", "position_embedding", "cost", "rotation"}
    assert again.evidence.rotation.models[0].accuracy.lo <= again.evidence.rotation.models[0].accuracy.value


def test_nan_is_written_as_null_and_reads_back_as_nan(evaluated):
    out, _ = evaluated
    data = json.loads((out / "results.json").read_text())
    data["rotation"]["e3nn"]["accuracy"]["so3"]["lo"] = math.nan
    data["evidence"]["cost"]["memory_exponents"]["vit"]["value"] = math.nan
    text = to_json(Results.model_validate(data))
    assert "NaN" not in text and '"lo": null' in text  # JSON has no NaN
    again = Results.model_validate_json(text)
    assert math.isnan(again.rotation["e3nn"].accuracy["so3"].lo)
    assert math.isnan(again.evidence.cost.memory_exponents["vit"].value)


def test_the_report_writes_verdicts_json_with_its_schema_version(evaluated, tmp_path):
    from pipeline.stages.report import report

    out, _ = evaluated
    verdict_list = report(out, tmp_path / "train", tmp_path / "timings", tmp_path / "reports")
    verdicts = read_verdicts(tmp_path / "reports" / "verdicts.json")
    assert verdicts.schema_version == 1
    assert [v.claim for v in verdicts.claims] == [1, 2, 3, 4] == [v.claim for v in verdict_list]
    assert json.loads((tmp_path / "reports" / "verdicts.json").read_text())["claims"][0]["verdict"]


def test_every_trained_model_has_a_measured_deployment_cost_beside_its_accuracy(evaluated):

    out, results = evaluated
    table = results.deployment
    assert set(table.models) == set(VARIANTS) | {"vit-learned_fixed"}  # the derived reading too
    assert table.device == "cpu" and table.threads == 1 and table.machine  # evaluate.deploy_threads
    # the machine reference, timed in the same rounds, is not a model of the table
    reference, reference_lo, reference_hi = table.reference_ms
    assert 0 < reference_lo <= reference <= reference_hi and "machine reference" not in table.models
    for name, row in table.models.items():
        assert row.task == VARIANTS.get(name, ("", "images"))[1]
        assert row.latency_ms_lo <= row.latency_ms <= row.latency_ms_hi and row.latency_ms > 0
        # six windows, two fresh processes at each of three points of the stage, every model in each
        assert (row.windows, row.rounds) == (6, 6 * TINY_EVALUATE["deploy_rounds"])
        assert row.parameters > 0 and row.checkpoint_bytes > 0 and row.throughput_per_s > 0
        assert set(row.accuracy) == {c.name for c in table.conditions[row.task]}
    assert table.models["e3nn"].input_shape == [32, 3]  # the points it trained on
    assert [c.name for c in table.conditions["points"]] == ["unrotated", "so3"]
    # the unrotated accuracy is the rotation table's, the same numbers
    assert table.models["e3nn"].accuracy["unrotated"] == results.rotation["e3nn"].accuracy["none"]
    canvas = results.canvas.canvases[-1]
    assert [c.name for c in table.conditions["images"]] == ["in_distribution", f"canvas_{canvas}"]
    assert (out / "figures" / "tradeoff.png").is_file()
    rows = (out.parent / "plots" / "accuracy_vs_latency.csv").read_text().splitlines()
    assert rows[0].startswith("model,panel,latency_ms,latency_ms_lo,latency_ms_hi,accuracy,accuracy_lo")
    assert len(rows) - 1 == 2 * 2 + 3 * 2  # points: 2 models x 2 conditions; images: 3 x 2


def test_the_report_opens_with_the_decision_table_and_writes_decision_json(evaluated, tmp_path):
    from pipeline.evaluation.results import read_decision
    from pipeline.stages.report import report

    out, results = evaluated
    report(out, tmp_path / "train", tmp_path / "timings", tmp_path / "reports", latency_budget_ms=1e6)
    decision = read_decision(tmp_path / "reports" / "decision.json")
    assert decision.latency_budget_ms == 1e6 and decision.measured_on == results.deployment.machine
    assert "robot's own hardware" in decision.caveat
    assert [(r.task, r.condition) for r in decision.rows] == [
        (task, c.name) for task in ("points", "images") for c in results.deployment.conditions[task]
    ]
    for row in decision.rows:  # untrained models: every row still answers or says why not
        assert row.best is None or row.within_budget is not None  # a huge budget holds every model
    markdown = (tmp_path / "reports" / "report.md").read_text()
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Which backbone: accuracy against deployment cost"
    assert "tradeoff" in markdown.split(headings[1])[0]  # the figure sits under the table


def _set(path: str, value):
    """A change to the file's JSON at a dotted path (list indices as numbers); `...` deletes the key."""

    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is ...:
            del node[last]
        else:
            node[last] = value

    return change


# case -> (change to results.json, the parts of the one line it must fail with)
MALFORMED = {
    "a number that is text": (
        _set("rotation.pointnet-none.accuracy.so3.lo", "low"),
        ["rotation.pointnet-none.accuracy.so3.lo: Input should be a valid number"],
    ),
    "a missing field": (_set("cost.rows.0.tokens", ...), ["cost.rows.0.tokens: Field required"]),
    "a missing table": (_set("resolution", ...), ["resolution: Field required"]),
    "typed evidence of the wrong type": (
        _set("evidence.rotation.models.0.chance", [0.5]),
        ["evidence.rotation.models.0.chance: Input should be a valid number"],
    ),
    "an unknown field": (_set("canvas.pixels", 3), ["canvas.pixels: Extra inputs are not permitted"]),
    "the older schema": (_set("schema_version", 2), ["schema_version 2, expected 7"]),
    "no schema version": (_set("schema_version", ...), ["schema_version missing, expected 7"]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_results_json_fails_with_one_line_naming_the_file_and_field(evaluated, tmp_path, case):
    out, _ = evaluated
    change, expected = MALFORMED[case]
    data = json.loads((out / "results.json").read_text())
    change(data)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as caught:
        read_results(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert message.endswith("; rerun dvc repro evaluate"), message
    for part in expected:
        assert part in message, (part, message)


def test_the_report_stage_refuses_a_malformed_results_json_before_any_work(evaluated, tmp_path, capfd):
    out, _ = evaluated
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "results.json").write_text((out / "results.json").read_text()[:-300])  # cut short
    argv = ["report", "--params", str(tmp_path / "params.yaml"), "--evaluation", str(evaluation),
            "--train", str(tmp_path / "train"), "--out", str(tmp_path / "reports")]  # fmt: skip
    (tmp_path / "params.yaml").write_text(json.dumps(merge(TINY_PARAMS, {})))
    capfd.readouterr()
    assert main(argv) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{evaluation / 'results.json'}: unreadable (not valid JSON" in lines[0]
    assert not (tmp_path / "reports").exists()


def test_a_malformed_verdicts_json_names_the_field_and_the_report_stage(tmp_path):
    path = tmp_path / "verdicts.json"
    path.write_text(json.dumps({"schema_version": 1, "claims": [{"claim": 1, "verdict": "maybe"}]}))
    with pytest.raises(DatasetError, match=r"verdicts.json: claims.0.title: Field required \(and \d+ more\); "
                                           r"rerun dvc repro report"):  # fmt: skip
        read_verdicts(path)
    path.write_text(json.dumps({"claims": []}))
    with pytest.raises(DatasetError, match="schema_version missing, expected 1"):
        read_verdicts(path)
