"""Execute the notebooks in a real Jupyter kernel and save them with their outputs.

    .venv/bin/python scripts/run_notebooks.py [notebooks/NAME.ipynb ...]   (default: all of notebooks/)

nbclient runs each notebook top to bottom in an ipykernel kernel of this Python, in notebooks/, with
one intra-op thread (the demo model is tiny: more threads only contend). The saved notebook keeps a
digest of the code it ran in its metadata (``lora_graph.executed_code``); tests/test_notebooks.py
executes every notebook again and fails when that digest no longer matches the code cells, i.e.
when a cell was edited and its outputs were not made again with this script.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 120


def code_digest(nb) -> str:
    """sha256 of the notebook's code cells, in order."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def execute(path: Path):
    """Run ``path`` in a fresh kernel; returns the executed notebook and the seconds it took.
    A cell that raises stops the run with nbclient's CellExecutionError."""
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the kernel inherits it
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata["lora_graph"] = {"executed_code": code_digest(nb)}
    return nb, seconds


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        nb, seconds = execute(path)
        nbformat.write(nb, path)
        print(f"{path.name}: {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
