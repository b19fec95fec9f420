"""Mixture-of-Heads attention at inference: every head (``routing="all"``) vs the adaptive sparse path.

The issue's target: attention-layer tokens/s at inference, ``all`` against adaptive routing at the
measured average head share ``s``, with the adaptive layer computing only its active (token, head)
pairs (``MoHAttention._active_heads_only``, taken under ``torch.no_grad()`` with
``skip_inactive_heads="inference"``). It must be faster than ``all`` by at least half of the ideal
saving: ideal speedup ``1/s``, target ``1 / (1 - (1 - s)/2)`` (50% of heads active -> >= 1.33x).

    python benchmarks/moh_attention.py                            # synthetic layer, preset default, s = 0.5
    python benchmarks/moh_attention.py --preset medium --share 0.25
    python benchmarks/moh_attention.py --run runs/moh-...          # the trained layers of a run, on held-out data

Two inputs:

- ``--run DIR``: a ``decollapse train moh`` output folder. Its held-out sequences (the synthetic
  corpus validation split, rebuilt from ``corpus.json`` exactly as the run built it, checked against
  the run's ``probe_batch.safetensors``) go through the trained model once; a forward pre-hook on each
  ``layer.attn`` captures that layer's real input. Each trained attention layer is then timed against
  an ``all`` layer built from the same config with ``routing="all"`` and the trained q/k/v/o weights.
- without ``--run``: one synthetic adaptive layer at a shape preset, input ``x ~ N(0, 1)``. Its router
  gets a spread (score and threshold weights ~ N(0, std^2), default std = 1/sqrt(hidden), i.e.
  unit-variance logits on this input); the complexity head is pinned at n_t = H so it never binds,
  and the threshold head's bias is bisected until the measured active share is within 0.01 of
  ``--share``. ``threshold_max`` is 1.0 so every share in (1/H, 1] is reachable.

Both: eval mode, ``torch.no_grad()``, ``attn_mask=None``, ``is_causal=True``; interleaved rounds (the
order of the two paths alternates each round) after warm-up calls, each round ``--calls`` calls per
path; reported is the median seconds per call as tokens/s and the speedup as the median (and middle
half) of the per-round ratios. Before any timing, the sparse output of each adaptive layer is checked
against the dense weighted output of the same layer (``skip_inactive = "never"``); on a mismatch the
script prints no numbers and exits 1. Otherwise it is a measurement and exits 0 whatever the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import machine_info  # noqa: E402

from decollapse.configuration.moh import MoHConfig  # noqa: E402
from decollapse.modeling.moh import MoHAttention  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
    "default": {"hidden": 64, "heads": 8, "head_dim": 16, "kv_heads": 4, "batch": 32, "seq_len": 128},
    "medium": {"hidden": 256, "heads": 8, "head_dim": 32, "kv_heads": 4, "batch": 8, "seq_len": 512},
    "long": {"hidden": 128, "heads": 8, "head_dim": 32, "kv_heads": 4, "batch": 4, "seq_len": 2048},
}
PATHS = ("all", "adaptive")
SHARE_TOLERANCE = 0.01
CHECK_TOLERANCE = 1e-5
# Blocking of torch's CPU flash-attention kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp),
# which F.scaled_dot_product_attention dispatches to for float32 on CPU, masked or not.
FLASH_KV_SPLIT = 512


def target_speedup(share: float) -> float:
    """Half of the ideal saving: the time goes from 1 to 1 - (1 - s)/2."""
    return 1.0 / (1.0 - (1.0 - share) / 2.0)


# --------------------------------------------------------------------------------------------------
# What is timed
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One attention layer: the adaptive layer, its ``all`` twin and the input both are timed on."""

    name: str
    adaptive: MoHAttention
    dense: MoHAttention
    x: torch.Tensor  # (B, T, C)
    times: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {p: [] for p in PATHS})
    stats: dict = dataclasses.field(default_factory=dict)

    def call(self, path: str) -> None:
        layer = self.dense if path == "all" else self.adaptive
        layer(self.x, None, True)


