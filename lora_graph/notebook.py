"""Jupyter: HTML views of the wrapper and of adapters, and three ways to look at what adapters do.

    lm._repr_html_()                     the base model, a table of adapters and their state, memory
    lm.compare(prompts, adapters=[...])  every prompt under every SPEC in ONE batched generate call
        └──> Comparison: a grid (prompts × SPECs, text that differs from the base column marked),
             .to_pandas() in long format, .texts as plain lists
    lm.sweep(prompt, {"a": [...], "b": [...]}, target="...")
        └──> a DataFrame: one row per point of the weight grid, its output and the target's log-probability
    lm.mixer(prompt, adapters=[...])     one ipywidgets slider per adapter; every change regenerates

Why this way: a request's SPEC already routes each batch row on its own, so comparing N prompts
under M SPECs is one ``generate`` call over N·M rows, not N·M calls, and a weight grid is one
batched call per ``batch_size`` points. Nothing here changes how a forward is computed: these are
the public ``lm.generate`` and ``lm(...)`` with a SPEC list, plus formatting.

What it does not do: sampling is off unless ``do_sample=True`` is passed (the point is to compare);
beams and ``num_return_sequences`` are refused, since each row gives one output, timed by a streamer
(which beams cannot use) that records when each decoding step's tokens arrive.

Libraries: pandas (tables), matplotlib (plots, in the notebooks), ipywidgets (sliders) are the
``notebook`` extra and are imported only by the feature that needs one, never with the library.
The tokenizer comes from transformers (``AutoTokenizer``) when none is passed.
"""

from __future__ import annotations

import difflib
import html
import importlib
import itertools
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

EXTRA = "pip install 'lora_graph[notebook]'"


def _require(module: str, feature: str):
    """Import an optional dependency, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{feature} needs {module}, which is not installed; install the notebook extra: "
                          f"{EXTRA}") from exc


def spec_label(spec) -> str:
    """A readable name for one row's SPEC: ``base``, ``upper``, ``1·upper + 0.5·shift``."""
    if spec is None or spec == "__base__" or (isinstance(spec, Mapping) and not spec):
        return "base"
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return " + ".join(f"{float(w):g}·{name}" for name, w in spec.items())
    raise TypeError(f"expected None, an adapter name or a {{name: weight}} mapping, got {type(spec).__name__}")


def _by_rank(classes: dict[int, int]) -> list[tuple[str, str]]:
    """The slot buffers of each rank (``r=1: 12.0 MiB, r=64: 4.0 MiB``), when the banks hold several."""
    if len(classes) < 2:
        return []
    return [("by rank", ", ".join(f"r={rank}: {readable_bytes(n)}" for rank, n in classes.items()))]


def readable_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    if abs(n) < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


# -- generation -----------------------------------------------------------------------------------
def load_tokenizer(lm, tokenizer=None):
    """``tokenizer``, or the model's own: ``AutoTokenizer.from_pretrained(model.name_or_path)``."""
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    name = getattr(lm.model, "name_or_path", "") or ""
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # from_pretrained fails in many ways (OSError, ValueError, validation errors)
        raise ValueError(f"could not load a tokenizer from the model's name_or_path {name!r} "
                         f"({type(exc).__name__}: {exc}); pass tokenizer=...") from exc


