"""Experiment, not a library path: can a prefix/band split of the packed MoH attention reach the target?

``benchmarks/moh_attention.py`` times the shipped sparse path (``MoHAttention._active_heads_only``),
which gives each packed query chunk one float mask over all the keys it may see. The mask costs as
much memory traffic as the scores. This script times an alternative on the same synthetic layer:
for each chunk of packed slots (all heads batched, GQA keys repeated), the keys before the chunk's
earliest position are visible to every query and go through the CPU flash kernel *unmasked*; only
the band between the earliest and latest position is masked. The two partial softmaxes are merged
with their log-sum-exps, which the public ``F.scaled_dot_product_attention`` does not return, so this
uses the private ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (CPU, float32 only).
That private op is why the idea is measured here and not shipped.

    python benchmarks/moh_prefix_band.py --preset long --chunk 128

Prints the median time per call of ``all``, the shipped sparse path and this variant, and the
variant's max abs difference from the dense weighted output (it must be ~1e-6).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moh_attention  # noqa: E402
from throughput import machine_info  # noqa: E402

flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def prefix_band_attention(layer, hidden_states: torch.Tensor, chunk: int) -> torch.Tensor:
    """The layer's causal sparse output, attention split into an unmasked prefix and a masked band."""
    batch, seq_len, _ = hidden_states.shape
    heads, dim = layer.num_heads, layer.head_dim
    group = heads // layer.num_kv_heads
    routing = layer.router(hidden_states)
    weights = routing.weights.masked_fill(~routing.active, 0).transpose(1, 2)  # (B, H, T)
    active = weights != 0

    def per_head(proj, n):
        return proj(hidden_states).view(batch, seq_len, n, dim).transpose(1, 2)

    key = per_head(layer.k_proj, layer.num_kv_heads).repeat_interleave(group, 1)
    value = per_head(layer.v_proj, layer.num_kv_heads).repeat_interleave(group, 1)
    query = per_head(layer.q_proj, heads)
    order = torch.sort((~active).to(torch.uint8), dim=-1, stable=True).indices  # active positions first
    counts = active.sum(-1)  # (B, H)
    slots = int(counts.max())
    out = hidden_states.new_zeros(batch, heads, seq_len, dim)
    key_pos = torch.arange(seq_len)
    for start in range(0, slots, chunk):
        index = order[:, :, start : min(start + chunk, slots)]  # (B, H, c)
        slot_active = torch.arange(start, start + index.shape[-1]) < counts.unsqueeze(-1)
        # Tail slots (inactive tokens, weight 0) get the chunk's latest position: they see every key,
        # so their softmax is finite, and they do not widen the band.
        lo = int(index.masked_fill(~slot_active, seq_len).min())
        hi = int(index.masked_fill(~slot_active, -1).max()) + 1
        position = torch.where(slot_active, index, hi - 1)
        q = query.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, dim))
        band_bias = torch.zeros(batch, heads, index.shape[-1], hi - lo)
        band_bias.masked_fill_(key_pos[lo:hi] > position.unsqueeze(-1), float("-inf"))
        attended, band_lse = flash_with_lse(q, key[:, :, lo:hi], value[:, :, lo:hi], attn_mask=band_bias)
        if lo > 0:
            prefix, prefix_lse = flash_with_lse(q, key[:, :, :lo], value[:, :, :lo])
            # softmax over prefix ∪ band = prefix·σ(lse_p - lse_b) + band·σ(lse_b - lse_p)
            attended = torch.lerp(prefix, attended, torch.sigmoid(band_lse - prefix_lse).unsqueeze(-1))
        slot_weight = weights.gather(2, index).unsqueeze(-1)
        out.scatter_(2, index.unsqueeze(-1).expand(-1, -1, -1, dim), attended * slot_weight)
    return layer.o_proj(out.transpose(1, 2).reshape(batch, seq_len, heads * dim))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(moh_attention.PRESETS), default="long")
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--chunk", type=int, default=128, help="packed slots per kernel call")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    bench_args = moh_attention.parse_args(["--preset", args.preset, "--share", str(args.share)])
    (case,), describe = moh_attention.synthetic_cases(bench_args)
    layer, x = case.adaptive, case.x
    paths = {
        "all": lambda: case.dense(x, None, True),
        "shipped sparse": lambda: layer(x, None, True),
        "prefix/band": lambda: prefix_band_attention(layer, x, args.chunk),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        layer.skip_inactive = "never"
        reference = layer(x, None, True)[0]
        layer.skip_inactive = "inference"
        error = (prefix_band_attention(layer, x, args.chunk) - reference).abs().max().item()
        for fn in paths.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in paths.items():
                begin = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - begin)
    all_time = statistics.median(times["all"])
    print(f"command: python benchmarks/moh_prefix_band.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    info = machine_info(torch.device("cpu"))
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores, torch threads {info['torch_threads']}, torch {info['torch']}")
    print(f"input: {describe}; chunk {args.chunk}")
    print(f"prefix/band max |diff| from the dense weighted output: {error:.2e}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>15}: {median * 1e3:7.1f} ms/call  speedup vs all {all_time / median:.2f}x")
    print(f"target at share {args.share}: {moh_attention.target_speedup(args.share):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
