"""Does a quantized base still serve the demo adapters? Exact match on held-out words, per adapter.

Question: when the base is quantized (bitsandbytes nf4 or int8), is it better to keep each adapter
as a separate fp32 branch beside the quantized base (what lora_graph does), or to merge the
adapter into the fp32 weights first and quantize the merged model (one model per adapter)?

Setups, each on the same held-out words (never seen in training), greedy decoding:

    fp32+branch    fp32 base, lora_graph branch; all adapters and the base in one mixed batch
    nf4+branch     nf4 base, lora_graph branch; one mixed batch
    int8+branch    int8 base, lora_graph branch; one mixed batch
    merged->nf4    PEFT merge_and_unload into fp32, then nf4; one model per adapter
    merged->int8   the same with int8
    save_merged(nf4)        nf4 base, lora_graph's lm.save_merged per adapter: each module dequantized,
                            the adapter merged in, a plain fp32 checkpoint reloaded; one model per adapter
    save_merged(nf4)->nf4   that checkpoint quantized to nf4 again (what re-quantizing an export gives)
    save_merged(int8), save_merged(int8)->int8   the same over the int8 base

Quantization is transformers' own: the model is loaded with a ``BitsAndBytesConfig``
(lora_graph.demo.load_base / quantized_copy), which keeps lm_head unquantized; an adapter's embed_tokens / lm_head part therefore stays fp32 when
merged. The "base" column is the copy task of the base model itself under the same quantization.

    .venv/bin/python benchmarks/bench_quant_quality.py [--words 200]

Writes benchmarks/results/quant_quality.json and quant_quality.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU build: an optional kernel package is missing

import bitsandbytes  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import lora_graph  # noqa: E402
from lora_graph import demo  # noqa: E402
from _env import cpu_name, git_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (*demo.ADAPTERS, "base")


def load_base():
    return AutoModelForCausalLM.from_pretrained(demo.base_path(), dtype=torch.float32).eval()


def score(answers: list[str], task: str, words: list[str]) -> float:
    return sum(a == demo.expected(task, w) for a, w in zip(answers, words)) / len(words)


def branch(tokenizer, words: list[str], quantize: str) -> dict[str, float]:
    """All adapters and the base in ONE mixed generate call over a (quantized) base."""
    lm = lora_graph.wrap(demo.load_base(quantize))
    for name, path in demo.adapter_paths().items():
        lm.load_adapter(name, path)
    tasks = [*demo.ADAPTERS, None]
    rows = [(w, t) for t in tasks for w in words]
    answers, _ = demo.complete(lm, tokenizer, [w for w, _ in rows], [t for _, t in rows])
    n = len(words)
    return {t or "base": score(answers[i * n:(i + 1) * n], t or "copy", words) for i, t in enumerate(tasks)}


def merged(tokenizer, words: list[str], quantize: str) -> dict[str, float]:
    """Each adapter merged into its own fp32 copy of the base (PEFT), then quantized."""
    out = {}
    for name, path in demo.adapter_paths().items():
        model = demo.quantized_copy(PeftModel.from_pretrained(load_base(), path).merge_and_unload(), quantize)
        answers, _ = demo.complete(model, tokenizer, words)
        out[name] = score(answers, name, words)
    model = demo.load_base(quantize)
    answers, _ = demo.complete(model, tokenizer, words)
    out["base"] = score(answers, "copy", words)
    return out


def exported(tokenizer, words: list[str], quantize: str, requantize: bool) -> dict[str, float]:
    """Each adapter exported by ``lm.save_merged`` over the (quantized) base, reloaded, and
    optionally quantized again the same way."""
    import tempfile

    model = load_base()
    demo.quantize_linears(model, quantize)
    lm = lora_graph.wrap(model, progress=False)
    for name, path in demo.adapter_paths().items():
        lm.register_adapter(name, path)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (*demo.ADAPTERS, None):
            folder = lm.save_merged(Path(tmp) / (name or "base"), adapters=name, dtype=torch.float32)
            merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            if requantize:
                demo.quantize_linears(merged, quantize)
            answers, _ = demo.complete(merged, tokenizer, words)
            out[name or "base"] = score(answers, name or "copy", words)
    return out


def markdown(report: dict) -> str:
    lines = [
        "# Quantized base: branch vs merged, exact match on held-out words",
        "",
        f"{report['words']} held-out words per adapter, greedy decoding; device {report['device']}; "
        f"torch {report['versions']['torch']}, bitsandbytes {report['versions']['bitsandbytes']}; "
        f"commit {report['commit'][:12]}.",
        "",
        "| setup | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for setup, accs in report["results"].items():
        lines.append(f"| {setup} | " + " | ".join(f"{100 * accs[c]:.1f}%" for c in COLUMNS) + " |")
    lines += ["", "Produced by `benchmarks/bench_quant_quality.py`; see its docstring for the setups.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    words = demo.heldout_words(args.words)
    tokenizer = AutoTokenizer.from_pretrained(demo.base_path())
    setups = {
        "fp32+branch": lambda: branch(tokenizer, words, "none"),
        "nf4+branch": lambda: branch(tokenizer, words, "nf4"),
        "merged->nf4": lambda: merged(tokenizer, words, "nf4"),
        "int8+branch": lambda: branch(tokenizer, words, "int8"),
        "merged->int8": lambda: merged(tokenizer, words, "int8"),
        "save_merged(nf4)": lambda: exported(tokenizer, words, "nf4", requantize=False),
        "save_merged(nf4)->nf4": lambda: exported(tokenizer, words, "nf4", requantize=True),
        "save_merged(int8)": lambda: exported(tokenizer, words, "int8", requantize=False),
        "save_merged(int8)->int8": lambda: exported(tokenizer, words, "int8", requantize=True),
    }
    results, seconds = {}, {}
    for name, run in setups.items():
        t0 = time.perf_counter()
        results[name] = run()
        seconds[name] = round(time.perf_counter() - t0, 2)
        print(f"{name:24s} " + "  ".join(f"{c} {100 * results[name][c]:5.1f}%" for c in COLUMNS), flush=True)

    report = {
        "benchmark": "quant_quality",
        "device": f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)",
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "lora_graph": lora_graph.__version__,
        },
        "commit": git_commit(),
        "words": len(words),
        "metric": "exact match of the greedy completion (before EOS) with the task's answer",
        "results": results,
        "seconds": seconds,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quant_quality.md").write_text(markdown(report))
    print(f"wrote {out / 'quant_quality.json'} and {out / 'quant_quality.md'}")


if __name__ == "__main__":
    main()
