"""``decollapse export DIR OUT``: a checkpoint folder -> a self-contained, Hub-ready folder.

The folder loads like any Hub model, ``AutoModel.from_pretrained(OUT, trust_remote_code=True)``,
in an environment where decollapse is not installed. What it holds:

- ``config.json`` with an ``auto_map`` naming the flat code files below, ``model.safetensors`` (the
  weights, loaded and re-saved through the package's own class, so a folder with pickled weights
  comes out as safetensors only) and the tokenizer files;
- ``configuration_<arch>.py`` / ``modeling_<arch>.py`` generated from the package source, plus every
  module they import (transitively: shared helpers, and a sibling architecture's files when its blocks
  are reused) and nothing else (``decollapse.remote_code``);
- for an architecture with a pooling path, the sentence-transformers files (``modules.json``,
  ``sentence_bert_config.json``, ``1_Pooling/``): ``SentenceTransformer(OUT, trust_remote_code=True)``
  encodes with the same parameter-free mean the evaluation suites use;
- the records of the run that are in DIR (metrics, training log, diagnostics, eval results, plots,
  probe batch), so ``decollapse card OUT`` and ``decollapse diagnose OUT`` work on the export;
- ``README.md``, the model card built from those records.

Nothing is written to OUT until everything is ready: the folder is assembled beside it and renamed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..remote_code import GENERATED_HEADER, BundleError, write_remote_code

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# Files of a run folder that travel with the export (the card and `decollapse diagnose` read them).
RECORDS = (
    "metrics.json",
    "training_log.json",
    "diagnostics.json",
    "eval_results.json",
    "eval_results.md",
    "corpus.json",
    "probe_batch.safetensors",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Pooling module for concept models: sentence-transformers' stock Pooling applies the token mask
# whenever its length happens to equal the number of output vectors, which would mask concepts.
CONCEPT_POOLING_MODULE = "sentence_pooling"


class ExportError(ValueError):
    """The folder cannot be exported; one line naming the problem."""


# ---------------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A decollapse checkpoint folder, read far enough to know what it is."""

    folder: Path
    arch: object  # registry.Architecture
    config: object  # the architecture's config

    @property
    def objective(self) -> str:
        return self.config.objective


