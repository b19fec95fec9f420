"""When does an approximate-nearest-neighbour index beat SoME's exact key search? Measured side by side.

    python benchmarks/some_search.py                              # N = 256 ... 65,536 keys
    python benchmarks/some_search.py --run runs/some              # + a trained model served with each search
    python benchmarks/some_search.py --sizes 256,4096 --json /tmp/search.json

A SoME router picks, for each token, the ``num_experts_per_tok`` keys with the highest score
``q · k + b`` (unit query and keys, the balance bias ``b``). ``key_search="exact"`` computes every
score (a matmul) and takes a top-k; the FAISS backends (``faiss_flat``, ``faiss_ivf``, ``faiss_hnsw``,
the ``ann`` extra) search an index of ``[k, b]`` with the query ``[q, 1]``. This script times the
router itself, not a bare search: a ``SomeRouter`` in evaluation mode, its query network, the search,
the index's torch <-> numpy round trip and the gates, on one batch of tokens (``--tokens``, default 512
= the CPU recipe's 4 x 128), for each number of keys N:

- **route time**: median wall time of the router's forward over ``--repeats`` calls after warm-up, the
  backends timed in interleaved rounds (order rotated each round) so drift hits all alike;
- **build time**: building the index from the keys once (what a moved key store costs on the next
  evaluation; training never builds one, since the keys move every step);
- **recall@k**: the share of the exact search's k experts per token that the backend also picked.

The keys are drawn as SoME draws them (uniform on the unit sphere) and the bias as a trained
balancer leaves it (normal, std ``--bias-std``); the tokens are standard normal, so the queries a
random query network makes of them are close to uniform: the hard case for an index, which profits
from clustered queries. ``--run DIR`` (a finished ``decollapse train some`` folder) adds the real
case: the validation and test perplexity of that model served with each search (through the same
Trainer evaluation the run ended with), and each layer's recall on the validation probe batch.

It is a measurement, not a test: it exits 0 whatever it finds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from decollapse.configuration.some import SomeConfig
from decollapse.modeling.some import SomeRouter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import machine_info  # noqa: E402

BACKENDS = ("exact", "faiss_flat", "faiss_ivf", "faiss_hnsw")


def build_router(n: int, key_size: int, k: int, bias_std: float, seed: int) -> SomeRouter:
    config = SomeConfig(hidden_size=key_size, num_attention_heads=1, num_experts=n, num_experts_per_tok=k,
                        key_size=key_size, expert_intermediate_size=1)
    torch.manual_seed(seed)
    router = SomeRouter(config)
    router.reset_state()
    with torch.no_grad():
        router.balance_bias.normal_(std=bias_std)
    return router.eval()


def route(router: SomeRouter, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return router(tokens)[0]


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of each row's exact top-k that ``found`` holds too."""
    hits = (found.unsqueeze(-1) == exact.unsqueeze(-2)).any(-2)
    return float(hits.float().mean())


