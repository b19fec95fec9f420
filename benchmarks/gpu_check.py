"""The GPU checks, ready to run in one call on a CUDA machine; on a CPU it says what it skipped.

    python benchmarks/gpu_check.py                      # every architecture
    python benchmarks/gpu_check.py --archs dense,moh --steps 100 --out /tmp/gpu_check

For each architecture, on the first CUDA device:

1. **bf16 training**: ``decollapse train ARCH --max-steps N --set bf16=true`` on the embedded corpus,
   in a subprocess (a failure of one architecture does not stop the others); recorded: exit code,
   wall time, held-out loss / perplexity, and whether every logged loss is finite.
2. **throughput**: ``benchmarks/throughput.py ARCH --device cuda --json …`` (float32, SDPA attention,
   interleaved rounds against dense and the ``transformers`` reference, as on CPU).
3. **sharded engines**: ``accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes G
   -m decollapse train ARCH --max-steps 20`` over the G CUDA devices there are (one is enough to
   exercise the wrapping, the collective save and the final report), and the same with
   ``deepspeed_zero3.yaml`` when DeepSpeed is installed; recorded: exit code and the engine that
   ``metrics.json`` says trained the model.

4. **Mixture-of-Heads head skipping with a GPU kernel** (once, not per architecture): a MoH model with
   top-k routing at half the heads, skipping inactive heads through the compiled ``flex_attention``
   block mask (``skip_kernel=flex``) and through per-head SDPA calls (``sdpa``), against all heads
   (``routing=all``, SDPA's flash kernel), each in bf16: inference forward and a training step
   (``skip_inactive_heads=always``), median of interleaved rounds. Target: all-heads time ÷ flex time
   ≥ 1.33 at half the heads.

Everything goes to ``--out`` (``summary.json`` and each step's log), and a summary table is printed.

On a machine without CUDA every check is skipped with one line saying so, and the script exits 0.
It is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def bf16_training(arch: str, steps: int, out: Path) -> dict:
    run = out / f"train-{arch}"
    command = [sys.executable, "-m", "decollapse", "train", arch, "--max-steps", str(steps), "--output-dir",
               str(run), "--overwrite", "--no-progress", "--set", "bf16=true"]
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    (out / f"train-{arch}.log").write_text(done.stdout + done.stderr)
    result = {"command": " ".join(command[1:]), "exit_code": done.returncode, "seconds": round(time.time() - start, 1)}
    if done.returncode == 0:
        metrics = json.loads((run / "metrics.json").read_text())["metrics"]
        log = json.loads((run / "training_log.json").read_text())
        result["finite_losses"] = all(math.isfinite(e["loss"]) for e in log if "loss" in e)
        result["metrics"] = {k: v for k, v in metrics.items() if k.endswith(("_loss", "_perplexity"))}
    return result


def throughput(arch: str, out: Path) -> dict:
    path = out / f"throughput-{arch}.json"
    command = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), arch, "--device", "cuda",
               "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    (out / f"throughput-{arch}.log").write_text(done.stdout + done.stderr)
    result = {"command": " ".join(command[1:]), "exit_code": done.returncode}
    if done.returncode == 0 and path.is_file():
        payload = json.loads(path.read_text())
        result["ratio_to_reference"] = payload["ratio"]["median"]
        if "ratio_dense_matched" in payload:
            result["ratio_to_dense"] = payload["ratio_dense_matched"]["median"]
        result["gpu"] = payload["machine"].get("gpu")
    return result


def sharded_training(arch: str, config: str, out: Path) -> dict:
    run = out / f"{config}-{arch}"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "examples" / "accelerate" / f"{config}.yaml"), "--num_processes",
               str(torch.cuda.device_count()), "-m", "decollapse", "train", arch, "--max-steps", "20",
               "--output-dir", str(run), "--overwrite", "--no-progress"]
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    (out / f"{config}-{arch}.log").write_text(done.stdout + done.stderr)
    result = {"command": " ".join(command[1:]), "exit_code": done.returncode, "seconds": round(time.time() - start, 1)}
    if done.returncode == 0:
        result["engine"] = json.loads((run / "metrics.json").read_text()).get("engine")
    return result


def moh_head_skipping(rounds: int = 10, seq_len: int = 2048, batch: int = 4) -> dict:
    """Seconds per inference forward and per training step of MoH at half the heads (top-k) with each
    skip kernel, against all heads; interleaved rounds, medians. CUDA only."""
    import statistics

    from decollapse.configuration.moh import MoHConfig
    from decollapse.modeling.moh import MoHForCausalLM

    shape = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, intermediate_size=2048, max_position_embeddings=seq_len)
    variants = {
        "all": dict(routing="all"),
        "sdpa": dict(routing="topk", routing_top_k=4, skip_inactive_heads="always", skip_kernel="sdpa"),
        "flex": dict(routing="topk", routing_top_k=4, skip_inactive_heads="always", skip_kernel="flex"),
    }
    torch.manual_seed(0)
    models = {name: MoHForCausalLM(MoHConfig(**shape, **extra)).cuda() for name, extra in variants.items()}
    ids = torch.randint(5, 8192, (batch, seq_len), device="cuda")

    def infer(model):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids)

    def train_step(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    result = {"shape": {**shape, "batch": batch, "heads_active": "4 of 8"}}
    for phase, step in (("inference", infer), ("training", train_step)):
        times = {name: [] for name in models}
        for name, model in models.items():  # warm-up: compilation and autotuning stay out of the timing
            for _ in range(3):
                step(model)
        torch.cuda.synchronize()
        for r in range(rounds):
            names = list(models)[r % 3:] + list(models)[: r % 3]
            for name in names:
                start = time.perf_counter()
                step(models[name])
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        result[phase] = {"seconds": medians, "all_over_flex": medians["all"] / medians["flex"],
                         "all_over_sdpa": medians["all"] / medians["sdpa"]}
    return result


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from decollapse.registry import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=300, help="bf16 training steps per architecture")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for the logs and summary.json")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        print(f"--archs: unknown {', '.join(unknown)}; expected some of {', '.join(ARCHITECTURES)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        for arch in archs:
            print(f"{arch}: skipped bf16 training and throughput and sharded (FSDP, ZeRO-3) training: "
                  f"no CUDA device here (torch {torch.__version__})")
        print(f"moh head skipping (flex_attention): skipped: no CUDA device here (torch {torch.__version__})")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": args.steps, "archs": {}}
    import importlib.util

    engines = ["fsdp"] + (["deepspeed_zero3"] if importlib.util.find_spec("deepspeed") is not None else [])
    for arch in archs:
        summary["archs"][arch] = {"bf16_training": bf16_training(arch, args.steps, args.out),
                                  "throughput": throughput(arch, args.out),
                                  **{engine: sharded_training(arch, engine, args.out) for engine in engines}}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"GPU: {summary['gpu']}, torch {summary['torch']}, {args.steps} bf16 steps per architecture")
    print(f"| arch | bf16 train (exit, s, finite) | val loss | throughput ÷ reference | ÷ dense | "
          f"{' | '.join(f'{e} (exit, engine)' for e in engines)} |")
    print("|---|---|---|---|---|" + "---|" * len(engines))
    for arch, entry in summary["archs"].items():
        train, speed = entry["bf16_training"], entry["throughput"]
        loss = train.get("metrics", {}).get("validation_loss")
        sharded = " | ".join(f"{entry[e]['exit_code']}, {entry[e].get('engine', '-')}" for e in engines)
        print(f"| {arch} | {train['exit_code']}, {train['seconds']}, {train.get('finite_losses')} | "
              f"{'-' if loss is None else f'{loss:.4f}'} | {speed.get('ratio_to_reference', '-')} | "
              f"{speed.get('ratio_to_dense', '-')} | {sharded} |")
    try:
        summary["moh_head_skipping"] = moh_head_skipping()
    except Exception as err:  # a measurement: report the failure, keep the rest
        summary["moh_head_skipping"] = {"error": f"{type(err).__name__}: {err}"}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    skipping = summary["moh_head_skipping"]
    for phase in ("inference", "training"):
        if phase in skipping:
            print(f"moh head skipping, {phase}: all heads ÷ flex {skipping[phase]['all_over_flex']:.2f}x, "
                  f"÷ per-head SDPA {skipping[phase]['all_over_sdpa']:.2f}x (target flex >= 1.33x)")
    if "error" in skipping:
        print(f"moh head skipping: {skipping['error']}")
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
