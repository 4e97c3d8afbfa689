"""The layout's rules hold and are enforced: import-linter's contracts pass on the tree and catch planted violations,
torch-free modules import with torch blocked, every package says what it holds and may import, modules stay small."""

from __future__ import annotations

import ast
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("transfer", "exporters", "models")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 400
LONGER_BY_DESIGN = {  # module -> why it is longer than MAX_LINES
    "cli.py": "the typer app: 15 commands of parse, one library call, print; splitting it would scatter the shared "
              "option types and output helpers every command uses",
}


def contracts() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def torch_free_modules() -> list[str]:
    """Every module under the forbidden contract's sources (a package stands for all its modules)."""
    names = []
    for contract in contracts()["contracts"]:
        if contract["type"] != "forbidden":
            continue
        for source in contract["source_modules"]:
            path = ROOT / source.replace(".", "/")
            names.append(source)
            if path.is_dir():
                names += [f"{source}.{info.name}" for info in pkgutil.iter_modules([str(path)])]
    return names


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under `tree`, with `tree` first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=120)


def copy_tree(destination: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, destination / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", destination / "pyproject.toml")
    return destination


def test_the_contracts_hold_on_this_tree():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    names = [contract["name"] for contract in contracts()["contracts"]]
    assert f"Contracts: {len(names)} kept, 0 broken." in result.stdout
    assert {contract["type"] for contract in contracts()["contracts"]} >= {"layers", "forbidden", "acyclic_siblings"}


@pytest.mark.parametrize(("module", "planted", "broken", "chain"), [
    ("transfer/serving/predict.py", "import torch", "Torch-free", "transfer.serving.predict -> torch"),
    ("transfer/core/progress.py", "import timm", "Torch-free", "transfer.core.progress -> timm"),
    ("models/registry.py", "from transfer.training import loop", "Layers", "models.registry -> transfer.training"),
    ("transfer/training/loop.py", "from transfer.training import lr_find", "No import cycles", "lr_find"),
])
def test_a_planted_violation_is_caught(tmp_path, module, planted, broken, chain):
    tree = copy_tree(tmp_path)
    with open(tree / module, "a") as handle:
        handle.write(f"\n{planted}  # planted by the test\n")
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout[-3000:]
    report = result.stdout[result.stdout.index("Broken contracts"):]
    assert broken in report and chain in report
    assert "0 broken" not in result.stdout


def test_a_new_package_must_be_placed(tmp_path):
    tree = copy_tree(tmp_path)
    (tree / "transfer" / "plugins").mkdir()
    (tree / "transfer" / "plugins" / "__init__.py").write_text('"""Not placed in a layer yet."""\n')
    result = lint_imports(tree)
    assert result.returncode == 1 and "transfer.plugins" in result.stdout


def test_torch_free_modules_import_with_torch_blocked():
    modules = torch_free_modules()
    assert "exporters.runtime" in modules and "transfer.serving.serve" in modules and "transfer.core.io" in modules
    code = ("import importlib, sys\n"
            "for blocked in ('torch', 'timm', 'torchvision'):\n"
            "    sys.modules[blocked] = None\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')\n"
            "          and sys.modules[m] is not None]\n"
            "assert not loaded, loaded\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_every_package_says_what_it_holds_and_may_import():
    for init in sorted(ROOT.glob("*/**/__init__.py")):
        if init.parts[len(ROOT.parts)] not in PACKAGES:
            continue
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, f"{init.relative_to(ROOT)} has no docstring"
        if init.parent != ROOT / "transfer":
            assert "may import" in docstring.lower(), f"{init.relative_to(ROOT)} does not say what it may import"


def test_modules_stay_small_unless_a_reason_is_stated():
    sources = [ROOT / "cli.py", *(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))]
    long = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in sources}
    long = {name: count for name, count in long.items() if count > MAX_LINES}
    assert set(long) <= set(LONGER_BY_DESIGN), f"over {MAX_LINES} lines without a stated reason: {long}"


def test_examples_and_benchmarks_use_public_names_only():
    private = []
    for script in sorted([*ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")]):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                hidden = [alias.name for alias in node.names if alias.name.startswith("_")]
                hidden += [part for part in node.module.split(".") if part.startswith("_")]
                private += [f"{script.relative_to(ROOT)}: {node.module}.{name}" for name in hidden]
    assert not private, private
