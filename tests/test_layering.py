"""Dependency direction, read from the source with ``ast`` (nothing is imported).

* kernels/ knows only torch and triton (and the standard library, and its own modules);
* inside the wrapping stack, only lora_graph/patch.py knows transformers (the entry points above
  the wrapper, cli.py and demo.py, load models and tokenizers with it);
* the library never imports the tests or the notebooks;
* inside the library, lower layers never import upper ones
  (routing < backends < layers < patch < residency < wrapper);
* only backends/__init__.py (``resolve_backend``) compares a backend's name.

Imports inside functions count too, and so do ``importlib.import_module("...")`` / ``__import__``
calls with a literal name.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted((ROOT / "lora_graph").rglob("*.py"))
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


def rel(path: Path) -> str:
    return path.relative_to(ROOT / "lora_graph").as_posix()


def test_files_exist():
    names = {rel(p) for p in LIBRARY}
    assert {"patch.py", "wrapper.py", "layers.py", "routing.py", "slots.py", "backends/torch.py",
            "backends/triton.py"} <= names
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


# cli.py, demo.py, serve/app.py and serve/loading.py sit above the wrapper: they load an HF model,
# then wrap it; notebook.py loads the model's tokenizer (AutoTokenizer) when a caller passes none
ENTRY_POINTS = {"cli.py", "demo.py", "serve/app.py", "serve/loading.py", "notebook.py"}
# patch.py knows transformers' module types; serve/hf_batching.py its continuous batching
KNOWS_TRANSFORMERS = {"patch.py", "serve/hf_batching.py"}


@pytest.mark.parametrize("path", [p for p in LIBRARY if rel(p) not in ENTRY_POINTS], ids=rel)
def test_only_patch_knows_transformers(path):
    uses = sorted(n for n in imports(path) if top(n) == "transformers")
    if rel(path) in KNOWS_TRANSFORMERS:
        assert uses, f"{rel(path)} is where transformers is known"
    else:
        assert not uses, f"lora_graph/{rel(path)} imports {uses}; only {sorted(KNOWS_TRANSFORMERS)} may"


@pytest.mark.parametrize("path", LIBRARY, ids=rel)
def test_only_serve_knows_http_and_ray(path):
    uses = sorted(n for n in imports(path) if top(n) in {"fastapi", "uvicorn", "starlette", "sse_starlette", "ray",
                                                            "prometheus_client"})
    # serve/ and the command that starts a server; the engine itself knows neither HTTP nor Ray
    if not (rel(path).startswith("serve/") or rel(path) == "cli.py") or rel(path) == "serve/engine.py":
        assert not uses, f"lora_graph/{rel(path)} imports {uses}"


def test_importing_the_library_imports_no_server_or_cluster():
    import subprocess

    code = ("import sys, lora_graph, lora_graph.serve; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'ray', 'pandas', 'matplotlib', 'ipywidgets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("path", LIBRARY + KERNELS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_library_never_imports_tests_or_notebooks(path):
    bad = sorted(n for n in imports(path) if top(n.lstrip(".")) in {"tests", "notebooks", "helpers", "conftest"})
    assert not bad, f"{path.parent.name}/{path.name} imports {bad}"


# routing < backends < layers < patch < residency < wrapper: a module never imports one above it
ABOVE_BACKENDS = {"layers", "patch", "residency", "wrapper", "cli"}
UPPER = {
    "backends/__init__.py": ABOVE_BACKENDS,
    "backends/base.py": ABOVE_BACKENDS,
    "backends/torch.py": ABOVE_BACKENDS,
    "backends/triton.py": ABOVE_BACKENDS,
    "layers.py": {"patch", "residency", "wrapper", "cli"},
    "patch.py": {"residency", "wrapper", "cli"},
    "residency.py": {"wrapper", "cli"},
    "bank.py": {"backends", "layers", "patch", "residency", "wrapper", "cli"},
    "routing.py": {"backends", "layers", "patch", "residency", "wrapper", "cli"},
    "slots.py": {"bank", "backends", "layers", "patch", "residency", "wrapper", "cli"},
    "adapters.py": {"bank", "backends", "layers", "patch", "residency", "wrapper", "cli"},
    "config.py": {"adapters", "bank", "backends", "layers", "patch", "residency", "wrapper", "cli"},
    "store.py": {"bank", "backends", "layers", "patch", "residency", "wrapper", "cli"},
    "sources.py": {"bank", "backends", "layers", "patch", "residency", "wrapper", "cli"},
    "wrapper.py": {"cli", "demo"},
}


def internal_imports(path: Path) -> set[str]:
    """The lora_graph modules ``path`` imports, by their top name inside the package."""
    depth = len(Path(rel(path)).parts) - 1  # 1 inside backends/
    found = set()
    for imported in imports(path):
        dots = len(imported) - len(imported.lstrip("."))
        if dots:
            parts = ([Path(rel(path)).parts[0]] if dots == 1 and depth else []) + imported[dots:].split(".")
            if dots - 1 <= depth and parts[0]:
                found.add(parts[0])
        elif top(imported) == "lora_graph":
            found.add(imported.split(".")[1] if "." in imported else "lora_graph")
    return found


@pytest.mark.parametrize("name", sorted(UPPER))
def test_lower_layers_do_not_import_upper_ones(name):
    bad = sorted(internal_imports(ROOT / "lora_graph" / name) & (UPPER[name] | {"lora_graph"}))
    assert not bad, f"lora_graph/{name} imports {bad}, which sit above it"


def test_the_internal_scan_resolves_package_relative_imports():
    assert internal_imports(ROOT / "lora_graph" / "backends" / "torch.py") >= {"routing", "backends"}
    assert "routing" in internal_imports(ROOT / "lora_graph" / "wrapper.py")


def test_only_resolve_backend_compares_a_backend_name():
    """A backend is an object; its name is looked at in one place."""
    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](torch|triton)["']|["'](torch|triton)["']\s*(==|!=)""")
    found = [f"{rel(p)}:{i}" for p in LIBRARY for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert all(f.startswith("backends/__init__.py:") for f in found), found
    assert found, "the check found resolve_backend's own comparisons"


def _functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", LIBRARY + KERNELS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_function_is_over_60_lines(path):
    """Past about 60 lines a function hides a concept; split it."""
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in _functions(path) if f.end_lineno - f.lineno + 1 > 60]
    assert not long, f"{path.name}: {long}"


def test_the_wrapper_stays_a_facade():
    """LoraGraph holds the registry, the requests and the hooks; the mechanics live beside it."""
    tree = ast.parse((ROOT / "lora_graph" / "wrapper.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LoraGraph"]
    assert cls.end_lineno - cls.lineno + 1 <= 300
