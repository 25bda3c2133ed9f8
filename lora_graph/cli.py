"""The ``lora-graph`` command.

    lora-graph demo [--quantize none|nf4|int8] [--backend auto] [--words WORD ...]
    lora-graph serve [MODEL_DIR] [--adapter NAME=PATH ...] [--port 8000] [--api-key KEY] ...

``demo`` loads the shipped tiny model (lora_graph/demo_assets) and its four adapters through
lora_graph, then runs ONE ``generate`` call whose batch mixes a row per adapter, a base row and a
weighted blend, per word. It prints the rows as a table with the timings, and exits 1 when an
adapter row or the base row is wrong (the blend is an experiment: it has no expected answer).

``serve`` runs the OpenAI-compatible server (lora_graph.serve.app) with uvicorn; with no MODEL_DIR
it serves the demo model and its four adapters as ``lora-graph-demo``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from . import demo
from .notebook import spec_label

logger = logging.getLogger(__name__)

DEFAULT_WORDS = ("weight", "python")  # both held out from training (demo.is_heldout)
BLEND = {"upper": 1.0, "shift": 0.5}


def run_demo(args) -> int:
    # The CPU build of bitsandbytes warns at import that an optional kernel package is missing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch
    from rich.console import Console
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    import lora_graph

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    console = Console()
    bad = [w for w in args.words if not demo.valid_word(w)]
    if bad:
        console.print(f"[red]words must be {demo.MIN_LEN} to {demo.MAX_LEN} lowercase ASCII letters: {' '.join(bad)}")
        return 2
    hf_logging.disable_progress_bar()  # a 39-tensor model needs no loading bar
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(demo.base_path())
    model = demo.load_base(args.quantize)  # bitsandbytes quantizes while transformers loads
    load_s = time.perf_counter() - t0
    try:
        lm = lora_graph.wrap(model, backend=args.backend)
    except ValueError as exc:
        console.print(f"[red]{exc}")
        return 2

    adapter_s = {}
    for name, path in demo.adapter_paths().items():
        t0 = time.perf_counter()
        lm.load_adapter(name, path)
        adapter_s[name] = time.perf_counter() - t0
    # One batch: per word, a row for each adapter, one for the base, one for the blend.
    rows = [(w, spec) for w in args.words for spec in (*demo.ADAPTERS, None, BLEND)]
    words = [w for w, _ in rows]
    specs = [spec for _, spec in rows]
    t0 = time.perf_counter()
    answers, tokens = demo.complete(lm, tokenizer, words, specs)
    gen_s = time.perf_counter() - t0

    base_kind = "fp32" if args.quantize == "none" else args.quantize
    table, failures = _results_table(rows, answers, f"lora_graph demo: one generate call, {len(rows)} rows, "
                                                    f"{base_kind} base")
    console.print(table)

    ranks = {n: i.rank for n, i in lm.adapters.items()}
    loads = ", ".join(f"{n} (r={ranks[n]}) {s * 1e3:.1f} ms" for n, s in adapter_s.items())
    quant = f" ({args.quantize} by BitsAndBytesConfig)" if args.quantize != "none" else ""
    console.print(f"base load {load_s:.2f} s{quant}\nadapter loads: {loads}\n"
                  f"generate: {gen_s:.2f} s for {tokens} tokens over {len(rows)} rows "
                  f"→ {tokens / gen_s:.0f} tokens/s (backend {lm.backend})\n"
                  f"total {time.perf_counter() - start:.2f} s after imports")
    if failures:
        console.print(f"[red]{failures} adapter/base rows wrong")
        return 1
    return 0


def _results_table(rows, answers, title: str):
    """The demo's rich table and how many adapter or base rows are wrong."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for col in ("adapters", "prompt", "output", "expected", ""):
        table.add_column(col)
    failures = 0
    for (word, spec), answer in zip(rows, answers):
        if isinstance(spec, dict):
            want, mark = "(experiment)", "[dim]–"
        else:
            want = demo.expected(spec or "copy", word)
            ok = answer == want
            failures += not ok
            mark = "[green]✓" if ok else "[red]✗"
        shown = answer.encode("unicode_escape").decode("ascii")  # the blend may write control bytes
        table.add_row(spec_label(spec), Text(demo.prompt(word)), Text(shown), Text(want), mark)
    return table, failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-graph", description="Serve many LoRA adapters over one frozen model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the library's INFO messages")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="run the shipped tiny model with its four adapters in one mixed batch")
    p.add_argument("--quantize", choices=demo.QUANTIZE, default="none",
                   help="quantize the base's Linear layers with bitsandbytes (CPU too)")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                   help="lora_graph backend passed to wrap()")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings on a shared machine)")
    p.add_argument("--words", nargs="+", default=list(DEFAULT_WORDS), metavar="WORD",
                   help=f"{demo.MIN_LEN} to {demo.MAX_LEN} lowercase letters each (default: {' '.join(DEFAULT_WORDS)})")
    p.set_defaults(func=run_demo)
    _serve_parser(commands)
    return parser


