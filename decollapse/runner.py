"""The ``decollapse train`` job: data -> model -> DecollapseTrainer -> evaluation -> a complete
output folder, or nothing at all.

Everything the user typed is validated before any work starts. The run writes into a temporary
sibling folder and renames it into place only when it is complete, so an interrupted or failed run
never leaves a half-written output directory. The one deliberate exception is a non-finite loss: the
last good state (from before the update that led to it, and finite on the probe batch) is kept in
``DIR/last-good-checkpoint`` (a complete checkpoint) for inspection.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from . import __version__
from .data import PACKING, SyntheticCorpusConfig, build_synthetic_corpus, load_text_corpus, stream_text_corpus
from .registry import get_architecture
from .settings import apply_settings
from .trainers import (
    CollapseMonitorCallback,
    CollatorStateCallback,
    DecollapseTrainer,
    DecollapseTrainingArguments,
    NonFiniteGuardCallback,
    NonFiniteLossError,
    QuietProgressCallback,
    StopOnSignalCallback,
)
from .trainers.weighting import LossWeighting

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
LABEL_COLUMNS = ("domain", "word_class", "sense")
# When logging_steps is left at its default, a short run still logs its training loss this many
# times: with 50-step logging a 20-step run would log none, and its loss plot would be one eval dot.
MIN_TRAIN_LOGS = 10


class UsageError(ValueError):
    """Bad input from the user: reported as one line with exit code 2."""


class RunInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT / SIGTERM at a step boundary, with a checkpoint to resume from. A
    KeyboardInterrupt, so that commands running several jobs stop as on Ctrl-C."""

    def __init__(self, signal_name: str, step: int, job: "TrainJob", checkpoint: Path):
        self.signal_name, self.step, self.job, self.checkpoint = signal_name, step, job, checkpoint
        super().__init__(
            f"stopped by {signal_name} after step {step}; checkpoint in {checkpoint}; "
            f"continue with: decollapse train {job.arch} --resume {job.output_dir}"
        )


@dataclass
class TrainRecipe:
    """Training knobs of ``decollapse train`` (settable with ``--set``).

    Defaults are the two-minute CPU recipe of docs/CORPUS.md (Calibration): small batches
    and many optimizer steps, because on the embedded corpus models only start inferring the domain
    after 1-2k steps.
    """

    max_steps: int = 5000
    batch_size: int = 4
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    optim: str = "adamw_torch_fused"  # transformers' default; any TrainingArguments.optim (adafactor, adamw_torch, ...)
    warmup_steps: int = 100
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    logging_steps: int = 50
    eval_steps: int = 1000
    eval_batch_size: int = 32
    loss_weighting: str = "fixed"
    aux_warmup_steps: int = 0
    aux_weights: dict[str, float] | None = None
    monitor_every: int = 1000
    probe_size: int | None = None  # validation rows the collapse report reads; None: the architecture's
    stop_on_alarm: bool = False
    mlm_probability: float = 0.15
    deletion_rate: float = 0.6
    min_prefix_fraction: float = 0.3
    max_prefix_fraction: float = 0.5
    block_size: int = 128
    # How a text --dataset's documents become rows (decollapse.data.PACKING): "auto" packs them with
    # position ids restarting per document when the model keeps packed documents apart, else one per row.
    packing: str = "auto"
    streaming_held_out_rows: int = 2000  # --streaming: the first N rows of validation and of test are scored
    report_to: str = "none"
    save_steps: int = 0  # > 0: a resumable checkpoint every N steps in OUTPUT.checkpoints/ (kept after the run)
    save_total_limit: int = 2  # checkpoints kept there (the oldest are deleted)
    bf16: bool = False  # bfloat16 autocast (CPU or GPU); weights, optimizer and routing stay float32
    fp16: bool = False  # float16 autocast with loss scaling (CUDA only)


@dataclass
class TrainJob:
    arch: str
    dataset: str = SYNTHETIC
    output_dir: Path | None = None
    overwrite: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    max_steps: int | None = None
    show_progress: bool = True  # the Trainer's progress bars (training and evaluation)
    # A `decollapse train` folder whose model this job trains further (weights and configuration; the
    # optimizer and schedule start fresh), instead of a freshly initialised one.
    init_checkpoint: Path | None = None
    # A Trainer checkpoint of this same job (``OUTPUT.checkpoints/checkpoint-N``) to continue from:
    # weights, optimizer, schedule, RNG states, data position, loss weighting and state buffers.
    resume_from: Path | None = None
    # Read a text dataset as a stream (an IterableDataset); needs max_steps.
    streaming: bool = False

    def to_json(self) -> dict[str, Any]:
        """What ``--resume`` needs to rebuild this job (progress display and resume point excluded)."""
        # Absolute paths: a scheduler may resume the job from another working directory.
        dataset = self.dataset
        if dataset != SYNTHETIC and _looks_local(dataset):
            dataset = str(Path(dataset).expanduser().absolute())
        return {
            "arch": self.arch,
            "dataset": dataset,
            "output_dir": str(Path(self.output_dir).absolute()),
            "overwrite": self.overwrite,
            "settings": dict(self.settings),
            "max_steps": self.max_steps,
            "streaming": self.streaming,
            "init_checkpoint": None if self.init_checkpoint is None else str(Path(self.init_checkpoint).absolute()),
        }


JOB_FILE = "job.json"


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process in a multi-process launch (torchrun, accelerate), ``(0, 1)``
    alone. Read from the launcher's RANK / WORLD_SIZE before the Trainer has joined the process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch, or the only process."""
    return process_rank()[0] == 0


