"""adapter_config.json: what changes the math, what we honour, and what we refuse.

PEFT saves every `LoraConfig` field. Most are metadata or training-only. The ones that change the
forward are honoured here exactly as PEFT does: the scale (`r`, `lora_alpha`, `use_rslora`,
`rank_pattern`, `alpha_pattern`), which modules carry LoRA (`target_modules`, `exclude_modules`,
`layers_to_transform`, `layers_pattern`), `lora_bias` and `use_dora` (DoRA's per-channel scale is
computed at load, see adapters.py). Fields whose forward needs a mutated base
or a different formula are refused with an error that names the field, so a user never gets
silently wrong outputs. Unknown fields from a newer PEFT are refused too when they hold a value,
unless the caller passes ``strict=False``: then they are ignored and logged by name.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import SimpleNamespace

logger = logging.getLogger(__name__)

# Fields that PEFT writes and that do not change the inference forward of plain LoRA.
_INERT = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "fan_in_fan_out", "lora_dropout", "eva_config", "loftq_config", "corda_config", "lora_ga_config",
    "velora_config", "monteclora_config", "qalora_group_size", "megatron_core", "runtime_config",
    "init_lora_weights", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "lora_bias", "peft_type", "bias",
    "modules_to_save", "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora",
    "use_bdlora", "arrow_config", "kasa_config", "layer_replication", "megatron_config", "use_dora",
    "ensure_weight_tying",
}

# field -> why it is refused; refused when the value is truthy (not None/False/empty).
_REFUSED_IF_SET = {
    "modules_to_save": "it replaces whole modules of the shared base",
    "trainable_token_indices": "it replaces embedding rows of the shared base",
    "target_parameters": "it patches raw parameters of the base (MoE experts)",
    "alora_invocation_tokens": "activated LoRA applies the adapter only after an invocation sequence",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "use_bdlora": "block-diagonal LoRA stores differently shaped factors",
    "arrow_config": "Arrow routes tokens among adapters itself",
    "kasa_config": "KaSA truncates the base weight and adds a diagonal between A and B",
    "layer_replication": "it duplicates base layers",
    "megatron_config": "Megatron parallel layers are not supported",
    "ensure_weight_tying": "tied lm_head/embedding LoRA is not supported yet",
}

# fields PEFT builds a sub-config object from when they hold a dict
_SUBCONFIGS = {"arrow_config", "kasa_config", "use_bdlora", "megatron_config"}

# init_lora_weights values whose adapters are only correct on a rewritten base weight.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterConfigError(ValueError):
    """An adapter_config.json that lora_graph cannot honour exactly."""


@dataclass(frozen=True)
class LoraSettings:
    """The fields of a PEFT LoRA config that decide the forward."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | None = None
    lora_bias: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False

    # -- which modules ------------------------------------------------------------------
    def targets(self, module_name: str) -> bool:
        """PEFT's own ``check_target_module_exists`` for one module name inside the base model."""
        from peft.tuners.tuners_utils import check_target_module_exists  # peft takes seconds to import

        if self.target_modules is None:
            return False
        return bool(check_target_module_exists(self._peft_view, module_name))

    @cached_property
    def _peft_view(self) -> SimpleNamespace:
        """The fields PEFT's matcher reads, in the types PEFT gives them (lists, not tuples: an empty
        list of layers means every layer)."""
        def as_list(value):
            return list(value) if isinstance(value, tuple) else value

        return SimpleNamespace(
            target_modules=as_list(self.target_modules), exclude_modules=as_list(self.exclude_modules),
            layers_to_transform=as_list(self.layers_to_transform), layers_pattern=as_list(self.layers_pattern),
            modules_to_save=None, target_parameters=None)

    # -- how much -----------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """PEFT's lookup: the first ``rank_pattern`` key, in file order, that ``get_pattern_key`` matches."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: Mapping, module_name: str, default):
    """``patterns[get_pattern_key(patterns, module_name)]``, or ``default``, as PEFT's layers look it up."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(patterns.keys(), module_name), default)


def _is_set(value) -> bool:
    return value not in (None, False, "", [], {}, ())


def parse_config(raw: Mapping, source: str = "adapter_config.json", strict: bool = True) -> LoraSettings:
    """Validate a PEFT adapter config and keep what decides the forward.

    Raises AdapterConfigError naming the field for anything that cannot be honoured exactly. With
    ``strict=False``, fields unknown to lora_graph are ignored and logged instead of refused (the
    known fields that change the math are refused either way).
    """
    if not isinstance(raw, Mapping):
        raise AdapterConfigError(f"{source}: expected a JSON object")
    flags = {name: _flag(raw, name, source) for name in ("use_rslora", "lora_bias", "use_dora")}
    _refuse_unsupported(raw, source, strict)
    target_modules = _names(raw, "target_modules", source)
    if target_modules is None or target_modules == ():
        raise AdapterConfigError(f"{source}: field 'target_modules' is empty; no module would carry the adapter")
    if target_modules == "all-linear":
        raise AdapterConfigError(
            f"{source}: field 'target_modules' is the unexpanded 'all-linear'; PEFT saves the expanded list"
        )
    layers, layers_pattern = _layers(raw, source)
    return LoraSettings(
        r=_number(raw, "r", int, 8, source),
        lora_alpha=_number(raw, "lora_alpha", float, 8, source),
        rank_pattern=_pattern(raw, "rank_pattern", int, source),
        alpha_pattern=_pattern(raw, "alpha_pattern", float, source),
        target_modules=target_modules,
        exclude_modules=_names(raw, "exclude_modules", source),
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
        init_lora_weights=raw.get("init_lora_weights", True),
        **flags,
    )


def warn_if_other_base(raw: Mapping, model_name: str | None, source: str) -> None:
    """Log when the config's ``base_model_name_or_path`` and the wrapped model's ``_name_or_path``
    are both set and differ: the adapter may have been trained on another model (the shapes, checked
    later, catch only some of those)."""
    trained_on = raw.get("base_model_name_or_path") if isinstance(raw, Mapping) else None
    if model_name and trained_on and trained_on != model_name:
        logger.warning("%s: the adapter was trained on %r but the wrapped model is %r", source, trained_on, model_name)


def _refuse_unsupported(raw: Mapping, source: str, strict: bool) -> None:
    """Fields that change the math or rewrite the base, and unknown fields that carry a value."""

    def refuse(name: str, why: str):
        raise AdapterConfigError(f"{source}: field {name!r}={raw.get(name)!r} is not supported: {why}")

    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        refuse("peft_type", "only LORA adapters are served")
    for name, why in _REFUSED_IF_SET.items():
        value = raw.get(name)
        # PEFT turns a dict sub-config, even an empty one, into a config object that switches the variant on
        if _is_set(value) or (name in _SUBCONFIGS and isinstance(value, dict)):
            refuse(name, why)
    if raw.get("bias", "none") != "none":
        refuse("bias", "bias training overwrites the shared base biases")
    if raw.get("use_dora") and raw.get("lora_bias"):
        refuse("lora_bias", "PEFT does not define lora_bias together with use_dora")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        refuse("init_lora_weights", "this initialisation is only correct on a rewritten base weight")
    unknown = sorted(k for k in raw if k not in _INERT and _is_set(raw[k]))
    if unknown and strict:
        raise AdapterConfigError(
            f"{source}: unknown field(s) {unknown} with a value; a newer PEFT may give them a meaning "
            "that would change the outputs (pass strict=False to load the adapter ignoring them)"
        )
    if unknown:
        logger.warning("%s: ignoring config field(s) unknown to lora_graph (strict=False): %s", source, unknown)


# |lora_alpha| and the alpha_pattern values are bounded by float32's range: the scale alpha / r
# (or alpha / sqrt(r)), which is at most |alpha| since r >= 1, is held in float32 by the banks.
_FLOAT32_MAX = 3.4028234663852886e38


def _check_number(value, kind, what: str, source: str, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind_name = "an integer" if kind is int else "a number"
        raise AdapterConfigError(f"{source}: {what} must be {kind_name}, got {value!r}")
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > _FLOAT32_MAX:
        raise AdapterConfigError(f"{source}: {what} must be a finite number within float32's range, got {value!r}")
    if kind is int and value != int(value):
        raise AdapterConfigError(f"{source}: {what} must be an integer, got {value!r}")
    if positive and value <= 0:
        raise AdapterConfigError(f"{source}: {what} must be positive, got {value!r}")


def _number(raw: Mapping, name: str, kind, default, source: str):
    value = raw.get(name, default)
    _check_number(value, kind, f"field {name!r}", source, positive=name == "r")
    return kind(value)


def _flag(raw: Mapping, name: str, source: str) -> bool:
    """A boolean field: true, false or null. A string such as "false" is refused: Python (and PEFT)
    would take it as true."""
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise AdapterConfigError(f"{source}: field {name!r} must be true or false, got {value!r}")
    return bool(value)


def _pattern(raw: Mapping, name: str, kind, source: str) -> dict:
    """rank_pattern (int values) or alpha_pattern (float values): regex keys, in file order."""
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise AdapterConfigError(f"{source}: field {name!r} must be a mapping, got {value!r}")
    for k, v in value.items():
        _check_number(v, kind, f"field {name!r} value for {k!r}", source, positive=name == "rank_pattern")
        _check_regex(str(k), f"field {name!r} key {k!r}", source)
    return {str(k): kind(v) for k, v in value.items()}


def _check_regex(pattern: str, what: str, source: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterConfigError(f"{source}: {what} is not a valid regex: {exc}") from None


def _names(raw: Mapping, name: str, source: str):
    """target_modules / exclude_modules: a regex matched against whole module names, or a list of
    names (suffixes)."""
    value = raw.get(name)
    if isinstance(value, str):
        _check_regex(value, f"field {name!r} ({value!r})", source)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterConfigError(f"{source}: field {name!r} must be a string or a list of strings, got {value!r}")


def _layers(raw: Mapping, source: str):
    """``(layers_to_transform, layers_pattern)``, normalised."""
    layers = raw.get("layers_to_transform")
    if layers is not None and not isinstance(layers, int):
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
            raise AdapterConfigError(f"{source}: field 'layers_to_transform' must be an int or a list of ints")
        layers = tuple(layers)
    layers_pattern = raw.get("layers_pattern")
    if not layers_pattern:
        return layers, None  # PEFT: an empty pattern accepts any layer list
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    elif isinstance(layers_pattern, (list, tuple)) and all(isinstance(p, str) for p in layers_pattern):
        layers_pattern = tuple(layers_pattern)
    else:
        raise AdapterConfigError(
            f"{source}: field 'layers_pattern' must be a string or a list of strings, got {layers_pattern!r}")
    for pattern in layers_pattern:  # as PEFT's matcher embeds it
        _check_regex(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", f"field 'layers_pattern' ({pattern!r})", source)
    return layers, layers_pattern
