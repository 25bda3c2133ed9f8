"""The README's API tour runs as a script, as written, with UserWarnings turned into errors.

The tour's placeholders are filled by files made here: a tiny Llama saved where the tour loads
"..." from, two PEFT adapters under adapters/, and the tensors it names (ids, mask, and a packed
batch of three sequences with its block-diagonal causal mask).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import save_adapter, targets, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"

PREAMBLE = '''
import torch
ids = torch.randint(3, 96, (3, 8), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
lengths = [5, 3, 7]
ids_1x15 = torch.randint(3, 96, (1, 15), generator=torch.Generator().manual_seed(1))
pos = torch.cat([torch.arange(n) for n in lengths])[None]
block_mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool).tril() for n in lengths])[None, None]
'''


def api_tour() -> str:
    text = README.read_text()
    section = text[text.index("## API tour"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_api_tour_runs_without_user_warnings(tmp_path):
    tour = api_tour()
    assert 'from_pretrained("...")' in tour and "adapters/sql" in tour
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    for seed, name in enumerate(("sql", "chat")):
        save_adapter(model, str(tmp_path / "adapters" / name), seed=seed + 1, target_modules=targets("llama"))
    script = tmp_path / "tour.py"
    script.write_text(PREAMBLE + tour.replace('from_pretrained("...")', 'from_pretrained("base")')
                      + '\nprint("tour done", seqs.shape)\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tour done torch.Size([3," in run.stdout