def _check_launch() -> None:
    """Launches that would silently train otherwise than asked. ``accelerate launch --cpu
    --num_processes N`` starts one process (accelerate starts several CPU processes only through
    mpirun) and sets MASTER_ADDR without WORLD_SIZE: training would run on one process at 1/N of the
    intended global batch. An FSDP or DeepSpeed config on a machine without CUDA would run as DDP."""
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise UsageError(
            "accelerate launch --cpu --num_processes N starts a single process here (accelerate needs mpirun "
            "for several CPU processes); use `accelerate launch --multi_gpu --num_processes N` (gloo on a "
            "CPU) or `torchrun --nproc_per_node N`"
        )
    # accelerate shards a model (FSDP, DeepSpeed) only on accelerators: on a CPU the same launch trains
    # with plain DDP without a word, which is not what the config file asked for.
    sharding = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                if os.environ.get(flag, "").lower() in ("1", "true")]
    if sharding and not torch.cuda.is_available():
        raise UsageError(
            f"the accelerate config asks for {sharding[0]}, which accelerate runs on GPUs only; on this CPU the "
            "run would silently be plain DDP (use examples/accelerate/ddp.yaml, or torchrun)"
        )
    if "DeepSpeed" in sharding and importlib.util.find_spec("deepspeed") is None:
        raise UsageError("the accelerate config asks for DeepSpeed, which is not installed; pip install deepspeed")


