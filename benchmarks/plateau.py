"""When and how a causal LM leaves the embedded corpus's early plateau, read from a run's checkpoints.

Every model trained on the embedded corpus first sits at about 4.6 nats, predicting each token from the
one before it, and leaves that plateau when it starts inferring the document's domain from its context
(docs/CORPUS.md). This script reads runs trained with checkpoints, e.g.

    decollapse train dawn --set train.save_steps=250 train.save_total_limit=40 --output-dir runs/dawn
    decollapse train dense --set intermediate_size=1536 train.save_steps=250 train.save_total_limit=40 \\
        --output-dir runs/dense
    PYTHONPATH=. python benchmarks/plateau.py runs/dawn runs/dense --until 2500

and prints, per run, the **escape step** (the first logged step at which the mean of five consecutive
training task losses is under ``--threshold`` nats, 4.0 by default) and, per checkpoint (with ``--final``,
also for the trained model the run folder itself holds):

- ``loss``: the training task loss logged at that step;
- ``attn H/Hmax``: per layer and head, the entropy of the causal attention of every module with a fused
  ``qkv_proj`` (dense's attention, DAWN's router context attention), divided by the entropy of uniform
  attention over the same prefix (1 = averages the whole prefix, 0 = looks at one token), over query
  positions 16 and later of 16 validation rows;
- ``domain probe``: per layer, the accuracy of a linear probe (multinomial logistic regression, L2 1e-3,
  L-BFGS) that reads the token's domain label from the hidden state after that layer, fit on 64 training
  rows and scored on 32 validation rows. The majority domain's share of the probe tokens is printed with it.

The model is built from the checkpoint folder alone (``AutoModelForCausalLM.from_pretrained``); the
corpus is the embedded default, so a run must have been trained on it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import decollapse  # noqa: F401  (registers the Auto classes)
from decollapse.data import build_synthetic_corpus

MIN_QUERY = 16  # early positions have few tokens to attend to; their entropy says little


def escape_step(log: list[dict], threshold: float, window: int = 5) -> int | None:
    losses = [entry for entry in log if "task_loss" in entry]
    for end in range(window, len(losses) + 1):
        if sum(entry["task_loss"] for entry in losses[end - window:end]) / window < threshold:
            return losses[end - 1]["step"]
    return None


def training_log(run: Path, checkpoints: list[Path]) -> list[dict]:
    if (run / "training_log.json").is_file():
        return json.loads((run / "training_log.json").read_text())
    if checkpoints:  # a run stopped early: its newest checkpoint holds the log so far
        return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    return []


def checkpoints_of(run: Path) -> list[Path]:
    folder = run.with_name(run.name + ".checkpoints")
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def forward_with_hooks(model, input_ids: torch.Tensor, hooks: list[tuple[torch.nn.Module, object]]) -> None:
    """One no-grad forward pass with ``(module, forward hook)`` pairs attached for its duration."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()


def attention_entropy(model, input_ids: torch.Tensor) -> list[list[float]]:
    """Per attention module (in model order) and head: mean entropy of the causal attention ÷ log(prefix length)."""
    captured: list[tuple[torch.nn.Module, torch.Tensor]] = []
    modules = [m for m in model.modules() if hasattr(m, "qkv_proj") and hasattr(m, "num_heads")]
    forward_with_hooks(model, input_ids, [
        (m.qkv_proj, lambda mod, args, out, m=m: captured.append((m, out))) for m in modules
    ])
    out = []
    seq_len = input_ids.shape[1]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    uniform = torch.arange(1, seq_len + 1).float().log()[MIN_QUERY:]
    for module, qkv in captured:
        batch, _, width3 = qkv.shape
        width = width3 // 3
        heads = module.num_heads
        query, key, _ = (p.view(batch, seq_len, heads, width // heads).transpose(1, 2) for p in qkv.split(width, -1))
        scores = (query @ key.transpose(-1, -2) / math.sqrt(width // heads)).masked_fill(future, float("-inf"))
        p = scores.softmax(-1)[..., MIN_QUERY:, :]
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (B, H, T')
        out.append((entropy / uniform).mean((0, 2)).tolist())
    return out


def layer_states(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    states: dict[int, torch.Tensor] = {}
    layers = model.base_model.layers
    forward_with_hooks(model, input_ids, [
        (layer, lambda mod, args, out, i=i: states.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(layers)
    ])
    return [states[i] for i in range(len(layers))]


def probe_accuracy(train_x, train_y, test_x, test_y, num_classes: int) -> float:
    keep, keep_test = train_y >= 0, test_y >= 0
    train_x, train_y, test_x, test_y = train_x[keep], train_y[keep], test_x[keep_test], test_y[keep_test]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(-1) == test_y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of `decollapse train` (checkpoints beside them)")
    parser.add_argument("--threshold", type=float, default=4.0, help="escape: mean of 5 logged task losses under this")
    parser.add_argument("--until", type=int, default=None, help="read checkpoints up to this step")
    parser.add_argument("--final", action="store_true",
                        help="also read the trained model in the run folder itself, as the last row ('final')")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    corpus = build_synthetic_corpus().dataset
    probe_ids = torch.tensor(corpus["validation"][:32]["input_ids"])
    probe_domain = torch.tensor(corpus["validation"][:32]["domain"])
    fit_ids = torch.tensor(corpus["train"][:64]["input_ids"])
    fit_domain = torch.tensor(corpus["train"][:64]["domain"])
    num_domains = int(fit_domain.max()) + 1
    labelled = probe_domain[probe_domain >= 0]
    chance = float(torch.bincount(labelled).max() / labelled.numel())

    logs = {run: training_log(run, checkpoints_of(run)) for run in args.runs}
    for run, log in logs.items():  # every folder is checked before any is read further
        if not log:
            print(f"plateau.py: {run}: no training_log.json and no checkpoints beside it", file=sys.stderr)
            return 2
    for run, log in logs.items():
        checkpoints = checkpoints_of(run)
        if args.until is not None:
            checkpoints = [c for c in checkpoints if int(c.name.split("-")[-1]) <= args.until]
        if args.final and (run / "training_log.json").is_file():  # written when training finished
            checkpoints.append(run)
        logged = {entry["step"]: entry["task_loss"] for entry in log if "task_loss" in entry}
        print(f"\n{run}: escape step {escape_step(log, args.threshold)} (threshold {args.threshold} nats)\n")
        if not checkpoints:
            continue
        print(f"| step | loss | attn H/Hmax (per layer: heads) | domain probe per layer (majority domain {chance:.2f}) |")
        print("|---|---|---|---|")
        for checkpoint in checkpoints:
            final = checkpoint == run
            step = max(logged) if final else int(checkpoint.name.split("-")[-1])
            model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
            entropy = attention_entropy(model, probe_ids[:16])
            test_states, fit_states = layer_states(model, probe_ids), layer_states(model, fit_ids)
            accuracy = [
                probe_accuracy(fit.flatten(0, 1), fit_domain.flatten(), test.flatten(0, 1), probe_domain.flatten(), num_domains)
                for fit, test in zip(fit_states, test_states)
            ]
            loss = f"{logged[step]:.3f}" if step in logged else "–"
            heads = " / ".join(",".join(f"{h:.2f}" for h in layer) for layer in entropy)
            label = f"{step} (final)" if final else str(step)
            print(f"| {label} | {loss} | {heads} | {' / '.join(f'{a:.2f}' for a in accuracy)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
