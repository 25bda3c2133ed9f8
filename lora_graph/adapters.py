"""Reading a PEFT adapter directory into validated, per-module LoRA weights.

`read_adapter` does all the checking before anything is placed: the config (see config.py), the
file format, and every key against the model's modules, shapes and the config's ranks. An adapter
that gets past it can be placed without further failure, so a failed load leaves no trace.

Keys look like ``base_model.model.<module path>.lora_A.weight`` (see PEFT_SEMANTICS §3). Only the
names inside the base model matter; PEFT's wrapper prefix is dropped.

**DoRA** (``use_dora``). PEFT's forward scales each output channel by ``g = m / ‖W + s·B·A‖``
(peft/tuners/lora/dora.py), where ``m`` is the saved ``lora_magnitude_vector`` and the norm runs
over each row of the base weight plus the adapter's delta. ``g`` depends only on the adapter and
the frozen base, so it is computed here, once per module, and travels with the factors as an
``(N,)`` fp32 vector (``ModuleLora.mag``). ``W + s·B·A`` is formed a chunk of rows at a time
(``_NORM_CHUNK`` elements), so neither ``B·A`` nor a dense copy of ``W`` is ever held whole (a
bitsandbytes 4-bit weight is dequantized whole, one module at a time: its blocks run over the
flattened matrix). This is the only place outside export that forms ``B·A``, and only rows of it.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from .config import AdapterConfigError, LoraSettings, parse_config

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# Full matrices PEFT saves when an embedding or lm_head is targeted (save_embedding_layers).
_PREFIX = "base_model.model."
_PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
          "lora_magnitude_vector")
_MAGNITUDE = "lora_magnitude_vector"
# Elements of W + s·B·A formed at once while computing DoRA's norms: 1 MB of fp32 rows, which
# stays in cache between the copy, the addmm and the norm (measured fastest of 256 KB to 16 MB).
_NORM_CHUNK = 1 << 18
_FULL = ("base_layer.weight",)


def split_key(key: str, parts: tuple[str, ...] = _PARTS) -> tuple[str, str] | None:
    """``(module, part)`` of a PEFT weight key ``[base_model.model.]<module>.<part>``, or None."""
    for part in parts:
        if key.endswith(part) and key[-len(part) - 1 : -len(part)] == ".":
            module = key[: -len(part) - 1]
            if module.startswith(_PREFIX) and len(module) > len(_PREFIX):
                module = module[len(_PREFIX) :]
            return (module, part) if module else None
    return None


@dataclass(frozen=True)
class ModuleShape:
    """What a patchable module looks like from outside: ``in_features``/``out_features``
    (for an embedding: vocabulary size and embedding dim)."""

    kind: str  # "linear" | "embedding"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModuleLora:
    """One adapter's factors for one module, in PEFT's layout: the record that the store, the host
    cache and the banks pass whole (a new per-module quantity is a new field here)."""

    a: torch.Tensor  # (r, K)
    b: torch.Tensor  # (N, r)
    bias: torch.Tensor | None  # (N,) or None
    rank: int
    scale: float
    mag: torch.Tensor | None = None  # (N,) fp32, DoRA's g = m / ‖W + s·B·A‖; None for LoRA

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The factors, kept in the adapters' dtype (``mag`` stays fp32 and is apart)."""
        return (self.a, self.b) if self.bias is None else (self.a, self.b, self.bias)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def map(self, fn, fn_mag=None) -> ModuleLora:
        """The same record with every factor passed through ``fn`` (a copy into a buffer, a view),
        and ``mag`` through ``fn_mag`` (default ``fn``)."""
        mag = None if self.mag is None else (fn_mag or fn)(self.mag)
        return replace(self, a=fn(self.a), b=fn(self.b), bias=None if self.bias is None else fn(self.bias), mag=mag)


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter, ready to be placed into the banks."""

    path: str
    settings: LoraSettings
    modules: dict[str, ModuleLora]

    @cached_property
    def numel(self) -> int:
        """Elements of all factors: the adapter's size in any dtype."""
        return sum(m.numel for m in self.modules.values())

    @cached_property
    def mag_numel(self) -> int:
        """Elements of the DoRA vectors (fp32 whatever the factors' dtype); 0 for a LoRA adapter."""
        return sum(m.mag.numel() for m in self.modules.values() if m.mag is not None)


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as zero-copy views of its memory map (read-only)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError("file too short")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header_len = int.from_bytes(mapped[:8], "little")
        if header_len <= 0 or 8 + header_len > size:
            raise ValueError("bad header length")
        header = json.loads(bytes(mapped[8 : 8 + header_len]))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        header.pop("__metadata__", None)
        begin = 8 + header_len
        data = torch.frombuffer(mapped, dtype=torch.uint8, offset=begin) if size > begin else None
        available = size - begin
        flat: dict[torch.dtype, torch.Tensor] = {}  # the data as each dtype, where its alignment allows
        tensors = {}
        for name, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            shape, (start, end) = info["shape"], info["data_offsets"]
            if dtype is None:
                raise ValueError(f"unsupported dtype {info.get('dtype')!r} for {name!r}")
            numel = 1
            for d in shape:
                if type(d) is not int or d < 0:
                    raise ValueError(f"bad dimension {d!r} in the shape of {name!r}")
                numel *= d
            itemsize = dtype.itemsize
            if not 0 <= start <= end <= available or end - start != numel * itemsize:
                raise ValueError(f"data offsets of {name!r} do not match its shape or the file size")
            if not numel:
                tensors[name] = torch.empty(shape, dtype=dtype)
            elif start % itemsize == 0 and begin % itemsize == 0:  # one view op per tensor
                whole = flat.get(dtype)
                if whole is None:
                    whole = flat[dtype] = data[: available // itemsize * itemsize].view(dtype)
                tensors[name] = whole.as_strided(shape, _contiguous_strides(shape), start // itemsize)
            else:  # misaligned for its dtype: a copy (the mapped bytes cannot be viewed as it)
                tensors[name] = data[start:end].clone().view(dtype).view(tuple(shape))
        return tensors
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the adapter weights ({exc})") from None


def _contiguous_strides(shape) -> tuple[int, ...]:
    if len(shape) == 2:  # every LoRA factor
        return (shape[1], 1)
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(int(d), 1)
    return tuple(reversed(strides))


def _read_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st = folder / SAFETENSORS_NAME
    if st.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # views of a read-only map; never written
            return mmap_safetensors(st)
    pt = folder / PICKLE_NAME
    if pt.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pt}: refusing to read a pickle file; pass allow_pickle=True if you trust it "
                "(it is then read with torch.load(weights_only=True))"
            )
        try:
            tensors = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise ValueError(f"{pt}: cannot read the adapter weights ({exc})") from None
        if not isinstance(tensors, dict) or not all(torch.is_tensor(v) for v in tensors.values()):
            raise ValueError(f"{pt}: expected a dict of tensors")
        return tensors
    raise FileNotFoundError(f"{folder}: no {SAFETENSORS_NAME} (nor {PICKLE_NAME})")


