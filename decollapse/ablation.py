"""``decollapse ablate``: one command, a grid of ``decollapse train`` runs, one table.

The arms are every combination of the ``--grid`` values (a full factorial), crossed with each
``--case`` when cases are given (a case is a named set of settings, for variants whose knobs only make
sense together, such as MoH's ``routing=adaptive routing_grad=soft`` beside ``routing=all``). Each arm
trains once per ``--seeds`` value (``train.seed``: the initialisation seed and the data order, so one
seed gives every arm the same batches in the same order), or once with the recipe's seed. Every run
is planned and validated before the first one starts; each run is an ordinary ``decollapse train`` run (same recipe, same held-out
evaluation, same collapse report). The table reports, per arm, held-out perplexity and the
architecture's headline collapse metrics (``collapse_headline`` on its model class), each reduced
over layers as the headline states, as mean ± sample standard deviation over the seeds. With a
``--control`` arm it adds each arm's perplexity ratio to the control, computed per seed (paired) and
then summarised, and whether that ratio falls on the same side of 1 on every seed. With ``--heatmap
METRIC`` it also draws that metric over the two ``--grid`` axes, mean over seeds per cell
(``decollapse.heatmap``; the name is checked before anything is trained). Everything is
written to a temporary sibling folder and renamed into place only when every run has finished.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .runner import TrainJob, UsageError, plan, publish, run

logger = logging.getLogger(__name__)

REDUCTIONS = {"min": min, "max": max, "mean": lambda values: sum(values) / len(values)}
# Paired ratios to a control sit close to 1; three decimals would round a 0.05% effect away.
RATIO_DIGITS = 4
# The TrainRecipe field --seeds sets: set_seed (initialisation), the Trainer's data_seed (batch order) and the
# collator's seed. The synthetic corpus has its own corpus.seed, so every seed trains on the same examples; a text
# --dataset without its own validation split carves one by train.seed, so there each seed also draws its own split
# (the same for every arm: still paired).
SEED_KEY = "train.seed"
PERPLEXITY_METRICS = ("validation_perplexity", "validation_perplexity_ratio")


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
    # None: each arm trains once, with the recipe's seed (and its run folder has no seed in its name).
    seeds: list[int] | None = None
    # The arm the others are compared to: assignments that exactly one arm's --case/--grid values contain.
    control: dict[str, str] | None = None
    # Metrics drawn as heat-maps over the two --grid axes once every run has finished (decollapse.heatmap),
    # and (rows, columns) when not the first and second --grid axes.
    heatmaps: list[str] = field(default_factory=list)
    heatmap_axes: tuple[str, str] | None = None


@dataclass
class PlannedRun:
    settings: dict[str, str]  # the arm's --case/--grid values
    seed: int
    name: str
    train_job: TrainJob
    parts: dict[str, Any]


@dataclass
class Spread:
    """One quantity over seeds: ``values`` in seed order, their mean and sample standard deviation
    (n - 1 in the denominator). ``std`` is None with one seed; both are None when a seed lacks the value."""

    values: list[float | None]
    mean: float | None
    std: float | None

    @classmethod
    def of(cls, values: list[float | None]) -> "Spread":
        if not values or any(v is None for v in values):
            return cls(list(values), None, None)
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(list(values), statistics.fmean(values), std)


@dataclass
class ArmSummary:
    """One arm over its seeds. ``ratio_to_control`` holds, per seed, the arm's held-out perplexity over
    the control's at the same seed; ``same_sign_every_seed`` says whether every one of those ratios is
    above 1 or every one below (None for the control itself, with one seed, or without a control)."""

    settings: dict[str, str]
    seeds: list[int]
    runs: list[str]
    validation_perplexity: Spread
    validation_perplexity_ratio: Spread
    headline: dict[str, Spread]
    is_control: bool = False
    ratio_to_control: Spread | None = None
    same_sign_every_seed: bool | None = None


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


def _assignments(item: str, flag: str) -> dict[str, str]:
    """One string of whitespace-separated ``key=value`` assignments."""
    out: dict[str, str] = {}
    for part in item.split():
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{flag} {item!r}: expected key=value assignments separated by spaces")
        if key in out:
            raise UsageError(f"{flag} {item!r}: {key} given twice")
        out[key] = value
    if not out:
        raise UsageError(f"{flag} '': name at least one key=value")
    return out


def parse_cases(items: list[str]) -> list[dict[str, str]]:
    """Each ``--case`` is one string of whitespace-separated ``key=value`` assignments."""
    return [_assignments(item, "--case") for item in items]


def parse_control(text: str) -> dict[str, str]:
    """``--control`` names an arm as a ``--case`` does: ``'key=value [key=value ...]'`` from its
    --case/--grid values, enough of them that exactly one arm matches (checked by ``plan_ablation``)."""
    return _assignments(text, "--control")


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct non-negative integers, comma-separated, in the order given."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UsageError(f"--seeds {text!r}: expected comma-separated non-negative integers, e.g. 0,1,2")
        if int(part) in seeds:
            raise UsageError(f"--seeds {text!r}: seed {int(part)} given twice")
        seeds.append(int(part))
    return seeds


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


def _shown(assignments: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in assignments.items())


def find_control(arms: list[dict[str, str]], control: dict[str, str], varied: list[str]) -> dict[str, str]:
    """The one arm whose settings contain every assignment of ``control``."""
    unknown = [k for k in control if k not in varied]
    if unknown:
        raise UsageError(
            f"--control {_shown(control)!r}: {', '.join(unknown)} is not varied; the arms vary {', '.join(varied)}"
        )
    matches = [arm for arm in arms if all(arm.get(k) == v for k, v in control.items())]
    if not matches:
        raise UsageError(
            f"--control {_shown(control)!r}: no arm has these values; the arms are "
            + "; ".join(_shown(arm) for arm in arms)
        )
    if len(matches) > 1:
        raise UsageError(
            f"--control {_shown(control)!r}: matches {len(matches)} arms ("
            + "; ".join(_shown(arm) for arm in matches) + "); name more keys so that one arm matches"
        )
    return matches[0]


def headline(metrics: dict[str, float], spec: dict[str, tuple[str, str]]) -> dict[str, float | None]:
    """``{label: reduction over the metrics matching the pattern}`` (None when nothing matches)."""
    out: dict[str, float | None] = {}
    for label, (pattern, reduction) in spec.items():
        values = [v for k, v in metrics.items() if fnmatch.fnmatchcase(k, pattern)]
        out[label] = REDUCTIONS[reduction](values) if values else None
    return out


def plan_ablation(job: AblationJob) -> list[PlannedRun]:
    """Validates every run of the grid (and the output folder, the seeds and the control) before any
    work starts; returns the runs arm by arm, each arm's seeds in the order given."""
    if job.output_dir.exists():
        if not job.output_dir.is_dir():
            raise UsageError(f"--output-dir {job.output_dir}: exists and is not a directory")
        if any(job.output_dir.iterdir()) and not job.overwrite:
            raise UsageError(f"--output-dir {job.output_dir}: not empty; pass --overwrite to replace it")
    if not job.grid and not job.cases and job.seeds is None:
        # With --seeds alone the one arm is the recipe as it stands: the spread of a default over seeds.
        raise UsageError("name at least one --grid key=value1,value2,..., --case 'key=value ...' or --seeds S1,S2,...")
    overlap = sorted(set(table_keys(job)) & set(job.settings))
    if overlap:
        raise UsageError(f"{', '.join(overlap)}: given both in --grid/--case and --set")
    if job.seeds is not None:
        if not job.seeds:
            raise UsageError("--seeds: name at least one seed")
        if SEED_KEY in job.settings or SEED_KEY in table_keys(job):
            raise UsageError(f"{SEED_KEY}: given both by --seeds and in --set/--grid/--case")
    arms = combinations(job.grid, job.cases)
    if job.control is not None:
        find_control(arms, job.control, table_keys(job))
    if job.heatmap_axes is not None and not job.heatmaps:
        raise UsageError("--heatmap-axes: only with --heatmap METRIC")
    if job.heatmaps:
        from .heatmap import heatmap_axes

        heatmap_axes(job.grid, job.cases, job.heatmap_axes, "--heatmap")
    runs = []
    names = set()
    for combo in arms:
        if run_name(combo) in names:
            raise UsageError(f"run {run_name(combo)!r} is listed twice")
        names.add(run_name(combo))
        for seed in job.seeds if job.seeds is not None else [None]:
            settings = {**job.settings, **combo}
            name = run_name(combo)
            if seed is not None:
                settings[SEED_KEY] = str(seed)
                name = run_name({**combo, "seed": str(seed)})
            train_job = TrainJob(
                arch=job.arch,
                dataset=job.dataset,
                output_dir=job.output_dir / "runs" / name,
                overwrite=True,
                settings=settings,
                max_steps=job.max_steps,
            )
            parts = plan(train_job)
            runs.append(PlannedRun(combo, parts["recipe"].seed, name, train_job, parts))
    if job.heatmaps:
        _check_heatmap_metrics(job.heatmaps, runs)
    return runs


