"""`pipeline/` by concern: each package imports only what its `__init__.py` says it may, the way
tests/test_dvc_deps.py holds dvc.yaml to the imports.

Every package's docstring has a line `May import: <packages>` (the base modules `config`, `errors`,
`outputs` and `parallel` are `base`). Every import in the package's modules, top-level or deferred inside a
function, must name a module of an allowed package. Only `tracking/` imports mlflow; no stage imports
another stage; the base imports no package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PIPELINE = REPO / "pipeline"
BASE = {"config", "errors", "outputs", "parallel"}
PACKAGES = sorted(p.name for p in PIPELINE.iterdir() if (p / "__init__.py").is_file())


def owner(module: str) -> str | None:
    """The package (or "base", "entry") a `pipeline.` module belongs to; None outside pipeline."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    if parts[1] in BASE:
        return "base"
    if parts[1] == "__main__":
        return "entry"
    return parts[1]


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (deferred imports included), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pipeline import x`
    return found


def allowed(package: str) -> set[str]:
    doc = ast.get_docstring(ast.parse((PIPELINE / package / "__init__.py").read_text())) or ""
    match = re.search(r"^May import: (.+)$", doc, re.MULTILINE)
    assert match, f"pipeline/{package}/__init__.py: its docstring has no 'May import: ...' line"
    return {name.strip().rstrip(".") for name in match.group(1).split(",")}


def test_pipeline_is_five_packages_and_the_base() -> None:
    assert PACKAGES == ["evaluation", "reporting", "stages", "tracking", "training"]
    loose = sorted(p.stem for p in PIPELINE.glob("*.py"))
    assert loose == ["__init__", "__main__", "config", "errors", "outputs", "parallel"]


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_its_docstring_allows(package: str) -> None:
    permitted = allowed(package) | {package}
    wrong = []
    for path in sorted((PIPELINE / package).rglob("*.py")):
        for module in imports(path):
            other = owner(module)
            if other is not None and other not in permitted:
                wrong.append(f"{path.relative_to(REPO)} imports {module} ({other})")
    assert not wrong, f"pipeline/{package} may import {sorted(permitted)}: " + "; ".join(sorted(set(wrong)))


def test_the_base_imports_no_package() -> None:
    for name in BASE:
        path = PIPELINE / f"{name}.py"
        others = {owner(m) for m in imports(path)} - {None, "base"}
        assert not others, f"{path.relative_to(REPO)} imports {others}"


def test_only_tracking_imports_mlflow() -> None:
    importers = sorted(
        str(path.relative_to(REPO))
        for path in PIPELINE.rglob("*.py")
        if any(m == "mlflow" or m.startswith("mlflow.") for m in imports(path))
    )
    assert importers and all(p.startswith("pipeline/tracking/") for p in importers), importers


def test_no_stage_imports_another_stage() -> None:
    for path in sorted((PIPELINE / "stages").glob("*.py")):
        stages = {m for m in imports(path) if m.startswith("pipeline.stages.") and m.count(".") == 2}
        assert not stages, f"{path.relative_to(REPO)} imports {sorted(stages)}"


def test_the_check_catches_a_forbidden_import(tmp_path) -> None:
    """The rule can fail: evaluation/ importing tracking/ is named."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.tracking.review import review_url\n")
    assert {owner(m) for m in imports(module)} >= {"tracking"}
    assert "tracking" not in allowed("evaluation")
