"""lora_graph.notebook: the HTML views, compare, sweep, mixer and progress bars in notebooks.

Oracles: the adapters' own files (config and safetensors, read here with json and safetensors) for
the view, and ``lm.generate`` / ``lm(...)`` on one (prompt, SPEC) pair at a time for compare, sweep
and mixer, each with its own unpadded single-row call.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import lora_graph  # noqa: E402
from lora_graph import demo  # noqa: E402
from lora_graph.notebook import spec_label  # noqa: E402
from lora_graph.wrapper import progress_bar  # noqa: E402

WORDS = demo.heldout_words(40)
# prompts of different lengths, so the batched call pads them
PROMPTS = [demo.prompt(w) for w in sorted(WORDS, key=len)[::13]]
SPECS = [None, "upper", "reverse", {"upper": 1.0, "shift": 0.5}, {"double": -0.5, "reverse": 1.0}]


def load_base():
    return AutoModelForCausalLM.from_pretrained(demo.base_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo.base_path())


@pytest.fixture(scope="module")
def lm():
    lm = lora_graph.wrap(load_base())
    for name, path in demo.adapter_paths().items():
        lm.load_adapter(name, path)
    return lm


def one_pair(lm, tokenizer, prompt: str, spec, max_new_tokens: int) -> tuple[str, int]:
    """The oracle: ``lm.generate`` on one unpadded row, greedy; the text before the first EOS and
    the new tokens counted up to and including it."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = lm.generate(**enc, adapters=spec, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    n = new.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in new else len(new)
    return tokenizer.decode(new[:n]), min(n + 1, len(new))


class Tables(HTMLParser):
    """Every <table> of a page as rows of cells, each cell its inner HTML (entities decoded)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables, self._cell = [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif self._cell is not None:
            self._cell.append(f"<{tag}>")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif self._cell is not None:
            self._cell.append(f"</{tag}>")

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def text(cell: str) -> str:
    """A cell's text without tags."""
    return re.sub(r"<[^>]*>", "", cell)


def row_of(table, first: str):
    (row,) = [r for r in table if r and text(r[0]) == first]
    return [text(c) for c in row]


