"""Training throughput of a decollapse architecture against dense and the `transformers` reference, side by side.

    python benchmarks/throughput.py dense                      # default CPU recipe shape
    python benchmarks/throughput.py dense --preset medium      # a bigger shape
    python benchmarks/throughput.py dense --objective masked_lm --json /tmp/dense_mlm.json
    python benchmarks/throughput.py dawn                       # dawn vs dense and GPT-2 of matched size
    python benchmarks/throughput.py some                       # some vs dense of matched active size

What it measures (``benchmarks/README.md`` has the long form):

- **tokens/s** over full training steps (forward + backward + AdamW step + the model's
  ``after_optimizer_step()`` hook where it has one, as ``DecollapseTrainer`` calls it + zero_grad), all models in
  train mode with dropout 0, SDPA attention and the same optimizer.
  - For ``dense``: two models, decollapse dense and the reference of identical width, depth, heads,
    MLP width, vocabulary and sequence length (``GPT2LMHeadModel`` for causal_lm,
    ``BertForMaskedLM`` for masked_lm). Target: dense/reference >= 0.95x.
  - For any other architecture: three models, the architecture itself, ``decollapse dense`` and the
    reference, the last two at the architecture's width, depth, heads, vocabulary and sequence length
    with the MLP width (``intermediate_size``) that brings dense's total parameter count closest to
    the architecture's (dense's count is affine in it: counted at two widths, solved, rounded). So the
    reference is "GPT-2 (or BERT) of matched size". A routed architecture whose model has
    ``num_active_parameters()`` (SoME) is matched on the parameters one token uses instead, since
    most of its parameters sit in experts a token does not run. Target: architecture/dense-matched
    >= 0.70x.
  ``--set`` overrides apply to the architecture under test only; dense and the reference copy the
  shape read back from its built config (so ``--set hidden_size=...`` moves all of them).
  The models are timed in **interleaved rounds in one process**, the order rotated each round
  (A B, B A, ... for two; A B C, B C A, C A B, ... for three) so that drift and background noise hit
  all equally and none always runs first; each round is a few untimed warm-up steps then ``--steps``
  timed steps. Reported: the median and min-max of per-round tokens/s, and each ratio (decollapse/
  reference; for non-dense architectures also decollapse/dense-matched) as the median and min-max of
  the per-round ratios (round r of one model against round r of the other).
- **peak memory** of one training step per model, isolated from the other models living in the same
  process: bytes of the model's parameters and optimizer state, plus the high-water mark of what the
  step allocates on top (activations, gradients, temporaries). On CUDA the high-water mark comes from
  ``torch.cuda.max_memory_allocated``; on CPU from replaying the allocator events that
  ``torch.profiler`` records with ``profile_memory=True`` (every allocation and free of the step,
  in order). Memory that libraries allocate outside PyTorch's allocator (oneDNN/BLAS scratch) is
  not seen on CPU.
- **MFU**: model FLOPs per token by nanoGPT's ``estimate_mfu`` convention, 6 * N + 12 * L * d * T with
  N the non-embedding parameters plus the output projection counted once (6 * d * V, embeddings
  are tied), against the machine's float32 matmul peak measured in the same process with the same
  thread count. The count is the same formula for every model; where a model skips work the formula
  counts (decollapse's masked-LM head projects only the labelled 15% of positions; a routed
  architecture does not use every parameter once per token), its MFU reads high, and where it does
  work the formula does not count, its MFU reads low. For a non-dense architecture read it as a
  parameter-count proxy, not its FLOPs.

It is a measurement, not a test: it exits 0 whatever the ratios are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
import typing

import torch
import transformers

import decollapse  # noqa: F401  (importing registers the architectures)
from decollapse.registry import ARCHITECTURES

# Tokenizer size of the default embedded corpus (decollapse.data.synthetic, default config):
# 2,266 generator words ([EOD] and punctuation included) + 7 special tokens. Hard-coded because
# building the corpus to count it takes seconds and is not what this script measures.
CORPUS_VOCAB = 2273

# Shapes: "default" is the decollapse CPU recipe (d=64, 2 layers, batch 4 x 128 tokens, see
# docs/CORPUS.md); "medium" is a shape where matmuls dominate more.
# Each preset also sets the timing defaults that keep one run near a minute on two CPU cores.
PRESETS: dict[str, dict[str, int]] = {
    "default": {
        "hidden_size": 64, "layers": 2, "heads": 2, "vocab": CORPUS_VOCAB, "seq_len": 128, "batch_size": 4,
        "rounds": 40, "steps": 20, "warmup": 3,
    },
    "medium": {
        "hidden_size": 256, "layers": 4, "heads": 4, "vocab": CORPUS_VOCAB, "seq_len": 128, "batch_size": 8,
        "rounds": 12, "steps": 10, "warmup": 2,
    },
}
SHAPE_KEYS = ("hidden_size", "layers", "heads", "vocab", "seq_len", "batch_size")
MASK_RATE = 0.15  # share of positions that carry a masked-LM label (BERT's rate)
IGNORE_INDEX = -100
BATCH_POOL = 4  # distinct random batches cycled through (same sequence for both models)
DENSE_TARGET = 0.95  # dense must train at >= 95% of GPT-2's speed
ARCH_TARGET = 0.70  # any other architecture: >= 70% of the speed of dense of matched parameter count
MIB = 2**20


# --------------------------------------------------------------------------------------------------
# Building the models
# --------------------------------------------------------------------------------------------------


def _convert_setting(key: str, raw: str, annotation: typing.Any) -> typing.Any:
    """``raw`` converted to the type the config field is annotated with (unions tried in order)."""
    if isinstance(annotation, str):  # unresolved forward reference: guess from the text
        return json.loads(raw) if raw[:1] in "[{" else _guess(raw)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null"):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert_setting(key, raw, arg)
            except ValueError:
                continue
        raise ValueError(f"--set {key}={raw!r}: does not fit {annotation}")
    if annotation is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw!r}: expected a boolean")
    if annotation in (int, float, str):
        try:
            return annotation(raw)
        except ValueError:
            raise ValueError(f"--set {key}={raw!r}: expected {annotation.__name__}") from None
    if origin in (dict, list) or annotation in (dict, list):
        return json.loads(raw)
    return _guess(raw)


def _guess(raw: str) -> typing.Any:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(raw.lower(), raw)


def _field_annotation(config_class: type, name: str) -> typing.Any:
    """The annotation of field ``name``, evaluated in the module of the class that declares it (one
    field at a time: ``typing.get_type_hints`` fails on the whole MRO when any base annotation
    names something its module does not import at runtime)."""
    for klass in config_class.__mro__:
        annotation = vars(klass).get("__annotations__", {}).get(name)
        if annotation is None:
            continue
        if isinstance(annotation, str):
            module = sys.modules.get(klass.__module__)
            try:
                return eval(annotation, vars(module) if module else {}, {})  # noqa: S307 (own source)
            except Exception:
                return annotation
        return annotation
    return str


def config_overrides(config_class: type, assignments: list[str]) -> dict[str, typing.Any]:
    """``--set key=value`` items checked against the config's fields and converted to their types."""
    names = {f.name for f in dataclasses.fields(config_class)}
    out = {}
    for item in assignments:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SystemExit(f"--set {key}: {config_class.__name__} has no such field{hint}")
        try:
            out[key] = _convert_setting(key, raw, _field_annotation(config_class, key))
        except (ValueError, json.JSONDecodeError) as err:
            raise SystemExit(str(err)) from None
    return out


