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
import math
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from .config import AdapterConfigError, LoraSettings, parse_config, warn_if_other_base
from .tensorfile import check_stamp, file_stamp, read_safetensors

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
    files: tuple = ()  # file_stamp() of each file read, taken before reading it

    @cached_property
    def numel(self) -> int:
        """Elements of all factors: the adapter's size in any dtype."""
        return sum(m.numel for m in self.modules.values())

    @cached_property
    def mag_numel(self) -> int:
        """Elements of the DoRA vectors (fp32 whatever the factors' dtype); 0 for a LoRA adapter."""
        return sum(m.mag.numel() for m in self.modules.values() if m.mag is not None)


def check_unchanged(weights: AdapterWeights) -> None:
    """Raise if a file ``weights`` was read from changed since: weights read ahead of the lock
    and placed under it must still be the files' contents."""
    for stamp in filter(None, weights.files):
        check_stamp(Path(stamp[0]), stamp, "waiting to be placed")


def is_unchanged(weights: AdapterWeights) -> bool:
    try:
        check_unchanged(weights)
    except ValueError:
        return False
    return True


def _read_tensors(folder: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], tuple, set[int]]:
    """The tensors of the adapter's weights file, that file's stamp, and the ``id()`` of those
    whose values the reader found finite (tensorfile.py; none for a pickle file)."""
    st = folder / SAFETENSORS_NAME
    if st.is_file():
        stamp = file_stamp(st)
        tensors, finite = read_safetensors(st)
        return tensors, stamp, finite
    pt = folder / PICKLE_NAME
    if pt.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pt}: refusing to read a pickle file; pass allow_pickle=True if you trust it "
                "(it is then read with torch.load(weights_only=True))"
            )
        stamp = file_stamp(pt)
        try:
            tensors = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise ValueError(f"{pt}: cannot read the adapter weights ({exc})") from None
        check_stamp(pt, stamp, "being read")
        _check_pickled(pt, tensors)
        return tensors, stamp, set()
    raise FileNotFoundError(f"{folder}: no {SAFETENSORS_NAME} (nor {PICKLE_NAME})")


def _check_pickled(pt: Path, tensors) -> None:
    """A pickle can hold anything: a dict of dense CPU tensors under string keys is expected."""
    if not isinstance(tensors, dict):
        raise ValueError(f"{pt}: expected a dict of tensors, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise ValueError(f"{pt}: key {key!r} is a {type(key).__name__}, expected a string")
        if not torch.is_tensor(value):
            raise ValueError(f"{pt}: {key!r} is a {type(value).__name__}, expected a tensor")
        if value.layout != torch.strided or value.device.type != "cpu":
            raise ValueError(f"{pt}: tensor {key!r} is a {value.layout} tensor on {value.device.type}; "
                             "expected a dense tensor with data")


def read_config(folder: Path, strict: bool = True, model_name: str | None = None) -> LoraSettings:
    """The adapter's validated settings. ``strict=False`` ignores (and logs) config fields unknown
    to lora_graph; ``model_name`` (the wrapped model's ``_name_or_path``) is compared with the
    config's ``base_model_name_or_path``, and a difference logged."""
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(f"{cfg}: not valid JSON ({exc})") from None
    except RecursionError:
        raise AdapterConfigError(f"{cfg}: JSON nested too deeply to be an adapter config") from None
    settings = parse_config(raw, source=str(cfg), strict=strict)
    warn_if_other_base(raw, model_name, str(cfg))
    return settings


def adapter_dir(path) -> Path:
    """``path`` as an existing directory, or an error that says what was wrong with it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an adapter path must be a str or os.PathLike, got {path!r} ({type(path).__name__})")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {str(path)!r}")
    return folder


def read_adapter(
    path: str | os.PathLike,
    shapes: dict[str, ModuleShape],
    allow_pickle: bool = False,
    base_weight: Callable[[str], torch.Tensor | None] = lambda name: None,
    base_rows: Callable[[str], Callable[[int, int], torch.Tensor]] | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
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
        dtype: the dtype the factors will be kept in; a factor value beyond its range is refused.
        strict: refuse config fields unknown to lora_graph (False: ignore and log them).
    """
    folder = adapter_dir(path)
    config_stamp = file_stamp(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
    settings = read_config(folder, strict)
    tensors, weights_stamp, finite = _read_tensors(folder, allow_pickle)
    weights = adapter_weights(folder, settings, tensors, shapes, base_weight, base_rows, dtype, finite)
    return replace(weights, files=(config_stamp, weights_stamp))


def adapter_weights(
    source,
    settings: LoraSettings,
    tensors: dict[str, torch.Tensor],
    shapes: dict[str, ModuleShape],
    base_weight: Callable[[str], torch.Tensor | None] = lambda name: None,
    base_rows: Callable[[str], Callable[[int, int], torch.Tensor]] | None = None,
    dtype: torch.dtype | None = None,
    finite: set[int] = frozenset(),
) -> AdapterWeights:
    """Validate PEFT-keyed ``tensors`` under ``settings`` against the model (see
    :func:`read_adapter`): what a folder and an in-memory adapter share, so both are checked, and
    placed, alike. ``source`` names the adapter in errors; ``finite`` holds the ``id()`` of
    tensors whose values were found finite as they were read from a file (tensorfile.py)."""
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
    _check_values(source, parts, dtype, finite)
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


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_values(folder, parts: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype | None,
                  finite: set[int] = frozenset()) -> None:
    """NaN or infinity in a factor poisons every output of its module, and so does a finite value
    beyond the range of the dtype it is kept in: ``dtype`` (an F64 factor kept as fp32, an F32 one
    as fp16), fp32 for DoRA's magnitude.

    One pass over the values: where the kept dtype holds every value of the file's, a sum per
    tensor, finite unless a value is not (or the sum overflows), all tested at once; min and max
    otherwise, and for a tensor whose sum is not finite, to tell which it is. A tensor in
    ``finite`` (found finite as the file was read, tensorfile.py) needs no sum of its own."""
    limits = {part: math.inf if dtype is None else torch.finfo(dtype).max for part in _PARTS}
    limits[_MAGNITUDE] = torch.finfo(torch.float32).max
    by_sum: dict[torch.dtype, list] = {}
    exact = []
    for name, found in parts.items():
        for part, tensor in found.items():
            if not tensor.numel():
                continue
            entry = (name, part, tensor, limits[part])
            summed = tensor.dtype in _FLOATS and torch.finfo(tensor.dtype).max <= limits[part]
            if summed and id(tensor) in finite:
                continue
            (by_sum.setdefault(tensor.dtype, []) if summed else exact).append(entry)
    for group in by_sum.values():
        finite = torch.isfinite(torch.stack([entry[2].sum() for entry in group])).tolist()
        exact += [entry for entry, ok in zip(group, finite) if not ok]
    for name, part, tensor, limit in exact:
        if tensor.dtype not in _FLOATS:
            tensor = tensor.float()  # float8 and friends: aminmax is not defined on them
        lo, hi = (float(v) for v in torch.aminmax(tensor))  # NaN reaches both ends, ±inf one of them
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{folder}: module {name!r} has NaN or infinite values in its {part}")
        if max(-lo, hi) > limit:
            raise ValueError(f"{folder}: module {name!r} has a value {max(-lo, hi):.4g} in its {part}, beyond "
                             f"the range of {dtype} the adapters are kept in")


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
