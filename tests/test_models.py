"""One test over every registered model family and named size: the contract the study relies on."""

from __future__ import annotations

import copy
import importlib.util
import io
import re
import sys

import pytest
import torch

from perception.models import FAMILIES, ModelConfigError, ModelFamily, build, get_family
from perception.models.registry import without_parametrizations
from tests.conftest import REPO

CASES = [(name, size) for name, family in FAMILIES.items() for size in family.sizes]
# Larger sizes build models of tens of millions of parameters: fine, but slow on 2 cores.
MARKS = {size: [pytest.mark.slow] if size != "tiny" else [] for _, size in CASES}


def _inputs(name: str, batch: int = 2) -> torch.Tensor:
    if get_family(name).input_kind == "image":
        return torch.randn(batch, 4, 32, 32)
    return torch.randn(batch, 128, 3)


@pytest.mark.parametrize("name,size", [pytest.param(n, s, marks=MARKS[s], id=f"{n}-{s}") for n, s in CASES])
def test_model_contract(name, size):
    check_contract(name, size)


def check_contract(name: str, size: str) -> None:
    torch.manual_seed(0)
    hparams = {"patch_size": 8} if get_family(name).input_kind == "image" else {}
    model = build(name, size, num_classes=5, **hparams)
    x = _inputs(name)
    logits = model(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()

    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"

    model.eval()
    with torch.no_grad():
        reference = model(x)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        clone = build(name, size, num_classes=5, **hparams)
        clone.load_state_dict(torch.load(buffer, weights_only=True))
        clone.eval()
        assert torch.allclose(clone(x), reference, atol=1e-5)
        twin = copy.deepcopy(model)
        assert torch.allclose(twin(x), reference, atol=1e-5)
        # Whole-module pickling (what mlflow.pytorch.log_model does) of the parametrisation-free copy.
        buffer = io.BytesIO()
        torch.save(without_parametrizations(model), buffer)
        buffer.seek(0)
        unpickled = torch.load(buffer, weights_only=False)
        assert torch.allclose(unpickled(x), reference, atol=1e-5)


def test_build_defaults_to_the_cpu_size():
    for name, family in FAMILIES.items():
        assert build(name).config == family.config("tiny")


def test_the_study_families_are_registered():
    assert {"vit", "mamba_hybrid", "e3nn", "pointnet", "dgcnn"} <= set(FAMILIES)


def test_unknown_names_and_hparams_fail_with_one_line():
    with pytest.raises(ModelConfigError, match="model 'resnet' is not registered; allowed: vit"):
        build("resnet")
    with pytest.raises(ModelConfigError, match="size 'huge' is not allowed"):
        build("vit", "huge")
    with pytest.raises(ModelConfigError, match=r"ViTConfig\.widht: unknown hparam; allowed: .*dim"):
        build("vit", widht=3)


def test_the_documented_example_family_plugs_in_with_one_file_and_one_entry(tmp_path, monkeypatch):
    readme = (REPO / "docs/models.md").read_text()  # the README links it
    code = re.search(r"```python\n(# perception/models/my_cnn.py\n.*?)```", readme, re.S).group(1)
    (tmp_path / "my_cnn.py").write_text(code)
    spec = importlib.util.spec_from_file_location("my_cnn", tmp_path / "my_cnn.py")
    my_cnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(my_cnn)
    monkeypatch.setitem(sys.modules, "my_cnn", my_cnn)  # importable, as a file in perception/models is
    monkeypatch.setitem(
        FAMILIES, "my_cnn", ModelFamily(my_cnn.MyCNNConfig, my_cnn.MyCNN, my_cnn.SIZES, "image")
    )
    for size in my_cnn.SIZES:
        check_contract("my_cnn", size)
    with pytest.raises(ModelConfigError, match="MyCNNConfig.depth = 0"):
        build("my_cnn", depth=0)

    # The study trains it with no other change: the default params pick it up, and a trial builds it.
    from ray.tune.search.variant_generator import generate_variants

    from pipeline.config import parse_config
    from pipeline.training import space
    from pipeline.training.trainable import build_model

    config = parse_config({})
    variants = space.expand(config)
    assert "my_cnn" in [v.name for v in variants]
    space.check(config, variants, num_classes=8, in_channels=4)
    flat = {**config.flat(), "data.num_classes": 8, "data.in_channels": 4}
    trials = [
        space.resolved(spec) for _, spec in generate_variants(space.param_space(config, variants, flat))
    ]
    mine = [t for t in trials if t["trial.family"] == "my_cnn"]
    assert sorted(t["trial.seed"] for t in mine) == sorted(config.seeds)  # one trial per training seed
    assert build_model(mine[0])(torch.randn(2, 4, 32, 32)).shape == (2, 8)
