"""No eval, exec or unpickling of files the user did not produce: ruff's rules, and what they cannot see.

Ruff checks the whole repo (`ruff check .`, configured in pyproject.toml) and resolves import aliases:
    eval, builtins.eval         S307        pickle.load(s), pickle.Unpickler, dill calls   S301
    exec, builtins.exec         S102        marshal.load(s)                                 S302
    yaml.load (unsafe Loader)   S506        os.system, os.popen, subprocess.getoutput       S605
    subprocess.*(shell=True)    S602        any other call with shell=True                  S604
    banned-api (TID251): `import dill`, _pickle and cloudpickle load(s), yaml's load_all, full_load(_all)
    and unsafe_load(_all). `test_ruff_reports_every_unsafe_pattern` fails if a rule is dropped or ignored.

Ruff has no rule for the rest, so a small AST scan of perception, pipeline and benchmarks checks them here
(tests may load the pickles they wrote themselves): `compile` (banned-api cannot see a bare builtin),
`torch.load` without a literal `weights_only=True`, `numpy.load` with `allow_pickle` other than a literal
False, and a subprocess `shell=` other than a literal False (S602 judges only literal truthy values).

Neither can see code that unpickles on our behalf inside a library (Ray Tune's restore, MLflow's pickled
models); those call sites are guarded where they are made.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("perception", "pipeline", "benchmarks")

COMPILES = {"compile", "builtins.compile"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
SUBPROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call"}
SUBPROCESS_CALLS |= {"subprocess.check_output"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (`np` -> "numpy", `load` -> "torch.load")."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b` binds `a`; `import a.b as c` binds `c` to `a.b`.
                local = alias.asname or alias.name.split(".")[0]
                names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """`np.load` -> "numpy.load" when `np` is numpy; None for calls on anything but a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


ABSENT = object()


def _keyword(call: ast.Call, name: str) -> object:
    """The constant passed as `name=`, the expression itself if not a constant (a variable), else ABSENT."""
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else k.value
    return ABSENT


def _judge(call: ast.Call, name: str) -> str | None:
    if name in COMPILES:
        return "builtin compile makes code objects from text"
    if name in TORCH_LOADS and _keyword(call, "weights_only") is not True:
        return f"{name} without weights_only=True unpickles arbitrary objects"
    if name == "numpy.load" and _keyword(call, "allow_pickle") not in (ABSENT, False):
        return f"{name} with allow_pickle unpickles object arrays"
    if name in SUBPROCESS_CALLS and _keyword(call, "shell") not in (ABSENT, False):
        return f"{name} with a shell= ruff cannot judge may run a shell"
    return None


def scan_source(source: str, path: Path) -> list[str]:
    tree = ast.parse(source, filename=str(path))
    aliases = _aliases(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    found = {
        (n.lineno, what) for n in calls if (what := _judge(n, _dotted(n.func, aliases) or "")) is not None
    }
    return [f"{path}:{line}: {what}" for line, what in sorted(found)]


def test_the_project_neither_compiles_nor_unpickles_what_ruff_cannot_see():
    scanned = sorted(p for folder in SCANNED for p in (REPO / folder).rglob("*.py"))
    assert len(scanned) > 20, "the scan found almost no files: wrong folders?"
    findings = [f for path in scanned for f in scan_source(path.read_text(), path.relative_to(REPO))]
    assert not findings, "unsafe calls:\n" + "\n".join(findings)


BAD_SNIPPET = """\
import numpy as np
import subprocess, torch
from torch import load
compile("1", "f", "eval")
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
torch.load("m.pt", weights_only=flag)
load("m.pt", map_location="cpu")
np.load("a.npy", allow_pickle=True)
subprocess.run(cmd, shell=flag)
"""


def test_the_scan_reports_every_pattern_ruff_lacks_by_line():
    findings = scan_source(BAD_SNIPPET, Path("bad.py"))
    words = {4: "compile", 5: "weights_only", 6: "weights_only", 7: "weights_only", 8: "torch.load"}
    words |= {9: "allow_pickle", 10: "shell"}
    assert [int(f.split(":")[1]) for f in findings] == list(words), findings
    for finding, word in zip(findings, words.values(), strict=True):
        assert finding.startswith("bad.py:") and word in finding, finding


GOOD_SNIPPET = """\
import re, subprocess
import numpy as np
import torch
model.eval()
model.compile()
pattern = re.compile("a+")
torch.load("m.pt", map_location="cpu", weights_only=True)
np.load("a.npy", allow_pickle=False)
np.load("a.npy", mmap_mode="r")
subprocess.run(["ls"], check=True)
subprocess.run(["ls"], shell=False)
"""


def test_the_scan_passes_the_safe_forms():
    assert scan_source(GOOD_SNIPPET, Path("good.py")) == []


RUFF_HEADER = """\
import builtins
import marshal
import os
import pickle
import subprocess
from pickle import loads as unpickle

import _pickle
import cloudpickle as cp
import yaml
"""
# a line each, with the rule the repo's ruff config must report on it
RUFF_CASES = {
    "import dill": "TID251",
    'eval("1")': "S307",
    'builtins.eval("1")': "S307",
    'exec("x = 1")': "S102",
    'pickle.load(open("f", "rb"))': "S301",
    "pickle.Unpickler(f)": "S301",
    'unpickle(b"")': "S301",
    'dill.loads(b"")': "S301",
    '_pickle.loads(b"")': "TID251",
    'cp.loads(b"")': "TID251",
    'marshal.loads(b"")': "S302",
    "yaml.load(text)": "S506",
    "yaml.load(text, Loader=yaml.FullLoader)": "S506",
    "yaml.load_all(text)": "TID251",
    "yaml.full_load(text)": "TID251",
    "yaml.unsafe_load(text)": "TID251",
    'os.system("ls")': "S605",
    "os.popen(cmd)": "S605",
    'subprocess.getoutput("ls")': "S605",
    'subprocess.run("ls", shell=True)': "S602",
    'subprocess.Popen("ls", shell=True)': "S602",
    'other.run("ls", shell=True)': "S604",
}
RUFF_SAFE = ["model.eval()", "yaml.safe_load(text)", "yaml.load(text, Loader=yaml.SafeLoader)"]
RUFF_SAFE += ["pickle.dumps(1)", 'subprocess.run(["ls"], check=True)']


def test_ruff_reports_every_unsafe_pattern(tmp_path):
    """The repo's own ruff config, on a file outside the repo (so no per-file ignore applies to it)."""
    lines = RUFF_HEADER.splitlines() + list(RUFF_CASES) + RUFF_SAFE
    planted = tmp_path / "planted.py"
    planted.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "json"]
    result = subprocess.run(
        [*command, "--config", str(REPO / "pyproject.toml"), str(planted)], capture_output=True, text=True
    )
    assert result.returncode in (0, 1), result.stderr
    found = {(d["location"]["row"], d["code"]) for d in json.loads(result.stdout)}
    wanted = {(lines.index(case) + 1, code) for case, code in RUFF_CASES.items()}
    assert wanted <= found, f"not reported: {sorted(wanted - found)}"
    security = {(row, code) for row, code in found if code.startswith(("S", "TID"))}
    assert security == wanted, f"unexpected: {sorted(security - wanted)}"