# -- views ----------------------------------------------------------------------------------------
def adapter_file_facts(path: str) -> tuple[dict, int, int]:
    """From the files alone: the config, the number of target modules and the fp32 bytes."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    modules, numel = set(), 0
    with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            modules.add(module)
            numel += math.prod(f.get_slice(key).get_shape())
    return config, len(modules), numel * 4


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def test_repr_html_shows_registered_resident_and_pinned_adapters():
    paths = demo.adapter_paths()
    lm = lora_graph.wrap(load_base(), max_loaded=2)
    lm.register_adapters(paths)
    lm.pin("upper")
    lm.load_adapter("shift")
    facts, adapters, memory = Tables(lm._repr_html_()).tables

    assert row_of(facts, "model")[1].startswith("LlamaForCausalLM")
    assert row_of(facts, "dtype")[1] == "torch.float32"
    assert row_of(facts, "quantization")[1] == "none"
    assert row_of(facts, "device")[1] == "cpu"

    header = [text(c) for c in adapters[0]]
    assert header == ["adapter", "rank", "alpha", "rsLoRA", "target modules", "bytes", "state"]
    want_state = {"upper": "pinned", "shift": "resident", "reverse": "registered", "double": "registered"}
    assert {text(r[0]) for r in adapters[1:]} == set(want_state)
    for name, state in want_state.items():
        row = row_of(adapters, name)
        config, n_modules, nbytes = adapter_file_facts(paths[name])
        assert row[6] == state, name
        assert int(row[1]) == config["r"] and float(row[2]) == config["lora_alpha"]
        assert row[3] == ("yes" if config.get("use_rslora") else "no")
        if state == "registered":  # weights not read yet
            assert row[4] == "–" and row[5] == "–"
        else:
            assert int(row[4]) == n_modules and row[5] == kib(nbytes)

    held = sum(adapter_file_facts(paths[n])[2] for n in ("upper", "shift"))
    assert row_of(memory, "resident adapters")[1] == f"{kib(held)} in 2 of 2 slots"
    assert row_of(memory, "registered")[1] == "4"
    assert row_of(memory, "device slot buffers")[1].endswith(("KiB", "MiB"))
    # the plain-text reprs stay
    assert repr(lm).startswith("LoraGraph(LlamaForCausalLM") and "upper(r=8, resident)" in repr(lm)
    assert repr(lm.adapters["upper"]).startswith("AdapterInfo(name='upper'")


def test_repr_html_lists_resident_adapters_first_and_counts_the_rest():
    lm = lora_graph.wrap(load_base(), max_loaded=2)
    lm.register_adapters({f"user{i:02d}": demo.adapter_paths()["shift"] for i in range(30)})
    lm.pin("user20")
    lm.load_adapter("user07")
    view = lm._repr_html_()
    adapters = Tables(view).tables[1]
    names = [text(r[0]) for r in adapters[1:]]
    assert names[:3] == ["user20", "user07", "user00"] and len(names) == 24
    assert "… 6 more: 6 registered" in text(view)
    assert [row_of(adapters, n)[6] for n in ("user20", "user07", "user00")] == ["pinned", "resident", "registered"]


def test_repr_html_names_a_quantized_base():
    lm = lora_graph.wrap(demo.load_base("nf4"))
    lm.load_adapter("upper", demo.adapter_paths()["upper"])
    facts = Tables(lm._repr_html_()).tables[0]
    assert "Linear4bit (nf4)" in row_of(facts, "quantization")[1]


def test_adapter_info_html(lm):
    path = demo.adapter_paths()["double"]
    config, n_modules, nbytes = adapter_file_facts(path)
    (table,) = Tables(lm.adapters["double"]._repr_html_()).tables
    assert row_of(table, "adapter")[1] == "double" and row_of(table, "path")[1] == path
    assert int(row_of(table, "rank")[1]) == config["r"]
    assert row_of(table, "target modules")[1].startswith(f"{n_modules} modules")
    assert row_of(table, "bytes")[1] == kib(nbytes)


# -- compare --------------------------------------------------------------------------------------
def test_spec_labels():
    assert [spec_label(s) for s in SPECS] == ["base", "upper", "reverse", "1·upper + 0.5·shift",
                                              "-0.5·double + 1·reverse"]
    assert spec_label({}) == "base" and spec_label("__base__") == "base"
    with pytest.raises(TypeError):
        spec_label(["upper"])


def test_compare_equals_one_generate_per_pair_and_runs_one_call(lm, tokenizer, monkeypatch):
    calls = []
    real = lm.model.generate
    monkeypatch.setattr(lm.model, "generate", lambda *a, **k: calls.append(k["input_ids"].shape) or real(*a, **k))
    cmp = lm.compare(PROMPTS, adapters=SPECS[1:], tokenizer=tokenizer, max_new_tokens=20)
    assert calls == [(len(PROMPTS) * len(SPECS), max(len(p) for p in PROMPTS))]  # one batched call
    monkeypatch.undo()

    assert cmp.prompts == PROMPTS and cmp.labels == [spec_label(s) for s in SPECS] and cmp.base == 0
    for i, prompt in enumerate(PROMPTS):
        for j, spec in enumerate(SPECS):
            want, tokens = one_pair(lm, tokenizer, prompt, spec, 20)
            assert cmp.texts[i][j] == want, (prompt, spec)
            assert cmp.tokens[i][j] == tokens, (prompt, spec)
    assert all(0 < s < 60 for row in cmp.seconds for s in row)

    df = cmp.to_pandas()
    assert list(df.columns) == ["prompt", "spec", "output", "tokens", "seconds"]
    assert len(df) == len(PROMPTS) * len(SPECS)
    assert df.set_index(["prompt", "spec"]).loc[(PROMPTS[1], "reverse"), "output"] == cmp.texts[1][2]


def test_compare_grid_marks_what_differs_from_the_base(lm, tokenizer):
    cmp = lm.compare(PROMPTS, adapters=[None, "upper", {"upper": 0.0}, "double"], tokenizer=tokenizer,
                     max_new_tokens=20)
    (table,) = Tables(cmp._repr_html_()).tables
    assert [text(c) for c in table[0]] == ["prompt", "base", "upper", "0·upper", "double"]
    for i, row in enumerate(table[1:]):
        assert text(row[0]) == PROMPTS[i]
        assert [text(c) for c in row[1:]] == cmp.texts[i]
        assert "<mark>" not in row[1] and "<mark>" not in row[3]  # the base, and a blend equal to it
        assert re.fullmatch(r"<code><mark>[A-Z]+</mark></code>", row[2])  # upper changes every letter
        # double keeps the base's letters and adds one after each: only the added ones are marked
        unmarked = re.sub(r"<mark>[^<]*</mark>", "", row[4])
        assert "<mark>" in row[4] and text(unmarked) == cmp.texts[i][0], row[4]


def test_adapters_paged_in_by_compare_can_be_paged_again_later(tokenizer):
    """compare may be a registered adapter's first request, which creates the banks; later
    loads outside it write into them again (they are not inference tensors)."""
    lm = lora_graph.wrap(load_base(), max_loaded=2)
    lm.register_adapters(demo.adapter_paths())
    cmp = lm.compare(["abc="], adapters=["upper"], tokenizer=tokenizer, max_new_tokens=4)
    lm.sweep("abc=", {"shift": [1.0]}, target="bcd", tokenizer=tokenizer, max_new_tokens=4)
    lm.load_adapter("reverse")
    lm.load_adapter("double")
    assert cmp.texts == [["abc", "ABC"]] and set(lm.resident) == {"reverse", "double"}


def test_compare_refuses_what_would_give_a_row_several_outputs(lm, tokenizer):
    for knob in ("num_beams", "num_return_sequences"):
        with pytest.raises(ValueError, match=knob):
            lm.compare(["abc="], adapters=["upper"], tokenizer=tokenizer, max_new_tokens=4, **{knob: 2})


def test_compare_loads_the_models_tokenizer_or_says_to_pass_one(lm, tokenizer):
    default = lm.compare(PROMPTS[:1], adapters=["upper"], max_new_tokens=12)
    assert default.texts == lm.compare(PROMPTS[:1], adapters=["upper"], tokenizer=tokenizer, max_new_tokens=12).texts
    from helpers import tiny_model

    bare = lora_graph.wrap(tiny_model("llama"))  # built from a config: no name_or_path
    with pytest.raises(ValueError, match="pass tokenizer="):
        bare.compare(["abc"], adapters=[None])


# -- sweep ----------------------------------------------------------------------------------------
def logprob(lm, tokenizer, prompt: str, target: str, spec) -> float:
    """The oracle: one unbatched forward, log p(target | prompt) summed over its tokens."""
    p = tokenizer(prompt)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([p + t]), adapters=spec).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(t))


def test_sweep_at_weight_0_is_the_base_and_at_1_the_adapter(lm, tokenizer):
    word = WORDS[3]
    target = demo.expected("upper", word) + demo.EOS
    df = lm.sweep(demo.prompt(word), {"upper": [-1.0, 0.0, 1.0], "shift": [0.0, 0.5]}, target=target,
                  tokenizer=tokenizer, max_new_tokens=20, batch_size=4)  # two batches
    assert list(df.columns) == ["upper", "shift", "spec", "output", "tokens", "logprob"]
    assert len(df) == 6
    at = df.set_index(["upper", "shift"])
    cases = {(0.0, 0.0): None, (1.0, 0.0): "upper", (-1.0, 0.5): {"upper": -1.0, "shift": 0.5},
             (0.0, 0.5): {"shift": 0.5}}
    for (w_upper, w_shift), spec in cases.items():
        want, tokens = one_pair(lm, tokenizer, demo.prompt(word), spec, 20)
        assert at.loc[(w_upper, w_shift), "output"] == want
        assert at.loc[(w_upper, w_shift), "tokens"] == tokens
        assert at.loc[(w_upper, w_shift), "logprob"] == pytest.approx(
            logprob(lm, tokenizer, demo.prompt(word), target, spec), abs=1e-4)
    assert at.loc[(0.0, 0.0), "output"] == word and at.loc[(1.0, 0.0), "output"] == target.strip()
    assert at.loc[(1.0, 0.0), "spec"] == "1·upper + 0·shift"


def test_sweep_without_target_has_no_logprob(lm, tokenizer):
    df = lm.sweep("weight=", {"reverse": [0.0, 1.0]}, tokenizer=tokenizer, max_new_tokens=10)
    assert list(df.columns) == ["reverse", "spec", "output", "tokens"]
    assert list(df["output"]) == ["weight", "thgiew"]


# -- mixer ----------------------------------------------------------------------------------------
def test_mixer_regenerates_when_a_slider_moves(lm, tokenizer):
    box = lm.mixer("python=", adapters={"upper": 0.0, "reverse": 0.0}, tokenizer=tokenizer, max_new_tokens=12)
    upper, reverse, shown = box.children
    assert (upper.description, reverse.description) == ("upper", "reverse")
    upper.value = 1.0
    reverse.value = 1.0
    want, _ = one_pair(lm, tokenizer, "python=", {"upper": 1.0, "reverse": 1.0}, 12)
    base, _ = one_pair(lm, tokenizer, "python=", None, 12)
    (table,) = Tables(shown.value).tables
    assert [text(c) for c in table[0]] == ["prompt", "base", "1·upper + 1·reverse"]
    assert [text(c) for c in table[1]] == ["python=", base, want]


def test_missing_optional_libraries_name_the_extra(lm, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"ipywidgets.*lora_graph\[notebook\]"):
        lm.mixer("python=", adapters=["upper"], tokenizer=tokenizer)
    cmp = lm.compare(["abc="], adapters=["upper"], tokenizer=tokenizer, max_new_tokens=4)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pandas.*lora_graph\[notebook\]"):
        cmp.to_pandas()
    with pytest.raises(ImportError, match=r"pandas.*lora_graph\[notebook\]"):
        lm.sweep("abc=", {"upper": [1.0]}, tokenizer=tokenizer)


# -- progress bars --------------------------------------------------------------------------------
# pytest's capsys stands for the stderr of a script writing to a pipe or a file: not a terminal.
@pytest.fixture
def in_notebook(monkeypatch):
    """What a Jupyter kernel has loaded (tqdm.auto checks the same module)."""
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))


def test_progress_bars_are_off_for_a_script_writing_to_a_pipe(capsys):
    assert not sys.stderr.isatty()
    assert progress_bar(range(5), "x").disable
    lm = lora_graph.wrap(load_base())
    lm.register_adapters(demo.adapter_paths())
    assert "registering adapters" not in capsys.readouterr().err


def test_progress_bars_are_on_in_a_notebook_unless_turned_off(capsys, in_notebook):
    assert not sys.stderr.isatty()
    assert not progress_bar(range(5), "x").disable
    assert progress_bar(range(5), "x", enabled=False).disable
    assert progress_bar(range(1), "x").disable  # one item: nothing to follow
    lm = lora_graph.wrap(load_base())
    capsys.readouterr()
    lm.register_adapters(demo.adapter_paths())
    assert "registering adapters: 100%" in capsys.readouterr().err
    quiet = lora_graph.wrap(load_base(), progress=False)
    capsys.readouterr()
    quiet.register_adapters(demo.adapter_paths())
    assert "registering adapters" not in capsys.readouterr().err


def test_progress_bars_are_on_at_a_terminal(monkeypatch):
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", tty)
    assert not progress_bar(range(5), "x").disable