class _StepClock:
    """A ``generate`` streamer that only records when each decoding step's tokens arrive."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []  # stamps[0]: the prompt; stamps[k]: the k-th new token

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class Generated:
    texts: list[str]  # each row's text before its first end token
    tokens: list[int]  # new tokens per row, the end token included
    seconds: list[float]  # per row: from the call's start to the step that gave its last token


def generate_rows(lm, tokenizer, prompts: Sequence[str], specs: Sequence, max_new_tokens: int,
                  **generate_kwargs) -> Generated:
    """One ``lm.generate`` call: row ``i`` is ``prompts[i]`` under ``specs[i]``, left-padded."""
    for knob in ("num_beams", "num_return_sequences"):
        if generate_kwargs.get(knob, 1) != 1:
            raise ValueError(f"{knob} must be 1 here: each row gives one output, timed by a streamer")
    if "streamer" in generate_kwargs:
        raise ValueError("streamer is taken: it times each row's last token")
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    eos = generate_kwargs.get("eos_token_id", getattr(getattr(lm.model, "generation_config", None), "eos_token_id",
                                                      None))
    eos = {tokenizer.eos_token_id} if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos - {None}), 0)
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, L), padded on the left
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    clock = _StepClock()
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", pad)
    # no_grad, not inference_mode: a request may page an adapter in, and a bank first written
    # under inference_mode could never be written again outside it
    with torch.no_grad():
        out = lm.generate(input_ids=input_ids.to(lm.router.device), attention_mask=mask.to(lm.router.device),
                          adapters=list(specs), max_new_tokens=max_new_tokens, streamer=clock, **generate_kwargs)
    texts, tokens, seconds = [], [], []
    for row in out[:, width:].tolist():
        n = next((i for i, t in enumerate(row) if t in eos), None)
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
        count = len(row) if n is None else n + 1
        tokens.append(count)
        seconds.append(clock.stamps[min(count, len(clock.stamps) - 1)])
    return Generated(texts, tokens, seconds)


# -- compare --------------------------------------------------------------------------------------
def compare(lm, prompts, adapters, tokenizer=None, max_new_tokens: int = 32, base: bool = True,
            **generate_kwargs) -> Comparison:
    """Every prompt under every SPEC of ``adapters``, in ONE batched ``generate`` call.

    ``adapters`` is a list of row SPECs (None, a name, or a ``{name: weight}`` set); with
    ``base=True`` a base column (None) comes first unless the list has one. Decoding is greedy
    unless ``generate_kwargs`` say otherwise. The tokenizer defaults to the model's own
    (``AutoTokenizer.from_pretrained(model.name_or_path)``).

    Returns a :class:`Comparison`: a grid in a notebook, ``.to_pandas()``, ``.texts``.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    specs = [adapters] if adapters is None or isinstance(adapters, (str, Mapping)) else list(adapters)
    labels = [spec_label(s) for s in specs]  # also refuses what is not a row SPEC
    if base and "base" not in labels:
        specs, labels = [None, *specs], ["base", *labels]
    if not prompts or not specs:
        raise ValueError("compare needs at least one prompt and one SPEC")
    tokenizer = load_tokenizer(lm, tokenizer)
    rows = list(itertools.product(range(len(prompts)), range(len(specs))))
    out = generate_rows(lm, tokenizer, [prompts[i] for i, _ in rows], [specs[j] for _, j in rows], max_new_tokens,
                        **generate_kwargs)
    m = len(specs)

    def grid(values):
        return [values[i * m:(i + 1) * m] for i in range(len(prompts))]

    return Comparison(prompts, labels, grid(out.texts), grid(out.tokens), grid(out.seconds),
                      labels.index("base") if "base" in labels else None)