def read_config(folder: Path) -> LoraSettings:
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(f"{cfg}: not valid JSON ({exc})") from None
    return parse_config(raw, source=str(cfg))


def read_adapter(
    path: str | os.PathLike,
    shapes: dict[str, ModuleShape],
    allow_pickle: bool = False,
    base_weight: Callable[[str], torch.Tensor | None] = lambda name: None,
    base_rows: Callable[[str], Callable[[int, int], torch.Tensor]] | None = None,
) -> AdapterWeights:
    """Read and validate a PEFT adapter directory against a model's patchable modules.

    Args:
        path: the directory holding adapter_config.json and adapter_model.safetensors.
        shapes: every patchable module of the model, by its name inside the model.
        allow_pickle: accept a legacy adapter_model.bin (read with ``weights_only=True``).
        base_weight: the model's own weight of a module, to check the full matrices PEFT saves
            beside an embedding or lm_head adapter: they must equal the base, since loading them
            would replace the shared weight.
        base_rows: for DoRA adapters, ``base_rows(module)(start, stop)`` gives rows of that
            module's base weight in PEFT's ``(out, in)`` layout as a new fp32 tensor
            (``patch.weight_rows``), from which ``g`` is computed.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {str(path)!r}")
    settings = read_config(folder)
    tensors = _read_tensors(folder, allow_pickle)
    return adapter_weights(folder, settings, tensors, shapes, base_weight, base_rows)


def adapter_weights(
    source,
    settings: LoraSettings,
    tensors: dict[str, torch.Tensor],
    shapes: dict[str, ModuleShape],
    base_weight: Callable[[str], torch.Tensor | None] = lambda name: None,
    base_rows: Callable[[str], Callable[[int, int], torch.Tensor]] | None = None,
) -> AdapterWeights:
    """Validate PEFT-keyed ``tensors`` under ``settings`` against the model (see
    :func:`read_adapter`): what a folder and an in-memory adapter share, so both are checked, and
    placed, alike. ``source`` names the adapter in errors."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = split_key(key)
        if found is None:
            full = split_key(key, _FULL)
            if full is None:
                raise ValueError(f"{source}: unexpected key {key!r} in the adapter weights")
            _check_full_weight(source, full[0], tensor, base_weight(full[0]))
            continue
        module = parts.setdefault(found[0], {})
        if found[1] in module:  # the same tensor spelled with and without PEFT's prefix
            raise ValueError(f"{source}: key {key!r} repeats {found[1]} of module {found[0]!r} under another spelling")
        module[found[1]] = tensor

    modules = {name: _check_module(source, name, found, shapes.get(name), settings) for name, found in parts.items()}
    _check_targets(source, modules, shapes, settings)
    if settings.use_dora:  # last: everything cheap to check has been checked
        modules = _with_dora_scales(source, modules, parts, base_rows)
    return AdapterWeights(str(source), settings, modules)


