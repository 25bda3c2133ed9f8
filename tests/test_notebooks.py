"""notebooks/: each runs top to bottom in a real Jupyter kernel, and its committed outputs are current.

Each notebook is executed again here with nbclient in an ipykernel kernel (the code of
scripts/run_notebooks.py, which also makes the committed outputs); any cell that raises fails the
test. The committed file must be a complete top-to-bottom run (execution counts 1..n) of exactly
its code cells: the digest of the code that was run, saved in its metadata when it was executed,
must match its code cells now, and a fresh run must give every cell the same kinds of output.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CPU_BUDGET_S = 60  # each notebook runs in under a minute on a CPU laptop


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def output_kinds(cell) -> list:
    """What a cell displayed: each rich output's MIME types, in order (streams, whose warnings
    vary with the environment, left out)."""
    return [sorted(out.get("data", {})) for out in cell.outputs if out.output_type != "stream"]


def stale_reasons(nb) -> list[str]:
    """Why ``nb``'s outputs may not come from its code as it now is; empty when current."""
    reasons = []
    counts = [cell.execution_count for cell in code_cells(nb)]
    if counts != list(range(1, len(counts) + 1)):
        reasons.append(f"execution counts {counts} are not one run from the top")
    recorded = nb.metadata.get("lora_graph", {}).get("executed_code")
    if recorded != run_notebooks.code_digest(nb):
        reasons.append("the code cells changed since the outputs were made")
    return reasons


def test_the_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_mixing.ipynb", "03_quantized_base.ipynb",
                                           "04_many_adapters.ipynb"]


def test_the_stale_check_sees_an_edited_cell_and_a_partial_run():
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    assert stale_reasons(nb) == []
    edited = copy.deepcopy(nb)
    code_cells(edited)[-1].source += "\nprint('edited')"
    assert stale_reasons(edited) == ["the code cells changed since the outputs were made"]
    rerun = copy.deepcopy(nb)
    code_cells(rerun)[1].execution_count = len(code_cells(nb)) + 1  # one cell run again by hand
    assert len(stale_reasons(rerun)) == 1 and "execution counts" in stale_reasons(rerun)[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_committed_outputs_are_current(path):
    committed = nbformat.read(path, as_version=4)
    assert not stale_reasons(committed), (f"{path.name}: {stale_reasons(committed)}; "
                                          "run: .venv/bin/python scripts/run_notebooks.py " + f"notebooks/{path.name}")
    fresh, seconds = run_notebooks.execute(path)  # raises CellExecutionError if a cell fails
    for old, new in zip(code_cells(committed), code_cells(fresh)):
        assert not [o for o in new.outputs if o.output_type == "error"]
        assert output_kinds(new) == output_kinds(old), f"{path.name}, cell {old.execution_count}:\n{old.source}"
    # twice the budget: a shared 2-core machine may be busy with other work
    assert seconds < 2 * CPU_BUDGET_S, f"{path.name} took {seconds:.0f} s"
