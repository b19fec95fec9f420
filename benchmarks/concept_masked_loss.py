"""Masked-position loss vs full-vocabulary logits for the concept encoder's Perceiver MLM head.

Same model, same batch, same process, side by side: (a) ``model(input_ids, labels=labels)``, which
projects only the labelled (15%) positions to the vocabulary, and (b) full ``[B, L, V]`` logits then
cross-entropy with ignore_index — what the original's PosOnly/TSDAE path did. Both give the same loss
(checked before timing). Reported: forward+backward time per step (median over interleaved rounds)
and the step's peak allocation (CUDA: max_memory_allocated; CPU: the allocator events of one step
replayed from torch.profiler, as in benchmarks/throughput.py).

    python benchmarks/concept_masked_loss.py                  # V=30522 (BERT's vocabulary), CPU
    python benchmarks/concept_masked_loss.py --device cuda --batch 64 --length 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import machine_info, step_peak_bytes, synchronize  # noqa: E402

from decollapse.configuration.concept import ConceptEncoderConfig  # noqa: E402
from decollapse.modeling.concept import ConceptEncoderForMaskedLM  # noqa: E402


class Path_:
    def __init__(self, model, sparse: bool):
        self.model, self.sparse = model, sparse

    def loss(self, batch):
        ids, labels = batch
        if self.sparse:
            return self.model(input_ids=ids, labels=labels).loss
        logits = self.model(input_ids=ids).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    def step(self, batch):
        self.model.zero_grad(set_to_none=True)
        self.loss(batch).backward()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--concepts", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ConceptEncoderConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_concepts=args.concepts, num_hidden_layers=args.layers,
        max_position_embeddings=args.length, num_attention_heads=max(1, args.hidden // 64),
    )
    model = ConceptEncoderForMaskedLM(config).to(device).train()
    ids = torch.randint(7, args.vocab, (args.batch, args.length), device=device)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape, device=device) < 0.15
    labels[chosen] = ids[chosen]
    batch = (ids, labels)
    sparse, full = Path_(model, True), Path_(model, False)
    torch.testing.assert_close(sparse.loss(batch), full.loss(batch), rtol=1e-4, atol=1e-4)
    for path in (sparse, full):
        path.step(batch)  # warm-up
    times = {"sparse": [], "full": []}
    for r in range(args.rounds):
        order = [("sparse", sparse), ("full", full)] if r % 2 == 0 else [("full", full), ("sparse", sparse)]
        for name, path in order:
            synchronize(device)
            start = time.perf_counter()
            path.step(batch)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    peaks = {name: step_peak_bytes(path, batch, device) for name, path in (("sparse", sparse), ("full", full))}
    info = machine_info(device)
    print(f"concept MLM loss path: masked positions only vs full [B, L, V] logits — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {info} | command: python benchmarks/concept_masked_loss.py {' '.join(argv or sys.argv[1:])}")
    print(f"shape: B={args.batch} L={args.length} V={args.vocab} H={args.hidden} C={args.concepts} layers={args.layers}, "
          f"{int(chosen.sum())} masked positions ({chosen.float().mean():.1%})")
    print("\n| path | fwd+bwd ms (median) | step peak MiB |\n|---|---|---|")
    for name in ("sparse", "full"):
        print(f"| {name} | {1000 * statistics.median(times[name]):.1f} | {peaks[name] / 2**20:.1f} |")
    speed = statistics.median(times["full"]) / statistics.median(times["sparse"])
    print(f"\nmasked-only is {speed:.2f}x faster and allocates {peaks['full'] / max(peaks['sparse'], 1):.2f}x less at its peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
