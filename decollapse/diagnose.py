"""``decollapse diagnose``: the collapse report of a checkpoint folder written by ``decollapse train``."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from .modeling.diagnostics import CollapseReport
from .registry import ARCHITECTURES


class DiagnoseError(ValueError):
    pass


def unreadable_safetensors(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (one line), or None when it is.

    Opening reads the header and checks that its tensors cover the file exactly, which catches a
    truncated or overwritten file without loading a single tensor.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as err:
        return f"{path}: truncated or corrupt, not a readable safetensors file ({str(err).splitlines()[0]})"
    return None


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors weights as ``from_pretrained`` reads them: ``model.safetensors``,
    else its shards."""
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("model-*.safetensors"))


def load_checkpoint(folder: Path):
    """Loads a decollapse checkpoint folder with the head its config's objective names."""
    if not (folder / "config.json").is_file():
        raise DiagnoseError(f"{folder}: no config.json, not a checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError) as err:
        raise DiagnoseError(f"{folder}: cannot read config.json ({str(err).splitlines()[0]})") from None
    arch = next((a for a in ARCHITECTURES.values() if a.config_class.model_type == config.model_type), None)
    if arch is None:
        raise DiagnoseError(f"{folder}: model_type {config.model_type!r} is not a decollapse architecture")
    for path in weight_files(folder):
        problem = unreadable_safetensors(path)
        if problem:
            raise DiagnoseError(problem)
    model_class = arch.model_for_objective(config.objective)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # Missing weights are one line below, not a load-report table; nor a bar for a few-megabyte file.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise DiagnoseError(f"{folder}: the weights do not load ({str(err).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if info.get("missing_keys"):
        # A report on freshly initialised weights would look like a report on the checkpoint.
        raise DiagnoseError(
            f"{folder}: weights missing for {model_class.__name__} (e.g. {sorted(info['missing_keys'])[0]})"
        )
    return model.eval()


def diagnose(folder: Path, plots_dir: Path | None = None) -> tuple[CollapseReport, list[Path]]:
    model = load_checkpoint(folder)
    probe_path = folder / "probe_batch.safetensors"
    if not probe_path.is_file():
        raise DiagnoseError(f"{folder}: no probe_batch.safetensors (written by `decollapse train`)")
    problem = unreadable_safetensors(probe_path)
    if problem:
        raise DiagnoseError(problem)
    report = model.collapse_report(load_file(str(probe_path)))
    history = []
    if (folder / "training_log.json").is_file():
        try:
            history = json.loads((folder / "training_log.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DiagnoseError(f"{folder / 'training_log.json'}: not readable JSON ({err})") from None
    from .reporting import write_plots

    plots = write_plots(plots_dir or folder / "plots", history, report)
    return report, plots


def health_table(report: CollapseReport) -> str | None:
    """Markdown table of the graded metrics (those with a ``<name>.grade`` beside them): value,
    grade and the thresholds that define it (after MrCogito's concept analysis, github.com/ksopyla/MrCogito). None when nothing is graded."""
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
