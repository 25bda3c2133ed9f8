"""Finding and swapping the modules that carry LoRA: by type plus name, never per architecture.

A module is patchable when it is an ``nn.Linear`` (which bitsandbytes' Linear4bit and Linear8bitLt
are), a transformers ``Conv1D`` (GPT-2), or an ``nn.Embedding``. Which of them get wrapped is
decided by the adapters' configs. ``PatchedModules`` keeps a bank beside every module some resident
adapter targets: placing an adapter in a slot writes its factors into the banks in one commit and
wraps the modules that had none; freeing a slot clears it everywhere, and a module that no slot
uses any more gets its original back. This is the one place in the library that knows about
transformers.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .adapters import ModuleShape
from .bank import AdapterBank
from .layers import LoraEmbedding, LoraLinear, _LoraModule
from .store import HostAdapter, to_device

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


def shape_of(module: nn.Module) -> ModuleShape | None:
    """in/out features of a patchable module, or None when the type is not supported."""
    if isinstance(module, nn.Linear):
        return ModuleShape("linear", module.in_features, module.out_features)
    if Conv1D and isinstance(module, Conv1D):
        nx, nf = module.weight.shape  # Conv1D stores (in, out)
        return ModuleShape("linear", nx, nf)
    if isinstance(module, nn.Embedding):
        return ModuleShape("embedding", module.num_embeddings, module.embedding_dim)
    return None


def patchable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every supported module by its name inside ``model``; a wrapped one is given by its base."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _LoraModule):
            found[name] = module.base_layer
        elif shape_of(module) is not None and not name.endswith(".base_layer") and name:
            found[name] = module
    return found


def plain_weight(module: nn.Module | None) -> torch.Tensor | None:
    """The unquantized weight of an Embedding or Linear, in PEFT's (out, in) / (vocab, dim) layout."""
    if isinstance(module, (nn.Embedding, nn.Linear)) and type(module.weight) in (torch.Tensor, nn.Parameter):
        return stored_weight(module)
    return None


def stored_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, or, while accelerate keeps the module offloaded (the parameter on the meta
    device between forwards), the copy its hook loads from: host memory or a file on disk."""
    weight = module.weight
    if weight.is_meta:
        for hook in _accelerate_hooks(module):
            weights = getattr(hook, "weights_map", None)
            if getattr(hook, "offload", False) and weights is not None:
                try:
                    return weights["weight"]
                except KeyError:
                    continue
    return weight


def _accelerate_hooks(module: nn.Module) -> list:
    """accelerate's hooks on ``module`` (a SequentialHook's parts, in order); [] for none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def weight_rows(module: nn.Module):
    """``rows(start, stop)``: rows ``start:stop`` of ``module``'s weight in PEFT's ``(out, in)``
    layout (an Embedding's ``(dim, vocab)``), dequantized as PEFT's ``dequantize_module_weight``
    does, as a new fp32 tensor on the module's device: what DoRA's norm reads at load, a chunk of
    rows at a time. The weight itself is only read.

    A bitsandbytes 4-bit weight is quantized in blocks over the flattened matrix, so it is
    dequantized whole, once per call of this function; LLM.int8 has one scale per row, and plain
    weights are sliced. Raises TypeError for another weight format."""
    param = stored_weight(module)
    kind = type(param).__name__
    if kind == "Params4bit":
        dense = _dequantize_4bit(param)  # (N, K)
        return lambda start, stop: _fp32_copy(dense[start:stop])
    if kind == "Int8Params":
        import bitsandbytes.functional as bnbf

        scb = module.state.SCB if getattr(module.state, "SCB", None) is not None else param.SCB  # (N,)
        return lambda start, stop: bnbf.int8_vectorwise_dequant(param.data[start:stop], scb[start:stop]).float()
    weight = param.detach()
    if type(param) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point():
        raise TypeError(f"its weight is a {kind} of {weight.dtype}, which cannot be read densely")
    if weight.is_meta:
        raise TypeError("its weight is on the meta device, and no accelerate offload hook holds its values")
    if isinstance(module, nn.Embedding) or (Conv1D and isinstance(module, Conv1D)):
        return lambda start, stop: _fp32_copy(weight[:, start:stop].t())  # stored (in, out)
    return lambda start, stop: _fp32_copy(weight[start:stop])