# The search-effort knob of each approximate backend and the values tried, cheapest first.
EFFORT = {
    "faiss_ivf": ("key_search_nprobe", (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
    "faiss_hnsw": ("key_search_ef", (16, 32, 64, 128, 256, 512, 1024)),
}


def tune(router: SomeRouter, backend: str, tokens: torch.Tensor, exact: torch.Tensor, target: float) -> dict:
    """The cheapest search effort whose recall@k reaches ``target`` (or the most effort tried), with the
    index's build time and recall at that effort."""
    router.config.key_search = backend
    knob, values = EFFORT.get(backend, (None, (None,)))
    for value in values:
        if knob is not None:
            setattr(router.config, knob, value)
        router._search_index = None
        start = time.perf_counter()
        route(router, tokens[:1])  # builds the index (and routes one token)
        build = time.perf_counter() - start
        found = recall(route(router, tokens), exact)
        if found >= target:
            break
    entry = {"build_s": build, "recall": found}
    if knob is not None:
        entry[knob] = value
    return entry


def measure_size(n: int, args, backends: list[str]) -> dict:
    tokens = torch.randn(args.tokens, args.key_size, generator=torch.Generator().manual_seed(args.seed + 1))
    # One router per backend, all with the same keys, bias and query network (same seed), so that
    # interleaving them never rebuilds an index inside a timed call.
    routers = {b: build_router(n, args.key_size, args.k, args.bias_std, args.seed) for b in backends}
    exact = route(routers["exact"], tokens)
    row = {"num_keys": n, "backends": {"exact": {}}}
    for backend in backends[1:]:
        row["backends"][backend] = tune(routers[backend], backend, tokens, exact, args.target_recall)
    times = {b: [] for b in backends}
    for r in range(args.rounds):
        shift = r % len(backends)
        for backend in backends[shift:] + backends[:shift]:
            for _ in range(args.warmup):
                route(routers[backend], tokens)
            for _ in range(args.repeats):
                start = time.perf_counter()
                route(routers[backend], tokens)
                times[backend].append(time.perf_counter() - start)
    for backend in backends:
        row["backends"][backend]["route_ms"] = 1e3 * statistics.median(times[backend])
    return row


def served_variants(backends: list[str]) -> list[tuple[str, dict]]:
    """Each backend at the configuration's search effort, and IVF / HNSW also at their least effort."""
    variants = [(b, {"key_search": b}) for b in backends]
    for backend, (knob, values) in EFFORT.items():
        if backend in backends:
            variants.append((f"{backend} {knob.removeprefix('key_search_')}={values[0]}",
                             {"key_search": backend, knob: values[0]}))
    return variants


def measure_run(run: Path, backends: list[str]) -> dict:
    """Perplexity and per-layer recall of a trained ``some`` model served with each search."""
    from decollapse.data import build_synthetic_corpus
    from decollapse.runner import TrainJob, continued_model, evaluate_checkpoint, plan

    saved = json.loads((run / "metrics.json").read_text())
    settings = {key: str(value) for key, value in saved.get("settings", {}).items()}
    parts = plan(TrainJob(arch="some", output_dir=Path("/nonexistent/some-search"), settings=settings))
    corpus = build_synthetic_corpus(parts["corpus_config"])
    model = continued_model(parts, run, corpus.tokenizer).eval()
    probe = torch.tensor(corpus.dataset["validation"]["input_ids"][:16])
    k = model.config.num_experts_per_tok
    out = {"run": str(run), "num_experts": model.config.num_experts, "served": {}}
    routed = {}
    trained = {knob: getattr(model.config, knob) for knob, _ in EFFORT.values()}  # the run's own efforts
    for name, inference in [("exact", {"key_search": "exact"})] + served_variants(backends[1:]):
        for field, value in {**trained, **inference}.items():
            setattr(model.config, field, value)
        found = {}
        hooks = [layer.moe.register_forward_hook(lambda m, a, o, i=i: found.__setitem__(i, o[1].indices))
                 for i, layer in enumerate(model.base_model.layers)]
        with torch.no_grad():
            model(input_ids=probe)
        for hook in hooks:
            hook.remove()
        routed[name] = found
        metrics = evaluate_checkpoint(parts, run, corpus.dataset, corpus.tokenizer, corpus.summary(),
                                      show_progress=False, inference=inference)
        out["served"][name] = {
            "inference": inference,
            "validation_perplexity": metrics["validation_perplexity"],
            "test_perplexity": metrics["test_perplexity"],
            "recall_per_layer": [recall(found[i].reshape(-1, k), routed["exact"][i].reshape(-1, k))
                                 for i in sorted(found)],
        }
    return out


def render(result: dict) -> str:
    lines = [
        f"SoME key search, {result['date']}, {result['machine']['cpu']}, torch {result['torch']}, faiss {result['faiss']}, "
        f"{result['threads']} threads",
        f"router forward over {result['tokens']} tokens, key size {result['key_size']}, k={result['k']}, "
        f"bias std {result['bias_std']}; median of {result['rounds']} x {result['repeats']} calls",
        "",
        f"IVF and HNSW at the least search effort whose recall@k reached {result['target_recall']} (or the most tried)",
        "",
        "| N keys | exact ms | FAISS flat ms | FAISS IVF ms | FAISS HNSW ms | fastest |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["sizes"]:
        b = row["backends"]

        def cell(name: str, with_recall: bool) -> str:
            if name not in b:
                return "-"
            e = b[name]
            extra = f"build {e['build_s'] * 1e3:.1f} ms"
            if with_recall:
                knob = EFFORT[name][0]
                extra += f", recall {e['recall']:.3f} at {knob.removeprefix('key_search_')}={e[knob]}"
            return f"{e['route_ms']:.2f} ({extra})"

        fastest = min(b, key=lambda name: b[name]["route_ms"])
        lines.append(f"| {row['num_keys']:,} | {b['exact']['route_ms']:.2f} | {cell('faiss_flat', False)} | "
                     f"{cell('faiss_ivf', True)} | {cell('faiss_hnsw', True)} | {fastest} |")
    lines.append("")
    lines.append(f"crossover: {result['crossover']}")
    if result.get("run"):
        run = result["run"]
        lines += ["", f"trained model {run['run']} ({run['num_experts']} experts per layer):", "",
                  "| search | val ppl | test ppl | recall per layer (probe batch) |", "|---|---|---|---|"]
        for name, e in run["served"].items():
            recalls = " / ".join(f"{r:.3f}" for r in e["recall_per_layer"])
            lines.append(f"| {name} | {e['validation_perplexity']:.3f} | {e['test_perplexity']:.3f} | {recalls} |")
    return "\n".join(lines)


def crossover(sizes: list[dict], target: float) -> str:
    """The smallest N from which an index that reaches the target recall routes faster than exact."""
    for row in sizes:
        exact = row["backends"]["exact"]["route_ms"]
        winners = [name for name, e in row["backends"].items()
                   if name != "exact" and e["recall"] >= target and e["route_ms"] < exact]
        if winners:
            return f"N = {row['num_keys']:,} ({', '.join(winners)} faster than exact at recall@k >= {target})"
    return f"none up to N = {sizes[-1]['num_keys']:,}: no index at recall@k >= {target} routed faster than exact"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024,4096,16384,65536", help="numbers of keys N, comma-separated")
    parser.add_argument("--key-size", type=int, default=64, help="key width (the CPU recipe's hidden size)")
    parser.add_argument("--k", type=int, default=2, help="experts per token (the default num_experts_per_tok)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens routed per call")
    parser.add_argument("--bias-std", type=float, default=0.05)
    parser.add_argument("--target-recall", type=float, default=0.9, help="recall@k the IVF / HNSW effort is tuned to")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--run", type=Path, help="a finished `decollapse train some` folder to serve with each search")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        faiss = __import__("faiss")
    except ImportError:
        print("benchmarks/some_search.py needs faiss: pip install 'decollapse[ann]'", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",")]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or backends[0] != "exact":
        print(f"--backends: expected 'exact' first, then any of {', '.join(BACKENDS[1:])}, got {args.backends}", file=sys.stderr)
        return 2
    if args.run is not None and not (args.run / "metrics.json").is_file():
        print(f"--run {args.run}: no metrics.json, not a finished `decollapse train some` folder", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(n) for n in args.sizes.split(",")]
    rows = [measure_size(n, args, backends) for n in sizes]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(torch.device("cpu")),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "threads": args.threads,
        "tokens": args.tokens,
        "key_size": args.key_size,
        "k": args.k,
        "bias_std": args.bias_std,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "sizes": rows,
        "target_recall": args.target_recall,
        "crossover": crossover(rows, args.target_recall),
    }
    if args.run is not None:
        result["run"] = measure_run(args.run, backends)
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