@dataclass(frozen=True)
class Comparison:
    """The outputs of ``lm.compare``: ``texts[i][j]`` is ``prompts[i]`` under the SPEC labelled
    ``labels[j]``; ``tokens`` counts new tokens (the end token included); ``seconds`` is when that
    row's last token came, from the start of the one batched call."""

    prompts: list[str]
    labels: list[str]
    texts: list[list[str]]
    tokens: list[list[int]]
    seconds: list[list[float]]
    base: int | None = None  # the column the others are marked against

    def to_pandas(self):
        """Long format: one row per (prompt, SPEC) with columns prompt, spec, output, tokens, seconds."""
        pd = _require("pandas", "Comparison.to_pandas")
        return pd.DataFrame(
            [(p, label, self.texts[i][j], self.tokens[i][j], self.seconds[i][j])
             for i, p in enumerate(self.prompts) for j, label in enumerate(self.labels)],
            columns=["prompt", "spec", "output", "tokens", "seconds"],
        )

    def _repr_html_(self) -> str:
        left = 'style="text-align:left"'  # notebook front ends right-align table cells by default
        head = "".join(f"<th {left}>{html.escape(label)}</th>" for label in self.labels)
        body = []
        for i, prompt in enumerate(self.prompts):
            ref = self.texts[i][self.base] if self.base is not None else None
            cells = "".join(
                f'<td {left} title="{self.tokens[i][j]} tokens, {self.seconds[i][j]:.3f} s">'
                f"{_marked(text, None if j == self.base else ref)}</td>"
                for j, text in enumerate(self.texts[i])
            )
            body.append(f"<tr><th {left}>{_visible(prompt)}</th>{cells}</tr>")
        note = (f"<caption {left}>marked: text that differs from the <b>base</b> column</caption>"
                if self.base is not None else "")
        return (f'<table class="lora-graph-compare">{note}<thead><tr><th {left}>prompt</th>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table>")


def _visible(text: str) -> str:
    """HTML-escaped, with control characters written as escapes (a blend may produce any byte)."""
    return html.escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


def _marked(text: str, ref: str | None) -> str:
    """``text`` with what differs from ``ref`` in ``<mark>``: the characters difflib finds changed,
    or the whole text when little is shared (a scattered character-level match reads as noise).
    Characters ``ref`` has and ``text`` lacks show as a marked ``∅``."""
    if ref is None or text == ref:
        return f"<code>{_visible(text)}</code>"
    matcher = difflib.SequenceMatcher(None, ref, text, autojunk=False)
    if matcher.ratio() < 0.5:
        return f"<code><mark>{_visible(text) or '∅'}</mark></code>"
    parts = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        piece = _visible(text[j1:j2])
        if tag == "equal":
            parts.append(piece)
        else:
            parts.append(f"<mark>{piece}</mark>" if piece else f'<mark title="base: {_visible(ref[i1:i2])}">∅</mark>')
    return f"<code>{''.join(parts)}</code>"


# -- sweep ----------------------------------------------------------------------------------------
def sweep(lm, prompt: str, weights: Mapping[str, Sequence[float]], target: str | None = None, tokenizer=None,
          max_new_tokens: int = 32, batch_size: int = 64, **generate_kwargs):
    """Outputs over a grid of blend weights (negative ones included): a pandas DataFrame.

    ``weights`` maps adapter names to the weights to try; every combination is one row, run as the
    SPEC ``{name: weight, ...}`` (a weight of 0 leaves that adapter out, so all zeros is the base).
    Columns: one per adapter (its weight), ``spec``, ``output``, ``tokens`` and, with ``target``,
    ``logprob``: log p(target | prompt) under that blend, summed over the target's tokens (one
    batched forward per ``batch_size`` points, beside one batched ``generate``).
    """
    pd = _require("pandas", "lm.sweep")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must map adapter names to the weights to try, e.g. {'upper': [-1, 0, 1]}")
    names = list(weights)
    points = [dict(zip(names, map(float, combo))) for combo in itertools.product(*(weights[n] for n in names))]
    tokenizer = load_tokenizer(lm, tokenizer)
    chunks = [points[i:i + batch_size] for i in range(0, len(points), batch_size)]
    rows = []
    from .wrapper import progress_bar  # not at the top: the wrapper imports this module

    for chunk in progress_bar(chunks, "sweeping blends", lm.progress):
        out = generate_rows(lm, tokenizer, [prompt] * len(chunk), chunk, max_new_tokens, **generate_kwargs)
        scores = target_logprobs(lm, tokenizer, prompt, target, chunk) if target is not None else [None] * len(chunk)
        for point, text, count, score in zip(chunk, out.texts, out.tokens, scores):
            rows.append({**point, "spec": spec_label(point), "output": text, "tokens": count,
                         **({"logprob": score} if target is not None else {})})
    return pd.DataFrame(rows)


def target_logprobs(lm, tokenizer, prompt: str, target: str, specs: Sequence) -> list[float]:
    """log p(target | prompt) under each SPEC, in one forward over ``len(specs)`` identical rows."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise ValueError(f"target {target!r} has no tokens")
    ids = torch.tensor([prompt_ids + target_ids], device=lm.router.device).expand(len(specs), -1)  # (B, P+T)
    with torch.no_grad():  # not inference_mode: see generate_rows
        logits = lm(input_ids=ids, adapters=list(specs)).logits  # (B, P+T, V)
    start = len(prompt_ids) - 1  # the logits at position t predict token t + 1
    logp = torch.log_softmax(logits[:, start:start + len(target_ids)].float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, ids[:, len(prompt_ids):, None]).squeeze(-1)  # (B, T)
    return picked.sum(-1).tolist()


# -- mixer ----------------------------------------------------------------------------------------
def mixer(lm, prompt, adapters, tokenizer=None, max_new_tokens: int = 32, low: float = -2.0, high: float = 2.0,
          step: float = 0.05, **generate_kwargs):
    """One slider per adapter (ipywidgets); each change regenerates ``prompt`` under the blend
    and shows it beside the base, as :func:`compare` does. ``adapters`` is a list of names (each
    starting at 0) or a ``{name: start weight}`` mapping. Returns the widget: the sliders, then
    an HTML widget with the grid."""
    widgets = _require("ipywidgets", "lm.mixer")
    start = dict(adapters) if isinstance(adapters, Mapping) else dict.fromkeys(adapters, 0.0)
    for name in start:
        if name not in lm.adapters:
            raise ValueError(f"unknown adapter {name!r} (registered: {', '.join(sorted(lm.adapters)) or 'none'})")
    tokenizer = load_tokenizer(lm, tokenizer)
    sliders = {name: widgets.FloatSlider(value=float(w), min=low, max=high, step=step, description=name,
                                         continuous_update=False, style={"description_width": "initial"})
               for name, w in start.items()}
    shown = widgets.HTML()

    def render(_=None) -> None:
        blend = {name: s.value for name, s in sliders.items()}
        shown.value = compare(lm, prompt, [blend], tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                              **generate_kwargs)._repr_html_()

    for s in sliders.values():
        s.observe(render, names="value")
    render()
    return widgets.VBox([*sliders.values(), shown])


# -- views ----------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Cells are HTML already; the header is text."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts(pairs: Sequence[tuple[str, object]]) -> str:
    """A two-column table of (name, HTML value) without a header."""
    body = "".join(f'<tr><th style="text-align:left">{html.escape(k)}</th><td style="text-align:left">{v}</td></tr>'
                   for k, v in pairs)
    return f"<table><tbody>{body}</tbody></table>"


def _quantization(lm) -> str:
    """The base's quantization: the kinds of the modules adapters can patch (bitsandbytes layers
    show up by their class), after transformers' quantization method when it quantized the model."""
    config = getattr(getattr(lm.model, "config", None), "quantization_config", None)
    method = getattr(config, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    kinds = Counter(
        type(m).__name__ + (f" ({m.weight.quant_type})" if getattr(m.weight, "quant_type", None) else "")
        for m in lm._patched.originals.values()
    )
    plain = {"Linear", "Embedding", "Conv1D"}
    layers = ", ".join(f"{html.escape(k)} ×{n}" for k, n in kinds.most_common() if k not in plain)
    if method is None:
        return layers or "none"
    return html.escape(f"{method} (transformers)") + (f": {layers}" if layers else "")


STATE_STYLE = {"pinned": "font-weight:bold;color:#1a7f37", "resident": "color:#1a7f37", "registered": "color:#6e7781"}


def wrapper_html(lm, max_rows: int = 24) -> str:
    """``LoraGraph._repr_html_``: the base model, a table of adapters with their state, memory.
    The table lists pinned adapters first, then resident, then registered, up to ``max_rows``."""
    model = lm.model
    params = sum(p.numel() for p in model.parameters())
    facts = [
        ("model", f"{html.escape(type(model).__name__)} <small>{html.escape(str(getattr(model, 'name_or_path', '')))}"
                  "</small>"),
        ("dtype", html.escape(str(getattr(model, "dtype", "–")))),
        ("quantization", _quantization(lm)),
        ("device", html.escape(str(lm.router.device))),
        ("parameters", f"{params:,}"),
        ("backend", html.escape(lm.backend)),
        ("patched modules", str(len(lm._patched.banks))),
    ]
    resident, pinned = set(lm.resident), lm.pinned
    order = {"pinned": 0, "resident": 1, "registered": 2}
    states = sorted(((n, "pinned" if n in pinned else "resident" if n in resident else "registered")
                     for n in lm.adapters), key=lambda item: order[item[1]])  # stable: registration order within
    rows = []
    for name, state in states[:max_rows]:
        info = lm.adapters[name]
        rows.append([f"<b>{html.escape(name)}</b>", info.rank, f"{info.alpha:g}", "yes" if info.use_rslora else "no",
                     "–" if info.targets is None else len(info.targets), readable_bytes(info.nbytes),
                     f'<span class="lora-graph-{state}" style="{STATE_STYLE[state]}">{state}</span>'])
    more = ""
    if len(states) > max_rows:
        rest = Counter(state for _, state in states[max_rows:])
        more = f"<p>… {len(states) - max_rows} more: " + ", ".join(f"{n} {s}" for s, n in rest.items()) + "</p>"
    mem = lm.memory()
    dev, host = mem["device"], mem["host"]
    slots = f"{dev['resident']} of {dev['max_loaded'] or 'unbounded'}"
    memory = [
        ("device slot buffers", readable_bytes(dev["slot_buffers"])),
        *_by_rank(dev.get("rank_classes") or {}),
        ("resident adapters", f"{readable_bytes(dev['adapters'])} in {slots} slots"),
        ("host cache", "off" if host["max_cpu"] == 0 else
         f"{readable_bytes(host['cache'])}, {host['cached']} of {host['max_cpu'] or 'unbounded'} adapters"),
        ("registered", str(mem["registered"])),
    ]
    adapters = (_table(["adapter", "rank", "alpha", "rsLoRA", "target modules", "bytes", "state"], rows) + more
                if rows else "<p>no adapters</p>")
    return (f'<div class="lora-graph"><b>LoraGraph</b>{_facts(facts)}{adapters}'
            f"<b>memory</b>{_facts(memory)}</div>")


def adapter_html(info) -> str:
    """``AdapterInfo._repr_html_``."""
    targets = ("not read yet" if info.targets is None else
               f"<details><summary>{len(info.targets)} modules</summary>{'<br>'.join(map(html.escape, info.targets))}"
               "</details>")
    facts = [("adapter", f"<b>{html.escape(info.name)}</b>"), ("path", f"<code>{html.escape(info.path)}</code>"),
             ("rank", info.rank), ("alpha", f"{info.alpha:g}"), ("rsLoRA", "yes" if info.use_rslora else "no"),
             ("target modules", targets), ("bytes", readable_bytes(info.nbytes))]
    return _facts(facts)
