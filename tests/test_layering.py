"""Imports run downhill: launch/ -> pretrain/engine/ -> pretrain/config.py, pretrain/data/, pretrain/models/,
pretrain/ops/. Every module imports on its own (an import cycle makes some module fail when it is the first one
imported), pretrain/ never imports launch/, and the stage config loads without torch, the engine or the model zoo."""
import ast
import json
import subprocess
import sys

from conftest import REPO

PACKAGES = ("pretrain", "launch")

# One interpreter imports the modules one after another, each after the project's modules are dropped from
# sys.modules, so each is imported alone as a fresh interpreter would (third-party modules stay loaded: the test takes
# seconds, not a torch start per module). The DCNv3 custom ops stay too: torch.library refuses to define an op twice.
# Prints, per module, the error its import raised or the project's modules it loaded.
IMPORT_EACH_ALONE = """
import importlib, json, sys
registers_once = ("pretrain._dcnv3", "pretrain.ops.kernels")
loaded = {}
for name in sys.argv[1:]:
    for module in [m for m in sys.modules if m.split(".")[0] in ("pretrain", "launch")]:
        if not module.startswith(registers_once):
            del sys.modules[module]
    try:
        importlib.import_module(name)
    except Exception as error:
        loaded[name] = f"{type(error).__name__}: {error}"
        continue
    loaded[name] = sorted(m for m in sys.modules if m.split(".")[0] in ("pretrain", "launch"))
print(json.dumps(loaded))
"""


def project_modules() -> list[str]:
    """Every module of pretrain/ and launch/, by its dotted name (a package by its __init__)."""
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_alone_and_pretrain_never_loads_launch():
    modules = project_modules()
    assert {"pretrain.config", "pretrain.engine.trainer", "launch.cli", "launch.commands.run"} <= set(modules)
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *modules], cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=True)
    loaded = json.loads(proc.stdout.splitlines()[-1])
    failed = {name: result for name, result in loaded.items() if isinstance(result, str)}
    assert not failed
    assert set(loaded) == set(modules)
    uphill = {name: [m for m in result if m.split(".")[0] == "launch"]
              for name, result in loaded.items() if name.split(".")[0] == "pretrain"}
    assert not any(uphill.values()), uphill


def imported_names(tree: ast.AST) -> set[str]:
    """The modules a file's import statements name, at any depth (imports inside functions too), and the dotted
    strings that name one of ours for importlib (launch/cli.py's command table)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PACKAGES):
            names.add(node.value)
    return names


def test_no_file_of_pretrain_names_launch_in_an_import():
    reaching_up = {}
    for path in sorted((REPO / "pretrain").rglob("*.py")):
        names = imported_names(ast.parse(path.read_text(), str(path)))
        uphill = sorted(n for n in names if n == "launch" or n.startswith("launch."))
        if uphill:
            reaching_up[str(path.relative_to(REPO))] = uphill
    assert not reaching_up
    assert "launch.commands.run" in imported_names(ast.parse((REPO / "launch/cli.py").read_text()))  # the scan sees it


def test_the_stage_config_loads_without_torch_the_engine_or_the_model_zoo():
    probe = ("import json, sys; from pretrain.config import load_stage_config; "
             f"load_stage_config({str(REPO / 'configs/demo/finetune.yaml')!r}); "
             "print(json.dumps(sorted(m for m in ('torch', 'timm', 'deepspeed', 'pretrain.engine', 'pretrain.models') "
             "if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=True)
    assert json.loads(proc.stdout) == []
