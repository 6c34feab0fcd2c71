"""dvc.yaml is complete: every stage depends on every project module it imports and on every params
section it reads, so that editing either makes `dvc status` show the stage as changed.

The import closure is computed statically (every `import` in a module, function-level ones included) from
`pipeline/__main__.py` plus the stage's own module; params sections are the ones the closure names
(`config.<section>` or a flat key `"<section>.<key>"`). `ray`, `mlflow` and `runtime` are deliberately not
tracked: results do not depend on where trials run, where they are logged, or how many workers a data
stage uses.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "perception")
UNTRACKED_SECTIONS = {"ray", "mlflow", "runtime"}
SECTIONS = ("seed", "seeds", "points", "images", "proximity", "train", "evaluate")

# stage in dvc.yaml -> its module under pipeline/stages
STAGE_MODULES = {
    "prepare_points": "pipeline.stages.prepare_points",
    "prepare_images": "pipeline.stages.prepare_images",
    "prepare_proximity": "pipeline.stages.prepare_proximity",
    "train": "pipeline.stages.train",
    "evaluate": "pipeline.stages.evaluate",
    "report": "pipeline.stages.report",
}


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None if it is not ours (or is a package attribute)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names imported anywhere in the file (with `from a import b`, both a and a.b)."""
    tree = ast.parse(path.read_text())
    # The entry point imports every stage, each in its own branch: a stage's closure adds its own module.
    dispatch = path == REPO / "pipeline" / "__main__.py"
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if not (dispatch and n.startswith("pipeline.stages"))}


def import_closure(modules: list[str]) -> set[Path]:
    """Every project file that importing `modules` can load, their packages' `__init__.py` included."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(imported_modules(path))
    return seen


def sections_read(files: set[Path]) -> set[str]:
    """Params sections the files name: `config.<section>` attributes, or flat keys "<section>.<key>"."""
    found: set[str] = set()
    for path in files:
        if path == REPO / "pipeline" / "config.py":  # the validator names every section
            continue
        text = path.read_text()
        for section in SECTIONS:
            if re.search(rf"config\.{section}\b", text) or re.search(rf"[\"']{section}\.\w", text):
                found.add(section)
    return found


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(dep) or Path(dep) in rel.parents for dep in deps)


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_a_stage_depends_on_every_project_module_it_imports(stage: str) -> None:
    closure = import_closure(["pipeline.__main__", STAGE_MODULES[stage]])
    deps = stages()[stage]["deps"]
    missing = sorted(str(p.relative_to(REPO)) for p in closure if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} imports these but does not list them in deps: {missing}"


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_a_stage_lists_no_project_code_it_does_not_import(stage: str) -> None:
    """An extra dep reruns the stage for edits that cannot change its outputs."""
    closure = import_closure(["pipeline.__main__", STAGE_MODULES[stage]])
    code = [d for d in stages()[stage]["deps"] if d.split("/")[0] in PACKAGES]
    extra = [d for d in code if not any(covered(p, [d]) for p in closure)]
    assert not extra, f"dvc.yaml stage {stage} lists code it never imports: {extra}"


def test_evaluation_rebuilds_models_without_the_trainer() -> None:
    closure = import_closure(["pipeline.stages.evaluate"])
    assert not [p for p in closure if REPO / "pipeline" / "training" in p.parents]


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_a_stage_declares_every_params_section_it_reads(stage: str) -> None:
    closure = import_closure(["pipeline.__main__", STAGE_MODULES[stage]])
    own = import_closure([STAGE_MODULES[stage]]) - import_closure(["pipeline.__main__"])
    declared = {p.split(".")[0] for p in stages()[stage].get("params", [])}
    read = sections_read(own | {REPO / "pipeline" / "stages" / f"{stage}.py"}) - UNTRACKED_SECTIONS
    assert closure  # the closure was found at all
    assert read <= declared, f"dvc.yaml stage {stage} reads params {sorted(read - declared)} undeclared"


def test_the_closure_finds_lazy_imports_inside_functions(tmp_path: Path) -> None:
    # The evaluate stage imports the figures module inside a function: the closure must still see it.
    closure = import_closure(["pipeline.stages.evaluate"])
    assert REPO / "pipeline" / "reporting" / "figures.py" in closure
    assert REPO / "perception" / "__init__.py" in closure


def test_an_undeclared_module_is_caught() -> None:
    deps = [d for d in stages()["prepare_images"]["deps"] if d != "pipeline/outputs.py"]
    closure = import_closure(["pipeline.__main__", STAGE_MODULES["prepare_images"]])
    assert not all(covered(p, deps) for p in closure)