def checkpoints_dir(output_dir: Path) -> Path:
    """Where a run keeps its resumable checkpoints: beside its output folder, which stays untouched
    until the run completes (``runs/x`` -> ``runs/x.checkpoints``)."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".checkpoints")


def resumable_job(folder: Path) -> TrainJob:
    """The job an interrupted run (its output folder or its ``.checkpoints`` folder) was started as,
    set to continue from its latest checkpoint. Raises UsageError when there is nothing to resume."""
    folder = Path(folder)
    candidates = [folder] if folder.name.endswith(".checkpoints") else [checkpoints_dir(folder), folder]
    root = next((c for c in candidates if (c / JOB_FILE).is_file()), None)
    if root is None:
        raise UsageError(
            f"--resume {folder}: not a resumable run (no {JOB_FILE} in {' or '.join(map(str, candidates))}); "
            "a run leaves one when it is stopped by SIGINT/SIGTERM or saves with --set save_steps=N"
        )
    try:
        saved = json.loads((root / JOB_FILE).read_text())
        job = TrainJob(**{**saved, "output_dir": Path(saved["output_dir"])})
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UsageError(f"--resume {folder}: unreadable {root / JOB_FILE} ({err})") from None
    if job.init_checkpoint is not None:
        job.init_checkpoint = Path(job.init_checkpoint)
    steps = sorted(
        (int(p.name.split("-")[1]), p) for p in root.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()
    )
    if not steps:
        raise UsageError(f"--resume {folder}: {root} holds no complete checkpoint-N folder")
    job.resume_from = steps[-1][1]
    return job


def default_output_dir(arch: str) -> Path:
    return Path("runs") / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan(job: TrainJob) -> dict[str, Any]:
    """Validates the whole job and returns its resolved parts; raises UsageError on bad input."""
    _check_launch()
    try:
        arch = get_architecture(job.arch)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        sets = apply_settings(
            job.settings,
            {"model": arch.config_class, "train": TrainRecipe, "corpus": SyntheticCorpusConfig},
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    recipe = TrainRecipe(**sets["train"])
    if job.max_steps is not None:
        recipe.max_steps = job.max_steps
    _check_recipe(recipe)
    # A short run logs its training loss MIN_TRAIN_LOGS times at the default logging_steps; a value
    # the user set is kept unless it would log nothing at all.
    if "logging_steps" not in sets["train"] or recipe.logging_steps > recipe.max_steps:
        lowered = min(recipe.logging_steps, max(1, recipe.max_steps // MIN_TRAIN_LOGS))
        if "logging_steps" in sets["train"]:
            logger.warning(
                "logging_steps=%d is more than the %d steps of the run: logging every %d steps instead",
                recipe.logging_steps, recipe.max_steps, lowered,
            )
        recipe.logging_steps = lowered
    if sets["corpus"] and job.dataset != SYNTHETIC:
        raise UsageError("corpus.* settings only apply to the embedded synthetic corpus")
    text_only = [f"--set {k}" for k in ("packing", "streaming_held_out_rows") if k in sets["train"]]
    if job.streaming:
        text_only.append("--streaming")
    if text_only and job.dataset == SYNTHETIC:
        raise UsageError(f"{', '.join(text_only)}: for a text --dataset only; the embedded corpus comes in rows of its own")
    if job.streaming and job.max_steps is None and "max_steps" not in sets["train"]:
        raise UsageError("--streaming needs --max-steps: a stream has no length to count epochs in")
    try:
        corpus_config = SyntheticCorpusConfig(**sets["corpus"])
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    from_tokenizer = [k for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id") if k in sets["model"]]
    if from_tokenizer:
        raise UsageError(f"--set {from_tokenizer[0]}: the tokenizer of the data decides it, it cannot be set")
    # Check the model settings now (with a placeholder vocabulary) rather than after building data.
    try:
        config = arch.config_class(**sets["model"])
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    for setting, (module, extra) in config.required_extras.items():
        if importlib.util.find_spec(module) is None:
            raise UsageError(
                f"--set {setting}={getattr(config, setting)}: needs {module}, which is not installed; "
                f"pip install 'decollapse[{extra}]'"
            )
    seq_len, seq_knob = (
        (corpus_config.seq_len, "corpus.seq_len") if job.dataset == SYNTHETIC else (recipe.block_size, "block_size")
    )
    max_positions = sets["model"].get("max_position_embeddings")
    if max_positions is not None and max_positions < seq_len:
        raise UsageError(
            f"--set max_position_embeddings={max_positions}: the training sequences are {seq_len} tokens "
            f"({seq_knob}); expected at least {seq_len}"
        )
    if recipe.packing == "auto":
        recipe.packing = "documents" if config.supports_packed_documents else "none"
    elif recipe.packing == "documents" and not config.supports_packed_documents:
        raise UsageError(
            f"--set packing=documents: {arch.name} cannot keep packed documents apart with these settings "
            "(packing=none gives one document per row; packing=concat lets attention cross documents)"
        )
    _check_aux_weights(recipe, config.aux_loss_weights)
    objective = sets["model"].get("objective", arch.objectives[0])
    if objective not in arch.objectives:
        raise UsageError(f"{arch.name} has no {objective} head; choose one of {', '.join(arch.objectives)}")
    init_from = sets["model"].get("init_from")
    if init_from is not None:
        if job.dataset == SYNTHETIC:
            raise UsageError(
                "model.init_from needs a text --dataset: the embedded corpus has its own vocabulary, "
                "and initialised embeddings only mean something with the checkpoint's tokenizer"
            )
        if not hasattr(arch.model_class("AutoModel"), "load_pretrained_embeddings"):
            raise UsageError(f"{arch.name} cannot be initialised from another checkpoint (model.init_from)")
        if _looks_local(init_from) and not Path(init_from).expanduser().is_dir():
            raise UsageError(f"model.init_from={init_from}: no such checkpoint folder")

    if job.init_checkpoint is not None and not (Path(job.init_checkpoint) / "config.json").is_file():
        raise UsageError(f"{job.init_checkpoint}: no config.json, not a checkpoint folder to continue from")

    if job.dataset != SYNTHETIC and _looks_local(job.dataset) and not Path(job.dataset).expanduser().exists():
        raise UsageError(f"--dataset {job.dataset}: no such file or directory")

    output_dir = Path(job.output_dir or default_output_dir(arch.name))
    _check_output_dir(output_dir, job.overwrite)
    checkpoints = checkpoints_dir(output_dir)
    if job.resume_from is None and checkpoints.exists() and not job.overwrite:
        raise UsageError(
            f"--output-dir {output_dir}: {checkpoints} holds checkpoints of an earlier run; continue it with "
            f"--resume {output_dir}, or pass --overwrite to start again"
        )
    # The last word on the training knobs is transformers' own: build the arguments once now.
    try:
        args = training_arguments(recipe, output_dir / "trainer", arch)
    except ValueError as err:
        raise UsageError(f"--set: {str(err).splitlines()[0]}") from None
    _check_optimizer(args)
    return {
        "arch": arch,
        "recipe": recipe,
        "model_settings": sets["model"],
        "corpus_config": corpus_config,
        "objective": objective,
        "output_dir": output_dir,
    }


def _check_recipe(recipe: TrainRecipe) -> None:
    """Each training knob against what it can mean; raises UsageError naming the first bad one."""
    if recipe.max_steps <= 0:
        raise UsageError(f"--max-steps {recipe.max_steps}: expected a positive integer")
    if recipe.probe_size is not None and recipe.probe_size <= 0:
        raise UsageError(f"--set probe_size={recipe.probe_size}: expected a positive integer")
    positive_ints = ("batch_size", "eval_batch_size", "logging_steps", "eval_steps", "monitor_every",
                     "block_size")
    for name in positive_ints:
        if getattr(recipe, name) <= 0:
            raise UsageError(f"--set {name}={getattr(recipe, name)}: expected a positive integer")
    for name in ("warmup_steps", "aux_warmup_steps"):
        if getattr(recipe, name) < 0:
            raise UsageError(f"--set {name}={getattr(recipe, name)}: expected an integer >= 0")
    for name in ("learning_rate", "weight_decay"):
        value = getattr(recipe, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--set {name}={value}: expected a finite number >= 0")
    if not recipe.max_grad_norm > 0:  # also refuses nan
        raise UsageError(f"--set max_grad_norm={recipe.max_grad_norm}: expected a number > 0 (inf: no clipping)")
    if recipe.packing not in ("auto", *PACKING):
        raise UsageError(f"--set packing={recipe.packing}: expected one of auto, {', '.join(PACKING)}")
    if recipe.streaming_held_out_rows <= 0:
        raise UsageError(f"--set streaming_held_out_rows={recipe.streaming_held_out_rows}: expected a positive integer")
    if not 0.0 < recipe.mlm_probability <= 1.0:
        raise UsageError(f"--set mlm_probability={recipe.mlm_probability}: expected a number in (0, 1]")
    if not 0.0 <= recipe.deletion_rate < 1.0:
        raise UsageError(f"--set deletion_rate={recipe.deletion_rate}: expected a number in [0, 1)")
    if not 0.0 < recipe.min_prefix_fraction <= recipe.max_prefix_fraction < 1.0:
        raise UsageError(
            f"--set min_prefix_fraction={recipe.min_prefix_fraction} max_prefix_fraction="
            f"{recipe.max_prefix_fraction}: expected 0 < min <= max < 1"
        )
    if not 0 <= recipe.seed < 2**32:  # numpy's seed range (set_seed seeds numpy too)
        raise UsageError(f"--set seed={recipe.seed}: expected an integer in [0, 2**32)")
    if recipe.save_steps < 0:
        raise UsageError(f"--set save_steps={recipe.save_steps}: expected an integer >= 0 (0: no periodic checkpoints)")
    if recipe.save_total_limit <= 0:
        raise UsageError(f"--set save_total_limit={recipe.save_total_limit}: expected a positive integer")
    if recipe.bf16 and recipe.fp16:
        raise UsageError("--set bf16=true fp16=true: choose one mixed precision")
    if recipe.fp16 and not torch.cuda.is_available():
        raise UsageError("--set fp16=true: float16 training needs a CUDA device here; use bf16=true on a CPU")
    _check_lr_scheduler(recipe.lr_scheduler)
    _report_to(recipe.report_to)


def _check_optimizer(args: DecollapseTrainingArguments) -> None:
    """An ``optim`` that transformers knows may still need a package that is not installed (bitsandbytes,
    galore, ...): resolve its class now, not after the data is built."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ValueError, ImportError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--set optim={args.optim.value}: {first}") from None


