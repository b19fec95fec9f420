"""Heat-maps (phase diagrams) of one metric over the two ``--grid`` axes of a ``decollapse ablate`` folder.

Every run of an ablation writes ``metrics.json`` (held-out losses, perplexities, their ratio to the
Bayes optimum, run sizes and time) and ``diagnostics.json`` (the final collapse report). Any numeric
value there is a metric: the keys of ``metrics.json``'s ``metrics`` and its numeric top-level fields
(``num_parameters``, ``train_seconds``, ...), and the flattened names of the collapse report
(``layer0.experts.usage_gini``). A heat-map puts the first ``--grid`` axis on the rows (y), the second
on the columns (x), each axis in the order its values were given, the first value at the origin
(bottom left, as in a plot). Each cell is the arithmetic mean of the runs of that grid cell that
report the metric, one run per seed, annotated with that mean and ``n``, the number of those runs.
A cell no run reports stays grey (``n/a``). The values also go to a CSV beside the PNG (one row per
cell: mean, sample standard deviation (n − 1), n and the seeds), so scripts need not read the image.

``decollapse ablate ... --heatmap METRIC`` checks the metric name before it trains anything: the names
a run will report are those of a freshly initialised model of each arm, on the run's own data and
probe batch, through the same collapse report and the same Trainer evaluation the run ends with
(:func:`expected_metrics`). The key set depends on the configuration and on which label columns the
data has, not on the weights, so an untrained model names exactly what the trained one will.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import math
import os
import statistics
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import UsageError

# The numeric fields `decollapse train` writes at the top level of metrics.json (runner._train_and_write):
# metrics too, e.g. num_parameters over a width x depth grid. tests/test_heatmap.py checks that the names
# expected before training are the ones a real run writes.
RUN_SCALARS = ("steps", "train_tokens", "train_seconds", "num_parameters", "trainable_parameters")
# HF's Trainer reports this speed metric only when an evaluation prepares a model that training did not;
# every run trains before it evaluates, so the names checked before training leave it out.
PREPARATION_METRIC = "_model_preparation_time"
# Validation rows the check before training evaluates: the metric names do not depend on how many.
CHECK_EVAL_ROWS = 2
# An error message lists every metric up to this many; past it, the close matches and the first names.
LISTED_METRICS = 40
HEATMAP_FOLDER = "heatmaps"
# Characters of the 8-point title per inch of figure width, with room for the axis labels and colour bar.
TITLE_CHARS_PER_INCH = 10


@dataclass
class Heatmap:
    """One metric over two grid axes. ``cells[i][j]`` holds ``(seed, value)`` of each run of the cell
    with row value ``row_values[i]`` and column value ``column_values[j]`` that reports the metric."""

    metric: str
    row_key: str
    row_values: list[str]
    column_key: str
    column_values: list[str]
    cells: list[list[list[tuple[int | None, float]]]]
    title: str

    def values(self, i: int, j: int) -> list[float]:
        return [value for _, value in self.cells[i][j]]

    def mean(self, i: int, j: int) -> float | None:
        values = self.values(i, j)
        return statistics.fmean(values) if values else None

    def std(self, i: int, j: int) -> float | None:
        """Sample standard deviation (n − 1), as the ablation table reports; None below two runs."""
        values = self.values(i, j)
        if len(values) < 2:
            return None
        # A diverged run (inf perplexity) has no spread to speak of; statistics.stdev cannot take it.
        return statistics.stdev(values) if all(map(math.isfinite, values)) else math.nan


# --- the axes --------------------------------------------------------------------------------------


def parse_axes(text: str, flag: str) -> tuple[str, str]:
    """``ROWS,COLUMNS``: the grid key drawn on the rows (y), then the one on the columns (x)."""
    keys = [part.strip() for part in text.split(",")]
    if len(keys) != 2 or not all(keys) or keys[0] == keys[1]:
        raise UsageError(f"{flag} {text!r}: expected two different --grid keys, ROWS,COLUMNS (e.g. a,b)")
    return keys[0], keys[1]


def heatmap_axes(
    grid: dict[str, list[str]], cases: list[dict[str, str]], axes: tuple[str, str] | None, where: str
) -> tuple[str, str]:
    """(row key, column key) of a heat-map over ``grid``: the first --grid axis on the rows, the second on
    the columns, unless ``axes`` names them. ``where`` starts the error line (a flag or a folder).

    One ``--case`` is a set of values every arm shares, so the grid still has one arm per cell; with two
    or more, each cell would hold one arm per case and there is no single value to draw."""
    if len(cases) > 1:
        raise UsageError(
            f"{where}: the arms are {len(cases)} --case values crossed with the grid, so each cell of the heat-map "
            "would hold several arms; draw a grid with at most one --case, or move the case's key into a --grid axis"
        )
    if len(grid) != 2:
        shown = f" ({', '.join(grid)})" if grid else ""
        raise UsageError(
            f"{where}: a heat-map needs exactly two --grid axes, the ablation has {len(grid)}{shown}"
        )
    if axes is None:
        return tuple(grid)  # type: ignore[return-value]
    unknown = [key for key in axes if key not in grid]
    if unknown:
        raise UsageError(f"{where}: {', '.join(unknown)} is not a --grid axis; the axes are {', '.join(grid)}")
    return axes


# --- the metrics a run reports ---------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_metrics(run_dir: Path) -> dict[str, float]:
    """Every numeric value a finished run reports, by name (see the module docstring). Raises
    UsageError naming the file when the run's ``metrics.json`` or ``diagnostics.json`` is missing or
    unreadable."""
    found: dict[str, float] = {}
    for name in ("diagnostics.json", "metrics.json"):
        path = run_dir / name
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{path}: missing; the ablation folder is incomplete") from None
        except (OSError, ValueError) as err:
            raise UsageError(f"{path}: not readable JSON ({str(err).splitlines()[0]})") from None
        metrics = payload.get("metrics") if isinstance(payload, dict) else None
        if not isinstance(metrics, dict):
            raise UsageError(f"{path}: no 'metrics' object; not written by decollapse train")
        if name == "metrics.json":
            found.update({k: float(payload[k]) for k in RUN_SCALARS if _is_number(payload.get(k))})
        found.update({k: float(v) for k, v in metrics.items() if _is_number(v)})
    return found


def expected_metrics(runs) -> dict[str, set[str]]:
    """Arm name -> the metric names its runs will report, before anything is trained.

    ``runs`` are ``ablation.plan_ablation``'s planned runs. Per arm (its first seed): the run's data
    (built once per distinct data setting), a freshly initialised model of the arm's configuration, its
    collapse report on the run's probe batch, and a ``DecollapseTrainer`` evaluation of the validation and
    test splits on ``CHECK_EVAL_ROWS`` rows each, plus the fields the runner adds after evaluating."""
    from . import runner
    from .ablation import run_name

    data: dict[str, tuple] = {}
    expected: dict[str, set[str]] = {}
    for planned in runs:
        arm = run_name(planned.settings)
        if arm in expected:
            continue  # a seed changes values, not names
        parts = planned.parts
        recipe = parts["recipe"]
        data_key = json.dumps(
            [planned.train_job.dataset, dataclasses.asdict(parts["corpus_config"]), recipe.block_size,
             recipe.seed, parts["model_settings"].get("init_from")],
            default=str,
        )
        if data_key not in data:
            data[data_key] = runner.load_data(planned.train_job, parts)
        expected[arm] = _fresh_run_metrics(parts, *data[data_key])
    return expected


def _fresh_run_metrics(parts: dict[str, Any], dataset, tokenizer, corpus_summary) -> set[str]:
    """The names a run of ``parts`` writes, in the order the runner computes them (evaluation, then the
    collapse report, called as the runner calls it: some reports take gradients, e.g. MoH's predictor)."""
    from transformers.trainer_callback import ProgressCallback

    from .runner import build_collator, build_model, probe_batch, training_arguments
    from .trainers import DecollapseTrainer

    recipe = parts["recipe"]
    objective = parts["objective"]
    model = build_model(parts, tokenizer, len(dataset["train"][0]["input_ids"]), dataset["train"])
    probe = probe_batch(dataset["validation"], recipe.probe_size or parts["arch"].probe_size)
    names = set(RUN_SCALARS) | {"frozen_parameter_share"}
    keep = ["input_ids", *model.aux_label_columns]
    splits = {
        split: dataset[split].select_columns(keep).select(range(min(CHECK_EVAL_ROWS, len(dataset[split]))))
        for split in ("validation", "test") if split in dataset
    }
    with tempfile.TemporaryDirectory(prefix="decollapse-heatmap-check-") as scratch:
        # report_to none: an integration would open its writers for an evaluation no one reads.
        args = training_arguments(dataclasses.replace(recipe, report_to="none"), Path(scratch), parts["arch"])
        trainer = DecollapseTrainer(
            model=model, args=args, eval_dataset=splits["validation"],
            data_collator=build_collator(objective, tokenizer, recipe), processing_class=tokenizer,
            eval_data_collator=lambda: build_collator(objective, tokenizer, recipe),
        )
        trainer.pop_callback(ProgressCallback)
        for split, rows in splits.items():
            metrics = trainer.evaluate(eval_dataset=rows, metric_key_prefix=split)
            names |= {k for k in metrics if not k.endswith(PREPARATION_METRIC)}
            if corpus_summary is not None and objective == "causal_lm":
                names |= {f"{split}_optimal_perplexity", f"{split}_perplexity_ratio"}
            if corpus_summary is not None and objective == "masked_lm":
                names |= {f"{split}_optimal_loss", f"{split}_loss_ratio", f"{split}_unigram_loss"}
    return names | set(model.collapse_report(probe).metrics)


def unknown_metric(
    metric: str, reported: set[str] | dict[str, Any], where: str,
    full_list: str = "`decollapse heatmap DIR --list-metrics` lists them all",
) -> UsageError:
    """The one-line error for a metric no run reports: the close matches, then the names the runs do
    report, sorted (abbreviated past ``LISTED_METRICS``, never without the close matches; ``full_list``
    says where to see them all)."""
    names = sorted(reported)
    close = difflib.get_close_matches(metric, names, n=6, cutoff=0.6)
    # The same measurement in other layers or groups: `usage_gini` finds every `layer<i>.*.usage_gini`.
    leaf = metric.rsplit(".", 1)[-1]
    close += [name for name in names if name.endswith(leaf) and name not in close][:6]
    message = f"{where}: no run reports {metric!r}"
    if close:
        message += f"; close matches: {', '.join(close)}"
    if not names:
        return UsageError(message + "; the runs report no metrics")
    if len(names) <= LISTED_METRICS:
        return UsageError(message + f"; the runs report: {', '.join(names)}")
    return UsageError(
        message + f"; the runs report {len(names)} metrics, the first {LISTED_METRICS}: "
        f"{', '.join(names[:LISTED_METRICS])}, … ({full_list})"
    )


# --- one heat-map ----------------------------------------------------------------------------------


def build_heatmap(
    payload: dict[str, Any], run_values: dict[str, dict[str, float]], metric: str, axes: tuple[str, str]
) -> Heatmap:
    """The cells of ``metric`` from ``ablation.json``'s ``payload`` and each run's metrics
    (``run_values[row['run']]``)."""
    row_key, column_key = axes
    rows, columns = payload["grid"][row_key], payload["grid"][column_key]
    cells: list[list[list[tuple[int | None, float]]]] = [[[] for _ in columns] for _ in rows]
    for row in payload["rows"]:
        value = run_values[row["run"]].get(metric)
        if value is None:
            continue
        i, j = rows.index(row["settings"][row_key]), columns.index(row["settings"][column_key])
        cells[i][j].append((row.get("seed"), value))
    return Heatmap(metric, row_key, list(rows), column_key, list(columns), cells, _title(payload, metric))


def _title(payload: dict[str, Any], metric: str) -> str:
    seeds = [s for s in payload.get("seeds") or [] if s is not None]
    how = (
        f"mean over seeds {', '.join(map(str, seeds))} (n: runs in the cell that report it)"
        if len(seeds) > 1 else f"one run per cell (seed {seeds[0]})" if seeds else "one run per cell"
    )
    cases = payload.get("cases") or []
    shared = f", {' '.join(f'{k}={v}' for k, v in cases[0].items())}" if cases else ""
    return f"{metric}\n{payload['architecture']}, {payload['max_steps']} steps{shared}: {how}"


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def to_csv(heatmap: Heatmap) -> str:
    """One row per cell, rows then columns in grid order: the mean, the sample std (n − 1, empty below
    two runs), n and the seeds of the runs that report the metric; mean empty when n is 0."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["metric", heatmap.row_key, heatmap.column_key, "mean", "std", "n", "seeds"])
    for i, row_value in enumerate(heatmap.row_values):
        for j, column_value in enumerate(heatmap.column_values):
            mean, std = heatmap.mean(i, j), heatmap.std(i, j)
            seeds = " ".join(str(seed) for seed, _ in heatmap.cells[i][j] if seed is not None)
            writer.writerow([
                heatmap.metric, row_value, column_value, "" if mean is None else repr(mean),
                "" if std is None else repr(std), len(heatmap.cells[i][j]), seeds,
            ])
    return out.getvalue()


def to_markdown(heatmap: Heatmap) -> str:
    """The cells as a table for the terminal: rows top to bottom in grid order, ``mean (n=k)``."""
    header = [f"{heatmap.row_key} \\ {heatmap.column_key}", *heatmap.column_values]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row_value in enumerate(heatmap.row_values):
        cells = []
        for j in range(len(heatmap.column_values)):
            mean = heatmap.mean(i, j)
            cells.append("n/a" if mean is None else f"{_number(mean)} (n={len(heatmap.cells[i][j])})")
        lines.append("| " + " | ".join([row_value, *cells]) + " |")
    return "\n".join(lines)


def figure(heatmap: Heatmap):
    """The heat-map as a matplotlib ``Figure`` on the Agg canvas (no display, no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_columns = len(heatmap.row_values), len(heatmap.column_values)
    means = np.array([[heatmap.mean(i, j) if heatmap.mean(i, j) is not None else np.nan
                       for j in range(n_columns)] for i in range(n_rows)], dtype=float)
    # Grey where a cell has no finite value (n/a, or a diverged inf / nan mean, which the colour scale cannot hold).
    shown = np.ma.masked_invalid(means)
    width = max(4.5, 2.2 + 1.1 * n_columns)
    fig = Figure(figsize=(width, max(3.2, 1.8 + 0.7 * n_rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_facecolor("lightgrey")
    image = ax.imshow(shown, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, fraction=0.046, label=heatmap.metric)
    ax.set_xticks(range(n_columns), labels=heatmap.column_values)
    ax.set_yticks(range(n_rows), labels=heatmap.row_values)
    ax.set_xlabel(heatmap.column_key)
    ax.set_ylabel(heatmap.row_key)
    # Wrapped to the figure: a small grid's figure is narrower than the line saying how seeds were combined.
    ax.set_title("\n".join(textwrap.fill(line, int(width * TITLE_CHARS_PER_INCH)) for line in heatmap.title.splitlines()),
                 fontsize=8)
    for i in range(n_rows):
        for j in range(n_columns):
            mean = heatmap.mean(i, j)
            if mean is None:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="black")
                continue
            # Dark text on grey and on the bright end of viridis, light text on its dark end.
            bright = not math.isfinite(mean) or image.norm(mean) > 0.6
            ax.text(j, i, f"{_number(mean)}\nn={len(heatmap.cells[i][j])}", ha="center", va="center",
                    fontsize=8, color="black" if bright else "white")
    fig.tight_layout()
    return fig


def write_heatmap(heatmap: Heatmap, png: Path) -> tuple[Path, Path]:
    """Writes ``png`` and the cell values to the ``.csv`` beside it, each renamed into place when complete."""
    csv_path = png.with_suffix(".csv")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig = figure(heatmap)
    staged = [(path.with_name(f".{path.name}.tmp-{os.getpid()}"), path) for path in (png, csv_path)]
    try:
        fig.savefig(staged[0][0], format="png", dpi=100)
        staged[1][0].write_text(to_csv(heatmap))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return png, csv_path


def default_png(folder: Path, metric: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in metric)
    return folder / HEATMAP_FOLDER / f"{safe}.png"


# --- an ablation folder ----------------------------------------------------------------------------


def read_ablation(folder: Path) -> dict[str, Any]:
    """``ablation.json`` of ``folder``, or UsageError naming what is wrong."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    path = folder / "ablation.json"
    if not path.is_file():
        raise UsageError(f"{folder}: not an ablation folder (no ablation.json; `decollapse ablate` writes one)")
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: not readable JSON ({str(err).splitlines()[0]})") from None
    fields = ("architecture", "grid", "rows", "max_steps")
    if not isinstance(payload, dict) or any(key not in payload for key in fields):
        raise UsageError(f"{path}: not written by `decollapse ablate` (expected the fields {', '.join(fields)})")
    return payload


def ablation_run_metrics(folder: Path, payload: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Run (as ``ablation.json`` names it, ``runs/<arm>``) -> every metric it reports."""
    return {row["run"]: run_metrics(folder / row["run"]) for row in payload["rows"]}


def metric_counts(run_values: dict[str, dict[str, float]]) -> dict[str, int]:
    """Metric name -> how many runs report it."""
    counts: dict[str, int] = {}
    for values in run_values.values():
        for name in values:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def draw(
    payload: dict[str, Any], run_values: dict[str, dict[str, float]], metric: str, axes: tuple[str, str], png: Path
) -> tuple[Heatmap, Path, Path]:
    heatmap = build_heatmap(payload, run_values, metric, axes)
    return (heatmap, *write_heatmap(heatmap, png))


def check_output(output: Path) -> None:
    if output.suffix.lower() != ".png":
        raise UsageError(f"--output {output}: expected a .png file (the cell values go to the .csv beside it)")
    if output.is_dir() or not output.parent.is_dir():
        raise UsageError(f"--output {output}: not a file in an existing folder")