def _dequantize_4bit(param) -> torch.Tensor:
    """A bitsandbytes 4-bit weight, dequantized ``(N, K)``.

    On a CPU with AVX512-BF16, bitsandbytes repacks the weight for its CPU kernel at the layer's
    first forward (``packing_format_for_cpu``: codes reordered, the block scales rounded to bf16
    and transposed), a layout ``dequantize_4bit`` misreads. The codes are then put back in order
    with bitsandbytes' own inverse and the block scales read as they are now (bf16, the values
    the forward multiplies by), all on copies: the module keeps its layout."""
    import copy

    import bitsandbytes.functional as bnbf

    state = param.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return bnbf.dequantize_4bit(param.data, state)
    scales = state.absmax.t().reshape(-1).float()  # (N*K / blocksize,) in the original block order
    state = copy.copy(state)
    state.original_nested = False  # keep the inverse from re-quantizing the scales
    codes, state = bnbf._convert_weight_packed_for_cpu_inverse(param.data.clone(), state)
    state.absmax, state.dtype = scales, torch.float32
    return bnbf.dequantize_4bit(codes, state)


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` runs, so where its bank lives. accelerate's big-model hooks (a
    ``device_map`` with "cpu" or "disk" entries, ``cpu_offload``, ``disk_offload``) keep an
    offloaded module's parameters on the meta device between forwards and name the device it runs
    on in ``execution_device``; other modules run where their parameters are. A model whose first
    parameter is offloaded runs where its first offloaded module does."""
    for hook in _accelerate_hooks(module):
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    device = module_device(module)
    if device.type == "meta":
        for sub in module.modules():
            hooked = next((h.execution_device for h in _accelerate_hooks(sub)
                           if getattr(h, "execution_device", None) is not None), None)
            if hooked is not None:
                return torch.device(hooked)
    return device


def make_wrapper(base: nn.Module, bank, router) -> _LoraModule:
    cls = LoraEmbedding if isinstance(base, nn.Embedding) else LoraLinear
    return cls(base, bank, router)


def generate_expansion(model: nn.Module, kwargs: dict) -> tuple[int, ...]:
    """How many rows ``model.generate(**kwargs)`` makes of each input row, as transformers expands
    them: ``num_beams`` for beam search, else ``num_return_sequences``; () for one."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def knob(name: str) -> int:
        value = kwargs.get(name, getattr(config, name, None))
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1

    k = knob("num_beams") if knob("num_beams") > 1 else knob("num_return_sequences")
    return (k,) if k > 1 else ()


def is_peft_model(model: nn.Module) -> bool:
    """True when PEFT has already injected its own LoRA layers into ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


# transformers methods that must not run on a wrapped model, and what to use instead. Continuous
# batching runs the model in a thread of its own, which a use() block does not reach (it would
# silently generate with the base model); transformers' PEFT integration would inject PEFT layers
# beside lora_graph's.
_REFUSED = {
    "generate_batch": "lm.generate_batch(inputs, adapters=[...]): transformers runs continuous batching in a "
                      "thread that no use() block reaches, so it would answer with the base model",
    "init_continuous_batching": "lm.generate_batch(inputs, adapters=[...]) or lora_graph.serve.Engine(lm): "
                                "transformers' manager runs the model in a thread that no use() block reaches",
    "continuous_batching_context_manager": "lora_graph.serve.Engine(lm), which routes every request",
    "load_adapter": "lm.load_adapter(name, path)",
    "add_adapter": "lm.load_adapter(name, path) for a trained adapter (lora_graph serves adapters, it does not create them)",
    "set_adapter": "lm.set_adapter(spec), or lm.use(spec) for a block",
    "enable_adapters": "lm.enable_adapters()",
    "disable_adapters": "lm.disable_adapters(), or the block lm.disable_adapter()",
    "active_adapters": "lm.active_adapters()",
    "active_adapter": "lm.active_adapters()",
    "delete_adapter": "lm.delete_adapter(name) (or lm.unload_adapter(name))",
    "get_adapter_state_dict": "the adapter's own files (lm.adapters[name].path)",
    "enable_peft_hotswap": "lm.load_adapter(name, path, replace=True), which never recompiles",
}


def shadow_integrations(model: nn.Module) -> tuple[str, ...]:
    """Shadow, on ``model`` itself, the transformers methods of ``_REFUSED`` by ones that refuse and
    name lora_graph's equivalent (the wrapper's attribute delegation then refuses too)."""
    shadowed = tuple(name for name in _REFUSED if callable(getattr(model, name, None)))
    for name in shadowed:
        setattr(model, name, _refusal(name, _REFUSED[name]))
    return shadowed


def _refusal(name: str, instead: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{name}() does not apply to a model wrapped by lora_graph; use {instead}")

    refuse.__name__ = name
    return refuse


def unshadow(model: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        model.__dict__.pop(name, None)


def batch_shape_of(args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
    """``(rows, positions)`` of a top-level HF forward call, from input_ids / inputs_embeds / the
    first tensor; ``positions`` is None when the input has no sequence dimension."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "pixel_values"):
        value = kwargs.get(key)
        if torch.is_tensor(value) and value.dim() >= 2:
            return value.shape[0], (value.shape[1] if key != "pixel_values" else None)
    for value in args:
        if torch.is_tensor(value) and value.dim() >= 2:
            return value.shape[0], value.shape[1] if not value.is_floating_point() or value.dim() == 3 else None
    return None, None


class PatchedModules:
    """The banks of a model's patched modules, by module name, and the swapping of modules."""

    def __init__(self, model: nn.Module, router, dtype: torch.dtype, slots: int | None, rank: int | None,
                 lock: threading.RLock) -> None:
        self.model = model
        self.router = router
        self.dtype = dtype
        self.slots = slots  # preallocated slots per bank (max_loaded), or None: grow as needed
        self.rank = rank or 0
        self.lock = lock
        # the patchable modules (by their original objects) and shapes, found once: walking a large
        # model's module tree on every load would cost more than reading a small adapter
        self.originals = patchable_modules(model)
        self.shapes = {n: shape_of(m) for n, m in self.originals.items()}
        self.banks: dict[str, AdapterBank] = {}

    @torch.inference_mode(False)  # a first request inside inference_mode must not make the banks inference tensors
    def place(self, host: HostAdapter, slot: int, stream=None) -> None:
        """Write an adapter's factors into ``slot`` of every module it targets, creating banks and
        wrapping modules as needed, and clear ``slot`` in the banks it does not target (the slot may
        hold an adapter no request reads: a victim, or the one being replaced). Everything that can
        fail happens before the first write; should a write fail anyway, ``slot`` is cleared everywhere."""
        staged, new_banks, on_device = {}, {}, {}
        for name, lora in host.weights.modules.items():
            bank = self.banks.get(name)
            if bank is None:
                shape = self.shapes[name]
                bank = new_banks[name] = AdapterBank(
                    shape.in_features, shape.out_features, execution_device(self.originals[name]), self.dtype,
                    slots=self.slots or slot + 1, rank=self.rank, lock=self.lock, keep=(self.slots or 0, self.rank),
                )
            if bank.device not in on_device:  # one transfer per device, not one per tensor
                on_device[bank.device] = to_device(host, bank.device, stream).modules
            staged[name] = bank.stage(slot, on_device[bank.device][name])
        wrappers = {n: make_wrapper(self.originals[n], b, self.router) for n, b in new_banks.items()}
        # commit: nothing below can fail on valid input
        banks = {n: new_banks.get(n) or self.banks[n] for n in staged}
        dst, src = [], []
        try:
            for name, st in staged.items():
                banks[name].prepare(st, dst, src)
            torch._foreach_copy_(dst, src)  # every factor into its slot, in one call
        except BaseException:
            self.free(slot, restore=False)
            raise
        for name, st in staged.items():
            banks[name].publish(st)
        for name, bank in self.banks.items():
            if name not in staged and slot in bank.present:
                bank.remove(slot)
                bank.compact()
        for name, wrapper in wrappers.items():
            self.banks[name] = new_banks[name]
            self.model.set_submodule(name, wrapper, strict=True)
        self.router.invalidate(self.bank_sizes())

    @torch.inference_mode(False)
    def free(self, slot: int, restore: bool) -> None:
        """Clear ``slot`` in every bank; with ``restore``, modules left empty get their originals
        back. Eviction alone keeps the wrappers, so paging never changes the module tree a compiled
        graph was traced with."""
        for bank in self.banks.values():
            bank.remove(slot)
            bank.compact()  # a state swap: forwards still reading the old storage keep it
        if restore:
            self.restore_empty()
        self.router.invalidate(self.bank_sizes())

    def restore_empty(self) -> None:
        for name in [n for n, bank in self.banks.items() if not bank.present]:
            self.model.set_submodule(name, self.originals[name], strict=True)
            del self.banks[name]
        self.router.invalidate(self.bank_sizes())

    def holds(self, slot: int) -> bool:
        """Whether some bank holds ``slot``."""
        return any(slot in bank.present for bank in self.banks.values())

    def slot_nbytes(self, slot: int) -> int:
        return sum(bank.slot_nbytes(slot) for bank in self.banks.values())

    @property
    def nbytes(self) -> int:
        return sum(bank.nbytes for bank in self.banks.values())

    def class_nbytes(self) -> dict[int, int]:
        """rank -> the bytes of that rank's storage, over every bank."""
        out: dict[int, int] = {}
        for bank in self.banks.values():
            for rank, nbytes in bank.class_nbytes().items():
                out[rank] = out.get(rank, 0) + nbytes
        return dict(sorted(out.items()))

    def bank_sizes(self) -> tuple[int, ...]:
        # a bank of several rank classes has no slot-indexed storage for traced layers to read
        return tuple(sorted({bank.factors.num_slots for bank in self.banks.values() if bank.factors is not None}))

    def unpatch(self) -> None:
        """Every original module back; the banks are dropped."""
        for name in self.banks:
            self.model.set_submodule(name, self.originals[name], strict=True)
        self.banks.clear()
        self.router.invalidate(())
