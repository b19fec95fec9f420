"""``decollapse eval``: validate everything, run the protocol on every task, then write the results.

Nothing is written until every task has run: a bad task name, a missing file, a malformed row or a
model without a pooling path fails in :func:`plan`, before any training, with one line. Results are
merged into the output folder's ``eval_results.json`` (one row per task, metric, split, protocol,
pairing, head and adapter; a rerun replaces its own rows) and ``eval_results.md`` is regenerated, both
written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .data import TaskData, load_task
from .finetune import FinetuneSettings, ensure_padding, finetune_once, head_of, pairing_of
from .sentence import ModelRef, check_model_ref, load_encoder, load_tokenizer, to_sentence_transformer
from .tasks import TASKS, Task, TaskError, resolve_suite

logger = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
TABLE_FILE = "eval_results.md"
SCHEMA = "decollapse.eval_results/1"
PROTOCOLS = ("finetune", "zeroshot")


@dataclass
class EvalJob:
    model: str
    suite: str = "stsb"
    protocol: str = "finetune"
    data_dir: Path | None = None
    output_dir: Path | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    seed: int = 42
    seeds: int = 1
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    max_eval_samples: int | None = None
    skip_bad_rows: bool = False
    allow_partial_data: bool = False
    show_progress: bool = True

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model, self.revision, self.trust_remote_code)


def select_tasks(job: EvalJob) -> list[Task]:
    tasks = resolve_suite(job.suite)
    if job.protocol != "zeroshot":
        return tasks
    # Zero-shot is cosine similarity: named groups keep their similarity tasks, a named
    # classification task is a mistake worth saying.
    named = [p.strip().lower() for p in job.suite.split(",") if p.strip()]
    for name in named:
        if name in TASKS and not TASKS[name].is_similarity:
            similar = ", ".join(t.name for t in TASKS.values() if t.is_similarity)
            raise TaskError(f"zero-shot similarity applies to {similar}; {name} is not a similarity task")
    kept = [t for t in tasks if t.is_similarity]
    if not kept:
        raise TaskError(f"--suite {job.suite} has no similarity task for --protocol zeroshot")
    skipped = [t.name for t in tasks if not t.is_similarity]  # named classification tasks raised above
    if skipped:
        logger.info("zero-shot: skipping non-similarity tasks %s", ", ".join(skipped))
    return kept


def default_output_dir(job: EvalJob) -> Path:
    if job.ref.is_local:
        return Path(job.ref.path)
    return Path("eval-results") / job.model.replace("/", "__")


def plan(job: EvalJob) -> dict:
    """Everything that can be wrong, checked before any work: returns what :func:`run` needs."""
    if job.protocol not in PROTOCOLS:
        raise TaskError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {job.protocol!r}")
    if job.seeds < 1:
        raise TaskError("--seeds must be at least 1")
    if job.max_eval_samples is not None and job.max_eval_samples < 2:
        raise TaskError("--max-eval-samples must be at least 2")
    job.finetune.validate()
    tasks = select_tasks(job)
    if job.protocol == "finetune" and job.finetune.siamese_head == "cosine" and job.finetune.pairs == "siamese":
        bad = [t.name for t in tasks if t.is_pair and not t.is_regression]
        if bad:
            raise TaskError(f"--siamese-head cosine predicts a score; {', '.join(bad)} are classification tasks")
    if job.data_dir is not None and not Path(job.data_dir).is_dir():
        raise TaskError(f"--data-dir {job.data_dir} is not a folder")
    ref = job.ref
    check_model_ref(ref)
    output_dir = Path(job.output_dir) if job.output_dir is not None else default_output_dir(job)
    _check_writable(output_dir)
    existing = read_results(output_dir)  # a corrupt results file is refused, never overwritten
    tokenizer = load_tokenizer(ref)
    ensure_padding(tokenizer)
    encoder = load_encoder(ref)  # proves the model loads and has a pooling path
    model_info = {**ref.provenance(), "class": type(encoder).__name__,
                  "model_type": getattr(encoder.config, "model_type", None),
                  "num_parameters": sum(p.numel() for p in encoder.parameters())}
    del encoder
    data = {}
    for task in tasks:
        splits = list(task.reported_splits) if job.protocol == "zeroshot" else ["train", *task.reported_splits]
        data[task.name] = load_task(
            task, splits, job.data_dir, skip_bad_rows=job.skip_bad_rows, strict_sizes=not job.allow_partial_data
        )
    return {"tasks": tasks, "data": data, "tokenizer": tokenizer, "output_dir": output_dir,
            "existing": existing, "model": model_info}


def _check_writable(output_dir: Path) -> None:
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise TaskError(f"cannot write results to {output_dir} (pass --output-dir)")


def run(job: EvalJob) -> dict:
    """Plan, evaluate every task, then write ``eval_results.json`` and ``eval_results.md``."""
    parts = plan(job)
    if job.protocol == "zeroshot":
        rows = _zeroshot(job, parts)
    else:
        rows = _finetune(job, parts)
    payload = merge_results(parts["existing"], rows)
    write_results(parts["output_dir"], payload)
    return {"rows": rows, "output_dir": parts["output_dir"]}


def _common(job: EvalJob, parts: dict, data: TaskData) -> dict:
    from .. import __version__

    return {
        "model": parts["model"],
        "data": {"source": data.source, "checksums": data.checksums, "sizes_checked": data.sizes_checked,
                 "skipped_rows": data.skipped_rows},
        "decollapse_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _zeroshot(job: EvalJob, parts: dict) -> list[dict]:
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    model = to_sentence_transformer(job.ref, max_seq_length=job.finetune.max_length)
    rows = []
    for task in tqdm(parts["tasks"], desc="zero-shot", disable=not job.show_progress):
        data = parts["data"][task.name]
        for split in task.reported_splits:
            dataset = data.splits[split]
            if job.max_eval_samples is not None and job.max_eval_samples < len(dataset):
                dataset = dataset.select(range(job.max_eval_samples))
            evaluator = EmbeddingSimilarityEvaluator(
                dataset["sentence1"], dataset["sentence2"], dataset["label"],
                main_similarity="cosine", write_csv=False, batch_size=64, name=task.name,
            )
            scores = evaluator(model)
            for metric in ("pearson", "spearman"):
                value = float(scores[f"{task.name}_{metric}_cosine"])
                rows.append({
                    "task": task.name, "metric": metric, "value": value, "std": None, "values": [value],
                    "split": split, "rows": len(dataset), "protocol": "zeroshot", "pairing": "siamese",
                    "head": "cosine", "peft": None, "seeds": [], "selection": None,
                    "settings": {"max_length": job.finetune.max_length, "pooling": "parameter-free mean"},
                    **_common(job, parts, data),
                })
    return rows


def _finetune(job: EvalJob, parts: dict) -> list[dict]:
    seeds = [job.seed + i for i in range(job.seeds)]
    runs = [(task, seed) for task in parts["tasks"] for seed in seeds]
    outcomes: dict[str, list[dict]] = {}
    for task, seed in tqdm(runs, desc="fine-tuning", disable=not job.show_progress):
        outcome = finetune_once(
            job.ref, parts["tokenizer"], parts["data"][task.name], job.finetune, seed,
            max_eval_samples=job.max_eval_samples, show_progress=job.show_progress,
        )
        outcomes.setdefault(task.name, []).append(outcome)
    settings = {k: v for k, v in dataclasses.asdict(job.finetune).items() if k not in ("pairs", "siamese_head", "peft")}
    if settings.get("lora_targets") is not None:
        settings["lora_targets"] = list(settings["lora_targets"])
    rows = []
    for task in parts["tasks"]:
        runs_of_task = outcomes[task.name]
        for split in task.reported_splits:
            for metric in task.metrics:
                values = [run["splits"][split]["metrics"][metric] for run in runs_of_task]
                rows.append({
                    "task": task.name, "metric": metric, "value": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None, "values": values,
                    "split": split, "rows": runs_of_task[0]["splits"][split]["rows"], "protocol": "finetune",
                    "pairing": pairing_of(task, job.finetune), "head": head_of(task, job.finetune),
                    "peft": job.finetune.peft, "seeds": seeds,
                    "selection": [run["selection"] for run in runs_of_task],
                    "settings": settings,
                    **_common(job, parts, parts["data"][task.name]),
                })
    return rows


# ---------------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------------

_KEY = ("task", "metric", "split", "protocol", "pairing", "head", "peft")


def read_results(output_dir: Path) -> dict | None:
    path = Path(output_dir) / RESULTS_FILE
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TaskError(f"{path} exists but is not readable JSON ({err}); move it aside first") from None
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA or not isinstance(payload.get("results"), list):
        raise TaskError(f"{path} exists but is not a {SCHEMA} file; move it aside first")
    return payload


def merge_results(existing: dict | None, rows: list[dict]) -> dict:
    """Existing rows with the same key (task, metric, split, protocol, pairing, head, peft) are replaced."""
    keys = {tuple(row[k] for k in _KEY) for row in rows}
    kept = [row for row in (existing or {}).get("results", []) if tuple(row.get(k) for k in _KEY) not in keys]
    return {"schema": SCHEMA, "results": kept + rows}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(output_dir: Path, payload: dict) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(output_dir / RESULTS_FILE, json.dumps(payload, indent=2, allow_nan=True) + "\n")
    _atomic_write(output_dir / TABLE_FILE, to_markdown(payload) + "\n")


def format_value(row: dict) -> str:
    value = row["value"]
    if value is None or value != value:  # NaN: an undefined correlation (constant predictions)
        return "n/a"
    text = f"{value:.4f}"
    if row.get("std") is not None:
        text += f" ± {row['std']:.4f}"
    return text


def to_markdown(payload: dict) -> str:
    lines = [
        "| task | split | metric | value | protocol | pairing | head | peft | seeds | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["results"]:
        notes = []
        if not row["data"].get("sizes_checked", True):
            notes.append("not the official split sizes")
        settings = row.get("settings") or {}
        if settings.get("max_train_samples"):
            notes.append(f"{settings['max_train_samples']} training rows")
        official = TASKS[row["task"]].sizes.get(row["split"]) if row["task"] in TASKS else None
        if official is not None and row.get("rows") not in (None, official):
            notes.append(f"scored on {row['rows']} of {official} rows")
        lines.append(
            f"| {row['task']} | {row['split']} | {row['metric']} | {format_value(row)} | {row['protocol']} "
            f"| {row['pairing']} | {row['head']} | {row['peft'] or '-'} | {len(row['seeds']) or '-'} "
            f"| {'; '.join(notes) or '-'} |"
        )
    return "\n".join(lines)
