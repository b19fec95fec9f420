"""Evaluation suites: GLUE, SICK, PAWS and STS-B, fine-tuned or zero-shot, offline from the original
files or from the Hub. ``decollapse eval`` is the command line; :func:`run` the Python entry point.

The results schema is documented in ``docs/EVAL.md``.
"""

from .finetune import FinetuneSettings, SentenceTaskModel
from .harness import RESULTS_FILE, SCHEMA, TABLE_FILE, EvalJob, plan, run
from .sentence import ConceptPooling, ModelRef, pool, to_sentence_transformer
from .tasks import GROUPS, TASKS, Task, TaskError, resolve_suite

__all__ = [
    "ConceptPooling",
    "EvalJob",
    "FinetuneSettings",
    "GROUPS",
    "ModelRef",
    "RESULTS_FILE",
    "SCHEMA",
    "SentenceTaskModel",
    "TABLE_FILE",
    "TASKS",
    "Task",
    "TaskError",
    "plan",
    "pool",
    "resolve_suite",
    "run",
    "to_sentence_transformer",
]
