"""``decollapse lifelong``: train on one domain subset of the embedded corpus, then on another, and
measure how much of the first the model forgot.

For each seed, two ordinary ``decollapse train`` runs:

- **phase 1** trains a fresh model on the first subset (``corpus.domains``) and evaluates it on that
  subset's validation and test splits, as every run does;
- **phase 2** starts from phase 1's weights (``TrainJob.init_checkpoint``) and trains them on the
  second subset for the same number of steps with the same recipe. The optimizer and the
  learning-rate schedule start fresh (warm-up and decay again, no AdamW moments carried over): the
  continual-learning setting where a trained model meets new data, not a resumed run. Its own
  evaluation is on the second subset.

Then the phase-2 model is evaluated on the first subset's validation and test splits through the same
Trainer evaluation. Forgetting is ``ppl(first, after) - ppl(first, before)`` and the ratio
``after / before``, per seed and as mean ± sample standard deviation over the seeds. Every subset of
the embedded corpus shares one tokenizer and has its own exact Bayes-optimal perplexity, reported
beside each number.

Every run of every seed is planned and validated before the first one starts; everything is written
to a hidden sibling folder and renamed into place only when the last run has finished:
``lifelong.json``, ``report.md`` and ``seed-<s>/phase1``, ``seed-<s>/phase2`` (complete run folders).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .ablation import Spread
from .data import build_synthetic_corpus
from .data.synthetic import parse_domain_subset
from .registry import ARCHITECTURES, get_architecture
from .runner import TrainJob, UsageError, evaluate_checkpoint, plan, publish, run

CAUSAL = "causal_lm"
SPLITS = ("test", "validation")
# The keys this command sets itself in each run's --set, so the user may not.
DOMAIN_KEYS = ("domains", "corpus.domains")
SEED_KEY = "train.seed"
AUX_CLASSES_KEYS = ("aux_head_classes", "model.aux_head_classes")


@dataclass
class LifelongJob:
    arch: str
    first: str  # the domains of phase 1, as corpus.domains takes them: "0-3", "0,2,5", "4"
    then: str  # the domains of phase 2
    output_dir: Path
    settings: dict[str, str]
    seeds: list[int] | None = None  # None: once, with the recipe's seed
    max_steps: int | None = None
    overwrite: bool = False
    show_progress: bool = True


@dataclass
class PlannedSeed:
    seed: int
    phase1: TrainJob
    phase2: TrainJob
    parts: dict[str, Any]  # phase 2's plan: the architecture, recipe and model settings both phases share


@dataclass
class LifelongPlan:
    seeds: list[PlannedSeed]
    first: tuple[int, ...]
    then: tuple[int, ...]
    first_corpus_config: Any  # SyntheticCorpusConfig of phase 1, for the evaluation after phase 2


def causal_architectures() -> list[str]:
    return [name for name, arch in ARCHITECTURES.items() if CAUSAL in arch.objectives]


def plan_lifelong(job: LifelongJob) -> LifelongPlan:
    """Validates the whole job (architecture, subsets, seeds, settings, output folder, every run of
    every seed) before anything is trained or written; raises UsageError with one line."""
    try:
        arch = get_architecture(job.arch)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if CAUSAL not in arch.objectives:
        raise UsageError(
            f"{arch.name} has no causal_lm head ({', '.join(arch.objectives)}); lifelong measures forgetting as "
            f"causal perplexity: use one of {', '.join(causal_architectures())}"
        )
    for key in job.settings:
        if key in DOMAIN_KEYS:
            raise UsageError(f"--set {key}: the domains of each phase are --first and --then")
        if job.seeds is not None and key == SEED_KEY:
            raise UsageError(f"--set {key}: given both by --seeds and in --set")
    if job.seeds is not None and not job.seeds:
        raise UsageError("--seeds: name at least one seed")

    # The shared settings and the output folder first: their errors name what the user typed.
    base = plan(TrainJob(arch=job.arch, output_dir=job.output_dir, overwrite=job.overwrite,
                         settings=job.settings, max_steps=job.max_steps))
    if base["objective"] != CAUSAL:
        raise UsageError(
            f"--set objective={base['objective']}: lifelong measures forgetting as causal perplexity; "
            f"expected objective=causal_lm"
        )
    num_domains = base["corpus_config"].num_domains
    subsets = {}
    for flag, text in (("--first", job.first), ("--then", job.then)):
        try:
            subsets[flag] = parse_domain_subset(text, num_domains)
        except ValueError as err:
            raise UsageError(f"{flag} {text!r}: expected {err}") from None

    settings = _with_label_space(job.settings, base)
    seeds = job.seeds if job.seeds is not None else [base["recipe"].seed]
    planned = []
    for seed in seeds:
        shared = {**settings, SEED_KEY: str(seed)} if job.seeds is not None else dict(settings)
        folder = job.output_dir / f"seed-{seed}"
        phases = [
            TrainJob(arch=job.arch, output_dir=folder / name, overwrite=True, max_steps=job.max_steps,
                     settings={**shared, "corpus.domains": text}, show_progress=job.show_progress)
            for name, text in (("phase1", job.first), ("phase2", job.then))
        ]
        first_config = plan(phases[0])["corpus_config"]
        planned.append(PlannedSeed(seed, phases[0], phases[1], plan(phases[1])))
    return LifelongPlan(planned, subsets["--first"], subsets["--then"], first_config)


def _with_label_space(settings: dict[str, str], parts: dict[str, Any]) -> dict[str, str]:
    """Heads trained on label columns (SOSM's) get the class counts of the whole language, not of the
    first subset's data: phase 2's labels (other domains, other senses) must fit phase 1's heads. A
    count the user set is kept if it covers the language."""
    config = parts["arch"].config_class(**parts["model_settings"])
    columns = getattr(config, "aux_label_columns", ())
    if not columns:
        return dict(settings)
    space = parts["corpus_config"].label_classes
    classes = {column: space[column] for column in columns if column in space}
    for column, count in (getattr(config, "aux_head_classes", None) or {}).items():
        if count < classes.get(column, 0):
            raise UsageError(
                f"--set aux_head_classes: {column!r} has {count} classes, the corpus has {classes[column]}; "
                "both phases' labels must fit the heads (leave it unset to get the corpus's)"
            )
        classes[column] = count
    out = {k: v for k, v in settings.items() if k not in AUX_CLASSES_KEYS}
    out["aux_head_classes"] = json.dumps(classes, sort_keys=True)
    return out


def run_lifelong(job: LifelongJob, on_phase_done=None) -> dict[str, Any]:
    """Runs every seed's two phases and the evaluation after phase 2; returns the ``lifelong.json``
    payload. ``on_phase_done(seed, phase, metrics)`` is called after each run. Raises UsageError or
    NonFiniteLossError, and then writes nothing."""
    planned = plan_lifelong(job)
    output_dir = job.output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        first_corpus = build_synthetic_corpus(planned.first_corpus_config)
        rows = []
        for seeded in planned.seeds:
            folder = f"seed-{seeded.seed}"
            seeded.phase1.output_dir = work / folder / "phase1"
            before = run(seeded.phase1)["metrics"]
            if on_phase_done is not None:
                on_phase_done(seeded.seed, "phase1", before)
            seeded.phase2.output_dir = work / folder / "phase2"
            seeded.phase2.init_checkpoint = seeded.phase1.output_dir
            then = run(seeded.phase2)["metrics"]
            if on_phase_done is not None:
                on_phase_done(seeded.seed, "phase2", then)
            after = evaluate_checkpoint(
                seeded.parts, seeded.phase2.output_dir, first_corpus.dataset, first_corpus.tokenizer,
                first_corpus.summary(), show_progress=job.show_progress,
            )
            rows.append(_row(seeded.seed, folder, before, after, then))
        payload = {
            "architecture": job.arch,
            "command": rerun_command(job),
            "first": job.first,
            "then": job.then,
            "first_domains": list(planned.first),
            "then_domains": list(planned.then),
            "max_steps": planned.seeds[0].parts["recipe"].max_steps,
            "settings": job.settings,
            "seeds": [s.seed for s in planned.seeds],
            "phase2_recipe": "phase 1's weights, the same recipe and number of steps, "
            "a fresh optimizer and learning-rate schedule",
            "rows": rows,
            "summary": summarise(rows),
        }
        (work / "lifelong.json").write_text(json.dumps(payload, indent=2) + "\n")
        (work / "report.md").write_text(to_markdown(payload) + "\n")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish(work, output_dir)
    return payload


def _row(seed: int, folder: str, before: dict, after: dict, then: dict) -> dict[str, Any]:
    """One seed: per split, the first subset's perplexity before and after phase 2, and the second
    subset's after phase 2, each beside its split's Bayes-optimal perplexity."""
    row: dict[str, Any] = {"seed": seed, "phase1": f"{folder}/phase1", "phase2": f"{folder}/phase2"}
    for split in SPLITS:
        first_before, first_after = before[f"{split}_perplexity"], after[f"{split}_perplexity"]
        row[split] = {
            "first_before": first_before,
            "first_after": first_after,
            "forgetting": first_after - first_before,
            "ratio": first_after / first_before,
            "first_optimal": before[f"{split}_optimal_perplexity"],
            "then_after": then[f"{split}_perplexity"],
            "then_optimal": then[f"{split}_optimal_perplexity"],
        }
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per split and quantity, the values over seeds with their mean and sample standard deviation."""
    return {
        split: {key: asdict(Spread.of([row[split][key] for row in rows])) for key in rows[0][split]}
        for split in SPLITS
    }


def rerun_command(job: LifelongJob) -> str:
    parts = ["decollapse lifelong", job.arch, "--first", job.first, "--then", job.then]
    if job.max_steps is not None:
        parts += ["--max-steps", str(job.max_steps)]
    if job.seeds is not None:
        parts += ["--seeds", ",".join(map(str, job.seeds))]
    if job.settings:
        parts += ["--set"] + [f"{k}={v}" for k, v in job.settings.items()]
    return " ".join(parts)


def _spread(spread: dict[str, Any], signed: bool = False) -> str:
    if spread["mean"] is None:
        return "n/a"
    mean = f"{spread['mean']:+.3f}" if signed else f"{spread['mean']:.3f}"
    return mean if spread["std"] is None else f"{mean} ± {spread['std']:.3f}"


def to_markdown(payload: dict[str, Any]) -> str:
    first, then = payload["first"], payload["then"]
    lines = [
        f"# Lifelong: `{payload['architecture']}`, domains {first} then {then}",
        "",
        f"`{payload['command']}`",
        "",
        f"Phase 1 trains a fresh model on domains {first} for {payload['max_steps']} steps; phase 2 trains that "
        f"model on domains {then} for another {payload['max_steps']} steps with the same recipe and a fresh "
        "optimizer and learning-rate schedule. Perplexity on held-out examples of the first subset before phase 2 "
        "(phase 1's own evaluation) and after it; forgetting = after − before (positive: forgotten), "
        "ratio = after ÷ before. The Bayes-optimal perplexity of each split is the floor of the exact "
        "hidden Markov model restricted to that subset.",
    ]
    header = ["seed", f"ppl {first} before", f"ppl {first} after", "forgetting", "after ÷ before",
              f"ppl {then} after", f"optimal {first}", f"optimal {then}"]
    keys = ["first_before", "first_after", "forgetting", "ratio", "then_after", "first_optimal", "then_optimal"]
    for split in SPLITS:
        lines += ["", f"## {split.capitalize()} split", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in payload["rows"]:
            cells = [f"{row[split][k]:+.3f}" if k == "forgetting" else f"{row[split][k]:.3f}" for k in keys]
            lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
        if len(payload["rows"]) > 1:
            summary = payload["summary"][split]
            cells = [_spread(summary[k], signed=k == "forgetting") for k in keys]
            lines.append("| mean ± std | " + " | ".join(cells) + " |")
    if len(payload["rows"]) > 1:
        lines += ["", "mean ± std: over the seeds, sample standard deviation (n − 1)."]
    lines += ["", "Run folders: " + ", ".join(f"`{r['phase1']}`, `{r['phase2']}`" for r in payload["rows"]) + "."]
    return "\n".join(lines)
