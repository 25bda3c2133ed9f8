"""Where an adapter's weights come from: a folder, a Hub repo id, or tensors in memory.

    lm.load_adapter(name, "path/to/dir")                 a PEFT folder (adapter_config.json + weights)
    lm.load_adapter(name, "org/repo", revision=None)     a Hub repo id, where no such folder exists: only
                                                         the adapter files are fetched, into the Hugging
                                                         Face cache; with HF_HUB_OFFLINE=1 the cache only
    lm.load_adapter(name, state_dict=sd, config=cfg)     PEFT-keyed tensors and a LoraConfig or a dict

Each becomes a ``Source``, and every source is validated by the same code
(``adapters.adapter_weights``), so an adapter loaded from memory is checked, and placed, exactly as
the same adapter saved to a folder would be.

A folder (a Hub snapshot is one) is read again whenever its adapter is paged in after its host
copy was dropped. Tensors in memory have nowhere to be read again from, so their source keeps a host
copy of them, made when they are registered or loaded, for as long as the adapter is registered,
outside the host cache's ``max_cpu`` bound. Later changes to the caller's tensors do not reach the
adapter, and tensors given on a GPU do not hold its memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME, AdapterWeights, adapter_weights, read_adapter, read_config
from .config import AdapterConfigError, LoraSettings, parse_config, warn_if_other_base

IN_MEMORY = "<in-memory>"  # the path an in-memory adapter is registered under
HUB_FILES = [CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME]  # all a Hub adapter needs; nothing else is fetched


@dataclass(frozen=True)
class Source:
    """A registered adapter's origin: a folder, or (``tensors``) host copies of in-memory tensors."""

    path: str  # the folder as given (a Hub id's cached snapshot), or IN_MEMORY
    settings: LoraSettings
    allow_pickle: bool = False
    tensors: dict[str, torch.Tensor] | None = None
    label: str = ""  # how errors name an in-memory adapter
    strict: bool = True  # refuse config fields unknown to lora_graph (False: ignore and log them)

    @property
    def nbytes(self) -> int:
        """Host bytes this source keeps (in-memory tensors); 0 for a folder."""
        return sum(t.numel() * t.element_size() for t in (self.tensors or {}).values())

    def read(self, shapes, **model) -> AdapterWeights:
        """The validated weights; ``model`` holds read_adapter's ``base_weight`` and ``base_rows``."""
        if self.tensors is None:
            return read_adapter(self.path, shapes, allow_pickle=self.allow_pickle, strict=self.strict, **model)
        return adapter_weights(self.label, self.settings, self.tensors, shapes, **model)


def open_source(name: str, path=None, state_dict=None, config=None, revision: str | None = None,
                allow_pickle: bool = False, strict: bool = True, model_name: str | None = None) -> Source:
    """The source ``load_adapter``/``register_adapter`` were given, with its config validated
    (``strict``: see Source; ``model_name``: the wrapped model's, compared with the config's)."""
    if state_dict is not None or config is not None:
        if path is not None or revision is not None:
            raise ValueError("pass either a path (a folder or a Hub repo id) or state_dict= and config=, not both")
        if state_dict is None or config is None:
            raise ValueError(f"in-memory adapter {name!r} needs both state_dict= and config=")
        return from_memory(name, state_dict, config, strict, model_name)
    if path is None:
        raise ValueError(f"adapter {name!r}: pass a path (a folder or a Hub repo id), or state_dict= and config=")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an adapter path must be a str or os.PathLike, got {path!r} ({type(path).__name__})")
    folder = resolve_folder(path, revision)
    return Source(folder, read_config(Path(folder), strict, model_name), allow_pickle, strict=strict)


def from_memory(name: str, state_dict, config, strict: bool = True, model_name: str | None = None) -> Source:
    """An in-memory adapter: its config validated and its tensors copied to the host."""
    label = f"in-memory adapter {name!r}"
    raw = config_dict(config, label)
    settings = parse_config(raw, source=f"{label} (config)", strict=strict)
    warn_if_other_base(raw, model_name, label)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{label}: state_dict must map PEFT keys to tensors, got {type(state_dict).__name__}")
    tensors = {}
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not torch.is_tensor(tensor):
            raise TypeError(f"{label}: state_dict entry {key!r} is not a tensor under a string key")
        if tensor.is_meta:
            raise ValueError(f"{label}: tensor {key!r} is on the meta device and holds no data")
        tensors[key] = tensor.detach().to("cpu", copy=True)
    return Source(IN_MEMORY, settings, tensors=tensors, label=label, strict=strict)


def config_dict(config, label: str) -> dict:
    """A LoraConfig (anything with PEFT's ``to_dict``) or a mapping, as adapter_config.json would
    hold it. Key order is kept: it decides which rank_pattern / alpha_pattern key wins."""
    if isinstance(config, Mapping):
        raw = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        raw = config.to_dict()
    else:
        raise TypeError(f"{label}: config must be a peft LoraConfig or a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(raw, default=_as_json))
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise AdapterConfigError(f"{label}: the config cannot be written as {CONFIG_NAME} ({exc})") from None


def _as_json(value):
    if isinstance(value, (set, frozenset)):  # PEFT writes a set of target modules as a list
        return sorted(value)
    raise TypeError(f"a {type(value).__name__} is not JSON")


def looks_like_repo_id(path) -> bool:
    """``org/repo``, as the Hub spells repo ids (a plain string; a Path is always a folder)."""
    if not isinstance(path, str) or path.count("/") != 1 or path.startswith((".", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def resolve_folder(path, revision: str | None = None) -> str:
    """``path`` when it is a folder; else, when it reads as a Hub repo id, the cached snapshot of its
    adapter files (fetched first unless offline)."""
    text = os.fspath(path)
    if os.path.isdir(text):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a Hub repo id, but {text!r} is a local folder")
        return text
    if not looks_like_repo_id(path):
        raise FileNotFoundError(f"adapter directory not found: {text!r}")
    return hub_snapshot(text, revision)


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """The local folder of ``repo_id``'s adapter files, through huggingface_hub's cache (which
    honours HF_HUB_OFFLINE, HF_HUB_CACHE and HF_TOKEN)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo_id!r} (not a local folder; as a Hub repo id{f', revision {revision!r}' if revision else ''})"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES)
    except GatedRepoError:
        raise FileNotFoundError(f"{where}: the repo is gated; accept its terms and log in (HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{where}: no such repo on the Hub, or it is private to another account") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{where}: the repo has no such revision") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(f"{where}: HF_HUB_OFFLINE is set and the cache ({constants.HF_HUB_CACHE}) holds "
                                    "no copy of it; download it once online") from None
        raise FileNotFoundError(f"{where}: the Hub cannot be reached and the cache ({constants.HF_HUB_CACHE}) "
                                "holds no copy of it") from None
    if not (Path(folder) / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{where}: the repo has no {CONFIG_NAME}, so it is not a PEFT adapter")
    return folder
