"""Loading evaluation data from the Hub or from the original release files, into one schema.

Both paths end in :func:`normalise`: the same columns (``sentence1``, ``sentence2``, ``label``), the
same features (``ClassLabel`` names or float32 scores), the same split names, and the official split
sizes checked, so a number never silently comes from a truncated or re-split copy.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .tasks import Task, TaskError

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    """A task's normalised splits and where they came from (recorded in every result)."""

    task: Task
    splits: datasets.DatasetDict
    source: str  # "hub:<path>[/<config>]@<revision>" or "local:<folder>"
    checksums: dict[str, str] = field(default_factory=dict)  # file or split -> sha256
    skipped_rows: int = 0
    sizes_checked: bool = True


def features_for(task: Task) -> datasets.Features:
    columns = {name: datasets.Value("string") for name in task.text_columns}
    if task.is_regression:
        columns["label"] = datasets.Value("float32")
    else:
        columns["label"] = datasets.ClassLabel(names=list(task.label_names))
    return datasets.Features(columns)


def check_sizes(task: Task, splits: dict[str, int], strict: bool, source: str) -> bool:
    """Compare row counts with the official ones; a mismatch fails unless ``strict`` is off."""
    for split, rows in splits.items():
        expected = task.sizes.get(split)
        if expected is not None and rows != expected:
            message = (
                f"{task.name} {split} from {source} has {rows} rows, the official split has {expected}; "
                "refusing a truncated or re-split copy (pass --allow-partial-data to evaluate it anyway, "
                "and the results will say so)"
            )
            if strict:
                raise TaskError(message)
            logger.warning(message)
            return False
    return True


def check_label(task: Task, value, where: str):
    """The label as the schema stores it, or a TaskError naming ``where``."""
    if task.is_regression:
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise TaskError(f"{where}: score {value!r} is not a number") from None
        low, high = task.score_range
        if math.isnan(score) or not low <= score <= high:
            raise TaskError(f"{where}: score {value!r} is outside {task.name}'s range [{low:g}, {high:g}]")
        return score
    if isinstance(value, str):
        label = task.local.label_map.get(value.strip()) if task.local.label_map else None
        if label is None:
            raise TaskError(
                f"{where}: label {value!r} is not one of {task.name}'s labels "
                f"({', '.join(sorted(task.local.label_map or {}))})"
            )
        return label
    if not isinstance(value, int) or not 0 <= value < task.num_labels:
        raise TaskError(f"{where}: label {value!r} is outside {task.name}'s label ids 0..{task.num_labels - 1}")
    return value


# ---------------------------------------------------------------------------------------------------
# The original release files
# ---------------------------------------------------------------------------------------------------


def expected_layout(task: Task) -> str:
    return ", ".join(sorted(set(task.local.files.values())))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_rows(path: Path, task: Task, skip_bad_rows: bool):
    """Yields ``(line_number, {normalised column: raw string}, split value)`` and counts skips."""
    source = task.local
    wanted = {**source.columns}
    if source.split_column:
        wanted[source.split_column] = "__split__"
    # utf-8-sig: the MRPC files start with a byte-order mark, as GLUE's own download writes them.
    # QUOTE_NONE: quotes are text in these files (an RTE row starts with an unbalanced one).
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if source.has_header:
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in wanted if name not in header]
            if missing:
                raise TaskError(f"{path}: header lacks column(s) {', '.join(missing)} (found: {', '.join(header)})")
            index = {header.index(name): target for name, target in wanted.items()}
        else:
            index = dict(source.positions)
        needed = max(index) + 1
        for fields in reader:
            line = reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line (e.g. a trailing one)
            row = {target: fields[i] for i, target in index.items() if i < len(fields)}
            problem = None
            if len(fields) < needed:
                problem = f"{len(fields)} fields, expected at least {needed}"
            elif any(not row[col].strip() for col in task.text_columns):
                problem = "empty sentence"
            else:
                try:
                    row["label"] = check_label(task, row["label"], f"{path}:{line}")
                except TaskError as err:
                    problem = str(err).split(": ", 1)[1]
            if problem is not None:
                if not skip_bad_rows:
                    raise TaskError(f"{path}:{line}: malformed row ({problem}); pass --skip-bad-rows to skip such rows")
                logger.warning("%s:%d: skipped malformed row (%s)", path, line, problem)
                yield line, None, None
                continue
            yield line, row, row.pop("__split__", None)