def read_checkpoint(folder: Path) -> Checkpoint:
    from transformers import AutoConfig

    from ..registry import ARCHITECTURES

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json, not a checkpoint folder")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{folder}/config.json is not readable JSON ({err})") from None
    arch = next((a for a in ARCHITECTURES.values() if a.config_class.model_type == model_type), None)
    if arch is None:
        raise ExportError(f"{folder}: model_type {model_type!r} is not a decollapse architecture")
    if not (folder / "model.safetensors").is_file() and not list(folder.glob("model-*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" (it has {', '.join(sorted(pickled))}; load and re-save it with safe_serialization)" if pickled else ""
        raise ExportError(f"{folder}: no safetensors weights{hint}")
    from ..diagnose import unreadable_safetensors, weight_files

    for path in weight_files(folder):
        problem = unreadable_safetensors(path)
        if problem:
            raise ExportError(problem)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise ExportError(f"{folder}/config.json: {str(err).splitlines()[0]}") from None
    return Checkpoint(folder, arch, config)


def model_class_of(checkpoint: Checkpoint):
    """The class the checkpoint was saved from (``architectures`` in its config, e.g. a sequence
    classifier), else the head of its objective."""
    saved = (getattr(checkpoint.config, "architectures", None) or [None])[0]
    try:
        return checkpoint.arch.class_named(saved)
    except ValueError:
        return checkpoint.arch.model_for_objective(checkpoint.objective)


def export_checkpoint(src: Path, out: Path, *, repo_id: str | None = None, overwrite: bool = False) -> Path:
    """Writes the Hub-ready folder for checkpoint ``src`` to ``out`` (see the module docstring).

    Raises ExportError (one line) before anything is written when ``src`` is not an exportable
    checkpoint or ``out`` is taken; on any later failure the partial folder is removed.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    checkpoint = read_checkpoint(src)
    if out == src or src in out.parents:
        raise ExportError(f"{out} is inside the checkpoint folder {src}; export to a folder beside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    tokenizer = _load_tokenizer(src)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_model(checkpoint, staging)
        tokenizer.save_pretrained(str(staging))
        _write_sentence_transformers_files(checkpoint, staging)
        _copy_records(src, staging)
        _check_no_pickles(staging)
        from .card import write_card

        write_card(staging, repo_id=repo_id, local_path=out)
        from ..runner import publish  # the same swap a training run ends with

        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ExportError(f"{folder}: no tokenizer files (save one there with tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - any failure is one line for the user
        raise ExportError(f"{folder}: its tokenizer does not load ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def _write_model(checkpoint: Checkpoint, staging: Path) -> None:
    """Loads the weights through the package class and re-saves them with ``auto_map`` in the config."""
    from transformers.utils import logging as hf_logging

    model_class = model_class_of(checkpoint)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # A load report of unused keys would be noise (missing ones fail below), and so would progress
    # bars for a few-megabyte file.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from safetensors import SafetensorError

        try:
            model, info = model_class.from_pretrained(str(checkpoint.folder), output_loading_info=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise ExportError(f"{checkpoint.folder}: the weights do not load ({str(err).splitlines()[0]})") from None
        if info.get("missing_keys"):
            raise ExportError(
                f"{checkpoint.folder}: weights missing for {model_class.__name__} (e.g. {sorted(info['missing_keys'])[0]})"
            )
        model.save_pretrained(str(staging))
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    try:
        write_remote_code(checkpoint.arch, staging)
    except BundleError as err:
        raise ExportError(str(err)) from None


def _write_sentence_transformers_files(checkpoint: Checkpoint, staging: Path) -> None:
    """``modules.json`` & co. for architectures whose base model has a pooling path.

    Token models use sentence-transformers' own mean Pooling; concept models (the base output holds
    C concept vectors, not tokens) use the bundle's ``sentence_pooling.ConceptMeanPooling``, which
    never applies the token mask. Both are the parameter-free means of ``decollapse eval``.
    """
    base = checkpoint.arch.model_class("AutoModel")
    mode = getattr(base, "sentence_pooling", "tokens")
    if mode not in ("tokens", "concepts"):
        return
    width = checkpoint.config.hidden_size
    if mode == "concepts":
        from .. import __version__

        source = PACKAGE_ROOT / "hub_cards" / f"{CONCEPT_POOLING_MODULE}.py"
        header = GENERATED_HEADER.format(
            version=__version__, package="decollapse", source=f"hub_cards/{CONCEPT_POOLING_MODULE}.py"
        )
        (staging / f"{CONCEPT_POOLING_MODULE}.py").write_text(header + source.read_text())
        pooling_type = f"{CONCEPT_POOLING_MODULE}.ConceptMeanPooling"
        pooling_config = {"embedding_dimension": width}
    else:
        pooling_type = "sentence_transformers.models.Pooling"
        pooling_config = {
            "word_embedding_dimension": width,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": pooling_type},
    ]
    _write_json(staging / "modules.json", modules)
    _write_json(
        staging / "sentence_bert_config.json",
        {"max_seq_length": checkpoint.config.max_position_embeddings, "do_lower_case": False},
    )
    (staging / "1_Pooling").mkdir()
    _write_json(staging / "1_Pooling" / "config.json", pooling_config)


def _copy_records(src: Path, staging: Path) -> None:
    for name in RECORDS:
        if (src / name).is_file():
            shutil.copy2(src / name, staging / name)
    plots = sorted((src / "plots").glob("*.png")) if (src / "plots").is_dir() else []
    if plots:
        (staging / "plots").mkdir()
        for plot in plots:
            shutil.copy2(plot, staging / "plots" / plot.name)


def _check_no_pickles(folder: Path) -> None:
    pickled = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ExportError(f"the export would hold pickle files: {', '.join(sorted(pickled))}")


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
