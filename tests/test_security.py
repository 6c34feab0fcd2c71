"""No eval, exec or unpickling of files the user did not produce: an AST scan of the project's own code.

The scan resolves import aliases (`import numpy as np`, `from pickle import loads`), so `np.load` and a bare
`loads` are judged by what they are. It cannot see code that unpickles on our behalf inside a library (Ray
Tune's restore, MLflow's pickled models); those call sites are guarded where they are made.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("perception", "pipeline", "benchmarks")

# Calls that run or unpickle whatever the input holds, whatever their arguments.
FORBIDDEN_CALLS = {
    "eval": "builtin eval runs arbitrary code",
    "exec": "builtin exec runs arbitrary code",
    "compile": "builtin compile makes code objects from text",
    "builtins.eval": "builtin eval runs arbitrary code",
    "builtins.exec": "builtin exec runs arbitrary code",
    "builtins.compile": "builtin compile makes code objects from text",
    "pickle.load": "pickle.load unpickles (runs code)",
    "pickle.loads": "pickle.loads unpickles (runs code)",
    "pickle.Unpickler": "pickle.Unpickler unpickles (runs code)",
    "_pickle.load": "_pickle.load unpickles (runs code)",
    "_pickle.loads": "_pickle.loads unpickles (runs code)",
    "cloudpickle.load": "cloudpickle.load unpickles (runs code)",
    "cloudpickle.loads": "cloudpickle.loads unpickles (runs code)",
    "marshal.load": "marshal.load reads code objects",
    "marshal.loads": "marshal.loads reads code objects",
    "yaml.load": "yaml.load can build arbitrary objects; use yaml.safe_load",
    "yaml.load_all": "yaml.load_all can build arbitrary objects; use yaml.safe_load_all",
    "yaml.full_load": "yaml.full_load is not the safe loader; use yaml.safe_load",
    "yaml.full_load_all": "yaml.full_load_all is not the safe loader; use yaml.safe_load_all",
    "yaml.unsafe_load": "yaml.unsafe_load builds arbitrary objects; use yaml.safe_load",
    "yaml.unsafe_load_all": "yaml.unsafe_load_all builds arbitrary objects; use yaml.safe_load_all",
    "os.system": "os.system runs a shell",
    "os.popen": "os.popen runs a shell",
    "subprocess.getoutput": "subprocess.getoutput runs a shell",
    "subprocess.getstatusoutput": "subprocess.getstatusoutput runs a shell",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}
SUBPROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call"}
SUBPROCESS_CALLS |= {"subprocess.check_output"}
FORBIDDEN_MODULES = {"dill": "dill unpickles (runs code)"}


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it was imported as, for every import in the module."""
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


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    """Whether `name=value` is passed as that literal constant (a variable or **kwargs does not count)."""
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords
    )


def _passes(call: ast.Call, name: str) -> bool:
    return any(k.arg == name for k in call.keywords)


def _judge(call: ast.Call, name: str) -> str | None:
    if name in FORBIDDEN_CALLS:
        return FORBIDDEN_CALLS[name]
    if name.split(".")[0] in FORBIDDEN_MODULES:
        return FORBIDDEN_MODULES[name.split(".")[0]]
    if name in TORCH_LOADS and not _keyword_is(call, "weights_only", True):
        return f"{name} without weights_only=True unpickles arbitrary objects"
    if name in NUMPY_LOADS and _passes(call, "allow_pickle") and not _keyword_is(call, "allow_pickle", False):
        return f"{name} with allow_pickle unpickles object arrays"
    if name in SUBPROCESS_CALLS and _passes(call, "shell") and not _keyword_is(call, "shell", False):
        return f"{name} with shell=True runs a shell"
    return None


def scan_source(source: str, path: Path) -> list[Finding]:
    tree = ast.parse(source, filename=str(path))
    aliases = _aliases(tree)
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in FORBIDDEN_MODULES:
                    findings.append(Finding(path, node.lineno, FORBIDDEN_MODULES[module.split(".")[0]]))
        elif isinstance(node, ast.Call) and (name := _dotted(node.func, aliases)) is not None:
            if (what := _judge(node, name)) is not None:
                findings.append(Finding(path, node.lineno, what))
    return sorted(set(findings), key=lambda f: (str(f.path), f.line, f.what))


def scan_tree(root: Path, folders: tuple[str, ...]) -> list[Finding]:
    findings = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            findings += scan_source(path.read_text(), path.relative_to(root))
    return findings


def test_the_project_neither_evaluates_nor_unpickles_untrusted_input():
    scanned = [p for folder in SCANNED for p in (REPO / folder).rglob("*.py")]
    assert len(scanned) > 20, "the scan found almost no files: wrong folders?"
    findings = scan_tree(REPO, SCANNED)
    assert not findings, "unsafe calls:\n" + "\n".join(map(str, findings))


BAD_SNIPPET = """\
import builtins, marshal, os, pickle, subprocess
import numpy as np
import torch, yaml
import cloudpickle as cp
from pickle import loads as unpickle
import dill
eval("1")
exec("x = 1")
compile("1", "f", "eval")
builtins.eval("1")
pickle.load(open("f", "rb"))
unpickle(b"")
cp.loads(b"")
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.unsafe_load(text)
yaml.full_load(text)
np.load("a.npy", allow_pickle=True)
subprocess.run("ls", shell=True)
os.system("ls")
marshal.loads(b"")
dill.loads(b"")
torch.load("m.pt", weights_only=flag)
"""

# line -> a word the finding on that line must contain
BAD_LINES = {
    6: "dill",
    7: "eval",
    8: "exec",
    9: "compile",
    10: "eval",
    11: "pickle.load",
    12: "pickle.loads",
    13: "cloudpickle.loads",
    14: "weights_only",
    15: "weights_only",
    16: "yaml.load",
    17: "yaml.unsafe_load",
    18: "yaml.full_load",
    19: "allow_pickle",
    20: "shell",
    21: "os.system",
    22: "marshal.loads",
    23: "dill",
    24: "weights_only",
}


def test_the_scanner_reports_every_unsafe_pattern_by_line():
    findings = scan_source(BAD_SNIPPET, Path("bad.py"))
    by_line = {f.line: f.what for f in findings}
    assert set(by_line) == set(BAD_LINES), sorted(by_line)
    for line, word in BAD_LINES.items():
        assert word in by_line[line], (line, by_line[line])
    assert str(findings[0]).startswith("bad.py:6: ")


GOOD_SNIPPET = """\
import re, subprocess
import numpy as np
import torch, yaml
model.eval()
pattern = re.compile("a+")
torch.load("m.pt", map_location="cpu", weights_only=True)
yaml.safe_load(text)
np.load("a.npy", allow_pickle=False)
np.load("a.npy", mmap_mode="r")
subprocess.run(["ls"], check=True)
subprocess.run(["ls"], shell=False)
"""


def test_the_scanner_passes_the_safe_forms():
    assert scan_source(GOOD_SNIPPET, Path("good.py")) == []