def _check_targets(folder, modules: dict[str, ModuleLora], shapes: dict[str, ModuleShape], settings) -> None:
    """The modules the file holds are the ones the config selects (or, for an init that leaves B at
    zero, a subset of them)."""
    targeted = {n for n in shapes if settings.targets(n)}
    stray = sorted(set(modules) - targeted)
    if stray:
        raise ValueError(
            f"{folder}: the weights hold module {stray[0]!r} that the config's target_modules / "
            "exclude_modules / layers_to_transform do not select"
        )
    missing = sorted(targeted - set(modules))
    if missing:
        if settings.init_lora_weights in (True, "gaussian", "eva", "mica"):
            # PEFT would keep lora_B at its zero init there: the adapter is a no-op on those modules.
            logger.warning("%s: no weights for %d targeted module(s), e.g. %r; they stay base-only",
                           folder, len(missing), missing[0])
        else:
            raise ValueError(
                f"{folder}: module {missing[0]!r} is targeted by the config but has no weights, and "
                f"init_lora_weights={settings.init_lora_weights!r} would give it random values in PEFT"
            )
    if not modules:
        raise ValueError(f"{folder}: the adapter holds no LoRA weights")


def _with_dora_scales(folder, modules: dict[str, ModuleLora], parts: dict[str, dict[str, torch.Tensor]],
                      base_rows) -> dict[str, ModuleLora]:
    """``modules`` with each one's DoRA ``g``, computed from its ``lora_magnitude_vector`` in
    ``parts`` and the base weight's rows, one module at a time."""
    if base_rows is None:
        raise ValueError(f"{folder}: a DoRA adapter needs the model's base weights to compute its norms")
    out = {}
    for name, lora in modules.items():
        try:
            rows = base_rows(name)
        except TypeError as exc:
            raise ValueError(f"{folder}: cannot compute DoRA's norm for module {name!r}: {exc}") from None
        out[name] = replace(lora, mag=dora_scale(lora, parts[name][_MAGNITUDE], rows))
    return out


