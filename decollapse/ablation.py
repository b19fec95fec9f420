"""``decollapse ablate``: one command, a grid of ``decollapse train`` runs, one table.

The runs are every combination of the ``--grid`` values (a full factorial), crossed with each
``--case`` when cases are given (a case is a named set of settings, for variants whose knobs only make
sense together, such as MoH's ``routing=adaptive routing_grad=soft`` beside ``routing=all``). Every run
is planned and validated before the first one starts; each run is an ordinary ``decollapse train`` run (same recipe, same held-out
evaluation, same collapse report). The table reports, per run, held-out perplexity and the
architecture's headline collapse metrics (``collapse_headline`` on its model class), each reduced
over layers as the headline states. Everything is written to a temporary sibling folder and renamed
into place only when every run has finished.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runner import TrainJob, UsageError, plan, publish, run

REDUCTIONS = {"min": min, "max": max, "mean": lambda values: sum(values) / len(values)}


@dataclass
class AblationJob:
    arch: str
    grid: dict[str, list[str]]
    output_dir: Path
    cases: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    max_steps: int | None = None
    dataset: str = "synthetic"
    overwrite: bool = False


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise UsageError(f"--grid {item!r}: expected key=value1,value2,...")
        if key.strip() in grid:
            raise UsageError(f"--grid {key.strip()}: given twice")
        grid[key.strip()] = choices
    return grid


def parse_cases(items: list[str]) -> list[dict[str, str]]:
    """Each ``--case`` is one string of whitespace-separated ``key=value`` assignments."""
    cases = []
    for item in items:
        case: dict[str, str] = {}
        for part in item.split():
            key, sep, value = part.partition("=")
            if not sep or not key or not value:
                raise UsageError(f"--case {item!r}: expected key=value assignments separated by spaces")
            if key in case:
                raise UsageError(f"--case {item!r}: {key} given twice")
            case[key] = value
        if not case:
            raise UsageError("--case '': name at least one key=value")
        cases.append(case)
    return cases


def combinations(grid: dict[str, list[str]], cases: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    keys = list(grid)
    cells = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if not cases:
        return cells
    out = []
    for case in cases:
        clash = sorted(set(case) & set(grid))
        if clash:
            raise UsageError(f"{', '.join(clash)}: given both in --case and --grid")
        out += [{**case, **cell} for cell in cells]
    return out


def table_keys(job: "AblationJob") -> list[str]:
    keys = [k for case in job.cases for k in case]
    return list(dict.fromkeys(keys + list(job.grid)))


def run_name(combo: dict[str, str]) -> str:
    return "__".join(f"{k.split('.')[-1]}={v}" for k, v in combo.items()).replace("/", "_")


def headline(metrics: dict[str, float], spec: dict[str, tuple[str, str]]) -> dict[str, float | None]:
    """``{label: reduction over the metrics matching the pattern}`` (None when nothing matches)."""
    out: dict[str, float | None] = {}
    for label, (pattern, reduction) in spec.items():
        values = [v for k, v in metrics.items() if fnmatch.fnmatchcase(k, pattern)]
        out[label] = REDUCTIONS[reduction](values) if values else None
    return out


def plan_ablation(job: AblationJob) -> list[tuple[dict[str, str], TrainJob, dict[str, Any]]]:
    """Validates every run of the grid (and the output folder) before any work starts; returns each
    cell's settings, its train job and its resolved plan."""
    if job.output_dir.exists():
        if not job.output_dir.is_dir():
            raise UsageError(f"--output-dir {job.output_dir}: exists and is not a directory")
        if any(job.output_dir.iterdir()) and not job.overwrite:
            raise UsageError(f"--output-dir {job.output_dir}: not empty; pass --overwrite to replace it")
    if not job.grid and not job.cases:
        raise UsageError("name at least one --grid key=value1,value2,... or --case 'key=value ...'")
    overlap = sorted(set(table_keys(job)) & set(job.settings))
    if overlap:
        raise UsageError(f"{', '.join(overlap)}: given both in --grid/--case and --set")
    runs = []
    names = set()
    for combo in combinations(job.grid, job.cases):
        if run_name(combo) in names:
            raise UsageError(f"run {run_name(combo)!r} is listed twice")
        names.add(run_name(combo))
        train_job = TrainJob(
            arch=job.arch,
            dataset=job.dataset,
            output_dir=job.output_dir / "runs" / run_name(combo),
            overwrite=True,
            settings={**job.settings, **combo},
            max_steps=job.max_steps,
        )
        runs.append((combo, train_job, plan(train_job)))
    return runs


