"""The model card (``README.md``) of a checkpoint folder, built from the records in the folder.

Every number on the card is read from a file beside the weights, and the card names the file and the
decollapse command that wrote it:

- ``config.json``: the architecture, its objective and its knobs (always present);
- ``model.safetensors``: the parameter count (read from the tensor shapes in its header);
- ``metrics.json`` / ``training_log.json`` / ``corpus.json``: the training summary (``decollapse train``);
- ``diagnostics.json``: the collapse report at the end of training (``decollapse train``);
- ``eval_results.json``: the evaluation rows (``decollapse eval``), also the ``model-index`` metadata;
- ``plots/*.png``: embedded by relative link.

A record that is not there is said to be missing; nothing is filled in. A bare ``save_pretrained``
folder therefore gets a card that states what the weights are and that there is no training record.

The metadata goes through ``huggingface_hub``'s ``ModelCardData`` and is parsed back before a card is
written (:func:`validate_card`), so a card that the Hub would misread is never written.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

CARD_FILE = "README.md"
LICENSE = "apache-2.0"  # the package's licence (pyproject.toml); the weights are released under it too
# The Hub pipeline of each objective's head; the encoder-only objectives serve features.
PIPELINE_TAGS = {"causal_lm": "text-generation", "masked_lm": "fill-mask"}
DEFAULT_PIPELINE_TAG = "feature-extraction"
REQUIRED_METADATA = ("library_name", "tags", "license", "pipeline_tag")
# Text that marks an unfinished card: the Hub template's filler, unrendered Jinja, and the usual notes.
PLACEHOLDERS = ("[More Information Needed]", "{{", "}}", "TODO", "TBD", "lorem")
_PLACEHOLDER_RE = re.compile(
    r"\[More Information Needed\]|\{\{|\}\}|\bTODO\b|\bTBD\b|lorem", flags=re.IGNORECASE
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")

# Citations of a training choice rather than of the architecture.
OBJECTIVE_CITATIONS: dict[str, str] = {
    "tsdae": "Wang, Reimers & Gurevych 2021, *TSDAE: Using Transformer-based Sequential Denoising Auto-Encoder "
    "for Unsupervised Sentence Embedding Learning*, Findings of EMNLP 2021, "
    "[arXiv:2104.06979](https://arxiv.org/abs/2104.06979).",
}
WEIGHTING_CITATIONS: dict[str, str] = {
    "kendall_gal": "Kendall, Gal & Cipolla 2018, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene "
    "Geometry and Semantics*, CVPR 2018, [arXiv:1705.07115](https://arxiv.org/abs/1705.07115).",
}

_SOURCES = {
    "metrics.json": "`decollapse train`",
    "training_log.json": "`decollapse train` (the Trainer's log history)",
    "diagnostics.json": "`decollapse train` (the final collapse report)",
    "eval_results.json": "`decollapse eval`",
    "corpus.json": "`decollapse train` (the embedded corpus's summary)",
}


class CardError(ValueError):
    """The card cannot be built or is not valid; one line naming the problem."""


# ---------------------------------------------------------------------------------------------------
# Reading the folder
# ---------------------------------------------------------------------------------------------------


@dataclass
class Records:
    """What a checkpoint folder holds, read once. A missing optional record is ``None``."""

    folder: Path
    arch: Any  # registry.Architecture
    config: Any  # the architecture's config
    num_parameters: int | None
    metrics: dict | None = None
    log: list | None = None
    diagnostics: dict | None = None
    eval_results: dict | None = None
    corpus: dict | None = None
    loss_weighting: dict | None = None
    plots: list[str] = field(default_factory=list)
    has_weights: bool = False
    has_tokenizer: bool = False
    has_remote_code: bool = False
    has_sentence_transformers: bool = False

    @property
    def objective(self) -> str:
        return self.config.objective


def read_records(folder: Path) -> Records:
    """Reads every record of ``folder``; raises CardError when config.json is missing or any record
    present is unreadable (a corrupt record is never silently skipped)."""
    from ..registry import ARCHITECTURES

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CardError(f"{folder}: no config.json, not a model folder")
    raw_config = _read_json(config_path)
    model_type = raw_config.get("model_type") if isinstance(raw_config, dict) else None
    arch = next((a for a in ARCHITECTURES.values() if a.config_class.model_type == model_type), None)
    if arch is None:
        raise CardError(f"{config_path}: model_type {model_type!r} is not a decollapse architecture")
    try:
        config = arch.config_class.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise CardError(f"{config_path}: {str(err).splitlines()[0]}") from None

    records = Records(folder, arch, config, _count_parameters(arch, config))
    records.has_weights = _has_weights(folder)
    records.metrics = _read_optional(folder / "metrics.json", dict)
    records.log = _read_optional(folder / "training_log.json", list)
    records.diagnostics = _read_optional(folder / "diagnostics.json", dict)
    records.corpus = _read_optional(folder / "corpus.json", dict)
    records.loss_weighting = _read_optional(folder / "loss_weighting.json", dict)
    if (folder / "eval_results.json").is_file():
        from ..eval_suites.harness import read_results
        from ..eval_suites.tasks import TaskError

        try:
            records.eval_results = read_results(folder)
        except TaskError as err:
            raise CardError(str(err)) from None
    if (folder / "plots").is_dir():
        # The loss curves first, then the per-unit plots in name order.
        names = sorted(p.name for p in (folder / "plots").glob("*.png") if p.is_file())
        records.plots = sorted(names, key=lambda n: (n != "losses.png", n))
    records.has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    records.has_remote_code = bool(raw_config.get("auto_map"))
    records.has_sentence_transformers = (folder / "modules.json").is_file()
    return records


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CardError(f"{path}: not readable JSON ({err})") from None


def _read_optional(path: Path, kind: type):
    if not path.is_file():
        return None
    payload = _read_json(path)
    if not isinstance(payload, kind):
        expected = "object" if kind is dict else "list"
        raise CardError(f"{path}: expected a JSON {expected}, found {type(payload).__name__}")
    return payload


def _count_parameters(arch, config) -> int | None:
    """Parameters of the model ``config.json`` describes, counted on a model built on the meta device
    (shapes only, nothing allocated). The weights file would also count persistent buffers, such as a
    router's step counter, and tied weights are one parameter either way."""
    import copy

    import torch

    try:
        with torch.device("meta"):
            model = arch.model_for_objective(config.objective)(copy.deepcopy(config))
    except Exception:  # noqa: BLE001 - the count is optional; the card then says it has none
        return None
    return sum(p.numel() for p in model.parameters())


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or any(folder.glob("model-*.safetensors"))


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def build_card(folder: Path, *, repo_id: str | None = None, local_path: Path | None = None) -> ModelCard:
    """The model card of ``folder`` (see the module docstring).

    ``repo_id`` (``USER/NAME``) names the model in the model-index and in the usage snippets. Without
    it they name the folder by its path: ``local_path`` when given (the folder's final place, for a
    card written into a staging folder that is renamed afterwards), else ``folder``.
    """
    folder = Path(folder)
    if repo_id is not None:
        _check_repo_id(repo_id)
    records = read_records(folder)
    local = Path(local_path) if local_path is not None else folder
    name = repo_id or local.name
    source = repo_id or str(local)

    eval_results, skipped = _eval_results(records)
    data = ModelCardData(
        library_name="transformers",
        license=LICENSE,
        tags=_tags(records),
        pipeline_tag=PIPELINE_TAGS.get(records.objective, DEFAULT_PIPELINE_TAG),
        datasets=_training_datasets(records) or None,
        base_model=_base_model(records),
        model_name=name,
        eval_results=eval_results or None,
    )
    sections = [
        _summary(records, name),
        _config_section(records),
        _training_section(records),
        _evaluation_section(records, skipped),
        _diagnostics_section(records),
        _plots_section(records),
        _usage_section(records, source),
        _limitations_section(records),
        _citations_section(records),
    ]
    body = "\n\n".join(s.strip("\n") for s in sections if s) + "\n"
    try:
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}", ignore_metadata_errors=False)
    except ValueError as err:
        raise CardError(f"{folder}: the card's metadata does not parse ({str(err).splitlines()[0]})") from None