def _check_lr_scheduler(name: str) -> None:
    """The scheduler must be one transformers has and that needs no ``lr_scheduler_kwargs`` (the recipe
    sets none): building it on a one-parameter optimizer is the check."""
    from transformers import SchedulerType, get_scheduler

    def builds(candidate: str) -> bool:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        try:
            get_scheduler(candidate, optimizer, num_warmup_steps=1, num_training_steps=2)
        except (ValueError, TypeError):
            return False
        return True

    if not builds(name):
        usable = [s.value for s in SchedulerType if builds(s.value)]
        raise UsageError(f"--set lr_scheduler={name}: expected one of {', '.join(usable)}")


# Integrations whose availability check is not named ``is_<name without underscores>_available``.
_AVAILABILITY_CHECKS = {"comet_ml": "is_comet_available", "flyte": "is_flytekit_available"}


def _report_to(value: str) -> str | list[str]:
    """``report_to`` as TrainingArguments takes it: ``none``, ``all`` (whatever is installed) or a
    comma-separated list of integrations, each one transformers knows and, by transformers' own
    ``is_<name>_available`` check, can use here."""
    from transformers.integrations import integration_utils as hf

    names = [n.strip() for n in value.split(",") if n.strip()]
    if names in (["none"], ["all"]):
        return names[0]
    known = sorted(hf.INTEGRATION_TO_CALLBACK)
    unknown = [n for n in names if n not in hf.INTEGRATION_TO_CALLBACK]
    if unknown or not names:
        shown = repr(unknown[0]) if unknown else "nothing"
        raise UsageError(f"--set report_to={value}: {shown} is not a transformers integration; "
                         f"expected none, all or a comma-separated list of {', '.join(known)}")
    for name in names:
        check = _AVAILABILITY_CHECKS.get(name, f"is_{name.replace('_', '')}_available")
        if hasattr(hf, check) and not getattr(hf, check)():
            raise UsageError(f"--set report_to={value}: {name} is not usable here "
                             f"(transformers' {check}() is False: is it installed?)")
    return names


def _check_aux_weights(recipe: TrainRecipe, defaults: dict[str, float]) -> None:
    """``aux_weights``, ``loss_weighting`` and ``aux_warmup_steps`` as the Trainer will combine them."""
    overrides = recipe.aux_weights or {}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UsageError(
            f"--set aux_weights: unknown term(s) {', '.join(unknown)}; this model reports: "
            f"{', '.join(sorted(defaults)) or 'no auxiliary terms'}"
        )
    try:
        LossWeighting({**defaults, **overrides}, strategy=recipe.loss_weighting, warmup_steps=recipe.aux_warmup_steps)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--set: {err}") from None


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise UsageError(f"--output-dir {output_dir}: exists and is not a directory")
        if any(output_dir.iterdir()) and not overwrite:
            raise UsageError(f"--output-dir {output_dir}: not empty; pass --overwrite to replace it")
    # The run is assembled in a sibling folder and renamed into place, so the nearest existing
    # ancestor must take new folders. Permission bits do not say so for root or on read-only mounts:
    # create (and remove) an empty folder there.
    ancestor = output_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--output-dir {output_dir}: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".decollapse-write-check-", dir=ancestor))
    except OSError as err:
        raise UsageError(f"--output-dir {output_dir}: cannot create folders in {ancestor} ({err.strerror})") from None


def training_arguments(recipe: TrainRecipe, output_dir: Path, arch=None) -> DecollapseTrainingArguments:
    """The Trainer's arguments for a recipe; ``output_dir`` is the Trainer's scratch folder. ``arch``
    (the registry entry) says whether DDP must look for parameters a step leaves without gradient."""
    report_to = _report_to(recipe.report_to)
    return DecollapseTrainingArguments(
        output_dir=str(output_dir),
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.eval_batch_size,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        optim=recipe.optim,
        warmup_steps=recipe.warmup_steps,
        lr_scheduler_type=recipe.lr_scheduler,
        max_grad_norm=recipe.max_grad_norm,
        seed=recipe.seed,
        data_seed=recipe.seed,
        # metrics.json's train_tokens: real (unpadded) tokens, summed over the processes by the Trainer.
        include_num_input_tokens_seen="non_padding",
        logging_steps=recipe.logging_steps,
        eval_strategy="steps",
        eval_steps=recipe.eval_steps,
        # Without save_steps the only checkpoint is the one a SIGINT/SIGTERM asks for (StopOnSignalCallback).
        save_strategy="steps" if recipe.save_steps else "no",
        **({"save_steps": recipe.save_steps} if recipe.save_steps else {}),
        save_total_limit=recipe.save_total_limit,
        bf16=recipe.bf16,
        fp16=recipe.fp16,
        report_to=[] if report_to == "none" else report_to,
        dataloader_num_workers=0,
        # The runner selects the columns itself; the Trainer's own pruning would drop label columns a
        # model reads through **kwargs (SOSM's auxiliary heads).
        remove_unused_columns=False,
        loss_weighting=recipe.loss_weighting,
        aux_weights=recipe.aux_weights,
        aux_warmup_steps=recipe.aux_warmup_steps,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=arch.ddp_find_unused_parameters if arch is not None else None,
    )


def _looks_local(source: str) -> bool:
    """A path the user means as a local file: explicit (./, /, ~) or deeper than a Hub ``owner/name``."""
    return source.startswith((".", "/", "~")) or source.split(":")[0].count("/") > 1