def build_decollapse(arch_name: str, objective: str, shape: dict[str, int], overrides: dict) -> torch.nn.Module:
    arch = ARCHITECTURES[arch_name]
    config_class = arch.config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    wanted = {
        "vocab_size": shape["vocab"],
        "hidden_size": shape["hidden_size"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "max_position_embeddings": shape["seq_len"],
        "objective": objective,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }
    kwargs = {k: v for k, v in wanted.items() if k in fields}
    kwargs.update(overrides)
    try:
        config = config_class(**kwargs)
    except ValueError as err:  # the config's own validation: say which setting, no traceback
        raise SystemExit(f"{config_class.__name__}: {err}") from None
    return arch.model_for_objective(objective)(config)


def reference_shape(model: torch.nn.Module, shape: dict[str, int]) -> dict[str, int]:
    """The shape the reference (and dense-matched) must copy, read back from the built decollapse
    config (``--set`` may have changed it). For a non-dense architecture ``main`` then replaces
    ``intermediate_size`` with the matched width."""
    config = model.config
    hidden = config.hidden_size
    return {
        "hidden_size": hidden,
        "layers": config.num_hidden_layers,
        "heads": getattr(config, "num_attention_heads", shape["heads"]),
        "intermediate_size": getattr(config, "intermediate_size", None) or 4 * hidden,
        "vocab": config.vocab_size,
        "seq_len": shape["seq_len"],
    }


def matched_intermediate_size(objective: str, ref: dict[str, int], target_params: int) -> int:
    """The ``intermediate_size`` at which ``dense`` of shape ``ref`` has the total parameter count
    closest to ``target_params``.

    Dense's count is affine in the MLP width (per layer ``d * F + F`` up and ``F * d`` down, the rest
    does not depend on F), so it is counted at F = 1 and F = 2, solved for ``target_params`` and
    rounded to the nearest integer (at least 1). The caller builds dense at that width and reports its
    actual count.
    """
    counts = [count_params(build_decollapse("dense", objective, ref, {"intermediate_size": f}))[0] for f in (1, 2)]
    per_unit = counts[1] - counts[0]
    return max(1, round(1 + (target_params - counts[0]) / per_unit))


def build_reference(objective: str, ref: dict[str, int], activation: str | None) -> torch.nn.Module:
    if objective == "causal_lm":
        config = transformers.GPT2Config(
            vocab_size=ref["vocab"],
            n_positions=ref["seq_len"],
            n_embd=ref["hidden_size"],
            n_layer=ref["layers"],
            n_head=ref["heads"],
            n_inner=ref["intermediate_size"],
            activation_function=activation or "gelu_new",  # GPT-2's own default
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=None,  # GPT-2's 50256 lies outside a small vocabulary; no step reads them
            eos_token_id=None,
            attn_implementation="sdpa",
        )
        model = transformers.GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # what it falls back to anyway, minus the warning
    else:
        config = transformers.BertConfig(
            vocab_size=ref["vocab"],
            hidden_size=ref["hidden_size"],
            num_hidden_layers=ref["layers"],
            num_attention_heads=ref["heads"],
            intermediate_size=ref["intermediate_size"],
            max_position_embeddings=ref["seq_len"],
            hidden_act=activation or "gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        model = transformers.BertForMaskedLM(config)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"reference built with {model.config._attn_implementation!r} attention, not sdpa")
    return model


def count_params(model: torch.nn.Module) -> tuple[int, int, int]:
    """(all parameters, non-embedding parameters, output-projection parameters d * V).

    ``model.parameters()`` yields a tied weight once. Non-embedding = everything outside
    ``nn.Embedding`` modules (token, position, token-type tables); the tied LM head is the token
    table, so it is excluded here and counted once as the output projection in the FLOPs.
    """
    total = sum(p.numel() for p in model.parameters())
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in embedding)
    out = model.get_output_embeddings()
    head = out.weight.numel()
    if id(out.weight) not in embedding:  # untied head: already in non_embedding, do not count it twice
        head = 0
    return total, non_embedding, head


def flops_per_token(non_embedding: int, head: int, layers: int, hidden: int, seq_len: int) -> int:
    """nanoGPT's estimate_mfu: 6 FLOPs per parameter per token (2 forward + 4 backward) for every
    matmul weight, plus 12 * L * d * T for the attention score and value matmuls (forward + backward;
    the causal mask is not discounted)."""
    return 6 * (non_embedding + head) + 12 * layers * hidden * seq_len


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def make_batches(objective: str, vocab: int, batch: int, seq_len: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(BATCH_POOL):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
        if objective == "causal_lm":
            labels = ids.clone()
        else:
            selected = torch.rand(batch, seq_len, generator=gen) < MASK_RATE
            selected[0, 0] = True  # never an empty batch
            labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        batches.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return batches


class Trainee:
    """One model, its optimizer and the training step that gets timed."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
        self.name = name
        self.model = model.to(device).train()
        # Same constructor defaults for both (foreach / fused as PyTorch picks them for the device).
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.round_tokens_per_s: list[float] = []

        # The state a model moves outside the optimizer (SoME's key stores, usage and balance bias) is
        # part of its training step: DecollapseTrainer calls this hook after every optimizer step. Timing
        # without it would also leave that state frozen, a routing no real run reaches.
        self.after_step = getattr(self.model, "after_optimizer_step", None)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step()
        self.optimizer.zero_grad(set_to_none=True)

    def static_bytes(self) -> int:
        """Parameters and optimizer state, the part of the footprint that outlives a step."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return total


def ratio_summary(numerator: Trainee, denominator: Trainee, target: float | None) -> dict[str, typing.Any]:
    """Per-round tokens/s ratios (round r against round r): median, min-max, middle half."""
    ratios = [a / b for a, b in zip(numerator.round_tokens_per_s, denominator.round_tokens_per_s)]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "p25": quartiles[0],
        "p75": quartiles[2],
        "per_round": ratios,
        "target": target,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round(trainee: Trainee, batches, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps after ``warmup`` untimed ones."""
    for i in range(warmup):
        trainee.step(batches[i % len(batches)])
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        trainee.step(batches[(warmup + i) % len(batches)])
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side prints start/stop lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_peak_bytes(trainee: Trainee, batch, device: torch.device) -> int:
    """High-water mark of what one training step allocates above what existed before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        trainee.step(batch)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainee.step(batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # Each "[memory]" event is one allocation (+bytes) or free (-bytes) of the CPU allocator. Frees of
    # blocks allocated before profiling started are not reported, so the running sum counts exactly
    # what the step itself allocated and how much of it was alive at once.
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
        key=lambda e: e["ts"],
    )
    alive = peak = 0
    for event in memory:
        alive += event["args"]["Bytes"]
        peak = max(peak, alive)
    return peak


def matmul_peak_flops(device: torch.device, size: int, repeats: int) -> float:
    """Best float32 FLOP/s of a ``size`` x ``size`` matmul: the machine's practical peak here."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)  # warm-up (thread pool, BLAS packing buffers, CUDA context)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def op_breakdown(trainee: Trainee, batch, top: int) -> str:
    """Top ops by self time over one training step (for investigating a gap)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with quiet_stderr(), profile(activities=activities) as prof:
        trainee.step(batch)
    sort = "self_device_time_total" if next(trainee.model.parameters()).is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top)


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, typing.Any]:
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fmt_si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def ratio_line(name: str, ratio: dict[str, typing.Any], target: str | None) -> str:
    line = (
        f"ratio {name}: {ratio['median']:.3f}x [{ratio['min']:.3f}-{ratio['max']:.3f}] "
        f"(median [min-max] of {len(ratio['per_round'])} per-round ratios; "
        f"middle half {ratio['p25']:.3f}-{ratio['p75']:.3f})"
    )
    if target is not None:
        line += f"   target: >= {target}"
    return line


def render(result: dict[str, typing.Any]) -> str:
    m, s, t = result["machine"], result["shape"], result["timing"]
    matched = result.get("matched")
    if matched is None:
        title = f"vs transformers {result['reference']}"
    else:
        title = f"vs decollapse dense and transformers {result['reference']} of matched parameter count"
    order = "A B, B A, ..." if matched is None else "A B C, B C A, C A B, ..."
    lines = [
        f"decollapse throughput: {result['arch']} ({result['objective']}) {title}",
        f"date {result['date']} | {m['cpu']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}"
        + (f" | GPU {m['gpu']}" if "gpu" in m else "")
        + f" | device {m['device']} | torch {m['torch']}, transformers {m['transformers']}",
        f"shape: d={s['hidden_size']} L={s['layers']} heads={s['heads']} mlp={s['intermediate_size']} "
        f"V={s['vocab']}{' (embedded corpus)' if s['vocab'] == CORPUS_VOCAB else ''} T={s['seq_len']} "
        f"batch={s['batch_size']} ({s['batch_size'] * s['seq_len']} tokens/step)"
        + (f" | --set {result['overrides']}" if result["overrides"] else "")
        + (f" | reference activation {result['reference_activation']}" if result["reference_activation"] else ""),
    ]
    if matched is not None:
        arch, arch_mlp = result["arch"], matched["arch_intermediate_size"]
        lines.append(
            f"matched size: dense and {result['reference']} at mlp={matched['intermediate_size']}"
            + (f" ({arch}'s own mlp={arch_mlp})" if arch_mlp is not None else "")
            + f", the width at which dense's total parameter count comes closest to {arch}'s "
            f"{matched['matched_on']}; --set applies to {arch} only"
        )
        lines.append(
            f"  {matched['matched_on']}: {arch} {matched['arch_params']:,} | dense {matched['dense_params']:,} "
            f"({100 * (matched['dense_params'] / matched['arch_params'] - 1):+.3f}%) | "
            f"{result['reference']} {matched['reference_params']:,}"
        )
    lines += [
        f"timing: {t['rounds']} interleaved rounds ({order}) x {t['steps']} steps after {t['warmup']} "
        f"warm-up steps; AdamW lr={t['lr']} wd={t['weight_decay']}; fwd+bwd+step+after_optimizer_step+zero_grad",
        f"matmul peak: {fmt_si(result['matmul_peak_flops'], 'FLOP/s')} (fp32 {result['matmul_size']}^2, best of "
        f"{result['matmul_repeats']}); FLOPs/token = 6*(N_nonemb + d*V) + 12*L*d*T (nanoGPT estimate_mfu)",
        "",
    ]
    header = ("model", "params", "tokens/s median [min-max]", "peak mem", "FLOP/s", "MFU")
    rows = []
    for entry in result["models"]:
        tps = entry["tokens_per_s"]
        rows.append(
            (
                entry["label"],
                f"{entry['params'] / 1e6:.3f}M",
                f"{tps['median']:,.0f} [{tps['min']:,.0f}-{tps['max']:,.0f}]",
                f"{entry['peak_memory_bytes'] / MIB:.1f} MiB",
                fmt_si(entry["achieved_flops"], "FLOP/s"),
                f"{100 * entry['mfu']:.2f}%",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
    if matched is None:
        lines.append("\n" + ratio_line("decollapse/reference", result["ratio"], f"{DENSE_TARGET:.2f}x (dense)"))
    else:
        lines.append(
            "\n" + ratio_line("decollapse/dense-matched", result["ratio_dense_matched"],
                               f"{ARCH_TARGET:.2f}x ({result['arch']} vs dense of matched size)")
        )
        lines.append(ratio_line("decollapse/reference", result["ratio"], None))
    lines.append(
        "peak mem = parameters + AdamW state + high-water mark of one step's own allocations "
        + (
            "(torch.cuda.max_memory_allocated over the step)"
            if m["device"].startswith("cuda")
            else "(CPU allocator events replayed from torch.profiler profile_memory=True; "
            "BLAS/oneDNN scratch outside the allocator not included)"
        )
    )
    for entry in result["models"]:
        lines.append(
            f"  {entry['label']}: static {entry['static_bytes'] / MIB:.1f} MiB"
            f" + step {entry['step_peak_bytes'] / MIB:.1f} MiB; non-embedding params"
            f" {entry['non_embedding_params']:,}, FLOPs/token {entry['flops_per_token']:,}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("arch", choices=sorted(ARCHITECTURES), help="decollapse architecture")
    parser.add_argument("--objective", choices=("causal_lm", "masked_lm"), default="causal_lm")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="shape; flags below override it")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--vocab", type=int, help=f"default {CORPUS_VOCAB}: the embedded corpus's tokenizer size")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per round (preset: 20 default, 10 medium)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each round (preset: 3 / 2)")
    parser.add_argument("--rounds", type=int, help="rounds per model, interleaved (preset: 40 / 12)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="field of the config of the architecture under test (repeatable); not applied to "
                        "dense-matched or the reference, which copy only its shape")
    parser.add_argument("--reference-activation", default=None,
                        help="override the reference's MLP activation (GPT-2 default gelu_new; BERT: gelu)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before anything runs")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the top N ops of one profiled step of each model")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shape = {key: getattr(args, key) for key in SHAPE_KEYS}
    for name in ("steps", "rounds", *SHAPE_KEYS):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    arch = ARCHITECTURES[args.arch]
    if args.objective not in arch.objectives:
        raise SystemExit(f"{args.arch} has no {args.objective} head; it has: {', '.join(arch.objectives)}")
    overrides = config_overrides(arch.config_class, args.overrides)

    torch.manual_seed(args.seed)
    dec_model = build_decollapse(args.arch, args.objective, args.shape, overrides)
    ref = reference_shape(dec_model, args.shape)
    trainees = [Trainee(f"decollapse {args.arch}", dec_model, args.lr, args.weight_decay, device)]
    matched = None
    if args.arch != "dense":
        # dense and the reference at the architecture's shape, with the MLP width that matches its
        # total parameter count, or its *active* count per token for a routed architecture whose
        # model says how many parameters a token uses (SoME: all but the experts it is not routed
        # to). --set overrides stay with the architecture under test.
        active = getattr(dec_model, "num_active_parameters", None)
        arch_params = active() if active is not None else count_params(dec_model)[0]
        ref["intermediate_size"] = matched_intermediate_size(args.objective, ref, arch_params)
        torch.manual_seed(args.seed)
        dense_model = build_decollapse("dense", args.objective, ref, {"intermediate_size": ref["intermediate_size"]})
        trainees.append(Trainee("decollapse dense (matched)", dense_model, args.lr, args.weight_decay, device))
        matched = {
            "intermediate_size": ref["intermediate_size"],
            "arch_intermediate_size": getattr(dec_model.config, "intermediate_size", None),
            "arch_params": arch_params,
            "matched_on": "active parameters per token" if active is not None else "total parameters",
            "dense_params": count_params(dense_model)[0],
        }
    torch.manual_seed(args.seed)
    ref_model = build_reference(args.objective, ref, args.reference_activation)
    reference_name = type(ref_model).__name__
    trainees.append(Trainee(f"{reference_name}", ref_model, args.lr, args.weight_decay, device))
    if matched is not None:
        matched["reference_params"] = count_params(ref_model)[0]
    batches = make_batches(args.objective, ref["vocab"], args.shape["batch_size"], ref["seq_len"], device, args.seed)
    tokens_per_step = args.shape["batch_size"] * ref["seq_len"]

    peak_flops = matmul_peak_flops(device, args.matmul_size, args.matmul_repeats)

    for trainee in trainees:  # first contact: optimizer state, allocator pools, kernel selection
        timed_round(trainee, batches, steps=1, warmup=args.warmup, device=device)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection landing in one model's round would be charged to it alone
    try:
        for r in range(args.rounds):
            shift = r % len(trainees)  # rotate: A B, B A, ... / A B C, B C A, C A B, ...
            order = trainees[shift:] + trainees[:shift]
            for trainee in order:
                seconds = timed_round(trainee, batches, args.steps, args.warmup, device)
                trainee.round_tokens_per_s.append(tokens_per_step * args.steps / seconds)
    finally:
        if gc_was_enabled:
            gc.enable()
    # Re-measure the peak after the runs too and keep the best: turbo/thermal state may differ.
    peak_flops = max(peak_flops, matmul_peak_flops(device, args.matmul_size, args.matmul_repeats))

    models = []
    for trainee in trainees:
        step_peak = step_peak_bytes(trainee, batches[0], device)
        static = trainee.static_bytes()
        total, non_embedding, head = count_params(trainee.model)
        per_token = flops_per_token(non_embedding, head, ref["layers"], ref["hidden_size"], ref["seq_len"])
        tps = trainee.round_tokens_per_s
        median = statistics.median(tps)
        models.append(
            {
                "label": trainee.name,
                "class": type(trainee.model).__name__,
                "params": total,
                "non_embedding_params": non_embedding,
                "flops_per_token": per_token,
                "tokens_per_s": {"median": median, "min": min(tps), "max": max(tps), "per_round": tps},
                "static_bytes": static,
                "step_peak_bytes": step_peak,
                "peak_memory_bytes": static + step_peak,
                "achieved_flops": median * per_token,
                "mfu": median * per_token / peak_flops,
            }
        )
    ratio = ratio_summary(trainees[0], trainees[-1], DENSE_TARGET if args.arch == "dense" else None)
    result = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "arch": args.arch,
        "objective": args.objective,
        "reference": reference_name,
        "reference_activation": args.reference_activation,
        "overrides": overrides,
        "machine": machine_info(device),
        "shape": {**ref, "batch_size": args.shape["batch_size"], "preset": args.preset},
        "timing": {
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "seed": args.seed,
        },
        "matmul_peak_flops": peak_flops,
        "matmul_size": args.matmul_size,
        "matmul_repeats": args.matmul_repeats,
        "models": models,
        "ratio": ratio,
    }
    if matched is not None:
        result["matched"] = matched
        result["ratio_dense_matched"] = ratio_summary(trainees[0], trainees[1], ARCH_TARGET)
    print(render(result))
    if args.profile:
        for trainee in trainees:
            print(f"\n== one training step of {trainee.name}: top {args.profile} ops by self time ==")
            print(op_breakdown(trainee, batches[0], args.profile))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