def write_card(folder: Path, *, repo_id: str | None = None, local_path: Path | None = None) -> Path:
    """Builds (see :func:`build_card`), validates and writes ``folder/README.md`` atomically (a
    temporary file renamed into place, so a reader never sees half a card). Returns the path written."""
    folder = Path(folder)
    card = build_card(folder, repo_id=repo_id, local_path=local_path)
    validate_card(card)
    path = folder / CARD_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(str(card), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def validate_card(path_or_card) -> None:
    """Raises CardError unless the card's metadata parses through huggingface_hub (``ModelCard`` /
    ``ModelCardData``, the model-index round trip through ``EvalResult``), has every key of
    :data:`REQUIRED_METADATA`, and the card holds no placeholder text (:data:`PLACEHOLDERS`)."""
    if isinstance(path_or_card, ModelCard):
        text, where = str(path_or_card), "the card"
    else:
        path = Path(path_or_card)
        if not path.is_file():
            raise CardError(f"{path}: no such card file")
        text, where = path.read_text(encoding="utf-8"), str(path)
    if not text.startswith("---"):
        raise CardError(f"{where}: no YAML metadata block at the top")
    try:
        # Parsed from the text (never ModelCard.load on a string that could be taken for a repo id).
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as err:  # noqa: BLE001 - YAML and metadata errors alike are one line
        first_line = (str(err).splitlines() or [""])[0]
        raise CardError(f"{where}: metadata does not parse ({type(err).__name__}: {first_line})") from None
    data = card.data
    if not isinstance(data, ModelCardData):
        raise CardError(f"{where}: metadata is not model-card metadata")
    missing = [key for key in REQUIRED_METADATA if not getattr(data, key, None)]
    if missing:
        raise CardError(f"{where}: metadata lacks {', '.join(missing)}")
    if data.eval_results:
        if not data.model_name:
            raise CardError(f"{where}: model-index without a model name")
        try:
            name, again = model_index_to_eval_results(eval_results_to_model_index(data.model_name, data.eval_results))
        except (KeyError, TypeError, ValueError) as err:
            raise CardError(f"{where}: model-index does not round-trip ({err})") from None
        if name != data.model_name or again != list(data.eval_results):
            raise CardError(f"{where}: model-index does not round-trip through huggingface_hub's EvalResult")
        bad = [r.metric_type for r in data.eval_results if not _finite(r.metric_value)]
        if bad:
            raise CardError(f"{where}: model-index holds non-finite values ({', '.join(bad)})")
    found = _PLACEHOLDER_RE.search(text)
    if found:
        line = text.count("\n", 0, found.start()) + 1
        raise CardError(f"{where}: placeholder text {found.group(0)!r} on line {line}")


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise CardError(f"repo id {repo_id!r}: {str(err).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise CardError(f"repo id {repo_id!r}: expected USER/NAME")


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------


def _tags(records: Records) -> list[str]:
    tags = ["decollapse", records.arch.name, records.objective, "collapse-diagnostics"]
    if records.has_sentence_transformers:
        tags.append("sentence-transformers")
    return tags


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` or a bare canonical name, not a local path (same reading as ``decollapse train``)."""
    if not source or source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _training_datasets(records: Records) -> list[str]:
    """The training data when it is a Hub dataset. Evaluation datasets are in the model-index only:
    ``datasets`` says what the weights were trained on."""
    if not records.metrics:
        return []
    dataset = str(records.metrics.get("dataset") or "")
    hub_id = dataset.partition(":")[0]
    return [hub_id] if dataset != "synthetic" and _looks_like_hub_id(hub_id) else []


def _base_model(records: Records) -> str | None:
    """``config.init_from`` (the checkpoint the embeddings were copied from) when it is a Hub id; a
    local path is named in the body instead, since the Hub links ``base_model`` to a repository."""
    init_from = getattr(records.config, "init_from", None)
    return init_from if init_from and _looks_like_hub_id(init_from) else None


def _eval_results(records: Records) -> tuple[list[EvalResult], list[dict]]:
    """model-index entries for the rows of eval_results.json; rows without a finite value are
    returned separately (the model-index needs a number)."""
    from ..eval_suites.tasks import TASKS

    results, skipped = [], []
    for row in (records.eval_results or {}).get("results", []):
        if not _finite(row.get("value")):
            skipped.append(row)
            continue
        task = TASKS.get(row["task"])
        notes = _row_notes(row)
        detail = ", ".join(x for x in (row.get("protocol"), f"{row.get('pairing')} {row.get('head')}",
                                        row.get("peft"), notes) if x)
        results.append(
            EvalResult(
                task_type="sentence-similarity" if task is None or task.is_similarity else "text-classification",
                task_name=task.title if task else row["task"],
                dataset_type=task.hub.path if task else row["task"],
                dataset_name=task.title if task else row["task"],
                dataset_config=task.hub.name if task else None,
                dataset_split=row.get("split"),
                dataset_revision=task.hub.revision if task else None,
                metric_type=row["metric"],
                metric_value=float(row["value"]),
                metric_name=f"{row['metric']} ({detail})",
            )
        )
    return results, skipped


def _row_notes(row: dict) -> str:
    """The caveats ``decollapse eval`` writes beside a row ("scored on N of M rows", …), taken from
    its own table so the card and eval_results.md never word them differently."""
    from ..eval_suites.harness import to_markdown

    last_line = to_markdown({"results": [row]}).splitlines()[-1]
    notes = last_line.strip().strip("|").split("|")[-1].strip()
    return "" if notes == "-" else notes


# ---------------------------------------------------------------------------------------------------
# Body sections
# ---------------------------------------------------------------------------------------------------


def _summary(records: Records, name: str) -> str:
    arch = records.arch
    params = (
        f"{records.num_parameters:,} parameters (counted on the model `config.json` describes)"
        if records.num_parameters is not None
        else "The parameter count is unknown (the model could not be built from `config.json`)"
    )
    if not records.has_weights:
        params += ". This folder holds no safetensors weights"
    version = (records.metrics or {}).get("decollapse_version")
    made = f", trained with decollapse {version}" if version else ""
    return (
        f"# {name}\n\n"
        f"A `{arch.name}` model with a `{records.objective}` head{made}. The architecture: {arch.summary}. {params}. "
        "It comes from decollapse, a package of modular language "
        "models whose sub-units tend to collapse into copies of each other, with shared diagnostics that "
        "measure that collapse.\n\n"
        "Every number on this card is read from a file in this repository; each section names the file and "
        "the decollapse command that wrote it. Where a record is missing, the card says so."
    )


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _config_section(records: Records) -> str:
    config = records.config
    knobs = type(config).knobs()
    lines = [
        "## Architecture",
        "",
        f"`{records.arch.name}` (`model_type` `{config.model_type}`), from `config.json`. The knobs "
        f"`decollapse list` shows for this architecture, with their values here; a value that differs from "
        "the default is in bold (a default of `None` is derived from other fields).",
        "",
        "| knob | value | default |",
        "|---|---|---|",
        f"| vocab_size | {config.vocab_size} | – |",
    ]
    for knob, default in knobs.items():
        value = getattr(config, knob, None)
        shown = f"`{_fmt(value)}`"
        if default is not None and value != default:
            shown = f"**{shown}**"
        lines.append(f"| {knob} | {shown} | `{_fmt(default)}` |")
    init_from = getattr(config, "init_from", None)
    if init_from:
        where = "its Hub repository is the `base_model` in the metadata" if _base_model(records) else (
            "a local path, so it is not linked as `base_model`"
        )
        lines += ["", f"The token embeddings were initialised from `{init_from}` ({where})."]
    return "\n".join(lines)


def _training_section(records: Records) -> str:
    lines = ["## Training"]
    if records.metrics is None and records.log is None:
        lines += [
            "",
            "No training record in this folder: there is no `metrics.json` or `training_log.json` (both written "
            "by `decollapse train`), so the data, the length of training and the losses these weights reached "
            "are not stated here.",
        ]
        return "\n".join(lines)
    m = records.metrics
    if m is None:
        lines += ["", "No `metrics.json` in this folder (written by `decollapse train`): no run summary."]
    else:
        from ..reporting import rerun_command

        recipe = m.get("recipe") or {}
        lines += ["", f"From `metrics.json`, written by {_SOURCES['metrics.json']}.", ""]
        lines.append(f"- data: {_data_description(records)}")
        lines.append(
            f"- {m.get('steps', 'n/a')} optimizer steps, {_int(m.get('train_tokens'))} training tokens, "
            f"{_fmt(m.get('train_seconds'))} s of training"
            + (f"; batch {recipe['batch_size']}" if "batch_size" in recipe else "")
            + (f", learning rate {_fmt(recipe['learning_rate'])} ({recipe.get('lr_scheduler', 'n/a')}, "
               f"{recipe.get('warmup_steps', 'n/a')} warm-up steps)" if "learning_rate" in recipe else "")
            + (f", seed {recipe['seed']}" if "seed" in recipe else "")
        )
        lines.append(f"- loss weighting: {_weighting_description(records, recipe)}")
        try:
            lines.append(f"- rerun: `{rerun_command(m)}`")
        except KeyError:
            pass  # a summary from an older version without the fields the command needs
        lines += _held_out_table(records)
    lines += _loss_terms_table(records)
    return "\n".join(lines)


def _int(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"


def _data_description(records: Records) -> str:
    dataset = records.metrics.get("dataset")
    if dataset is None:
        return "not recorded in `metrics.json`"
    if dataset != "synthetic":
        return f"`{dataset}` (as given to `decollapse train --dataset`)"
    corpus = records.corpus
    if corpus is None:
        return "the embedded synthetic corpus (no `corpus.json` in this folder for its details)"
    cfg = corpus.get("config", {})
    return (
        f"the embedded synthetic corpus (from `corpus.json`): {_int(cfg.get('num_train'))} training sequences of "
        f"{cfg.get('seq_len', 'n/a')} tokens, vocabulary {_int(corpus.get('vocab_size'))}, "
        f"{cfg.get('num_domains', 'n/a')} domains, generator seed {cfg.get('seed', 'n/a')}. It is a generated "
        "language whose Bayes-optimal perplexity is known exactly, not natural text"
    )


def _weighting_description(records: Records, recipe: dict) -> str:
    strategy = recipe.get("loss_weighting", "n/a")
    weights = recipe.get("aux_weights")
    if weights is None:
        defaults = {k: w for k, w in records.config.aux_loss_weights.items() if w > 0}
        weights_text = (
            "the config's weights " + ", ".join(f"{k} = {_fmt(w)}" for k, w in defaults.items())
            if defaults else "no auxiliary term (every auxiliary weight in the config is 0)"
        )
    else:
        weights_text = "weights " + ", ".join(f"{k} = {_fmt(w)}" for k, w in weights.items())
    if strategy == "kendall_gal" and weights_text.startswith(("the config", "weights")):
        # Kendall-Gal learns each weight; the given one only sets its starting log-variance.
        weights_text = "learned weights starting from " + weights_text
    text = f"`{strategy}`, {weights_text}"
    if recipe.get("aux_warmup_steps"):
        text += f", auxiliary weights warmed up linearly over {recipe['aux_warmup_steps']} steps"
    if records.loss_weighting and isinstance(records.loss_weighting.get("log_vars"), dict):
        learned = ", ".join(f"{k} = {_fmt(v)}" for k, v in records.loss_weighting["log_vars"].items())
        text += f"; learned log-variances at the end (from `loss_weighting.json`): {learned}"
    return text


def _held_out_table(records: Records) -> list[str]:
    m = records.metrics.get("metrics") or {}
    splits = [s for s in ("validation", "test") if f"{s}_loss" in m]
    if not splits:
        return []
    causal = records.objective == "causal_lm"
    lines = ["", "Held-out task loss after training (`metrics.json`):", ""]
    if causal:
        lines += [
            "| split | task loss (nats) | perplexity | Bayes-optimal perplexity | ratio |",
            "|---|---|---|---|---|",
        ]
    else:
        lines += ["| split | task loss (nats) |", "|---|---|"]
    for split in splits:
        row = f"| {split} | {_fmt(m[f'{split}_loss'])} |"
        if causal:
            row += (f" {_fmt(m.get(f'{split}_perplexity'))} | {_fmt(m.get(f'{split}_optimal_perplexity', 'n/a'))} | "
                    f"{_fmt(m.get(f'{split}_perplexity_ratio', 'n/a'))} |")
        lines.append(row)
    if causal and any(f"{s}_optimal_perplexity" in m for s in splits):
        lines += ["", "The Bayes-optimal perplexity is the generator's exact bound on the same positions the model "
                  "is scored on; a ratio of 1 is the best any model can do."]
    return lines


_TERM_MEANINGS = (
    ("loss", "total loss that was back-propagated (task + weighted auxiliary terms)"),
    ("task_loss", "task loss"),
    ("aux/", "auxiliary term, unweighted"),
    ("aux_weighted/", "auxiliary term's contribution to the total"),
    ("aux_weight/", "multiplier in use at that step"),
    ("metric/", "logged beside the loss, not part of it"),
    ("train_loss", "mean total loss over the whole run (the Trainer's summary)"),
    ("eval_loss", "held-out task loss at the last evaluation during training"),
    ("eval_total_loss", "held-out total loss at the last evaluation during training"),
    ("eval_aux_weighted_", "held-out auxiliary contribution at the last evaluation during training"),
    ("eval_aux_", "held-out auxiliary term at the last evaluation during training"),
)


def _term_meaning(key: str) -> str | None:
    for prefix, meaning in _TERM_MEANINGS:
        if key == prefix or (prefix.endswith(("/", "_")) and key.startswith(prefix)):
            return meaning
    return None


def final_loss_terms(log: list[dict]) -> dict[str, tuple[float, int | None]]:
    """The last logged value of every loss term in a Trainer log history, with its step, in the
    order of :data:`_TERM_MEANINGS`."""
    last: dict[str, tuple[float, int | None]] = {}
    for entry in log:
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if _term_meaning(key) is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                last[key] = (float(value), entry.get("step"))
    order = {prefix: i for i, (prefix, _) in enumerate(_TERM_MEANINGS)}

    def rank(key: str) -> tuple[int, str]:
        for prefix, _ in _TERM_MEANINGS:
            if key == prefix or (prefix.endswith(("/", "_")) and key.startswith(prefix)):
                return order[prefix], key
        return len(order), key

    return {k: last[k] for k in sorted(last, key=rank)}


def _loss_terms_table(records: Records) -> list[str]:
    if records.log is None:
        return ["", "No `training_log.json` in this folder: the loss terms during training are not recorded here."]
    terms = final_loss_terms(records.log)
    if not terms:
        return ["", "`training_log.json` holds no loss term (no training or evaluation log was written)."]
    lines = [
        "",
        f"Final value of every loss term: the last value logged in `training_log.json`, written by "
        f"{_SOURCES['training_log.json']}. Training terms are averages over the steps since the previous log.",
        "",
        "| term | last logged value | at step | what it is |",
        "|---|---|---|---|",
    ]
    for key, (value, step) in terms.items():
        lines.append(f"| `{key}` | {_fmt(value)} | {step if step is not None else 'n/a'} | {_term_meaning(key)} |")
    return lines


def _evaluation_section(records: Records, skipped: list[dict]) -> str:
    from ..eval_suites.harness import to_markdown

    lines = ["## Evaluation"]
    payload = records.eval_results
    if not payload or not payload.get("results"):
        lines += ["", "No evaluation in this folder: there is no `eval_results.json` (written by `decollapse eval`)."]
        return "\n".join(lines)
    rows = payload["results"]
    sources = sorted({str((row.get("data") or {}).get("source")) for row in rows})
    lines += [
        "",
        f"From `eval_results.json`, written by {_SOURCES['eval_results.json']}; the same rows are the `model-index` "
        "in this card's metadata. The notes column carries each row's caveats; a row scored on fewer rows than the "
        "official split is a smoke test, not a benchmark result.",
        "",
        to_markdown(payload),
        "",
        f"Data read from: {', '.join(f'`{s}`' for s in sources)}. Protocols: `zeroshot` is cosine similarity of "
        "parameter-free mean-pooled embeddings with no training; `finetune` trains a task head (mean ± standard "
        "deviation over the listed seeds, model selection on a held-out slice of the training split).",
    ]
    if skipped:
        names = ", ".join(f"{r['task']} {r['metric']} ({r.get('split')})" for r in skipped)
        lines += ["", f"Left out of the model-index because the value is undefined (n/a): {names}."]
    return "\n".join(lines)


def _diagnostics_section(records: Records) -> str:
    from ..trainers.callbacks import check_health

    lines = ["## Collapse diagnostics"]
    diagnostics = records.diagnostics
    if diagnostics is None or not isinstance(diagnostics.get("metrics"), dict):
        lines += [
            "",
            "No `diagnostics.json` in this folder (written by `decollapse train` at the end of training), so no "
            "collapse verdict. `decollapse diagnose DIR` measures a folder that has `probe_batch.safetensors`.",
        ]
        lines += _alarm_lines(records)
        return "\n".join(lines)
    metrics = {k: float(v) for k, v in diagnostics["metrics"].items() if isinstance(v, (int, float))}
    step = diagnostics.get("step")
    checks = check_health(metrics)
    lines += [
        "",
        f"From `diagnostics.json`, written by {_SOURCES['diagnostics.json']}"
        + (f" at step {step}" if step is not None else "")
        + ", measured on a fixed probe batch. A unit group is healthy when every criterion below holds; each is "
        "judged on the worst group in the report, with the thresholds the training-time collapse monitor "
        "alarms on. A value exactly at its threshold passes.",
        "",
        "| criterion | healthy when | worst metric | value | threshold | result |",
        "|---|---|---|---|---|---|",
    ]
    for check in checks:
        c = check.criterion
        rule = f"every `*{c.suffix}` {'≥' if c.worst == 'min' else '≤'} {_fmt(check.threshold)}"
        if check.metric is None:
            lines.append(f"| {c.name} | {rule} | none in this report | – | {_fmt(check.threshold)} | not measured |")
        else:
            result = "**fail**" if check.tripped else "pass"
            lines.append(
                f"| {c.name} | {rule} | `{check.metric}` | {_fmt(check.value)} | {_fmt(check.threshold)} | {result} |"
            )
    lines += [""] + [f"- `{c.criterion.suffix}`: {c.criterion.meaning}." for c in checks]

    poor = []
    graded = _health_table(metrics)
    if graded:
        poor = sorted(k[: -len(".grade")] for k, v in metrics.items() if k.endswith(".grade") and v == 0.0)
        lines += [
            "",
            "Graded concept geometry (bands of the MrCogito concept analysis; the edges are the thresholds of "
            "each grade):",
            "",
            graded,
        ]
    signs = [f"{c.criterion.name} (`{c.metric}` = {_fmt(c.value)})" for c in checks if c.tripped]
    signs += [f"`{name}` graded POOR" for name in poor]
    measured = any(c.metric is not None for c in checks) or bool(graded)
    if not measured:
        verdict = "no verdict: the report has none of the metrics the criteria read"
    elif signs:
        verdict = "collapse signs: " + "; ".join(signs)
    else:
        verdict = "no collapse criterion tripped"
    lines += ["", f"**Verdict: {verdict}.**"]
    lines += _alarm_lines(records)
    return "\n".join(lines)


def _health_table(metrics: dict[str, float]) -> str | None:
    from ..diagnose import health_table
    from ..modeling.diagnostics import CollapseReport

    return health_table(CollapseReport(metrics=metrics))


def _alarm_lines(records: Records) -> list[str]:
    if records.metrics is None:
        return []
    alarms = records.metrics.get("alarms") or []
    if not alarms:
        return ["", "Training-time alarms (`metrics.json`): none were raised while training."]
    lines = ["", "Training-time alarms raised by the collapse monitor (`metrics.json`):", ""]
    lines += [f"- step {a.get('step')}: {a.get('criterion')}: {a.get('message')}" for a in alarms]
    return lines


def _plots_section(records: Records) -> str:
    if not records.plots:
        return ""
    lines = [
        "## Plots",
        "",
        "From `plots/`, drawn by `decollapse train` (or `decollapse diagnose`) from the records above.",
        "",
    ]
    for name in records.plots:
        stem = name[: -len(".png")]
        caption = "loss terms over training" if stem == "losses" else stem.replace("_", " ")
        lines.append(f"![{caption}](plots/{name})")
    return "\n".join(lines)


def _usage_section(records: Records, source: str) -> str:
    from ..registry import OBJECTIVE_AUTO_CLASSES

    arch = records.arch
    objective = records.objective
    auto = OBJECTIVE_AUTO_CLASSES.get(objective, "AutoModel")
    if auto not in arch.models:
        auto = "AutoModel"
    repo = json.dumps(source)

    def snippet(remote: bool) -> list[str]:
        trust = ", trust_remote_code=True" if remote else ""
        code = ["import torch"] if objective == "causal_lm" else []
        imports = ", ".join([auto] + (["AutoTokenizer"] if records.has_tokenizer else []))
        code += [f"from transformers import {imports}"]
        head = arch.extra_heads.get(objective) if not remote else None
        if not remote:
            code += ["", "import decollapse  # registers the decollapse architectures with the Auto classes"]
            if head:
                code += [f"from decollapse.modeling.{arch.name} import {head}"]
        code += ["", f"model = {auto}.from_pretrained({repo}{trust})"]
        if head:
            code += [f"trained_head = {head}.from_pretrained({repo})  # the {objective} head it was trained with"]
        if records.has_tokenizer:
            # AutoTokenizer reads config.json too, whose classes are the repository's code.
            code += [f"tokenizer = AutoTokenizer.from_pretrained({repo}{trust})"]
            if objective == "causal_lm":
                code += [
                    "start = torch.tensor([[tokenizer.bos_token_id]])",
                    "print(tokenizer.decode(model.generate(start, max_new_tokens=20, do_sample=True)[0]))",
                ]
            else:
                code += [
                    'batch = tokenizer(["a first text", "a second one"], padding=True, return_tensors="pt")',
                    "outputs = model(**batch)",
                ]
        return ["```python", *code, "```"]

    lines = ["## Usage", ""]
    if records.has_tokenizer and (records.metrics or {}).get("dataset") == "synthetic":
        lines += [
            "The tokenizer is the synthetic corpus's: it knows the generated language's words, not English.",
            "",
        ]
    if not records.has_tokenizer:
        lines += [
            "This folder has no tokenizer files: give the model token ids from the tokenizer it was trained with.",
            "",
        ]
    lines += ["**Without decollapse installed** (the modeling code is loaded from the repository):", ""]
    lines += snippet(remote=True)
    if not records.has_remote_code:
        lines += [
            "",
            "This folder holds no modeling code yet (`config.json` has no `auto_map`): the snippet above works on the "
            "folder `decollapse export DIR OUT` writes, which bundles the code.",
        ]
    lines += ["", "**With the decollapse package installed** (its classes registered with the Auto classes; no code from the repository runs):", ""]
    lines += snippet(remote=False)
    if records.has_sentence_transformers:
        lines += [
            "",
            "**As a sentence encoder** (the parameter-free mean pooling the evaluation uses):",
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            f"encoder = SentenceTransformer({repo}, trust_remote_code=True)",
            'embeddings = encoder.encode(["a first text", "a second one"])',
            "```",
        ]
    return "\n".join(lines)


def _limitations_section(records: Records) -> str:
    m = records.metrics
    if m is None:
        trained = "This folder does not record what the weights were trained on."
    elif m.get("dataset") == "synthetic":
        trained = (
            f"It was trained for {m.get('steps', 'n/a')} steps on the embedded synthetic corpus, a generated "
            "language, and has never seen natural text: it is a research artefact for studying collapse, not a "
            "language model to use."
        )
    else:
        trained = f"It was trained for {m.get('steps', 'n/a')} steps on `{m.get('dataset')}`."
    return "\n".join([
        "## Limitations",
        "",
        f"A small research model. {trained}",
        "",
        f"- {records.arch.limitations}",
        "- The collapse verdict covers the criteria listed above on one probe batch; a passing verdict is not "
        "a guarantee of useful units.",
    ])


def _citations_section(records: Records) -> str:
    refs = list(records.arch.citations)
    if records.objective in OBJECTIVE_CITATIONS:
        refs.append(OBJECTIVE_CITATIONS[records.objective])
    strategy = ((records.metrics or {}).get("recipe") or {}).get("loss_weighting")
    if strategy in WEIGHTING_CITATIONS:
        refs.append(WEIGHTING_CITATIONS[strategy])
    if not refs:
        return ""
    return "\n".join(["## Citations", "", "The research this model's architecture and training come from:", ""]
                     + [f"- {ref}" for ref in refs])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
