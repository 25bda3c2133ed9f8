"""Dependency direction, read from the source with ``ast`` (nothing is imported).

* kernels/ knows only torch and triton (and the standard library, and its own modules);
* inside the wrapping stack, only lora_graph/patch.py knows transformers (the entry points above
  the wrapper, cli.py and demo.py, load models and tokenizers with it);
* the library never imports the tests or the notebooks;
* inside the library, lower layers never import upper ones (ops < layers < patch < wrapper).

Imports inside functions count too, and so do ``importlib.import_module("...")`` / ``__import__``
calls with a literal name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted((ROOT / "lora_graph").glob("*.py"))
KERNELS = sorted((ROOT / "kernels").glob("*.py"))
STDLIB = set(sys.stdlib_module_names)


def imports(path: Path) -> set[str]:
    """Absolute top-level-qualified names imported by ``path``; relative imports come back as
    ``.module`` (one dot per level)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "." * node.level + (node.module or "")
                if node.module:
                    found.add(base)
                else:  # from . import ops, patch
                    found.update(base + alias.name for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_scan_sees_imports(tmp_path):
    """The scanner itself: plain, from, relative, nested and dynamic imports are all found."""
    src = tmp_path / "m.py"
    src.write_text(
        "import os.path\nfrom torch import nn\nfrom . import ops, patch\nfrom ..x.y import z\n"
        "def f():\n    import transformers\n    importlib.import_module('tests.helpers')\n"
    )
    assert imports(src) == {"os.path", "torch", ".ops", ".patch", "..x.y", "transformers", "tests.helpers"}


def test_files_exist():
    names = {p.name for p in LIBRARY}
    assert {"patch.py", "wrapper.py", "layers.py", "ops.py"} <= names
    assert "reference.py" in {p.name for p in KERNELS}


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_kernels_import_only_torch_triton_and_stdlib(path):
    bad = set()
    for name in imports(path):
        if name.startswith(".."):
            bad.add(name)  # reaching out of kernels/
        elif name.startswith("."):
            continue  # another kernels module
        elif top(name) not in {"torch", "triton"} | STDLIB:
            bad.add(name)
    assert not bad, f"kernels/{path.name} imports {sorted(bad)}"


ENTRY_POINTS = {"cli.py", "demo.py"}  # above the wrapper: they load an HF model, then wrap it


@pytest.mark.parametrize("path", [p for p in LIBRARY if p.name not in ENTRY_POINTS], ids=lambda p: p.name)
def test_only_patch_knows_transformers(path):
    uses = sorted(n for n in imports(path) if top(n) == "transformers")
    if path.name == "patch.py":
        assert uses, "patch.py is where transformers' module types are known"
    else:
        assert not uses, f"lora_graph/{path.name} imports {uses}; only patch.py may know transformers"


@pytest.mark.parametrize("path", LIBRARY + KERNELS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_library_never_imports_tests_or_notebooks(path):
    bad = sorted(n for n in imports(path) if top(n.lstrip(".")) in {"tests", "notebooks", "helpers", "conftest"})
    assert not bad, f"{path.parent.name}/{path.name} imports {bad}"


# ops < layers < patch < wrapper: a module never imports one above it
UPPER = {
    "ops.py": {"layers", "patch", "wrapper", "cli"},
    "layers.py": {"patch", "wrapper", "cli"},
    "patch.py": {"wrapper", "cli"},
    "bank.py": {"layers", "patch", "wrapper", "cli"},
    "routing.py": {"layers", "patch", "wrapper", "cli"},
    "adapters.py": {"bank", "layers", "patch", "wrapper", "cli"},
    "config.py": {"adapters", "bank", "layers", "patch", "wrapper", "cli"},
    "store.py": {"bank", "layers", "patch", "wrapper", "cli"},
    "wrapper.py": {"cli", "demo"},
}


@pytest.mark.parametrize("name", sorted(UPPER))
def test_lower_layers_do_not_import_upper_ones(name):
    path = ROOT / "lora_graph" / name
    internal = set()
    for imported in imports(path):
        if imported.startswith(".") and not imported.startswith(".."):
            internal.add(top(imported[1:]))
        elif top(imported) == "lora_graph":
            internal.add(imported.split(".")[1] if "." in imported else "lora_graph")
    bad = sorted(internal & (UPPER[name] | {"lora_graph"}))
    assert not bad, f"lora_graph/{name} imports {bad}, which sit above it"
