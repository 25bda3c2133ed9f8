"""Export: a one-row SPEC written to disk, as a plain Hugging Face checkpoint or as one PEFT adapter.

    lm.save_merged(out_dir, adapters=SPEC)    W' = W + Σ w·s·B·A per module (DoRA: see below), a
                                              standard checkpoint that AutoModelForCausalLM reloads
    lm.save_adapter(out_dir, adapters=SPEC)   the weighted set as ONE exact PEFT LoRA adapter

This is the only code that ever forms ``B·A``, and only here, on request: one module at a time, in
fp32 on the module's device, cast to the output dtype at once and written with its shard. The live
model is only read: every tensor written is a new one or the model's own, untouched.

Where the factors come from: the host cache when it holds the adapter, else the adapter's files,
read again and validated exactly as a load reads them (``Residency.read``). So an adapter that is
registered but not resident exports the same as a resident one, and nothing is paged in or out.
The factors are rounded to the wrapper's ``adapter_dtype`` first, as the banks hold them, so the
export equals what ``lm(..., adapters=SPEC)`` computes.

**DoRA.** lora_graph runs DoRA as a branch: per output row ``g = m / ‖W + s·B·A‖`` (fixed at load),
``y = base(x) + Σ_a w_a·[(g_a − 1)⊙(base(x) − bias) + g_a⊙s_a·B_a(A_a x)]``. Merged, that is
``W' = W⊙(1 + Σ_a w_a(g_a − 1)) + Σ_a w_a·g_a⊙s_a·B_a A_a`` and the bias unchanged, which is what
PEFT's own merge of a single DoRA adapter gives (``g⊙(W + s·B·A)``). As an adapter file, a single
DoRA adapter is written as itself; a weighted set with a DoRA adapter in it is refused: its gain
``1 + Σ w(g − 1)`` is not one adapter's ``m / ‖W + s·B·A‖`` without re-deriving ``m`` from this
base's weights (and it is undefined where the gain is 0).

**save_adapter is exact.** Per module the adapters' factors are stacked along the rank: A is
``cat(A_a)`` (Σr rows) and B is ``cat(w_a·s_a·B_a)``, so ``B(Ax) = Σ w_a·s_a·B_a(A_a x)`` with no
SVD. Every module is written with ``lora_alpha = r`` (rank_pattern / alpha_pattern where the ranks
differ), so PEFT's scale is exactly 1 whatever the sets' rsLoRA, patterns and signs were.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import patch
from .adapters import CONFIG_NAME, SAFETENSORS_NAME, ModuleLora, dora_scale
from .layers import _LoraModule
from .routing import Packed, _weighted_set

logger = logging.getLogger(__name__)

_QUANTIZED = ("Params4bit", "Int8Params")  # bitsandbytes weights, dequantized on export
_PREFIX = "base_model.model."


class Export:
    """Mixed into LoraGraph; relies on its ``model``, ``_lock``, ``_infos``, ``_host``, ``_resident``,
    ``_sources``, ``_patched`` and ``adapter_dtype``."""

    def save_merged(self, out_dir: str | os.PathLike, adapters=None, dtype: torch.dtype | None = None,
                    max_shard_size: int | str = "2GB", tokenizer=None) -> Path:
        """Write a standard HF checkpoint (config, safetensors shards, generation config, and the
        tokenizer when given) whose weights are ``W + Σ w·s·B·A`` for the one-row SPEC ``adapters``
        (a name, ``{name: weight}``, or None for the base). ``AutoModelForCausalLM.from_pretrained``
        reloads it. The live model is not touched.

        ``dtype``: the checkpoint's floating dtype; default the model's compute dtype (a 4-bit
        base's ``compute_dtype``). Over a bitsandbytes base every quantized module is dequantized,
        merged or not, so the checkpoint is a plain one that loads without bitsandbytes. It is not
        quantized again: rounding the merged weight to 4 bits rounds the adapter's small delta into
        the base's quantization grid a second time and loses part of it (on the demo adapters, 2 to
        5 points of exact match with nf4: README, "Exporting"), while the checkpoint as written
        computes what the branch over the quantized base computed. Quantize on reload
        (``BitsAndBytesConfig``) if the size matters more. Tied weights (lm_head and the
        embedding) are written apart, and untied in the config, once an adapter changes either.
        Returns the directory.
        """
        weighted = self._export_set(adapters, "save_merged")
        dtype = _check_dtype(dtype, self.model)
        hosts = self._export_factors(weighted)
        config = _plain_config(self.model, dtype)
        entries, untie = _merged_entries(self, weighted, hosts, dtype)
        _match_layout(entries, self.model, config)
        split = _split(entries, max_shard_size)
        with _staging(out_dir) as tmp:
            _write_shards(tmp, entries, split)
            _write_config(tmp, self.model, config, untie)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        logger.info("wrote the merged checkpoint of %s to %s", dict(weighted) or "the base", out_dir)
        return Path(out_dir)

    def save_adapter(self, out_dir: str | os.PathLike, adapters=None) -> Path:
        """Write the one-row SPEC ``adapters`` as ONE PEFT LoRA adapter (adapter_config.json and
        adapter_model.safetensors) that reproduces ``Σ w·s·B(Ax)`` exactly: per module the sets'
        factors are concatenated along the rank (Σr), the weights and scales are folded into B,
        and every module's PEFT scale is 1 (``lora_alpha = r``, per module through rank_pattern and
        alpha_pattern). PEFT's ``PeftModel.from_pretrained`` and ``lm.load_adapter`` reload it. A
        single name is written in this normalized form; a single DoRA adapter as itself, with its
        magnitudes; a set with a DoRA adapter in it is refused. Returns the directory.
        """
        weighted = self._export_set(adapters, "save_adapter")
        if not weighted:
            raise ValueError("save_adapter: the SPEC names no adapter (it is the base model): nothing to write")
        hosts = self._export_factors(weighted)
        dora = [n for n, _ in weighted if any(m.mag is not None for m in hosts[n].values())]
        if dora and (len(weighted) > 1 or weighted[0][1] != 1.0):
            raise ValueError(
                f"save_adapter: the set {dict(weighted)} contains the DoRA adapter {dora[0]!r}, and a weighted set "
                "with a DoRA adapter is not written as one adapter: its per-row gain 1 + Σ w·(g − 1) would have to "
                "become a new magnitude, re-derived from this base's weights (and undefined where the gain is 0). "
                "Use save_merged for it, or save the DoRA adapter alone, at weight 1"
            )
        tensors, config = _stacked_adapter(self, weighted, hosts)
        from safetensors.torch import save_file

        with _staging(out_dir) as tmp:
            save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        logger.info("wrote %s as one adapter to %s", dict(weighted), out_dir)
        return Path(out_dir)

    # -- helpers --------------------------------------------------------------------------------
    def _export_set(self, spec, what: str) -> tuple[tuple[str, float], ...]:
        """The SPEC as one weighted set, validated against the registry."""
        self._check_live()
        if isinstance(spec, Packed) or (isinstance(spec, Sequence) and not isinstance(spec, str)):
            raise ValueError(
                f"{what}: adapters must be ONE SPEC for the whole model (None, a name or {{name: weight}}), "
                f"got a {type(spec).__name__} (a SPEC per batch row or per packed run)"
            )
        with self._lock:
            return _weighted_set(spec, self._infos, f"the SPEC of {what}")

    def _export_factors(self, weighted) -> dict[str, dict[str, ModuleLora]]:
        """Each adapter's per-module factors: from the host cache, or read again from its files
        (outside the lock: reading is the slow part). Nothing is paged in or cached."""
        with self._lock:
            cached = {n: self._host.get(n) for n, _ in weighted}
            sources = {n: self._sources[n] for n, _ in weighted}  # a folder, or in-memory tensors
        hosts = {}
        for name, _ in weighted:
            host = cached[name] or self._resident.read(sources[name])
            hosts[name] = {m: lora.map(lambda t: t.to(self.adapter_dtype), lambda t: t)
                           for m, lora in host.weights.modules.items()}
        return hosts


# -- checks ---------------------------------------------------------------------------------------


def _check_dtype(dtype, model: nn.Module) -> torch.dtype:
    if dtype is None:
        return _compute_dtype(model)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"save_merged: dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """A 4-bit base's ``compute_dtype``, else the dtype of the model's first floating parameter."""
    for module in model.modules():
        if type(getattr(module, "weight", None)).__name__ == "Params4bit" and getattr(module, "compute_dtype", None):
            return module.compute_dtype
    for param in model.parameters():
        if param.is_floating_point() and type(param).__name__ not in _QUANTIZED:
            return param.dtype
    return torch.float32


def _check_source(key: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":
        raise ValueError(f"save_merged: tensor {key!r} is offloaded (on the meta device); load the model whole first")
    if type(tensor) not in (torch.Tensor, nn.Parameter):
        raise ValueError(
            f"save_merged: tensor {key!r} is a {type(tensor).__name__}; only plain and bitsandbytes weights can "
            "be written as a plain checkpoint"
        )


# -- save_merged ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One tensor of the checkpoint: its shape and dtype (for sharding), and how to make it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    source: torch.Tensor  # the live tensor it replaces or copies (ties are found by its identity)
    changed: bool = False  # differs from the live tensor (merged)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def _walk(module: nn.Module, prefix: str = ""):
    """``(name., module)`` of every module by its unpatched name: a patched module is its base."""
    if isinstance(module, _LoraModule):
        yield from _walk(module.base_layer, prefix)
        return
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.")


def _copy(tensor: torch.Tensor, dtype: torch.dtype) -> _Entry:
    out = dtype if tensor.is_floating_point() else tensor.dtype
    # a copy: safetensors refuses tensors that share memory (views of one buffer) within a file
    return _Entry(tuple(tensor.shape), out, lambda: tensor.detach().to("cpu", out, copy=True).contiguous(), tensor)


def _plain_entries(model: nn.Module, dtype: torch.dtype) -> dict[str, _Entry]:
    """Every parameter and persistent buffer as the checkpoint holds it, by the unpatched names;
    a bitsandbytes module's weight dequantized (its quantization state is not written)."""
    entries = {}
    for prefix, module in _walk(model):
        weight = module._parameters.get("weight")
        if weight is not None and type(weight).__name__ in _QUANTIZED:
            n = module.out_features  # dequantized when its shard is written, not all at once
            make = lambda m=module, n=n: patch.weight_rows(m)(0, n).to("cpu", dtype)  # noqa: E731
            entries[prefix + "weight"] = _Entry((n, module.in_features), dtype, make, weight)
            if module.bias is not None:
                entries[prefix + "bias"] = _copy(module.bias, dtype)
            continue
        tensors = [(k, p) for k, p in module._parameters.items() if p is not None]
        tensors += [(k, b) for k, b in module._buffers.items() if b is not None
                    and k not in module._non_persistent_buffers_set]
        for key, tensor in tensors:
            _check_source(prefix + key, tensor)
            entries[prefix + key] = _copy(tensor, dtype)
    return entries