@torch.no_grad()
def dora_scale(lora: ModuleLora, magnitude: torch.Tensor, rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """DoRA's ``g = m / ‖W + s·B·A‖`` per output row (PEFT's ``mag_norm_scale``), fp32 on the host.

    ``rows(start, stop)`` gives rows of the base weight ``W`` in PEFT's ``(out, in)`` layout as a
    new fp32 tensor (dequantized for bitsandbytes), which is written in place: ``W + s·B·A`` is
    formed ``_NORM_CHUNK`` elements at a time and reduced to its row norms at once, in fp32 on the
    weight's device, as PEFT computes it.
    """
    n, k = lora.b.shape[0], lora.a.shape[1]
    step = max(1, _NORM_CHUNK // max(k, 1))
    norms, a, b = [], None, None
    for start in range(0, n, step):
        stop = min(start + step, n)
        w = rows(start, stop)  # (stop - start, K) fp32, a copy
        if a is None:
            a, b = lora.a.to(w.device, torch.float32), lora.b.to(w.device, torch.float32)
        w.addmm_(b[start:stop], a, alpha=lora.scale)  # W + s·B·A on these rows only
        norms.append(torch.linalg.vector_norm(w, dim=1))
    norm = torch.cat(norms) if norms else torch.zeros(0)  # (N,)
    return magnitude.to(norm.device, torch.float32).div(norm).cpu()


def _check_full_weight(folder, name: str, saved: torch.Tensor, own: torch.Tensor | None) -> None:
    if own is None or tuple(own.shape) != tuple(saved.shape) or not torch.equal(saved.to(own.dtype), own.detach().cpu()):
        raise ValueError(
            f"{folder}: the file holds a full weight for module {name!r} that differs from the model's "
            "(resized vocabulary or trained embedding); loading it would replace the shared base weight"
        )


def _check_module(folder, name, found, shape: ModuleShape | None, settings: LoraSettings) -> ModuleLora:
    if shape is None:
        raise ValueError(f"{folder}: module {name!r} does not exist in the model (or is not a Linear, Conv1D or Embedding)")
    is_emb = "lora_embedding_A" in found or "lora_embedding_B" in found
    if is_emb != (shape.kind == "embedding"):
        raise ValueError(f"{folder}: module {name!r} is a {shape.kind} but the file holds "
                         f"{'embedding' if is_emb else 'linear'} LoRA weights for it")
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if is_emb else ("lora_A.weight", "lora_B.weight")
    if a_key not in found or b_key not in found:
        raise ValueError(f"{folder}: module {name!r} lacks {a_key if a_key not in found else b_key}")
    a, b, bias = found[a_key], found[b_key], found.get("lora_B.bias")
    k, n = shape.in_features, shape.out_features
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape[0] != n or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"{folder}: module {name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the model's module "
            f"needs A (r, {k}) and B ({n}, r); was the adapter trained on another model?"
        )
    if not a.is_floating_point() or not b.is_floating_point():
        raise ValueError(f"{folder}: module {name!r} has non-float LoRA weights")
    rank = a.shape[0]
    expected = settings.rank_for(name)
    if rank != expected:
        raise ValueError(f"{folder}: module {name!r} has rank {rank} but the config (r / rank_pattern) says {expected}")
    if bias is not None:
        if not settings.lora_bias:
            raise ValueError(f"{folder}: module {name!r} has a lora_B bias but the config has lora_bias=false")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{folder}: module {name!r} has a lora_B bias of shape {tuple(bias.shape)}, expected ({n},)")
    _check_magnitude(folder, name, found.get(_MAGNITUDE), n, settings.use_dora)
    return ModuleLora(a, b, bias, rank, settings.scale_for(name))


def _check_magnitude(folder, name: str, magnitude: torch.Tensor | None, n: int, use_dora: bool) -> None:
    if magnitude is None:
        if use_dora:
            raise ValueError(f"{folder}: module {name!r} lacks {_MAGNITUDE}, which a use_dora=true adapter needs")
        return
    if not use_dora:
        raise ValueError(f"{folder}: module {name!r} has a {_MAGNITUDE} but the config has use_dora=false")
    if tuple(magnitude.shape) != (n,) or not magnitude.is_floating_point():
        raise ValueError(f"{folder}: module {name!r} has a {_MAGNITUDE} of shape {tuple(magnitude.shape)} and "
                         f"dtype {magnitude.dtype}, expected a float ({n},)")
