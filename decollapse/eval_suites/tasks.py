"""The evaluation tasks: what each one reads, predicts, scores and reports.

Every task, whatever its source (Hub dataset or the original release files), is normalised to one
schema: ``sentence1`` (and ``sentence2`` for pair tasks) as strings and ``label`` as a ``ClassLabel``
(classification) or a float32 score (regression). Split names follow the Hub datasets.

Reported splits are the ones with public labels: GLUE's validation splits (its test labels are
hidden), SICK's and PAWS's labelled test splits. Model selection never sees them: it uses a held-out
slice of the training split (see ``finetune.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HubSource:
    """A script-free Hub dataset: ``load_dataset(path, name, revision=revision)``.

    ``columns`` maps the Hub column names to the normalised ones; ``label`` names the Hub column that
    becomes ``label``. Hub label ids already follow the task's ``label_names`` order.
    """

    path: str
    name: str | None
    columns: dict[str, str]
    label: str = "label"
    revision: str | None = None


@dataclass(frozen=True)
class LocalSource:
    """The original release files under ``--data-dir``.

    ``files`` maps each split to its path relative to the data folder (several splits may share one
    file, told apart by ``split_column``). Columns are found by header name (``columns``: file column
    -> normalised column) or, for header-less files, by position (``positions``). ``label_map`` turns
    the file's label strings into label ids; a regression task parses floats instead.
    """

    files: dict[str, str]
    columns: dict[str, str] = field(default_factory=dict)
    positions: dict[int, str] = field(default_factory=dict)
    has_header: bool = True
    label_map: dict[str, int] | None = None
    split_column: str | None = None  # column whose value names the split (SICK's SemEval_set)
    split_values: dict[str, str] = field(default_factory=dict)  # split -> value in split_column


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    text_columns: tuple[str, ...]
    metrics: tuple[str, ...]  # the first one selects the best epoch
    reported_splits: tuple[str, ...]
    sizes: dict[str, int]  # official row counts per split, checked on load
    hub: HubSource
    local: LocalSource
    label_names: tuple[str, ...] | None = None  # None: regression
    score_range: tuple[float, float] | None = None  # regression scores must lie inside

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def is_similarity(self) -> bool:
        """Zero-shot cosine similarity applies: a pair task scored by correlation."""
        return self.is_pair and self.is_regression


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
_BINARY = {"0": 0, "1": 1}


def _glue(config: str, columns: dict[str, str]) -> HubSource:
    return HubSource("nyu-mll/glue", config, columns)


def _pair(a: str = "sentence1", b: str = "sentence2") -> dict[str, str]:
    return {a: "sentence1", b: "sentence2"}


def _gfiles(folder: str, *splits: tuple[str, str]) -> dict[str, str]:
    return {split: f"{folder}/{name}" for split, name in (("train", "train.tsv"), *splits)}


_DEV = ("validation", "dev.tsv")

# SICK: one file, the SemEval-2014 split in its last column. The parquet conversion of the Hub
# dataset is pinned because the `sick` loading script is refused by datasets >= 4.
_SICK_HUB_COLUMNS = _pair("sentence_A", "sentence_B")
_SICK_FILES = {"train": "SICK/SICK.txt", "validation": "SICK/SICK.txt", "test": "SICK/SICK.txt"}
_SICK_SPLITS = {"train": "TRAIN", "validation": "TRIAL", "test": "TEST"}
_SICK_SIZES = {"train": 4439, "validation": 495, "test": 4906}

TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            "cola", "CoLA", ("sentence1",), ("mcc",), ("validation",), {"train": 8551, "validation": 1043},
            _glue("cola", {"sentence": "sentence1"}),
            LocalSource(_gfiles("CoLA", _DEV), positions={1: "label", 3: "sentence1"}, has_header=False,
                        label_map=_BINARY),
            label_names=("unacceptable", "acceptable"),
        ),
        Task(
            "sst2", "SST-2", ("sentence1",), ("accuracy",), ("validation",), {"train": 67349, "validation": 872},
            _glue("sst2", {"sentence": "sentence1"}),
            LocalSource(_gfiles("SST-2", _DEV), {"sentence": "sentence1", "label": "label"}, label_map=_BINARY),
            label_names=("negative", "positive"),
        ),
        Task(
            "mrpc", "MRPC", ("sentence1", "sentence2"), ("f1", "accuracy"), ("validation",),
            {"train": 3668, "validation": 408},
            _glue("mrpc", _pair()),
            LocalSource(_gfiles("MRPC", _DEV), {"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"},
                        label_map=_BINARY),
            label_names=("not_equivalent", "equivalent"),
        ),
        Task(
            "qqp", "QQP", ("sentence1", "sentence2"), ("f1", "accuracy"), ("validation",),
            {"train": 363846, "validation": 40430},
            _glue("qqp", _pair("question1", "question2")),
            LocalSource(_gfiles("QQP", _DEV), {"question1": "sentence1", "question2": "sentence2",
                                               "is_duplicate": "label"}, label_map=_BINARY),
            label_names=("not_duplicate", "duplicate"),
        ),
        Task(
            "stsb", "STS-B", ("sentence1", "sentence2"), ("pearson", "spearman"), ("validation",),
            {"train": 5749, "validation": 1500},
            _glue("stsb", _pair()),
            LocalSource(_gfiles("STS-B", _DEV), {"sentence1": "sentence1", "sentence2": "sentence2", "score": "label"}),
            score_range=(0.0, 5.0),
        ),
        Task(
            "mnli", "MNLI", ("sentence1", "sentence2"), ("accuracy",), ("validation_matched", "validation_mismatched"),
            {"train": 392702, "validation_matched": 9815, "validation_mismatched": 9832},
            _glue("mnli", _pair("premise", "hypothesis")),
            LocalSource(
                _gfiles("MNLI", ("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv")),
                {"sentence1": "sentence1", "sentence2": "sentence2", "gold_label": "label"},
                label_map={name: i for i, name in enumerate(_NLI3)},
            ),
            label_names=_NLI3,
        ),
        Task(
            "qnli", "QNLI", ("sentence1", "sentence2"), ("accuracy",), ("validation",),
            {"train": 104743, "validation": 5463},
            _glue("qnli", _pair("question", "sentence")),
            LocalSource(_gfiles("QNLI", _DEV), {"question": "sentence1", "sentence": "sentence2", "label": "label"},
                        label_map={name: i for i, name in enumerate(_NLI2)}),
            label_names=_NLI2,
        ),
        Task(
            "rte", "RTE", ("sentence1", "sentence2"), ("accuracy",), ("validation",), {"train": 2490, "validation": 277},
            _glue("rte", _pair()),
            LocalSource(_gfiles("RTE", _DEV), {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
                        label_map={name: i for i, name in enumerate(_NLI2)}),
            label_names=_NLI2,
        ),
        Task(
            "wnli", "WNLI", ("sentence1", "sentence2"), ("accuracy",), ("validation",), {"train": 635, "validation": 71},
            _glue("wnli", _pair()),
            LocalSource(_gfiles("WNLI", _DEV), {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
                        label_map=_BINARY),
            label_names=("not_entailment", "entailment"),
        ),
        Task(
            "sick-r", "SICK-R", ("sentence1", "sentence2"), ("pearson", "spearman"), ("test",), _SICK_SIZES,
            HubSource("RobZamp/sick", None, _SICK_HUB_COLUMNS, label="relatedness_score",
                      revision="refs/convert/parquet"),
            LocalSource(_SICK_FILES, {"sentence_A": "sentence1", "sentence_B": "sentence2",
                                      "relatedness_score": "label"},
                        split_column="SemEval_set", split_values=_SICK_SPLITS),
            score_range=(1.0, 5.0),
        ),
        Task(
            "sick-e", "SICK-E", ("sentence1", "sentence2"), ("accuracy",), ("test",), _SICK_SIZES,
            HubSource("RobZamp/sick", None, _SICK_HUB_COLUMNS, revision="refs/convert/parquet"),
            LocalSource(_SICK_FILES, {"sentence_A": "sentence1", "sentence_B": "sentence2",
                                      "entailment_label": "label"},
                        label_map={name.upper(): i for i, name in enumerate(_NLI3)},
                        split_column="SemEval_set", split_values=_SICK_SPLITS),
            label_names=_NLI3,
        ),
        Task(
            "paws", "PAWS-Wiki", ("sentence1", "sentence2"), ("accuracy", "f1"), ("test",),
            {"train": 49401, "validation": 8000, "test": 8000},
            HubSource("google-research-datasets/paws", "labeled_final", _pair()),
            LocalSource({"train": "PAWS/train.tsv", "validation": "PAWS/dev.tsv", "test": "PAWS/test.tsv"},
                        {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, label_map=_BINARY),
            label_names=("not_paraphrase", "paraphrase"),
        ),
    ]
}

GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
GROUPS: dict[str, tuple[str, ...]] = {
    "glue": GLUE,
    # Paraphrase, similarity and entailment: the tasks a sentence-level concept encoder should help
    # with, as in MrCogito's evaluations (github.com/ksopyla/MrCogito).
    "concept": ("mrpc", "qqp", "stsb", "mnli", "sick-r", "sick-e", "paws"),
    "all": (*GLUE, "sick-r", "sick-e", "paws"),
}


class TaskError(ValueError):
    """Bad task selection or bad task data; the message is one line naming the problem."""


def resolve_suite(suite: str) -> list[Task]:
    """``"stsb,sick-r"`` or a group name (``glue``, ``concept``, ``all``) -> tasks, in order, no repeats."""
    names: list[str] = []
    for part in (p.strip().lower() for p in suite.split(",")):
        if not part:
            continue
        expanded = GROUPS.get(part, (part,))
        for name in expanded:
            if name not in TASKS:
                choices = ", ".join([*TASKS, *GROUPS])
                raise TaskError(f"unknown task {part!r}; choose from: {choices}")
            if name not in names:
                names.append(name)
    if not names:
        raise TaskError("--suite names no task")
    return [TASKS[name] for name in names]