def _merged_entries(lm, weighted, hosts, dtype: torch.dtype) -> tuple[dict[str, _Entry], bool]:
    """The checkpoint's tensors with every module the set targets merged, and whether a tie
    (one tensor under several names) had to be broken."""
    model, originals = lm.model, lm._patched.originals
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is not None and str(getattr(method, "value", method)) != "bitsandbytes":
        raise ValueError(f"save_merged: the base is quantized with {method!r}; only bitsandbytes and plain bases "
                         "can be written as a plain checkpoint")
    entries = _plain_entries(model, dtype)
    parts: dict[str, list] = collections.defaultdict(list)
    for name, weight in weighted:
        for module, lora in hosts[name].items():
            parts[module].append((name, weight, lora))
    for module_name, found in parts.items():
        module = originals[module_name]
        key = module_name + ".weight"
        entries[key] = _Entry(entries[key].shape, dtype, _merge_weight(module, found, dtype), module.weight, True)
        if any(lora.bias is not None for _, _, lora in found):
            if module.bias is None:
                raise ValueError(
                    f"save_merged: adapter {next(n for n, _, m in found if m.bias is not None)!r} has a lora_B bias on "
                    f"module {module_name!r}, which has no bias in the base model, so a standard checkpoint of this "
                    "architecture cannot hold it; use save_adapter instead"
                )
            entries[module_name + ".bias"] = replace(entries[module_name + ".bias"], changed=True,
                                                     make=_merge_bias(module.bias, found, dtype))
    return _untie(entries)


