"""Plots and the short ``report.md`` written next to every checkpoint.

matplotlib runs on the non-interactive Agg backend: this is called from training jobs and CI.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .modeling.diagnostics import CollapseReport  # noqa: E402

LOSS_PREFIXES = ("loss", "task_loss", "aux/", "aux_weighted/")


def write_plots(folder: Path, log_history: list[dict], report: CollapseReport) -> list[Path]:
    """Loss terms over time, one heatmap per similarity matrix and one histogram per usage
    distribution. Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    path = plot_losses(log_history, folder / "losses.png")
    if path is not None:
        written.append(path)
    for name, matrix in sorted(report.matrices.items()):
        written.append(_heatmap(name, matrix, folder / f"{_slug(name)}.png"))
    for name, values in sorted(report.distributions.items()):
        written.append(_histogram(name, values, folder / f"{_slug(name)}.png"))
    for name, points in sorted(report.points.items()):
        written.append(_unit_map(name, points, report.point_labels.get(name), folder / f"{_slug(name)}.png"))
    return written


def project_2d(points) -> tuple[Any, str]:
    """``points`` [n, d] -> ([n, 2] coordinates, the method's name): UMAP (cosine metric, seeded) when
    the ``viz`` extra (umap-learn) is installed and there are enough points for its neighbourhood
    graph, PCA otherwise.

    UMAP runs in a child process. In the training process itself, umap/numba left the process slower
    at everything that followed: measured on two cores with two ablations side by side, every later
    training run in the same process took 2.7x as long.
    """
    import numpy as np

    data = points.detach().cpu().double().numpy() if hasattr(points, "detach") else np.asarray(points, float)
    if data.shape[0] >= 8 and importlib.util.find_spec("umap") is not None:
        with tempfile.TemporaryDirectory() as folder:
            np.save(Path(folder) / "points.npy", data)
            # A fresh interpreter, not multiprocessing: a spawned worker re-imports the caller's main
            # script, which trains again in any script without a __main__ guard.
            subprocess.run([sys.executable, "-c", _UMAP_SCRIPT, folder], check=True, capture_output=True)
            return np.load(Path(folder) / "coords.npy"), "UMAP"
    if data.shape[0] < 2:
        return np.zeros((data.shape[0], 2)), "PCA"
    centred = data - data.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords, "PCA"


_UMAP_SCRIPT = """
import sys, warnings
from pathlib import Path
import numpy as np
import umap

folder = Path(sys.argv[1])
data = np.load(folder / "points.npy")
neighbours = min(15, len(data) - 1)
reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=neighbours, random_state=0, n_jobs=1)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)  # seeded: one thread
    np.save(folder / "coords.npy", reducer.fit_transform(data))
"""


def _unit_map(name: str, points, labels, path: Path) -> Path:
    """The units as points in 2-D, coloured by their label (grey: none)."""
    coords, method = project_2d(points)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    label_values = labels.tolist() if labels is not None else [-1] * len(coords)
    unlabelled = [i for i, v in enumerate(label_values) if v < 0]
    if unlabelled:
        ax.scatter(coords[unlabelled, 0], coords[unlabelled, 1], c="lightgrey", s=14, label="unused")
    for value in sorted({v for v in label_values if v >= 0}):
        rows = [i for i, v in enumerate(label_values) if v == value]
        ax.scatter(coords[rows, 0], coords[rows, 1], s=14, label=str(value))
    if len(label_values) and max(label_values) >= 0:
        ax.legend(fontsize=6, title="dominant label", title_fontsize=7, markerscale=0.8)
    ax.set_title(f"{name} ({method})", fontsize=9)
    return _save(fig, path)


