"""Loading a model and its adapters for serving: what ``lora-graph serve`` and each Ray replica do."""

from __future__ import annotations

from pathlib import Path

from .. import demo

DEMO_ID = "lora-graph-demo"


def served_name(model_dir: str | None) -> str:
    """The base model's id: the model folder's name, or ``lora-graph-demo`` for the demo."""
    return DEMO_ID if model_dir is None else Path(model_dir).name


def load_served(model_dir: str | None, adapters: dict | None = None, backend: str = "auto", quantize: str = "none",
                max_loaded: int | None = None, preload: bool = True):
    """``(lm, tokenizer)``: the model (default: the shipped demo) wrapped, its adapters registered
    (default, for the demo: its four) and, with ``preload``, as many made resident as ``max_loaded``
    allows."""
    import torch
    from transformers import AutoTokenizer

    import lora_graph

    if adapters is None:
        adapters = dict(demo.adapter_paths()) if model_dir is None else {}
    path = model_dir or str(demo.base_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = demo.load_base(quantize, path, dtype=torch.float32 if model_dir is None else "auto")
    lm = lora_graph.wrap(model, backend=backend, max_loaded=max_loaded)
    lm.register_adapters(adapters)
    for name in list(adapters)[: max_loaded or len(adapters)] if preload else ():
        lm.load_adapter(name)
    return lm, tokenizer