def load_data(job: TrainJob, parts: dict[str, Any]):
    """Returns (DatasetDict, tokenizer, corpus summary dict or None)."""
    if job.dataset == SYNTHETIC:
        corpus = build_synthetic_corpus(parts["corpus_config"])
        return corpus.dataset, corpus.tokenizer, corpus.summary()
    source, _, hub_config = job.dataset.partition(":")
    tokenizer = None
    init_from = parts["model_settings"].get("init_from")
    if init_from is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(init_from)
        except (OSError, ValueError) as err:
            raise UsageError(f"model.init_from={init_from}: no tokenizer could be loaded ({err})") from None
    recipe: TrainRecipe = parts["recipe"]
    options = dict(
        hub_config=hub_config or None, block_size=recipe.block_size, tokenizer=tokenizer, seed=recipe.seed,
        packing=recipe.packing,
    )
    try:
        if job.streaming:
            rank, world_size = process_rank()
            corpus = stream_text_corpus(
                source, **options, held_out_rows=recipe.streaming_held_out_rows, rank=rank, world_size=world_size,
            )
        else:
            corpus = load_text_corpus(source, **options)
    except (ValueError, OSError, FileNotFoundError) as err:
        raise UsageError(f"--dataset {job.dataset}: {err}") from None
    if not job.streaming and len(corpus.dataset["train"]) == 0:
        raise UsageError(f"--dataset {job.dataset}: the training split is empty")
    if recipe.packing == "none" and corpus.tokenizer.pad_token_id is None:
        raise UsageError(f"--dataset {job.dataset}: packing=none pads rows, and the tokenizer has no pad token")
    return corpus.dataset, corpus.tokenizer, None


def supervised_columns(parts: dict[str, Any], train) -> dict[str, Any]:
    """Model settings completed for the label columns the model trains on (e.g. SOSM's tier-3 heads):
    each column must be in the training data (UsageError naming it and the columns there are), and
    its class count is read from the data unless set."""
    arch = parts["arch"]
    settings = dict(parts["model_settings"])
    config = arch.config_class(**settings)
    columns = getattr(config, "aux_label_columns", ())
    if not columns:
        return settings
    names = train.column_names or []  # a stream may not know its columns before it is read
    missing = [column for column in columns if column not in names]
    if missing:
        raise UsageError(
            f"the model trains auxiliary heads on label column(s) {', '.join(map(repr, missing))}, which the "
            f"dataset lacks (its columns: {', '.join(names)}); set aux_heads to columns it has, "
            "or aux_head_weight=0"
        )
    classes = dict(getattr(config, "aux_head_classes", None) or {})
    for column in columns:
        if column not in classes:
            classes[column] = int(np.asarray(train.with_format("numpy", columns=[column])[column]).max()) + 1
    settings["aux_head_classes"] = classes
    return settings


def build_model(parts: dict[str, Any], tokenizer, seq_len: int, train=None):
    arch = parts["arch"]
    settings = supervised_columns(parts, train) if train is not None else dict(parts["model_settings"])
    settings.setdefault("max_position_embeddings", seq_len)
    fields = {f.name for f in dataclasses.fields(arch.config_class)}
    if "mask_token_id" in fields and tokenizer.mask_token_id is not None:
        settings.setdefault("mask_token_id", tokenizer.mask_token_id)
    init_from = settings.pop("init_from", None)
    source = None
    if init_from is not None:
        from transformers import AutoModel

        try:
            source = AutoModel.from_pretrained(init_from)
        except (OSError, ValueError) as err:
            raise UsageError(f"model.init_from={init_from}: {err}") from None
        if "token_embedding_dim" in fields:
            settings.setdefault("token_embedding_dim", source.get_input_embeddings().weight.shape[1])
    config = arch.config_class(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **settings,
    )
    model = arch.model_for_objective(parts["objective"])(config)
    if source is not None:
        try:
            copied = model.base_model.load_pretrained_embeddings(source)
        except ValueError as err:
            raise UsageError(f"model.init_from={init_from}: {err}") from None
        logger.info("initialised %s from %s", ", ".join(copied), init_from)
    return model