def run_ablation(job: AblationJob, on_run_done=None) -> list[dict[str, Any]]:
    runs = plan_ablation(job)
    parts = runs[0][2]
    spec = getattr(parts["arch"].model_for_objective(parts["objective"]), "collapse_headline", {})
    output_dir = job.output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    rows = []
    try:
        for combo, train_job, _ in runs:
            train_job.output_dir = work / "runs" / run_name(combo)
            summary = run(train_job)
            diagnostics = json.loads((train_job.output_dir / "diagnostics.json").read_text())["metrics"]
            row = {
                "settings": combo,
                "run": f"runs/{run_name(combo)}",
                "metrics": {k: summary["metrics"].get(k) for k in ("validation_perplexity", "validation_perplexity_ratio")},
                "headline": headline(diagnostics, spec),
                "train_seconds": summary["train_seconds"],
            }
            rows.append(row)
            if on_run_done is not None:
                on_run_done(row, len(rows), len(runs))
        payload = {
            "architecture": job.arch,
            "grid": job.grid,
            "cases": job.cases,
            "columns": table_keys(job),
            "settings": job.settings,
            "max_steps": parts["recipe"].max_steps,
            "headline": {label: list(rule) for label, rule in spec.items()},
            "command": rerun_command(job),
            "rows": rows,
        }
        (work / "ablation.json").write_text(json.dumps(payload, indent=2))
        (work / "ablation.md").write_text(to_markdown(payload) + "\n")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish(work, output_dir)
    return rows


def rerun_command(job: AblationJob) -> str:
    parts = ["decollapse ablate", job.arch]
    if job.dataset != "synthetic":
        parts += ["--dataset", job.dataset]
    if job.max_steps is not None:
        parts += ["--max-steps", str(job.max_steps)]
    for case in job.cases:
        assignments = " ".join(f"{k}={v}" for k, v in case.items())
        parts += ["--case", f"'{assignments}'" if len(case) > 1 else assignments]
    if job.grid:
        parts += ["--grid"] + [f"{k}={','.join(v)}" for k, v in job.grid.items()]
    if job.settings:
        parts += ["--set"] + [f"{k}={v}" for k, v in job.settings.items()]
    return " ".join(parts)


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def to_markdown(payload: dict[str, Any]) -> str:
    keys = payload.get("columns") or list(payload["grid"])
    labels = list(payload["headline"])
    lines = [
        f"Ablation of `{payload['architecture']}`, {payload['max_steps']} steps per run: `{payload['command']}`",
        "",
        "| " + " | ".join(keys + ["val ppl", "ratio to optimum"] + labels) + " |",
        "|" + "---|" * (len(keys) + 2 + len(labels)),
    ]
    for row in payload["rows"]:
        cells = [row["settings"].get(k, "–") for k in keys]
        cells += [_cell(row["metrics"]["validation_perplexity"]), _cell(row["metrics"]["validation_perplexity_ratio"])]
        cells += [_cell(row["headline"][label]) for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    rules = [f"{label}: {rule[1]} of `{rule[0]}`" for label, rule in payload["headline"].items()]
    if rules:
        lines += ["", "Headline metrics (final collapse report on the validation probe batch): " + "; ".join(rules) + "."]
    return "\n".join(lines)
