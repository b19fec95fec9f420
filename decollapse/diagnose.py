"""``decollapse diagnose``: the collapse report of a checkpoint folder written by ``decollapse train``."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoConfig

from .modeling.diagnostics import CollapseReport
from .registry import ARCHITECTURES


class DiagnoseError(ValueError):
    pass


def load_checkpoint(folder: Path):
    """Loads a decollapse checkpoint folder with the head its config's objective names."""
    if not (folder / "config.json").is_file():
        raise DiagnoseError(f"{folder}: no config.json, not a checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError) as err:
        raise DiagnoseError(f"{folder}: cannot read config.json ({err})") from None
    arch = next((a for a in ARCHITECTURES.values() if a.config_class.model_type == config.model_type), None)
    if arch is None:
        raise DiagnoseError(f"{folder}: model_type {config.model_type!r} is not a decollapse architecture")
    model = arch.model_for_objective(config.objective).from_pretrained(str(folder))
    return model.eval()


def diagnose(folder: Path, plots_dir: Path | None = None) -> tuple[CollapseReport, list[Path]]:
    model = load_checkpoint(folder)
    probe_path = folder / "probe_batch.safetensors"
    if not probe_path.is_file():
        raise DiagnoseError(f"{folder}: no probe_batch.safetensors (written by `decollapse train`)")
    report = model.collapse_report(load_file(str(probe_path)))
    history = []
    if (folder / "training_log.json").is_file():
        history = json.loads((folder / "training_log.json").read_text())
    from .reporting import write_plots

    plots = write_plots(plots_dir or folder / "plots", history, report)
    return report, plots


def health_table(report: CollapseReport) -> str | None:
    """Markdown table of the graded metrics (those with a ``<name>.grade`` beside them): value,
    grade and the thresholds that define it (spec mrcogito §4). None when nothing is graded."""
    from .modeling.diagnostics import CONCEPT_HEALTH_THRESHOLDS

    names = {"0.0": "POOR", "1.0": "OK", "2.0": "GOOD"}
    lines = ["| metric | value | grade | POOR / OK / GOOD edges |", "|---|---|---|---|"]
    for key in sorted(report.metrics):
        if not key.endswith(".grade"):
            continue
        metric = key[: -len(".grade")]
        short = metric.split(".", 1)[1] if metric.startswith("concepts.") else metric
        bad, good, higher = CONCEPT_HEALTH_THRESHOLDS.get(short, (float("nan"), float("nan"), True))
        edges = f"< {bad:g} / ≥ {bad:g} / ≥ {good:g}" if higher else f"≥ {bad:g} / < {bad:g} / < {good:g}"
        lines.append(f"| {metric} | {report.metrics.get(metric, float('nan')):.4g} | {names[str(report.metrics[key])]} | {edges} |")
    return "\n".join(lines) if len(lines) > 2 else None
