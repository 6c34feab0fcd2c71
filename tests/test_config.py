"""params.yaml validation: typed, frozen config; every bad value a one-line error naming key and allowed."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from pipeline.config import ConfigError, StudyConfig, load_config, parse_config
from tests.conftest import REPO, TINY_PARAMS, merge, write_params


def test_repo_params_file_is_valid_and_complete():
    config = load_config(REPO / "params.yaml")
    assert isinstance(config, StudyConfig)
    flat = config.flat()
    for key in ("seed", "points.source", "points.root", "points.num_points", "points.classes"):
        assert key in flat
    # Every knob of the config is written out in params.yaml (no hidden defaults).
    import yaml

    written = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in ("points", "images", "proximity", "train", "ray", "mlflow", "runtime"):
        fields = set(type(getattr(config, section)).model_fields)
        assert fields == set(written[section]), section


def test_the_gpu_profile_is_a_complete_valid_params_file():
    import yaml

    from pipeline.training import space

    config = load_config(REPO / "profiles/gpu.yaml")
    written = yaml.safe_load((REPO / "profiles/gpu.yaml").read_text())
    for section in ("points", "images", "proximity", "train", "ray", "mlflow", "runtime"):
        assert set(type(getattr(config, section)).model_fields) == set(written[section]), section
    assert config.train.size == "small" and config.images.train_resolution == 224
    assert config.points.num_points == 1024 and config.train.gpus_per_trial > 0
    space.check(config, space.expand(config), num_classes=10, in_channels=4)


def test_config_is_frozen():
    config = parse_config({})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.points.num_points = 3  # type: ignore[misc]


def test_flat_config_is_one_level_of_plain_values():
    flat = parse_config(TINY_PARAMS).flat()
    assert flat["points.classes"] == ["box", "sphere", "cone", "torus"]
    assert flat["images.eval_resolutions"] == [24, 32]
    assert all(not isinstance(v, dict | tuple) for v in flat.values())


def test_yaml_exponent_without_dot_is_read_as_a_number():
    assert parse_config({"points": {"noise_std": "1e-3"}}).points.noise_std == 0.001


BAD = [
    ({"points": {"num_points": -5}}, ["points.num_points", "-5", "integer from 8"]),
    ({"points": {"num_points": 3.5}}, ["points.num_points", "3.5", "integer"]),
    ({"points": {"num_points": True}}, ["points.num_points", "True", "integer"]),
    ({"points": {"nmu_points": 10}}, ["points.nmu_points", "unknown key", "num_points"]),
    ({"pionts": {}}, ["pionts", "unknown key", "points"]),
    ({"points": {"classes": ["box", "blob"]}}, ["points.classes", "'blob'", "sphere"]),
    ({"points": {"classes": []}}, ["points.classes", "list of names"]),
    ({"points": {"classes": ["box", "box"]}}, ["points.classes", "without repeats"]),
    ({"points": {"source": "mesh"}}, ["points.source", "'mesh'", "'procedural', 'folder'"]),
    ({"points": {"partial": "yes"}}, ["points.partial", "'yes'", "boolean"]),
    ({"points": {"noise_std": -0.1}}, ["points.noise_std", "-0.1", "from 0.0 to 0.5"]),
    ({"points": {"anisotropy": 1.5}}, ["points.anisotropy", "1.5"]),
    ({"points": {"up_axis": "x"}}, ["points.up_axis", "'z', 'y'"]),
    ({"seed": "abc"}, ["seed", "'abc'", "integer"]),
    ({"seed": -1}, ["seed", "-1"]),
    ({"images": {"train_resolution": 0}}, ["images.train_resolution", "0"]),
    (
        {"images": {"eval_resolutions": [16, 18]}},
        ["images.eval_resolutions[1] = 18", "multiple of images.patch_size = 4"],
    ),
    ({"images": {"train_resolution": 30}}, ["images.train_resolution = 30", "multiple of images.patch_size"]),
    ({"images": {"eval_resolutions": 32}}, ["images.eval_resolutions", "list"]),
    ({"images": {"fov_deg": 180}}, ["images.fov_deg", "180"]),
    ({"runtime": {"workers": -1}}, ["runtime.workers", "-1"]),
    (
        {"points": {"source": "folder", "root": "no/such/dir"}},
        ["points.root", "'no/such/dir'", "ModelNet layout"],
    ),
    ({"points": "many"}, ["points", "'many'", "mapping"]),
]


@pytest.mark.parametrize("override,expected", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_values_fail_with_one_line_naming_key_value_and_allowed(override, expected, tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config(merge(TINY_PARAMS, override), tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_folder_root_checks_layout(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    with pytest.raises(ConfigError, match="holds no class folders"):
        parse_config({"points": {"source": "folder", "root": str(root)}}, tmp_path)
    (root / "chair" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="chair/test/ is missing"):
        parse_config({"points": {"source": "folder", "root": "ds"}}, tmp_path)
    (root / "chair" / "test").mkdir()
    assert parse_config({"points": {"source": "folder", "root": "ds"}}, tmp_path).points.root == "ds"


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("points: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def test_stage_command_fails_fast_with_one_line_and_writes_nothing(tmp_path):
    params = write_params(tmp_path / "params.yaml", merge(TINY_PARAMS, {"points": {"num_points": -5}}))
    out = tmp_path / "out" / "points"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "prepare-points", "--params", str(params), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "points.num_points = -5" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_the_published_json_schema_is_the_models_schema():
    import json

    from pipeline.config import params_schema

    published = json.loads((REPO / "params.schema.json").read_text())
    assert published == params_schema(), "params.schema.json is stale: run `python -m pipeline schema`"
    assert "yaml-language-server: $schema=params.schema.json" in (REPO / "params.yaml").read_text()


@pytest.mark.parametrize("path", ["params.yaml", "profiles/gpu.yaml"])
def test_the_params_files_satisfy_the_json_schema(path):
    import jsonschema
    import yaml

    from pipeline.config import params_schema

    jsonschema.validate(yaml.safe_load((REPO / path).read_text()), params_schema())


@pytest.mark.parametrize(
    "override",
    [
        {"points": {"num_points": -5}},
        {"pionts": {}},
        {"train": {"bf16": "yes"}},
        {"train": {"models": {"vit": 3}}},
    ],
    ids=str,
)
def test_the_json_schema_refuses_what_the_config_refuses(override, tmp_path):
    import jsonschema

    from pipeline.config import params_schema

    with pytest.raises(ConfigError):
        parse_config(merge(TINY_PARAMS, override), tmp_path)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(merge(TINY_PARAMS, override), params_schema())


@pytest.mark.parametrize("name", ["modelnet40", "scanobjectnn"])
def test_the_benchmark_profiles_follow_params_yaml_as_written(name) -> None:
    """Everything but a profile's opening comments and points section is params.yaml's text."""
    from pipeline.config import synced_profile

    profile = (REPO / f"profiles/{name}.yaml").read_text()
    params = (REPO / "params.yaml").read_text()
    assert profile == synced_profile(profile, params), "rewrite them: python -m pipeline profiles"


def test_a_synced_profile_takes_the_new_params_and_keeps_its_points() -> None:
    from pipeline.config import synced_profile

    profile = "# mine\nseed: 0\n\npoints:\n  source: scanobjectnn   # its own\n\ntrain:\n  epochs: 8\n"
    params = "# schema\n# about\nseed: 0\n\npoints:\n  source: procedural\n\ntrain:\n  epochs: 12  # new\n"
    assert synced_profile(profile, params) == (
        "# mine\nseed: 0\n\npoints:\n  source: scanobjectnn   # its own\n\ntrain:\n  epochs: 12  # new\n"
    )