def _check_heatmap_metrics(metrics: list[str], runs: list[PlannedRun]) -> None:
    """Refuses, before training, a --heatmap metric that no arm will report (names from a freshly
    initialised model of each arm on its run's data: ``heatmap.expected_metrics``)."""
    from .heatmap import expected_metrics, unknown_metric

    expected = set().union(*expected_metrics(runs).values())
    for metric in metrics:
        if metric not in expected:
            raise unknown_metric(
                metric, expected, f"--heatmap {metric}",
                "a finished run's collapse-report names: `decollapse diagnose RUN --json`",
            )


def summarise(rows: list[dict[str, Any]], control: dict[str, str] | None = None) -> list[ArmSummary]:
    """Per-run rows (``settings``, ``seed``, ``run``, ``metrics``, ``headline``, as ``ablation.json``
    holds them) -> one summary per arm, in the order the arms first appear. ``control`` is the control
    arm's full settings; each arm's ratio at seed s divides its perplexity by the control's at seed s."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        arms.setdefault(run_name(row["settings"]), []).append(row)
    control_ppl = None
    if control is not None:
        if run_name(control) not in arms:
            raise ValueError(f"control {_shown(control)!r} is not one of the arms")
        control_ppl = {r["seed"]: r["metrics"]["validation_perplexity"] for r in arms[run_name(control)]}
    summaries = []
    for arm_rows in arms.values():
        ppl = [r["metrics"]["validation_perplexity"] for r in arm_rows]
        summary = ArmSummary(
            settings=arm_rows[0]["settings"],
            seeds=[r["seed"] for r in arm_rows],
            runs=[r["run"] for r in arm_rows],
            validation_perplexity=Spread.of(ppl),
            validation_perplexity_ratio=Spread.of([r["metrics"]["validation_perplexity_ratio"] for r in arm_rows]),
            headline={label: Spread.of([r["headline"][label] for r in arm_rows]) for label in arm_rows[0]["headline"]},
        )
        if control_ppl is not None:
            summary.is_control = summary.settings == control
            ratios = [
                None if value is None or control_ppl.get(seed) is None else value / control_ppl[seed]
                for seed, value in zip(summary.seeds, ppl)
            ]
            summary.ratio_to_control = Spread.of(ratios)
            if not summary.is_control and len(ratios) > 1 and None not in ratios:
                summary.same_sign_every_seed = all(r > 1 for r in ratios) or all(r < 1 for r in ratios)
        summaries.append(summary)
    return summaries


def run_ablation(job: AblationJob, on_run_done=None) -> list[dict[str, Any]]:
    runs = plan_ablation(job)
    parts = runs[0].parts
    spec = getattr(parts["arch"].model_for_objective(parts["objective"]), "collapse_headline", {})
    control = None
    if job.control is not None:
        control = find_control(combinations(job.grid, job.cases), job.control, table_keys(job))
    output_dir = job.output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    rows = []
    try:
        for planned in runs:
            train_job = planned.train_job
            train_job.output_dir = work / "runs" / planned.name
            summary = run(train_job)
            diagnostics = json.loads((train_job.output_dir / "diagnostics.json").read_text())["metrics"]
            row = {
                "settings": planned.settings,
                "seed": planned.seed,
                "run": f"runs/{planned.name}",
                "metrics": {k: summary["metrics"].get(k) for k in PERPLEXITY_METRICS},
                "headline": headline(diagnostics, spec),
                "train_seconds": summary["train_seconds"],
            }
            rows.append(row)
            if on_run_done is not None:
                on_run_done(row, len(rows), len(runs))
        seeds = list(dict.fromkeys(r.seed for r in runs))
        payload = {
            "architecture": job.arch,
            "grid": job.grid,
            "cases": job.cases,
            "columns": table_keys(job),
            "settings": job.settings,
            "max_steps": parts["recipe"].max_steps,
            "seeds": seeds,
            "control": control,
            "headline": {label: list(rule) for label, rule in spec.items()},
            "command": rerun_command(job),
            "rows": rows,
            "arms": [asdict(arm) for arm in summarise(rows, control)],
        }
        (work / "ablation.json").write_text(json.dumps(payload, indent=2))
        (work / "ablation.md").write_text(to_markdown(payload, per_seed=len(seeds) > 1) + "\n")
        if job.heatmaps:
            _draw_heatmaps(job, payload, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish(work, output_dir)
    return rows


def _draw_heatmaps(job: AblationJob, payload: dict[str, Any], work: Path) -> None:
    from .heatmap import ablation_run_metrics, default_png, draw, heatmap_axes

    axes = heatmap_axes(job.grid, job.cases, job.heatmap_axes, "--heatmap")
    run_values = ablation_run_metrics(work, payload)
    for metric in job.heatmaps:
        if not any(metric in values for values in run_values.values()):
            # The check before training expected it; the runs are kept rather than thrown away for a drawing.
            logger.warning(
                "--heatmap %s: no run reported it after all, no heat-map drawn (the ablation is written; "
                "`decollapse heatmap DIR --list-metrics` lists what the runs report)", metric,
            )
            continue
        draw(payload, run_values, metric, axes, default_png(work, metric))


def _quoted(assignments: dict[str, str]) -> str:
    return f"'{_shown(assignments)}'" if len(assignments) > 1 else _shown(assignments)


def rerun_command(job: AblationJob) -> str:
    parts = ["decollapse ablate", job.arch]
    if job.dataset != "synthetic":
        parts += ["--dataset", job.dataset]
    if job.max_steps is not None:
        parts += ["--max-steps", str(job.max_steps)]
    for case in job.cases:
        parts += ["--case", _quoted(case)]
    if job.grid:
        parts += ["--grid"] + [f"{k}={','.join(v)}" for k, v in job.grid.items()]
    if job.seeds is not None:
        parts += ["--seeds", ",".join(map(str, job.seeds))]
    if job.control is not None:
        parts += ["--control", _quoted(job.control)]
    for metric in job.heatmaps:
        parts += ["--heatmap", metric]
    if job.heatmap_axes is not None:
        parts += ["--heatmap-axes", ",".join(job.heatmap_axes)]
    if job.settings:
        parts += ["--set"] + [f"{k}={v}" for k, v in job.settings.items()]
    return " ".join(parts)


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _md(text) -> str:
    """A table cell: a ``|`` inside a label (``head mean |cos|``) would end the cell."""
    return str(text).replace("|", "\\|")


def _spread_cell(spread: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± std``; the plain value with one seed (no spread to show)."""
    if spread is None or spread["mean"] is None:
        return "n/a"
    if spread["std"] is None:
        return f"{spread['mean']:.{digits}f}"
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def _ratio_cell(arm: dict[str, Any]) -> str:
    return "1 (control)" if arm["is_control"] else _spread_cell(arm["ratio_to_control"], RATIO_DIGITS)