def continued_model(parts: dict[str, Any], checkpoint: Path, tokenizer, train=None):
    """The model saved in ``checkpoint``, to train or evaluate further: its weights and configuration,
    checked against the job's architecture, objective, ``--set`` model knobs and vocabulary (and the
    label columns of ``train``, for heads trained on them). Raises UsageError naming the mismatch."""
    arch, objective = parts["arch"], parts["objective"]
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{checkpoint}: no readable config.json ({err})") from None
    expected = arch.config_class.model_type
    if saved.get("model_type") != expected or saved.get("objective", objective) != objective:
        raise UsageError(
            f"{checkpoint}: holds a {saved.get('model_type')} {saved.get('objective')} model; "
            f"expected {expected} {objective}"
        )
    model_class = arch.model_for_objective(objective)
    try:
        model, info = model_class.from_pretrained(str(checkpoint), output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{checkpoint}: no loadable {model_class.__name__} ({first})") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])[0]
        raise UsageError(f"{checkpoint}: weights missing for {model_class.__name__}, e.g. {missing}")
    if model.config.vocab_size != len(tokenizer):
        raise UsageError(
            f"{checkpoint}: the model reads {model.config.vocab_size} token ids, "
            f"the data's tokenizer has {len(tokenizer)}"
        )
    # Compared as a config built from the settings holds them: validation may adjust a value (SOSM unties
    # embeddings its state cannot share), and the checkpoint's config went through the same adjustment.
    wanted = arch.config_class(**parts["model_settings"])
    for key, value in parts["model_settings"].items():
        if getattr(model.config, key, None) != getattr(wanted, key, value):
            saved_value = getattr(model.config, key, None)
            raise UsageError(f"--set {key}={value}: the checkpoint {checkpoint} has {key}={saved_value!r}")
    classes = getattr(model.config, "aux_head_classes", None) or {}
    for column in model.aux_label_columns if train is not None else ():
        if column not in train.column_names:
            raise UsageError(f"{checkpoint}: the model trains on label column {column!r}, which the dataset lacks")
        largest = int(np.asarray(train.with_format("numpy", columns=[column])[column]).max())
        if column in classes and largest >= classes[column]:
            raise UsageError(
                f"{checkpoint}: its {column!r} head has {classes[column]} classes, the data has label {largest}; "
                "give both runs the whole label space (--set aux_head_classes=...)"
            )
    return model


def build_collator(objective: str, tokenizer, recipe: TrainRecipe, stream: int = 0):
    """The data collator of an objective; the runner builds a fresh one per evaluation so that
    evaluation masks, deletions and splits are the same every time. ``stream`` offsets its seed: each
    training process passes its rank, so that processes do not mask (delete, split) their different
    rows at the same positions."""
    seed = recipe.seed + stream
    from .data.collators import (
        DataCollatorForMaskedDiffusion,
        DataCollatorForPackedLanguageModeling,
        DataCollatorForPrefixGeneration,
        DataCollatorForTSDAE,
    )

    if objective in ("causal_lm", "masked_lm"):
        return DataCollatorForPackedLanguageModeling(
            tokenizer, mlm=objective == "masked_lm", mlm_probability=recipe.mlm_probability, seed=seed
        )
    if objective == "tsdae":
        return DataCollatorForTSDAE(tokenizer, deletion_rate=recipe.deletion_rate, seed=seed)
    if objective == "masked_diffusion":
        return DataCollatorForMaskedDiffusion(tokenizer)
    if objective == "prefix_diffusion":
        return DataCollatorForPrefixGeneration(
            tokenizer,
            min_prefix_fraction=recipe.min_prefix_fraction,
            max_prefix_fraction=recipe.max_prefix_fraction,
            seed=seed,
        )
    raise UsageError(f"no data collator for objective {objective!r}")


def probe_batch(split, size: int) -> dict[str, torch.Tensor]:
    """The first ``size`` rows of ``split`` as the collapse monitor's batch: rows of unequal length
    (one document per row) right-padded under an ``attention_mask``, packed rows with their
    ``position_ids``, and the ground-truth label columns the split has."""
    rows = split.select(range(min(size, len(split))))
    lengths = {len(ids) for ids in rows["input_ids"]}
    if len(lengths) > 1:
        longest = max(lengths)
        ids = [list(r) + [0] * (longest - len(r)) for r in rows["input_ids"]]
        mask = [[1] * len(r) + [0] * (longest - len(r)) for r in rows["input_ids"]]
        batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    else:
        batch = {"input_ids": torch.tensor(rows["input_ids"])}
    if "position_ids" in rows.column_names:
        batch["position_ids"] = torch.tensor(rows["position_ids"])
    for column in LABEL_COLUMNS:
        if column in rows.column_names:
            batch[column] = torch.tensor(rows[column])
    return batch


def run(job: TrainJob, data=None) -> dict[str, Any]:
    """Runs the job; returns the final metrics. Raises UsageError or NonFiniteLossError.

    ``data``: what ``load_data`` returns for this job, when the caller already built it (``decollapse
    sweep`` trains its best trial again on the corpus its trials used, without building it twice).
    """
    parts = plan(job)
    recipe: TrainRecipe = parts["recipe"]
    output_dir: Path = parts["output_dir"]
    job.output_dir = output_dir  # the caller reports where the run went, also on failure
    set_seed(recipe.seed)
    dataset, tokenizer, corpus_summary = data if data is not None else load_data(job, parts)
    # A text corpus's rows are at most block_size long (a stream's cannot be counted up front).
    seq_len = len(dataset["train"][0]["input_ids"]) if job.dataset == SYNTHETIC else recipe.block_size
    if job.init_checkpoint is not None:
        model = continued_model(parts, job.init_checkpoint, tokenizer, dataset["train"])
    else:
        model = build_model(parts, tokenizer, seq_len, dataset["train"])
    probe = probe_batch(dataset["validation"], recipe.probe_size or parts["arch"].probe_size)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    checkpoints = checkpoints_dir(output_dir)
    if job.resume_from is None and checkpoints.exists() and is_main_process():  # --overwrite (else refused)
        shutil.rmtree(checkpoints)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    guard = NonFiniteGuardCallback()
    try:
        metrics = _train_and_write(job, parts, model, tokenizer, dataset, probe, corpus_summary, work, guard)
    except RunInterrupted:
        shutil.rmtree(work, ignore_errors=True)
        raise
    except NonFiniteLossError as err:
        shutil.rmtree(work, ignore_errors=True)
        if is_main_process():
            _drop_if_no_checkpoint(checkpoints)
        # What was kept travels with the error, for the one line the caller prints.
        collator = build_collator(parts["objective"], tokenizer, recipe)
        err.last_good, err.last_good_note = (
            _keep_last_good(model, tokenizer, guard, probe, collator, output_dir, job.overwrite)
            if is_main_process() else (None, "the main process keeps the last good weights")
        )
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if is_main_process():
            _drop_if_no_checkpoint(checkpoints)
        raise
    if not is_main_process():  # every rank trained and evaluated; only the main process writes
        shutil.rmtree(work, ignore_errors=True)
        return metrics
    publish(work, output_dir)
    if recipe.save_steps == 0:  # only an interruption put checkpoints there; the finished run needs none
        shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics


def _drop_if_no_checkpoint(checkpoints: Path) -> None:
    """A failed run leaves its periodic checkpoints (resumable) but not an empty folder."""
    if checkpoints.is_dir() and not any(checkpoints.glob("checkpoint-*")):
        shutil.rmtree(checkpoints, ignore_errors=True)


def _write_job(job: TrainJob, checkpoints: Path) -> None:
    if not is_main_process():
        return
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / JOB_FILE).write_text(json.dumps(job.to_json(), indent=2) + "\n")


