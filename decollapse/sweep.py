"""``decollapse recursive-sweep``: test-time compute scaling of a recursive concept encoder.

A recursive encoder applies one shared layer K times, and K may change after training. The sweep
evaluates a trained checkpoint at every requested K on the held-out split of the data it was trained
on (rebuilt from the run's ``metrics.json``), with the run's own evaluation collator (seeded, so every
K sees the same masks), and measures the concepts' rank on the run's probe batch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from .diagnose import DiagnoseError, load_checkpoint


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DiagnoseError(f"--k {text}: expected comma-separated positive integers, e.g. 2,4,6,8,12") from None
    if not ks or any(k <= 0 for k in ks):
        raise DiagnoseError(f"--k {text}: expected comma-separated positive integers, e.g. 2,4,6,8,12")
    return ks


def recursive_sweep(folder: Path, ks: list[int], split: str = "validation") -> list[dict]:
    """One row per K: ``k``, ``loss`` (the objective's held-out loss), ``within_erank`` and
    ``within_erank_ratio`` (entropy effective rank of each input's concepts, averaged),
    ``global_erank_nuclear`` (the original's batch-averaged Σσ/σ₁)."""
    from .runner import TrainJob, UsageError, build_collator, load_data, plan
    from .trainers import DecollapseTrainer, DecollapseTrainingArguments

    model = load_checkpoint(folder)
    if not getattr(model.config, "recursive", False):
        raise DiagnoseError(f"{folder}: not a recursive encoder (trained without model.recursive=true)")
    for name in ("metrics.json", "probe_batch.safetensors"):
        if not (folder / name).is_file():
            raise DiagnoseError(f"{folder}: no {name} (written by `decollapse train`)")
    summary = json.loads((folder / "metrics.json").read_text())
    job = TrainJob(
        arch=summary["architecture"], dataset=summary["dataset"], settings=summary["settings"],
        output_dir=folder / ".sweep-never-written",
    )
    try:
        parts = plan(job)
        dataset, tokenizer, _ = load_data(job, parts)
    except UsageError as err:
        raise DiagnoseError(f"{folder}: cannot rebuild the run's data ({err})") from None
    if split not in dataset:
        raise DiagnoseError(f"{folder}: the run's data has no {split} split")
    probe = load_file(str(folder / "probe_batch.safetensors"))
    recipe, objective = parts["recipe"], parts["objective"]
    rows = []
    trained_k = model.config.num_iterations
    with tempfile.TemporaryDirectory() as scratch:
        args = DecollapseTrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=recipe.eval_batch_size, report_to=[],
            dataloader_num_workers=0, use_cpu=True,
        )
        trainer = DecollapseTrainer(
            model=model, args=args, data_collator=build_collator(objective, tokenizer, recipe),
            eval_data_collator=lambda: build_collator(objective, tokenizer, recipe),
        )
        evaluation = dataset[split].select_columns(["input_ids"])
        try:
            for k in ks:
                model.config.num_iterations = k  # the encoder reads K from its config when not given
                metrics = trainer.evaluate(eval_dataset=evaluation, metric_key_prefix="sweep")
                report = model.collapse_report(probe).metrics
                rows.append(
                    {
                        "k": k,
                        "loss": metrics["sweep_loss"],
                        "within_erank": report["concepts.within.effective_rank_entropy"],
                        "within_erank_ratio": report["concepts.within.effective_rank_entropy_ratio"],
                        "global_erank_nuclear": report["concepts.global.effective_rank_nuclear"],
                        "trained_k": k == trained_k,
                    }
                )
        finally:
            model.config.num_iterations = trained_k
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| K | held-out loss | within-input erank (÷C) | global erank (Σσ/σ₁) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        k = f"{row['k']} (trained)" if row["trained_k"] else str(row["k"])
        lines.append(
            f"| {k} | {row['loss']:.4f} | {row['within_erank']:.2f} ({row['within_erank_ratio']:.2f}) "
            f"| {row['global_erank_nuclear']:.2f} |"
        )
    return "\n".join(lines)
