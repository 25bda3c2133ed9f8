"""What every benchmark records beside its numbers: the machine, the versions and the commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import torch


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
    """device, thread count, python/torch/transformers/peft versions and the git commit."""
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
        "transformers": version("transformers"),
        "peft": version("peft"),
        "triton": version("triton"),
        "bitsandbytes": version("bitsandbytes"),
        "commit": git_commit(),
    }


def write_json(report: dict, path: str) -> None:
    """Write a benchmark's report, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")