def loss_series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """The curves of ``losses.png``: name -> (steps, values), from the Trainer's ``log_history``.

    The training terms come from the logs every ``logging_steps`` (``runner.plan`` lowers it for
    short runs so that there is a curve to draw), the held-out task loss from each evaluation.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if key.startswith(LOSS_PREFIXES) and isinstance(value, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(value)
        if "eval_loss" in entry:
            xs, ys = series.setdefault("eval_loss (task)", ([], []))
            xs.append(step)
            ys.append(entry["eval_loss"])
    return series


def plot_losses(log_history: list[dict], path: Path) -> Path | None:
    series = loss_series(log_history)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, label=key, marker="o" if len(xs) < 3 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    if any(min(ys) > 0 for _, ys in series.values()):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("loss terms")
    return _save(fig, path)


def _heatmap(name: str, matrix, path: Path) -> Path:
    data = matrix.detach().cpu().float().numpy() if hasattr(matrix, "detach") else matrix
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(data, vmin=-1, vmax=1, cmap="RdBu_r")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(name, fontsize=9)
    return _save(fig, path)


def _histogram(name: str, values, path: Path) -> Path:
    data = values.detach().cpu().float().numpy() if hasattr(values, "detach") else values
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(data)), sorted(data, reverse=True), width=1.0)
    ax.set_xlabel("unit (sorted by share)")
    ax.set_ylabel("share")
    ax.set_title(name, fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # figures are not garbage-collected while pyplot tracks them
    return path


def rerun_command(summary: dict[str, Any]) -> str:
    """The command that reproduces the run (output folder aside)."""
    parts = ["decollapse train", summary["architecture"]]
    if summary["dataset"] != "synthetic":
        parts += ["--dataset", str(summary["dataset"])]
    parts += ["--max-steps", str(summary["steps"])]
    if summary["settings"]:
        parts += ["--set"] + [f"{k}={v}" for k, v in summary["settings"].items()]
    return " ".join(parts)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(
    path: Path,
    summary: dict[str, Any],
    report: CollapseReport,
    corpus: dict[str, Any] | None,
    plots: list[Path],
) -> None:
    m = summary["metrics"]
    lines = [
        f"# decollapse run: {summary['architecture']} ({summary['objective']})",
        "",
        f"- data: `{summary['dataset']}`; {summary['steps']} steps, {summary['train_tokens']:,} training tokens, "
        f"{summary['train_seconds']} s; {summary['num_parameters']:,} parameters",
        f"- rerun: `{rerun_command(summary)}`",
        "",
        "## Held-out results",
        "",
        "| split | task loss (nats) | perplexity | Bayes-optimal perplexity | ratio |",
        "|---|---|---|---|---|",
    ]
    for split in ("validation", "test"):
        if f"{split}_loss" not in m:
            continue
        bound = m.get(f"{split}_optimal_perplexity")
        ratio = m.get(f"{split}_perplexity_ratio")
        lines.append(
            f"| {split} | {m[f'{split}_loss']:.4f} | {m[f'{split}_perplexity']:.3f} | "
            f"{'n/a' if bound is None else f'{bound:.3f}'} | {'n/a' if ratio is None else f'{ratio:.3f}'} |"
        )
    masked = [split for split in ("validation", "test") if f"{split}_optimal_loss" in m]
    if masked:
        lines += [
            "",
            "| split | masked-token loss (nats) | Bayes-optimal loss | ratio | unigram loss |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {split} | {m[f'{split}_loss']:.4f} | {m[f'{split}_optimal_loss']:.4f} | "
            f"{m[f'{split}_loss_ratio']:.3f} | {m[f'{split}_unigram_loss']:.4f} |"
            for split in masked
        ]
    if corpus is not None:
        lines += [
            "",
            "The Bayes-optimal perplexity is computed exactly (forward algorithm over the generator's hidden "
            "states) on the same examples and positions the model is scored on."
            + (
                " The masked-token floor is exact too (forward-backward with every position a noisy view of its "
                "word through the masking collator's channel, at the evaluation's own masks); the unigram loss is "
                "an add-k unigram model of the training split scored on the same masked positions."
                if masked else ""
            ),
        ]
    lines += ["", "## Collapse diagnostics (probe batch from the validation split)", "", report.to_markdown()]
    if summary.get("alarms"):
        lines += ["", "## Alarms", ""] + [f"- step {a['step']}: {a['criterion']}: {a['message']}" for a in summary["alarms"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
