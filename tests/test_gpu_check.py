"""benchmarks/gpu_check.py --dry-run: every part of the one GPU check runs, on CPU at toy sizes.

The GPU check runs once, on a machine lent for a few minutes; this keeps it from rotting in between.
The dry run takes the parts' own code paths (the kernels in Triton's interpreter, torch.compile's
aot_eager in place of CUDA graphs), and it starts the way the GPU machine will: from the tree, with
lora_graph not installed. ``python -S`` with the site-packages folders on PYTHONPATH skips the .pth
files, so the editable install's finder is absent and benchmarks/_env.py must import this checkout.

Checked: the run exits 0, and every part wrote its report with status "ok", the environment, and
each of its figures; the correctness figures (kernels against the reference, the model against
PEFT, compiled against eager, recompiles) must meet their targets even at toy sizes. The speed
figures only need to exist. A part killed at its time limit leaves a report that says so, and fails
the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ("kernels", "model", "bandwidth", "decode", "loads", "cudagraphs")
CORRECTNESS = {"kernel_cases", "model_rows", "model_torch", "model_weighted", "model_base_rows", "model_effect",
               "cudagraph_recompiles", "cudagraph_mismatches"}
SPEED = {"decode_32": "decode", "decode_flat": "decode", "prefill": "decode", "peft_speedup": "decode",
         "hbm_fraction": "bandwidth", "load_fraction": "loads"}


def uninstalled(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """gpu_check.py run with site-packages on the path but without their .pth files (no editable install)."""
    packages = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(packages))
    env.pop("TRITON_INTERPRET", None)  # the runner sets it for the parts of a dry run
    return subprocess.run([sys.executable, "-S", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = uninstalled("--dry-run", "--out-dir", str(out), timeout=400)
    reports = {part: json.loads((out / f"gpu_{part}.json").read_text())
               for part in PARTS if (out / f"gpu_{part}.json").exists()}
    return proc, reports


def test_dry_run_exits_zero_and_prints_the_summary(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "figures meet their targets" in proc.stdout
    assert "6 of 6 parts ran to the end" in proc.stdout
    # the repository root never goes on sys.path: its kernels/ is not the top-level package `kernels`
    assert str(ROOT / "kernels" / "__init__.py") not in proc.stdout + proc.stderr


@pytest.mark.parametrize("part", PARTS)
def test_every_part_reports_ok_with_its_environment(dry_run, part):
    _, reports = dry_run
    assert part in reports, f"no report for {part}"
    report = reports[part]
    assert report["status"] == "ok", report.get("error", "") + report.get("traceback", "")
    assert report["dry_run"] is True
    env = report["env"]
    for key in ("device", "torch", "cuda", "triton", "transformers", "commit", "sources_sha256"):
        assert key in env, key
    assert Path(env["lora_graph"]).resolve() == ROOT / "lora_graph" / "__init__.py"
    assert report["results"], "a part that ran measured nothing"
    assert report["skipped"] == [], report["skipped"]


def test_correctness_figures_meet_their_targets(dry_run):
    _, reports = dry_run
    checks = {key: check for r in reports.values() for key, check in r["checks"].items()}
    for key in CORRECTNESS:
        assert key in checks, key
        assert checks[key]["met"] is True, (key, checks[key])
    assert reports["kernels"]["results"]["cases"], "no kernel case ran"
    assert all(case["ok"] for case in reports["kernels"]["results"]["cases"])


def test_speed_figures_are_measured(dry_run):
    _, reports = dry_run
    for key, part in SPEED.items():
        check = reports[part]["checks"][key]
        assert isinstance(check["value"], (int, float)) and check["value"] > 0, (key, check)
    rows = reports["bandwidth"]["results"]["rows"]
    assert {row["phase"] for row in rows} == {"decode", "prefill"}
    assert reports["bandwidth"]["results"]["measured_hbm_GBps"] > 0


def test_a_part_killed_at_its_limit_leaves_a_timeout_report(tmp_path):
    proc = uninstalled("--dry-run", "--parts", "loads", "--scale", "0.02", "--out-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    report = json.loads((tmp_path / "gpu_loads.json").read_text())
    assert report["status"] == "timeout"
    assert "time limit" in report["error"]
    assert "timeout" in proc.stdout
