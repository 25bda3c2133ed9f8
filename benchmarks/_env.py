"""What every benchmark needs beside its numbers: this checkout's lora_graph, and a record of the machine,
the versions and the commit.

A benchmark may run from a plain copy of the repository, with nothing installed (a GPU machine that
is lent for one run). ``use_checkout()`` then makes ``import lora_graph`` load this checkout, whose
``kernels/`` folder is the package ``lora_graph.kernels`` (pyproject's package-dir mapping), without
putting the repository root on ``sys.path``: that would expose ``kernels/`` as a top-level
``kernels``, a name that belongs to Hugging Face's package, which transformers and bitsandbytes
import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def use_checkout() -> None:
    """Make ``import lora_graph`` load this checkout, unless it already does (an editable install).

    Registers ``lora_graph`` and ``lora_graph.kernels`` from their folders; call it before anything
    imports lora_graph."""
    found = importlib.util.find_spec("lora_graph")
    if found is not None and found.origin and Path(found.origin).resolve() == ROOT / "lora_graph" / "__init__.py":
        return
    if "lora_graph" in sys.modules:
        raise RuntimeError(f"another lora_graph is imported already: {sys.modules['lora_graph'].__file__}")

    def register(name: str, folder: Path):
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        return spec, module

    package_spec, package = register("lora_graph", ROOT / "lora_graph")
    kernels_spec, kernels = register("lora_graph.kernels", ROOT / "kernels")
    kernels_spec.loader.exec_module(kernels)
    package.kernels = kernels
    package_spec.loader.exec_module(package)


def sources_digest() -> str:
    """sha256 of the library's sources (lora_graph/ and kernels/): names the code measured even
    where the copy that ran had no git history."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("lora_graph/**/*.py"), *ROOT.glob("kernels/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files other than results differ from it (the figures are
    then not HEAD's code)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results")
    return commit + ("-dirty" if changed else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment() -> dict:
    """device, thread count, python/torch/CUDA/transformers/peft/triton versions, the git commit and
    the sources' digest."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "triton": version("triton"),
        "bitsandbytes": version("bitsandbytes"),
        "commit": git_commit(),
        "sources_sha256": sources_digest(),
    }


def write_json(report: dict, path: str) -> None:
    """Write a benchmark's report, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")