def _agreement_cell(arm: dict[str, Any]) -> str:
    if arm["is_control"]:
        return "–"
    return {True: "yes", False: "**no**", None: "–"}[arm["same_sign_every_seed"]]


def to_markdown(payload: dict[str, Any], per_seed: bool = False) -> str:
    """The arm table (mean ± sample std over seeds); with ``per_seed``, also one row per run."""
    keys = payload.get("columns") or list(payload["grid"])
    labels = list(payload["headline"])
    control = payload.get("control")
    seeds = payload.get("seeds") or []
    compared = ["val ppl ÷ control", "same sign on every seed"] if control else []
    header = keys + ["val ppl", "ratio to optimum"] + compared + labels
    lines = [
        f"Ablation of `{payload['architecture']}`, {payload['max_steps']} steps per run: `{payload['command']}`",
        "",
        "| " + " | ".join(map(_md, header)) + " |",
        "|" + "---|" * len(header),
    ]
    for arm in payload["arms"]:
        cells = [_md(arm["settings"].get(k, "–")) for k in keys]
        cells += [_spread_cell(arm["validation_perplexity"]), _spread_cell(arm["validation_perplexity_ratio"])]
        if control:
            cells += [_ratio_cell(arm), _agreement_cell(arm)]
        cells += [_spread_cell(arm["headline"][label]) for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if len(seeds) > 1:
        notes.append(
            f"Seeds {', '.join(map(str, seeds))}: each cell is the mean ± sample standard deviation (n − 1) over "
            "the seeds, one run per arm and seed."
        )
    if control:
        notes.append(
            f"Control: `{_shown(control)}`. val ppl ÷ control divides each seed's held-out perplexity by the "
            "control's at the same seed (same initialisation seed, same data order), then summarises those "
            "ratios; above 1 is worse than the control. Same sign on every seed: the ratio is above 1 on every "
            "seed, or below 1 on every seed."
        )
        for arm in payload["arms"]:
            if arm["same_sign_every_seed"] is False:
                ratio = arm["ratio_to_control"]
                # Signed percentages: a ratio of 0.99998 printed as 1.0000 would hide the sign that flipped.
                per = ", ".join(f"{100 * (r - 1):+.3f}% (seed {s})" for s, r in zip(arm["seeds"], ratio["values"]))
                notes.append(
                    f"`{_shown(arm['settings'])}`: mean ratio {ratio['mean']:.{RATIO_DIGITS}f} to the control, but "
                    f"the effect does not have the same sign on every seed: {per}."
                )
    rules = [f"{label}: {rule[1]} of `{rule[0]}`" for label, rule in payload["headline"].items()]
    if rules:
        notes.append("Headline metrics (final collapse report on the validation probe batch): " + "; ".join(rules) + ".")
    for note in notes:
        lines += ["", note]
    if per_seed:
        lines += ["", "Every seed:", "", *_per_seed_table(payload, keys, labels)]
    return "\n".join(lines)


def _per_seed_table(payload: dict[str, Any], keys: list[str], labels: list[str]) -> list[str]:
    control = payload.get("control")
    ratios = {}
    if control:
        ratios = {
            (run_name(arm["settings"]), seed): ratio
            for arm in payload["arms"]
            for seed, ratio in zip(arm["seeds"], arm["ratio_to_control"]["values"])
        }
    header = keys + ["seed", "val ppl", "ratio to optimum"] + (["val ppl ÷ control"] if control else []) + labels
    lines = ["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)]
    for row in payload["rows"]:
        cells = [_md(row["settings"].get(k, "–")) for k in keys] + [str(row["seed"])]
        cells += [_cell(row["metrics"]["validation_perplexity"]), _cell(row["metrics"]["validation_perplexity_ratio"])]
        if control:
            ratio = ratios.get((run_name(row["settings"]), row["seed"]))
            cells.append("n/a" if ratio is None else f"{ratio:.{RATIO_DIGITS}f}")
        cells += [_cell(row["headline"][label]) for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