def all_heads_twin(attn: MoHAttention, config: MoHConfig, layer_idx: int) -> MoHAttention:
    """The ``routing="all"`` layer of the same config, with ``attn``'s q/k/v/o weights."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    twin = MoHAttention(MoHConfig(**{**fields, "routing": "all"}), layer_idx)
    result = twin.load_state_dict(attn.state_dict(), strict=False)
    leftover = [k for k in result.unexpected_keys if not k.startswith("router.")]
    if result.missing_keys or leftover:
        raise SystemExit(f"layer {layer_idx}: weights do not match the all-heads layer ({result})")
    return twin.eval()


def synthetic_cases(args: argparse.Namespace) -> tuple[list[Case], str]:
    shape = args.shape
    hidden, heads, batch, seq_len = shape["hidden"], shape["heads"], shape["batch"], shape["seq_len"]
    config = MoHConfig(
        hidden_size=hidden, num_attention_heads=heads, head_dim=shape["head_dim"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=seq_len, routing="adaptive",
        threshold_max=1.0,
    )
    torch.manual_seed(args.seed)
    attn = MoHAttention(config, 0).eval()
    x = torch.randn(batch, seq_len, hidden)
    std = args.router_std if args.router_std is not None else hidden**-0.5
    router = attn.router
    with torch.no_grad():
        nn.init.normal_(router.scores.weight, std=std)
        nn.init.normal_(router.threshold.weight, std=std)
        # n_t = min + (max - min)·σ(30) ≈ H keeps every rank r with r < n_t - ½: the count never binds.
        nn.init.zeros_(router.complexity.weight)
        nn.init.constant_(router.complexity.bias, 30.0)
        share = calibrate_threshold(attn, x, args.share)
    describe = (
        f"synthetic layer, preset {args.preset}: hidden {hidden}, {heads} heads x {shape['head_dim']}, "
        f"{shape['kv_heads']} kv heads, batch {batch} x T {seq_len} ({batch * seq_len} tokens), x ~ N(0, 1); "
        f"router weights ~ N(0, {std:.4g}^2), threshold bias {router.threshold.bias.item():+.3f} "
        f"(bisected: share {share:.3f} for --share {args.share})"
    )
    return [Case("synthetic", attn, all_heads_twin(attn, config, 0), x)], describe


def calibrate_threshold(attn: MoHAttention, x: torch.Tensor, share: float) -> float:
    """Bisect the threshold head's bias until the mean active share on ``x`` is within tolerance.
    The share never decreases with the bias (a higher threshold τ keeps more of the sorted heads)."""
    bias = attn.router.threshold.bias

    def measured(value: float) -> float:
        bias.fill_(value)
        return float(attn.router(x).active.float().mean())

    low, high = -30.0, 30.0
    reach = (measured(low), measured(high))
    if not reach[0] - SHARE_TOLERANCE <= share <= reach[1] + SHARE_TOLERANCE:
        raise SystemExit(f"--share {share}: this router reaches shares {reach[0]:.3f}..{reach[1]:.3f} only")
    for _ in range(100):
        mid = (low + high) / 2
        got = measured(mid)
        if abs(got - share) <= SHARE_TOLERANCE:
            return got
        low, high = (mid, high) if got < share else (low, mid)
    raise SystemExit(f"--share {share}: no threshold bias gives a share within {SHARE_TOLERANCE} (last {got:.3f})")


def run_cases(args: argparse.Namespace) -> tuple[list[Case], str]:
    from transformers.utils import logging as hf_logging

    from decollapse.modeling.moh import MoHForCausalLM

    run = Path(args.run)
    if not run.is_dir():
        raise SystemExit(f"--run {run}: no such folder")
    hf_logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
    try:
        model = MoHForCausalLM.from_pretrained(str(run))
    except (OSError, ValueError) as err:
        raise SystemExit(f"--run {run}: not a loadable moh checkpoint ({str(err).splitlines()[0]})") from None
    model.eval()
    config = model.config
    if config.routing == "all":
        raise SystemExit(f"--run {run}: routing='all' has no router, so there is no adaptive path to time")
    input_ids, source = held_out_ids(run, args.batch, args.seq_len or config.max_position_embeddings)

    captured: dict[int, tuple] = {}
    hooks = [
        layer.attn.register_forward_pre_hook(lambda mod, a, i=i: captured.__setitem__(i, a))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    cases = []
    for i, layer in enumerate(model.model.layers):
        hidden_states, attn_mask, is_causal = captured[i][:3]
        # The model passed what the benchmark passes: no padding, no cache, SDPA's own causal mask.
        if attn_mask is not None or not is_causal:
            raise SystemExit(f"layer {i}: the model called attention with attn_mask/is_causal the benchmark does not use")
        attn = layer.attn
        attn.skip_inactive = "inference"  # the sparse path is what is measured, whatever the run was set to
        cases.append(Case(f"layer {i}", attn, all_heads_twin(attn, config, i), hidden_states.detach().clone()))
    batch, seq_len = input_ids.shape
    describe = (
        f"run {run} (routing {config.routing}"
        + (f", routing_grad {config.routing_grad}" if config.routing == "adaptive" else "")
        + f", {len(cases)} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads x {config.head_dim}, "
        f"{config.num_key_value_heads} kv heads), each layer on its captured input for {batch} held-out "
        f"sequences x T {seq_len} ({batch * seq_len} tokens), {source}"
    )
    return cases, describe


def held_out_ids(run: Path, batch: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """The first ``batch`` rows of the run's validation split, cut to ``seq_len`` tokens.

    The synthetic corpus is rebuilt from ``corpus.json`` the way ``build_synthetic_corpus`` builds
    it (language, then the validation split's own random stream), and mapped to ids with the run's
    saved tokenizer; only the split is sampled, not the 24k training rows, the tokenizer training or
    the exact bounds. A run on another dataset has only its probe batch (validation rows) to offer.
    """
    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from decollapse.data.synthetic import SyntheticCorpusConfig, SyntheticLanguage, split_rng

    probe_path = run / "probe_batch.safetensors"
    probe = load_file(str(probe_path))["input_ids"] if probe_path.is_file() else None
    corpus_path = run / "corpus.json"
    if corpus_path.is_file():
        corpus = SyntheticCorpusConfig(**json.loads(corpus_path.read_text())["config"])
        language = SyntheticLanguage(corpus)
        words = language.sample(corpus.num_validation, split_rng(corpus, "validation"))["word_ids"]
        tokenizer = AutoTokenizer.from_pretrained(str(run))
        word_to_token = np.asarray(tokenizer.convert_tokens_to_ids(list(language.words)), dtype=np.int64)
        if np.any(word_to_token == tokenizer.unk_token_id):
            raise SystemExit(f"--run {run}: its tokenizer does not cover the corpus of corpus.json")
        ids = torch.from_numpy(word_to_token[words])
        # The run's probe batch is the first rows of the validation split it trained against.
        if probe is not None and not torch.equal(ids[: len(probe), : probe.shape[1]], probe):
            raise SystemExit(f"--run {run}: the rebuilt validation split does not match probe_batch.safetensors")
        source = f"synthetic corpus validation split (rebuilt from corpus.json, first {len(probe) if probe is not None else 0} rows checked against probe_batch)"
    elif probe is not None:
        ids, source = probe, "the run's probe batch (first rows of its validation split)"
    else:
        raise SystemExit(f"--run {run}: neither corpus.json nor probe_batch.safetensors to take held-out data from")
    if batch > len(ids) or seq_len > ids.shape[1]:
        raise SystemExit(f"--run {run}: held-out data has {tuple(ids.shape)} tokens, asked for ({batch}, {seq_len})")
    return ids[:batch, :seq_len].contiguous(), source


# --------------------------------------------------------------------------------------------------
# Checks and counts
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def check_sparse_equals_dense(case: Case) -> None:
    """The sparse path must give the dense weighted output of the same layer, or nothing is reported."""
    attn = case.adaptive
    sparse, heads, _ = attn(case.x, None, True)
    if heads is not None:  # the dense path returns every head's output; the sparse one None
        raise SystemExit(f"{case.name}: the adaptive layer did not take the sparse path")
    saved = attn.skip_inactive
    attn.skip_inactive = "never"
    try:
        dense, _, _ = attn(case.x, None, True)
    finally:
        attn.skip_inactive = saved
    try:
        torch.testing.assert_close(sparse, dense, atol=CHECK_TOLERANCE, rtol=CHECK_TOLERANCE)
    except AssertionError as err:
        print(f"{case.name}: the sparse output differs from the dense weighted output; no timings reported.\n{err}")
        raise SystemExit(1) from None


def cpu_flash_keys_per_query(q_len: int, kv_len: int, causal: bool) -> float:
    """Keys the CPU flash kernel computes a score for, averaged over the queries.

    With ``is_causal`` a query block [m, m + q_split) visits key blocks of 512 up to key m + q_split,
    so up to T = 512 every query computes all T keys (the triangle is masked, not skipped); with an
    explicit mask (the sparse path) every query computes every key.
    """
    if not causal:
        return float(kv_len)
    q_split = 256 if q_len >= 768 else 64 if q_len >= 192 else 32
    kv_split = min(FLASH_KV_SPLIT, kv_len)
    total = 0
    for m in range(0, q_len, q_split):
        rows = min(q_split, q_len - m)
        needed = min(m + rows, kv_len)
        total += rows * min(-(-needed // kv_split) * kv_split, kv_len)
    return total / q_len


@torch.no_grad()
def routing_stats(case: Case) -> dict:
    """Active share, the packed layout's slots and matmul FLOPs per token of both paths as executed.

    ``all``: q-proj 2·C·H·d, k/v-proj 4·C·n_kv·d, scores + AV 4·K·H·d with K the keys the CPU flash
    kernel computes per query (all T for T <= 512), o-proj 2·H·d·C.
    Sparse: every router Linear (2·C·H scores + 2·C per predictor for adaptive), the same (dense) q, k,
    v and o projections, and scores + AV 4·T·d per *packed slot* (explicit mask: all keys). Head h is
    packed to its largest active count over the sequences, so its slots·B can exceed its active
    pairs (the padding slots are computed at weight 0). Element-wise work (sort, gathers, masks,
    scatter) is not counted.
    """
    attn, x = case.adaptive, case.x
    batch, seq_len, width = x.shape
    heads, dim, kv_heads = attn.num_heads, attn.head_dim, attn.num_kv_heads
    routing = attn.router(x)
    # What _active_heads_only computes: the active pairs with a non-zero weight.
    computed = routing.weights.masked_fill(~routing.active, 0) != 0  # (B, T, H)
    slots = int(computed.sum(1).amax(0).sum())  # summed over heads, each its own maximum
    router_flops = sum(2 * m.in_features * m.out_features for m in attn.router.modules() if isinstance(m, nn.Linear))
    proj_flops = 4 * width * heads * dim + 4 * width * kv_heads * dim
    keys = cpu_flash_keys_per_query(seq_len, seq_len, causal=True)
    all_flops = proj_flops + 4 * keys * heads * dim
    sparse_flops = router_flops + proj_flops + slots / seq_len * 4 * seq_len * dim
    return {
        "active_share": float(routing.active.float().mean()),
        "computed_share": float(computed.float().mean()),
        "slots": slots,
        "packed_share": slots / (seq_len * heads),
        "flops_all": all_flops,
        "flops_adaptive": sparse_flops,
    }


# --------------------------------------------------------------------------------------------------
# Timing and report
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def time_cases(cases: list[Case], rounds: int, calls: int, warmup: int) -> None:
    for case in cases:
        for path in PATHS:
            for _ in range(warmup):
                case.call(path)
    gc.disable()
    try:
        for r in range(rounds):
            for case in cases:
                for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                    start = time.perf_counter()
                    for _ in range(calls):
                        case.call(path)
                    case.times[path].append((time.perf_counter() - start) / calls)
    finally:
        gc.enable()


def summarize(name: str, times: dict[str, list[float]], share: float, tokens: int) -> dict:
    ratios = [a / b for a, b in zip(times["all"], times["adaptive"])]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    target = target_speedup(share)
    speedup = statistics.median(ratios)
    return {
        "name": name,
        "active_share": share,
        "tokens_per_s": {p: tokens / statistics.median(times[p]) for p in PATHS},
        "ms_per_call": {p: 1000 * statistics.median(times[p]) for p in PATHS},
        "speedup": speedup,
        "speedup_p25": quartiles[0],
        "speedup_p75": quartiles[2],
        "ideal_speedup": 1.0 / share,
        "target_speedup": target,
        "passed": speedup >= target,
        "per_round_s": times,
    }


def render(result: dict) -> str:
    lines = [
        "MoH attention layer at inference: every head (routing=all) vs adaptive, only the active "
        f"(token, head) pairs computed; {result['date']}",
        "machine: {cpu}, {cpu_cores} cores, torch threads {torch_threads} | torch {torch}, transformers {transformers}".format(
            **result["machine"]
        ),
        f"command: {result['command']}",
        f"input: {result['input']}",
        f"timing: {result['rounds']} interleaved rounds (all, adaptive / adaptive, all) x {result['calls']} calls after "
        f"{result['warmup']} warm-up calls; median s/call; eval, torch.no_grad(), attn_mask=None, is_causal=True",
        f"check: sparse output == dense weighted output of the same layer (atol = rtol = {CHECK_TOLERANCE:g}): ok "
        f"for {len(result['layers'])} layer(s)",
        "",
        "| layer | active share | packed slots / (T·H) | all tok/s | adaptive tok/s | speedup (middle half) "
        "| ideal 1/s | target | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["layers"] + ([result["overall"]] if result.get("overall") else [])
    for row in rows:
        packed = f"{row['packed_share']:.3f}" if "packed_share" in row else "—"
        lines.append(
            f"| {row['name']} | {row['active_share']:.3f} | {packed} | {row['tokens_per_s']['all']:,.0f} "
            f"| {row['tokens_per_s']['adaptive']:,.0f} | {row['speedup']:.2f}x ({row['speedup_p25']:.2f}–{row['speedup_p75']:.2f}) "
            f"| {row['ideal_speedup']:.2f}x | {row['target_speedup']:.2f}x | {'PASS' if row['passed'] else 'FAIL'} |"
        )
    lines += [
        "",
        "| layer | matmul FLOPs/token all | adaptive (as executed) | adaptive / all |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['flops_all']:,.0f} | {row['flops_adaptive']:,.0f} "
            f"| {row['flops_adaptive'] / row['flops_all']:.3f} |"
        )
    lines.append(
        "\nFLOPs: all = q 2CHd + k/v 4C·n_kv·d + scores/AV 4·K·H·d (K = keys the CPU flash kernel computes per "
        "query: all T for T <= 512) + o 2HdC; adaptive = router Linears + the same projections + scores/AV "
        "4Td per packed slot, each head packed to its largest active count over the sequences, padding included."
    )
    lines.append(f"result: {'PASS' if result['passed'] else 'FAIL'} (speedup >= 1 / (1 - (1 - s)/2) at the measured share s)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a `decollapse train moh` output folder: time its trained layers on held-out data")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="synthetic layer shape")
    parser.add_argument("--share", type=float, default=0.5, help="synthetic: the active head share to calibrate to")
    parser.add_argument("--router-std", type=float, default=None, help="synthetic: router weight std (default 1/sqrt(hidden))")
    parser.add_argument("--batch", type=int, default=None, help="sequences (default: the preset's; --run: 32)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's / the run's)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5, help="calls per path per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per path before the rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.warmup < 0:
        parser.error("--rounds and --calls must be >= 1, --warmup >= 0")
    if not 0.0 < args.share <= 1.0:
        parser.error("--share must be in (0, 1]")
    for name in ("batch", "seq_len", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.shape = dict(PRESETS[args.preset])
    if args.batch:
        args.shape["batch"] = args.batch
    if args.seq_len:
        args.shape["seq_len"] = args.seq_len
    if args.run and args.batch is None:
        args.batch = 32  # the recipe's evaluation batch size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/moh_attention.py", *(sys.argv[1:] if argv is None else argv)])
    cases, describe = run_cases(args) if args.run else synthetic_cases(args)
    for case in cases:
        check_sparse_equals_dense(case)
        case.stats = routing_stats(case)
    time_cases(cases, args.rounds, args.calls, args.warmup)

    tokens = cases[0].x.shape[0] * cases[0].x.shape[1]
    layers = []
    for case in cases:
        row = summarize(case.name, case.times, case.stats["active_share"], tokens)
        row.update(case.stats)
        layers.append(row)
    overall = None
    if len(cases) > 1:  # the whole stack: per-round sums over layers, share averaged over layers
        sums = {p: [sum(ts) for ts in zip(*(c.times[p] for c in cases))] for p in PATHS}
        overall = summarize("all layers", sums, statistics.mean(r["active_share"] for r in layers), tokens)
        overall["flops_all"] = sum(r["flops_all"] for r in layers)
        overall["flops_adaptive"] = sum(r["flops_adaptive"] for r in layers)
    result = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(torch.device("cpu")),
        "input": describe,
        "rounds": args.rounds,
        "calls": args.calls,
        "warmup": args.warmup,
        "layers": layers,
        "overall": overall,
        "passed": all(row["passed"] for row in layers + ([overall] if overall else [])),
    }
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