def _train_and_write(job, parts, model, tokenizer, dataset, probe, corpus_summary, work: Path, guard):
    recipe: TrainRecipe = parts["recipe"]
    objective = parts["objective"]
    checkpoints = checkpoints_dir(job.output_dir)
    # Periodic checkpoints go straight to the visible OUTPUT.checkpoints (they must outlive a crash); without
    # them the Trainer works in the run's private folder and only an interruption's checkpoint moves out.
    trainer_dir = checkpoints if recipe.save_steps else work / "trainer"
    args = training_arguments(recipe, trainer_dir, parts["arch"])
    try:
        collator = build_collator(objective, tokenizer, recipe, stream=process_rank()[0])
    except ValueError as err:
        raise UsageError(f"--set: {err}") from None
    keep = ["input_ids", *model.aux_label_columns]
    if "position_ids" in (dataset["validation"].column_names or []):  # packed documents
        keep.append("position_ids")
    train = dataset["train"].select_columns(keep)
    validation = dataset["validation"].select_columns(keep)
    monitor = CollapseMonitorCallback(probe, every_n_steps=recipe.monitor_every, stop_on_alarm=recipe.stop_on_alarm)
    stopper = StopOnSignalCallback()
    collator_state = CollatorStateCallback(collator)
    try:
        trainer = DecollapseTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=validation,
            data_collator=collator_state.wrap(),
            processing_class=tokenizer,
            callbacks=[monitor, guard, stopper, collator_state],
            eval_data_collator=lambda: build_collator(objective, tokenizer, recipe),
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    if trainer.pop_callback(ProgressCallback) is not None and job.show_progress:
        trainer.add_callback(QuietProgressCallback)
    if recipe.save_steps:
        _write_job(job, checkpoints)
    if job.resume_from is not None:
        collator_state.restore(str(job.resume_from))
    started = time.time()
    with stopper:
        trainer.train(resume_from_checkpoint=None if job.resume_from is None else str(job.resume_from))
    train_seconds = time.time() - started
    if stopper.step is not None and stopper.step < trainer.state.max_steps:
        if trainer_dir != checkpoints and is_main_process():
            checkpoints.mkdir(parents=True, exist_ok=True)
            for saved in trainer_dir.glob("checkpoint-*"):
                shutil.move(str(saved), str(checkpoints / saved.name))
        _write_job(job, checkpoints)
        raise RunInterrupted(stopper.received, stopper.step, job, checkpoints / f"checkpoint-{stopper.step}")

    final = held_out_metrics(trainer, dataset, keep, corpus_summary, objective)

    total = sum(_numel(p) for p in model.parameters())
    # Share of the weights that never train (SoME's expert library; 0 for the others), as a metric so
    # that comparison tables and model cards can read it like perplexity.
    final["frozen_parameter_share"] = sum(_numel(p) for p in model.parameters() if not p.requires_grad) / total
    # Every process takes part in the final report and save: a sharded model (FSDP, ZeRO-3) gathers its
    # weights collectively, and a forward or save on the main process alone would wait forever. The
    # Trainer writes on the main process only.
    report = model.collapse_report(probe)
    checkpoint = work  # the folder root is the checkpoint: from_pretrained(DIR) just works
    trainer.save_model(str(checkpoint))
    if not is_main_process():
        return {"metrics": final, "objective": objective, "alarms": []}
    tokenizer.save_pretrained(str(checkpoint))
    # report_to integrations (tensorboard) write under the Trainer's output folder: keep their logs.
    if (trainer_dir / "runs").is_dir():
        shutil.move(str(trainer_dir / "runs"), str(work / "tensorboard"))
    shutil.rmtree(work / "trainer", ignore_errors=True)
    # The Trainer pickles its arguments next to the weights; a checkpoint holds no pickle files.
    (work / "training_args.bin").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in probe.items()}, str(work / "probe_batch.safetensors"))
    summary = {
        "decollapse_version": __version__,
        "architecture": parts["arch"].name,
        "objective": objective,
        "dataset": job.dataset,
        "streaming": job.streaming,
        "steps": trainer.state.global_step,
        # Every process's real tokens (padding excluded), as the Trainer counted them.
        "train_tokens": int(trainer.state.num_input_tokens_seen),
        "world_size": trainer.args.world_size,
        "engine": _engine(trainer),
        "train_seconds": round(train_seconds, 1),  # this process's training time (since the resume, if any)
        "resumed_from": None if job.resume_from is None else os.path.relpath(job.resume_from, job.output_dir),
        "num_parameters": total,
        "trainable_parameters": sum(_numel(p) for p in model.parameters() if p.requires_grad),
        "recipe": asdict(recipe),
        "settings": job.settings,
        # Relative to this folder, so the record survives moving both folders together.
        "init_checkpoint": (
            None if job.init_checkpoint is None else os.path.relpath(job.init_checkpoint, job.output_dir)
        ),
        "metrics": final,
        "alarms": [asdict(a) for a in monitor.alarms],
    }
    _write_json(work / "metrics.json", summary)
    _write_json(work / "training_log.json", trainer.state.log_history)
    _write_json(work / "diagnostics.json", {"step": trainer.state.global_step, **report.to_dict()})
    if corpus_summary is not None:
        _write_json(work / "corpus.json", corpus_summary)

    from .reporting import write_plots, write_report

    plots = write_plots(work / "plots", trainer.state.log_history, report)
    write_report(work / "report.md", summary, report, corpus_summary, plots)
    return summary