def load_local(
    task: Task, data_dir: Path, splits: list[str], *, skip_bad_rows: bool = False, strict_sizes: bool = True
) -> TaskData:
    """The task's ``splits`` from the original release files under ``data_dir``."""
    data_dir = Path(data_dir).expanduser().resolve()
    source = task.local
    paths = {split: data_dir / source.files[split] for split in splits}
    for split, path in paths.items():
        if not path.is_file():
            raise TaskError(
                f"{task.name}: missing {path} (expected under --data-dir: {expected_layout(task)})"
            )
    columns: dict[str, dict[str, list]] = {split: {c: [] for c in (*task.text_columns, "label")} for split in splits}
    counts = {split: 0 for split in splits}
    skipped = 0
    checksums = {}
    by_file: dict[Path, list[str]] = {}
    for split, path in paths.items():
        by_file.setdefault(path, []).append(split)
    for path, file_splits in by_file.items():
        checksums[str(path.relative_to(data_dir))] = sha256_file(path)
        value_to_split = {source.split_values[s]: s for s in file_splits} if source.split_column else None
        for _, row, split_value in _read_rows(path, task, skip_bad_rows):
            if value_to_split is not None:
                split = value_to_split.get((split_value or "").strip()) if row is not None else None
                if row is not None and split is None:
                    continue  # a split this run does not read
            else:
                split = file_splits[0]
            if row is None:
                skipped += 1
                continue
            counts[split] += 1
            for col in columns[split]:
                columns[split][col].append(row[col])
    features = features_for(task)
    dataset = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(columns[split], features=features) for split in splits}
    )
    if skipped:
        # The user chose to drop rows: the splits are no longer the official ones, and results say so.
        logger.warning("%s: %d malformed row(s) skipped; split sizes are not the official ones", task.name, skipped)
        sizes_checked = False
    else:
        sizes_checked = check_sizes(task, counts, strict_sizes, str(data_dir))
    return TaskData(task, dataset, f"local:{data_dir}", checksums, skipped, sizes_checked)


# ---------------------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------------------


def normalise_hub(task: Task, raw: datasets.DatasetDict, splits: list[str]) -> datasets.DatasetDict:
    """Hub columns -> the task schema: rename, keep only what the task reads, check every label."""
    out = {}
    hub = task.hub
    features = features_for(task)
    for split in splits:
        if split not in raw:
            raise TaskError(f"{task.name}: the Hub dataset {hub.path} has no {split!r} split (has {', '.join(raw)})")
        data = raw[split]
        missing = [c for c in (*hub.columns, hub.label) if c not in data.column_names]
        if missing:
            raise TaskError(f"{task.name}: the Hub dataset {hub.path} lacks column(s) {', '.join(missing)}")
        labels = [check_label(task, v, f"{hub.path} {split} row {i}") for i, v in enumerate(data[hub.label])]
        columns = {target: data[name] for name, target in hub.columns.items()}
        columns["label"] = labels
        out[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(out)


def load_hub(task: Task, splits: list[str], *, strict_sizes: bool = True) -> TaskData:
    hub = task.hub
    try:
        raw = datasets.load_dataset(hub.path, hub.name, revision=hub.revision)
    except Exception as err:  # noqa: BLE001 - network, auth or format: one line either way
        raise TaskError(
            f"{task.name}: could not load {hub.path} from the Hub ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "offline, pass --data-dir with the original files"
        ) from None
    splits_data = normalise_hub(task, raw, splits)
    where = f"{hub.path}{'/' + hub.name if hub.name else ''}@{hub.revision or 'main'}"
    sizes_checked = check_sizes(task, {s: len(d) for s, d in splits_data.items()}, strict_sizes, where)
    fingerprints = {split: raw[split]._fingerprint for split in splits}
    return TaskData(task, splits_data, f"hub:{where}", fingerprints, 0, sizes_checked)


def load_task(
    task: Task,
    splits: list[str],
    data_dir: Path | None = None,
    *,
    skip_bad_rows: bool = False,
    strict_sizes: bool = True,
) -> TaskData:
    if data_dir is not None:
        return load_local(task, data_dir, splits, skip_bad_rows=skip_bad_rows, strict_sizes=strict_sizes)
    return load_hub(task, splits, strict_sizes=strict_sizes)
