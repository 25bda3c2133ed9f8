"""adapter_config.json: what changes the math, what we honour, and what we refuse.

PEFT saves every `LoraConfig` field. Most are metadata or training-only. The ones that change the
forward are honoured here exactly as PEFT does: the scale (`r`, `lora_alpha`, `use_rslora`,
`rank_pattern`, `alpha_pattern`), which modules carry LoRA (`target_modules`, `exclude_modules`,
`layers_to_transform`, `layers_pattern`), `lora_bias` and `use_dora` (DoRA's per-channel scale is
computed at load, see adapters.py). Fields whose forward needs a mutated base
or a different formula are refused with an error that names the field, so a user never gets
silently wrong outputs. Unknown fields from a newer PEFT are refused too when they hold a value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

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
        """PEFT's ``check_target_module_exists`` for one module name inside the base model."""
        excl = self.exclude_modules
        if excl:
            if isinstance(excl, str):
                if re.fullmatch(excl, module_name):
                    return False
            elif module_name in excl or any(module_name.endswith("." + e) for e in excl):
                return False
        tm = self.target_modules
        if tm is None:
            return False
        if isinstance(tm, str):
            return re.fullmatch(tm, module_name) is not None
        if module_name in tm:
            return True
        if not any(module_name.endswith("." + t) for t in tm):
            return False
        indexes = self.layers_to_transform
        if indexes is None or (isinstance(indexes, tuple) and len(indexes) == 0):
            return True
        match = None
        if not self.layers_pattern:
            # the first numbered segment is the layer index, not an expert index further in
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        else:
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == indexes if isinstance(indexes, int) else idx in indexes

    # -- how much -----------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: Mapping, module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key, in dict order, matching ``(.*\\.)?(key)$``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _is_set(value) -> bool:
    return value not in (None, False, "", [], {}, ())


def parse_config(raw: Mapping, source: str = "adapter_config.json") -> LoraSettings:
    """Validate a PEFT adapter config and keep what decides the forward.

    Raises AdapterConfigError naming the field for anything that cannot be honoured exactly.
    """
    if not isinstance(raw, Mapping):
        raise AdapterConfigError(f"{source}: expected a JSON object")
    _refuse_unsupported(raw, source)
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
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=_pattern(raw, "rank_pattern", int, source),
        alpha_pattern=_pattern(raw, "alpha_pattern", float, source),
        target_modules=target_modules,
        exclude_modules=_names(raw, "exclude_modules", source),
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
        lora_bias=bool(raw.get("lora_bias", False)),
        init_lora_weights=raw.get("init_lora_weights", True),
        use_dora=bool(raw.get("use_dora", False)),
    )


def _refuse_unsupported(raw: Mapping, source: str) -> None:
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
    if unknown:
        raise AdapterConfigError(
            f"{source}: unknown field(s) {unknown} with a value; a newer PEFT may give them a meaning "
            "that would change the outputs"
        )


def _number(raw: Mapping, name: str, kind, default, source: str):
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise AdapterConfigError(f"{source}: field {name!r} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if value <= 0 and name == "r":
        raise AdapterConfigError(f"{source}: field 'r' must be positive, got {value}")
    return kind(value)


def _pattern(raw: Mapping, name: str, kind, source: str) -> dict:
    """rank_pattern (int values) or alpha_pattern (float values): regex keys, in file order."""
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise AdapterConfigError(f"{source}: field {name!r} must be a mapping, got {value!r}")
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (name == "rank_pattern" and v <= 0):
            raise AdapterConfigError(f"{source}: field {name!r} has a bad value {v!r} for {k!r}")
        try:
            re.compile(k)
        except re.error as exc:
            raise AdapterConfigError(f"{source}: field {name!r} key {k!r} is not a valid regex: {exc}") from None
    return {str(k): kind(v) for k, v in value.items()}


def _names(raw: Mapping, name: str, source: str):
    value = raw.get(name)
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
        layers_pattern = None  # PEFT: an empty pattern accepts any layer list
    elif isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    else:
        layers_pattern = tuple(layers_pattern)
    return layers, layers_pattern