def _merge_weight(module: nn.Module, parts, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """``make()`` of a merged weight, formed when its shard is written: in PEFT's ``(out, in)``
    rows, ``W⊙(1 + Σ w(g − 1)) + Σ w·g⊙s·B A`` in fp32 (g = 1 for LoRA), then laid out as the
    module stores it and cast."""

    @torch.no_grad()
    def make() -> torch.Tensor:
        shape = patch.shape_of(module)
        w = patch.weight_rows(module)(0, shape.out_features)  # (N, K) fp32, a copy
        gains = [(weight, lora.mag.to(w.device, torch.float32)) for _, weight, lora in parts if lora.mag is not None]
        if gains:
            w.mul_((1 + sum(weight * (g - 1) for weight, g in gains))[:, None])  # (N, 1)
        for _, weight, lora in parts:
            a, b = lora.a.to(w.device, torch.float32), lora.b.to(w.device, torch.float32)
            if lora.mag is not None:
                b = b * lora.mag.to(w.device, torch.float32)[:, None]  # (N, r): g⊙B
            w.addmm_(b, a, alpha=weight * lora.scale)
        if isinstance(module, nn.Embedding) or (patch.Conv1D and isinstance(module, patch.Conv1D)):
            w = w.t()  # stored (vocab, dim) / (in, out)
        return w.to("cpu", dtype).contiguous()

    return make


def _merge_bias(bias: torch.Tensor, parts, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """``make()`` of ``b + Σ w·s·b_B`` (DoRA adapters have no lora_B bias: PEFT refuses both)."""

    @torch.no_grad()
    def make() -> torch.Tensor:
        out = bias.detach().to(torch.float32, copy=True)
        for _, weight, lora in parts:
            if lora.bias is not None:
                out.add_(lora.bias.to(out.device, torch.float32), alpha=weight * lora.scale)
        return out.to("cpu", dtype)

    return make


def _untie(entries: dict[str, _Entry]) -> tuple[dict[str, _Entry], bool]:
    """Names that share one live tensor (lm_head tied to the embedding) are written once, under the
    first name, while none of them changed; when one did, each is written apart and the tie broken."""
    groups = collections.defaultdict(list)
    for key, entry in entries.items():
        groups[id(entry.source)].append(key)
    untie = False
    for keys in groups.values():
        if len(keys) > 1:
            unchanged = [k for k in keys if not entries[k].changed]
            untie = untie or len(unchanged) < len(keys)
            for key in unchanged[1:]:
                del entries[key]
    return entries, untie


def _split(entries: dict[str, _Entry], max_shard_size):
    from huggingface_hub import split_state_dict_into_shards_factory

    try:
        return split_state_dict_into_shards_factory(entries, get_storage_size=lambda e: e.nbytes,
                                                    filename_pattern="model{suffix}.safetensors",
                                                    max_shard_size=max_shard_size)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"save_merged: bad max_shard_size {max_shard_size!r} ({exc})") from None


def _write_shards(folder: Path, entries: dict[str, _Entry], split) -> None:
    """One shard at a time: its tensors are made (merged, dequantized, cast), written and dropped."""
    from safetensors.torch import save_file

    for filename, keys in split.filename_to_tensors.items():
        save_file({k: entries[k].make() for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _plain_config(model: nn.Module, dtype: torch.dtype):
    """A copy of the model's config without its quantization, in ``dtype``."""
    import copy

    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if key in config.__dict__:
            delattr(config, key)
    config.architectures = [type(model).__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def _match_layout(entries: dict[str, _Entry], model: nn.Module, config) -> None:
    """Lay dequantized weights out as the architecture stores them. bitsandbytes replaces a GPT-2
    ``Conv1D`` (weight ``(in, out)``) by a Linear (``(out, in)``), so its weight is transposed back
    where the model class, built from the config on the meta device, has a Conv1D (by type: a
    square weight's shape cannot tell)."""
    quantized = [k for k, e in entries.items() if type(e.source).__name__ in _QUANTIZED]
    if not quantized or not patch.Conv1D:
        return
    with torch.device("meta"):
        skeleton = type(model)._from_config(config)
    originals = dict(skeleton.named_modules())
    for key in quantized:
        module_name, _, param = key.rpartition(".")
        if param == "weight" and isinstance(originals.get(module_name), patch.Conv1D):
            entry = entries[key]
            entries[key] = replace(entry, shape=entry.shape[::-1], make=lambda make=entry.make: make().t().contiguous())


def _write_config(folder: Path, model: nn.Module, config, untie: bool) -> None:
    """``config`` (untied if a tie was broken) and the model's generation config."""
    if untie:
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(folder)


# -- save_adapter -----------------------------------------------------------------------------------


def _stacked_adapter(lm, weighted, hosts) -> tuple[dict[str, torch.Tensor], dict]:
    """The set's factors stacked per module (A: cat(A_a), B: cat(w_a·s_a·B_a)) with PEFT keys, and
    the adapter_config.json that gives every module the scale 1."""
    tensors, ranks, conv1d = {}, {}, []
    for module_name in sorted({m for name, _ in weighted for m in hosts[name]}):
        found = [(weight, hosts[name][module_name]) for name, weight in weighted if module_name in hosts[name]]
        original = lm._patched.originals[module_name]
        if not isinstance(original, nn.Embedding):
            conv1d.append(bool(patch.Conv1D) and isinstance(original, patch.Conv1D))
        tensors.update(_stacked_module(_PREFIX + module_name, original, found))
        ranks[module_name] = sum(lora.rank for _, lora in found)
    lora_bias = any(k.endswith(".lora_B.bias") for k in tensors)
    embeddings = [m for m in ranks if isinstance(lm._patched.originals[m], nn.Embedding)]
    if lora_bias and embeddings:
        with_bias = next(n for n, _ in weighted if any(m.bias is not None for m in hosts[n].values()))
        raise ValueError(
            f"save_adapter: adapter {with_bias!r} has lora_B biases and the set has embedding LoRA on module "
            f"{embeddings[0]!r}; PEFT's lora_bias is one switch for all modules and is not allowed on embeddings, "
            "so no single PEFT adapter holds both. Save them apart, or use save_merged"
        )
    if lora_bias:  # one switch in PEFT: every module gets a lora_B bias, zero where no adapter had one
        for module_name in ranks:
            stem = _PREFIX + module_name
            tensors.setdefault(stem + ".lora_B.bias", tensors[stem + ".lora_B.weight"].new_zeros(
                tensors[stem + ".lora_B.weight"].shape[0]))
    use_dora = any(k.endswith(".lora_magnitude_vector") for k in tensors)
    return tensors, _adapter_config(lm, ranks, lora_bias, conv1d, use_dora)


def _stacked_module(stem: str, original: nn.Module, found) -> dict[str, torch.Tensor]:
    """One module's PEFT tensors for ``found`` = [(weight, ModuleLora)]."""
    a = torch.cat([lora.a.float() for _, lora in found])  # (Σr, K)
    b = torch.cat([lora.b.float() * (weight * lora.scale) for weight, lora in found], dim=1)  # (N, Σr)
    is_emb = isinstance(original, nn.Embedding)
    out = {stem + (".lora_embedding_A" if is_emb else ".lora_A.weight"): a.contiguous(),
           stem + (".lora_embedding_B" if is_emb else ".lora_B.weight"): b.contiguous()}
    biases = [lora.bias.float() * (weight * lora.scale) for weight, lora in found if lora.bias is not None]
    if biases:
        out[stem + ".lora_B.bias"] = torch.stack(biases).sum(0)  # (N,)
    mag = found[0][1].mag
    if mag is not None:  # a single DoRA adapter at weight 1: m = g·‖W + (s·B)A‖, the norm PEFT takes of it
        unit = dora_scale(ModuleLora(a, b, None, a.shape[0], 1.0), torch.ones_like(mag), patch.weight_rows(original))
        out[stem + ".lora_magnitude_vector"] = mag.float() / unit
    return out


def _adapter_config(lm, ranks: dict[str, int], lora_bias: bool, conv1d: list[bool], use_dora: bool) -> dict:
    """PEFT's adapter_config.json for modules of the given ranks, each scaled exactly 1 (alpha = r):
    the commonest rank as ``r``, the others by exact, anchored module names (PEFT matches pattern
    keys as ``(.*\\.)?(key)$``, so ``^`` pins a key to one full name)."""
    r = max(collections.Counter(ranks.values()).most_common(), key=lambda rc: (rc[1], -rc[0]))[0]
    pattern = {"^" + re.escape(name): rank for name, rank in ranks.items() if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(lm.model.config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_bias": lora_bias,
        "use_dora": use_dora,
        "bias": "none",
        "fan_in_fan_out": bool(conv1d) and all(conv1d),
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


# -- writing into a fresh directory -----------------------------------------------------------------


@contextmanager
def _staging(out_dir):
    """A temporary directory beside ``out_dir``, renamed to it when the block succeeds and removed
    (with any parent this made) when it fails: ``out_dir`` is written whole or not at all."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {str(out)!r} is an existing file; give the path of a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not empty; give a new or empty directory")
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename does not replace a directory everywhere
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:  # deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
