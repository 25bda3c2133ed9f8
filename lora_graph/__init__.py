"""lora_graph: many LoRA adapters served at once over one frozen Hugging Face model.

    lm = lora_graph.wrap(model)
    lm.load_adapter("sql", "path/to/peft_dir")
    lm.generate(input_ids=ids, adapters=["sql", None, {"sql": 0.5, "chat": 1.0}])
    lm(input_ids=packed_ids, adapters=lora_graph.Packed(lengths=[5, 3], adapters=["sql", None]))
"""

from __future__ import annotations

import logging

import torch

from .config import AdapterConfigError
from .routing import Packed
from .store import AdapterInfo
from .wrapper import LoraGraph

__all__ = ["wrap", "LoraGraph", "AdapterInfo", "AdapterConfigError", "Packed", "__version__"]
__version__ = "0.1.0"


def wrap(
    model: torch.nn.Module,
    backend: str = "auto",
    adapter_dtype: torch.dtype = torch.float32,
    max_loaded: int | None = None,
    max_cpu: int | None = 8,
    max_rank: int | None = None,
    progress: bool = True,
) -> LoraGraph:
    """Patch ``model`` in place for multi-adapter serving and return the wrapper.

    Args:
        model: a Hugging Face model (or any ``nn.Module`` with Linear / Conv1D / Embedding layers).
            Its parameters and buffers are never modified.
        backend: ``"auto"`` (triton on CUDA when installed, else torch), ``"torch"`` or ``"triton"``.
        adapter_dtype: dtype the LoRA factors are stored in. The branch always accumulates in fp32;
            the default fp32 storage matches PEFT's default numerics.
        max_loaded: device slots, i.e. how many adapters are resident at once (None: no bound).
            Requests page registered adapters in and evict the least recently used.
        max_cpu: adapters kept in the host cache, each in one contiguous (pinned on CUDA) buffer.
        max_rank: preallocate the slot buffers for this rank; adapters of higher rank are refused.
        progress: tqdm bars when registering or loading many adapters (in a notebook or on a terminal).

    A model this library already wraps gives back its existing wrapper (re-running a notebook cell
    is harmless); its settings stay as they were.
    """
    existing = getattr(model, "_lora_graph", None)
    if isinstance(existing, LoraGraph):
        logging.getLogger(__name__).info("this model is already wrapped by lora_graph: returning its wrapper")
        return existing
    return LoraGraph(model, backend=backend, adapter_dtype=adapter_dtype, max_loaded=max_loaded,
                     max_cpu=max_cpu, max_rank=max_rank, progress=progress)