def _numel(parameter) -> int:
    """A parameter's full size, also when DeepSpeed ZeRO-3 has partitioned it (``numel()`` is then 0)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def _engine(trainer) -> str:
    """How the processes shared the model: "fsdp" with its version, "deepspeed-zero" with its stage,
    "ddp", or "single"."""
    if trainer.is_fsdp_enabled:
        return f"fsdp{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', '')}"
    if trainer.is_deepspeed_enabled:
        stage = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
        return f"deepspeed-zero{stage}"
    return "ddp" if trainer.args.world_size > 1 else "single"


def held_out_metrics(trainer, dataset, columns: list[str], corpus_summary, objective: str) -> dict[str, Any]:
    """``validation_*`` and ``test_*`` loss and perplexity of the trainer's model on ``dataset``; for a
    causal LM on the embedded corpus also the Bayes-optimal perplexity of each split and the ratio to it."""
    final: dict[str, Any] = {}
    for split in ("validation", "test"):
        if split in dataset:
            final.update(
                trainer.evaluate(eval_dataset=dataset[split].select_columns(columns), metric_key_prefix=split)
            )
    if corpus_summary is not None and objective == "causal_lm":
        for split in ("validation", "test"):
            bound = corpus_summary["bounds"][split]["perplexity"]
            final[f"{split}_optimal_perplexity"] = bound
            final[f"{split}_perplexity_ratio"] = final[f"{split}_perplexity"] / bound
    if corpus_summary is not None and objective == "masked_lm":
        for split in ("validation", "test"):
            if f"{split}_loss" not in final:
                continue
            floor = _masked_floor(trainer, dataset, split, corpus_summary)
            final[f"{split}_optimal_loss"] = floor["optimal"]
            final[f"{split}_loss_ratio"] = final[f"{split}_loss"] / floor["optimal"]
            final[f"{split}_unigram_loss"] = floor["unigram"]
    return final


def _masked_floor(trainer, dataset, split: str, corpus_summary) -> dict[str, float]:
    """The exact Bayes-optimal masked-token loss of ``split`` at the very masks the evaluation drew:
    the same fresh seeded collator, batch size and order as ``trainer.evaluate`` (one process)."""
    from .data import SyntheticLanguage, masked_lm_floor

    language = SyntheticLanguage(SyntheticCorpusConfig(**corpus_summary["config"]))
    collator = trainer.eval_data_collator()
    rows = dataset[split]["input_ids"]
    size = trainer.args.per_device_eval_batch_size

    def batches():
        for lo in range(0, len(rows), size):
            batch = collator([{"input_ids": ids} for ids in rows[lo : lo + size]])
            yield batch["input_ids"].numpy(), batch["labels"].numpy()

    return masked_lm_floor(
        language, trainer.processing_class, batches(), np.asarray(dataset["train"]["input_ids"]),
        mask_prob=collator.mask_replace_prob, random_prob=collator.random_replace_prob,
        select_prob=collator.mlm_probability,
    )


def evaluate_checkpoint(parts: dict[str, Any], checkpoint: Path, dataset, tokenizer, corpus_summary,
                        show_progress: bool = True, inference: dict[str, Any] | None = None) -> dict[str, Any]:
    """``held_out_metrics`` of the model saved in ``checkpoint`` on another dataset (same tokenizer),
    through the same Trainer evaluation a training run ends with; ``parts`` is the ``plan`` of a job
    with the checkpoint's architecture, settings and recipe. ``inference`` sets configuration fields
    that change how the trained model is served, not what it learned (SoME's ``key_search``)."""
    recipe, objective = parts["recipe"], parts["objective"]
    model = continued_model(parts, checkpoint, tokenizer)
    for name, value in (inference or {}).items():
        if not hasattr(model.config, name):
            raise UsageError(f"{name}: not a setting of {type(model.config).__name__}")
        setattr(model.config, name, value)
    if inference:
        try:
            model.config.validate()
        except ValueError as err:
            raise UsageError(str(err)) from None
    columns = ["input_ids", *model.aux_label_columns]
    scratch = Path(tempfile.mkdtemp(prefix=".decollapse-eval-"))
    try:
        trainer = DecollapseTrainer(
            model=model,
            args=training_arguments(recipe, scratch, parts["arch"]),
            eval_dataset=dataset["validation"].select_columns(columns),
            data_collator=build_collator(objective, tokenizer, recipe),
            processing_class=tokenizer,
            eval_data_collator=lambda: build_collator(objective, tokenizer, recipe),
        )
        if trainer.pop_callback(ProgressCallback) is not None and show_progress:
            trainer.add_callback(QuietProgressCallback)
        return held_out_metrics(trainer, dataset, columns, corpus_summary, objective)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_json(path: Path, payload) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, default=_jsonable)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def publish(work: Path, output_dir: Path) -> None:
    """Moves a complete ``work`` folder to ``output_dir``, replacing what was there."""
    if output_dir.exists():
        # --overwrite was checked in plan(); swap atomically enough: move the old one aside first.
        trash = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(trash)
        work.rename(output_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        work.rename(output_dir)


def _keep_last_good(model, tokenizer, guard: NonFiniteGuardCallback, probe, collator, output_dir: Path,
                    overwrite: bool):
    """Keeps the last good state as a complete checkpoint in DIR/last-good-checkpoint.

    The weights in memory when a loss goes non-finite are the ones that produced it, so the last good
    state is the guard's snapshot from before the last update (the state whose training loss was
    finite). It is kept only if its forward pass is finite on the probe batch too.
    Returns (the checkpoint folder or None, one line saying what was kept or why nothing was).
    """
    if guard.last_good is None:
        return None, "nothing kept: no step had a finite loss"
    step = guard.restore_last_good(model)
    if not _forward_is_finite(model, probe, collator):
        return None, (
            f"nothing kept: the weights of step {step}, the last with a finite loss, "
            "give non-finite outputs on the probe batch"
        )
    target = output_dir / "last-good-checkpoint"
    staging = Path(tempfile.mkdtemp(prefix=".last-good-", dir=output_dir.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        save_file({k: v.contiguous() for k, v in probe.items()}, str(staging / "probe_batch.safetensors"))
        if output_dir.exists() and overwrite:
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, f"the weights of step {step} (the last with a finite loss) kept in {target}"


def _forward_is_finite(model, probe: dict[str, torch.Tensor], collator) -> bool:
    """Whether every floating-point output of the model on the probe batch is finite, called the way
    a user calls it (``input_ids`` alone, for heads that work without labels) and the way the
    training step does (the probe rows through the run's collator: masks, deletions, labels, loss)."""
    model.eval()
    device = next(model.parameters()).device
    ids = probe["input_ids"]
    batches = [{"input_ids": ids}, collator([{"input_ids": row} for row in ids.tolist()])]
    outputs = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            try:
                outputs.append(model(**batch))
            except ValueError:
                if i == 0:  # a head that needs labels (prefix diffusion): the collated batch has them
                    continue
                raise

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):  # ModelOutput is a dict too
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)

    return all(bool(torch.isfinite(t).all()) for t in tensors(outputs) if t.is_floating_point())