def _serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="an OpenAI-compatible server; with no MODEL_DIR, the shipped demo")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="a Hugging Face model directory (default: the demo)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="a PEFT adapter (repeatable)")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="a directory under which /v1/load_lora_adapter may read (default: the --adapter folders' parents)")
    p.add_argument("--allow-runtime-loading", action="store_true", help="enable /v1/load_lora_adapter and unload")
    p.add_argument("--quantize", choices=demo.QUANTIZE, default="none", help="bitsandbytes quantization of the base")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--max-loaded", type=int, default=None, metavar="N", help="adapters resident at once")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting before the server answers 503")
    p.add_argument("--served-model-name", default=None, help="the base model's id (default: MODEL_DIR's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--ray", action="store_true", help="serve from replicas on Ray Serve (pip install 'lora_graph[ray]')")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: replicas of the model")
    p.add_argument("--ray-address", default=None, help="with --ray: the cluster to join (default: start a local one)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    """Load the model and adapters, then serve until interrupted (or deploy on Ray with --ray)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    adapters = dict(demo.adapter_paths()) if args.model_dir is None else {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter expects NAME=PATH, got {item!r}")
        adapters[name] = path
    if args.ray:
        return _serve_on_ray(args, adapters)
    import uvicorn

    from lora_graph.serve.app import create_app
    from lora_graph.serve.loading import load_served, served_name

    model_id = args.served_model_name or served_name(args.model_dir)
    lm, tokenizer = load_served(args.model_dir, adapters, backend=args.backend, quantize=args.quantize,
                                max_loaded=args.max_loaded)
    roots = args.adapter_root or sorted({str(Path(p).resolve().parent) for p in adapters.values()})
    app = create_app(lm, tokenizer, model_id, api_key=args.api_key, allow_runtime_loading=args.allow_runtime_loading,
                     adapter_roots=roots, max_queue=args.max_queue)
    logger.info("serving %s with adapters %s on http://%s:%d", model_id, ", ".join(adapters) or "none", args.host,
                args.port)
    serve_http(app, uvicorn.Config(app, host=args.host, port=args.port,
                                   log_level="info" if args.verbose else "warning"))
    return 0


def serve_http(app, config) -> None:
    """uvicorn in a thread of its own, and the engine's steps in this one, the thread that loaded
    the model (lora_graph.serve.Engine.run says why), until interrupted or until uvicorn stops."""
    import uvicorn

    server = uvicorn.Server(config)
    engine = app.state.server.engine
    if threading.current_thread() is threading.main_thread():  # uvicorn cannot, from its thread
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    engine.start(steps=False)  # the app's start-up finds it started, and its shut-down stops it

    def http_main():
        try:
            server.run()
        finally:  # stopped, or failed to start (uvicorn logs why): the steps end too
            engine.stop()

    http = threading.Thread(target=http_main, name="lora-graph-http", daemon=True)
    http.start()
    try:
        engine.run()  # returns once the engine is stopped
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=30)
        engine.stop()
    if not server.started:
        raise OSError(f"could not serve on http://{config.host}:{config.port} (see the log above)")


def _serve_on_ray(args, adapters: dict) -> int:
    """Start or join a Ray cluster and serve through Ray Serve's HTTP proxy until interrupted."""
    import ray
    from ray import serve

    from lora_graph.serve.ray import ray_app

    ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(ray_app(args.model_dir, adapters, replicas=args.replicas, max_loaded=args.max_loaded or 8,
                      api_key=args.api_key, served_model_name=args.served_model_name, backend=args.backend,
                      quantize=args.quantize, max_queue=args.max_queue), name="lora_graph", route_prefix="/")
    logger.info("serving on Ray with %d replicas at http://%s:%d", args.replicas, args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


def main(argv=None) -> int:
    """Run a command; an error of the library is one line on stderr (--verbose shows the traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"lora-graph {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
