"""Fine-tuning protocol: a task head on any encoder, trained with ``transformers.Trainer``.

- **joint** pairs: one sequence ``[CLS] s1 [SEP] s2 [SEP]``, pooled, then ``Linear(H, n)``.
- **siamese** pairs: each sentence encoded alone by the shared encoder into ``u`` and ``v``, then
  ``Linear(4H, n)`` on ``[u; v; |u − v|; u ⊙ v]``; or, for regression, ``--siamese-head cosine``:
  the prediction is ``cos(u, v)`` itself (sentence-transformers' CosineSimilarityLoss setup).
- Pooling is the parameter-free pooling of ``sentence.py`` (tokens or concepts).
- Regression targets are scaled to [0, 1] with the task's score range for training; correlations,
  which the task reports, do not change under that scaling.
- Model selection: the best evaluation (per epoch) on a seeded held-out slice of the **training**
  split, loaded back at the end (``load_best_model_at_end``); the reported split is predicted once,
  afterwards. The loss is the task loss only: no anti-collapse term is added during fine-tuning.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.modeling_outputs import SequenceClassifierOutput

from . import metrics as task_metrics
from .data import TaskData
from .sentence import (
    ModelError,
    ModelRef,
    effective_max_length,
    hidden_states,
    load_encoder,
    lora_target_modules,
    pool,
    pooling_mode,
)
from .tasks import Task, TaskError

_ENCODED = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class FinetuneSettings:
    pairs: str = "joint"  # "joint" | "siamese"
    siamese_head: str = "concat"  # "concat" | "cosine" (regression tasks only)
    peft: str | None = None  # None | "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] | None = None  # default: the architecture's (or peft's) choice
    epochs: float = 3.0
    max_steps: int | None = None
    learning_rate: float = 2e-5
    batch_size: int = 32
    max_length: int = 128
    max_train_samples: int | None = None
    selection_fraction: float = 0.1
    early_stopping_patience: int | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1

    def validate(self) -> None:
        if self.pairs not in ("joint", "siamese"):
            raise TaskError(f"--pairs must be joint or siamese, not {self.pairs!r}")
        if self.siamese_head not in ("concat", "cosine"):
            raise TaskError(f"--siamese-head must be concat or cosine, not {self.siamese_head!r}")
        if self.peft not in (None, "lora"):
            raise TaskError(f"--peft supports lora only, not {self.peft!r}")
        if not 0.0 < self.selection_fraction < 1.0:
            raise TaskError("--selection-fraction must lie strictly between 0 and 1")
        for name in ("epochs", "learning_rate", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise TaskError(f"--{name.replace('_', '-')} must be positive")
        for name in ("max_steps", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise TaskError(f"--{name.replace('_', '-')} must be positive")


def pairing_of(task: Task, settings: FinetuneSettings) -> str:
    return settings.pairs if task.is_pair else "single"


def head_of(task: Task, settings: FinetuneSettings) -> str:
    pairing = pairing_of(task, settings)
    if pairing == "siamese":
        return settings.siamese_head if task.is_regression else "concat"
    return "linear"


class SentenceTaskModel(nn.Module):
    """Encoder + parameter-free pooling + task head (see the module docstring for the heads)."""

    def __init__(self, encoder, *, num_labels: int, regression: bool, pairing: str, head: str, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling_mode(encoder)
        self.regression = regression
        self.pairing = pairing
        self.head = head
        # token_type_ids matter to BERT-style encoders on joint pairs; others do not take them.
        self._takes_token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
        width = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.classifier = None if head == "cosine" else nn.Linear(4 * width if head == "concat" else width, num_labels)
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.02)
            nn.init.zeros_(self.classifier.bias)

    def embed(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self._takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        output = self.encoder(**kwargs)
        return pool(hidden_states(output, self.encoder), attention_mask, self.pooling)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        input_ids_b=None,
        attention_mask_b=None,
        token_type_ids_b=None,
        labels=None,
    ) -> SequenceClassifierOutput:
        u = self.embed(input_ids, attention_mask, token_type_ids)
        if self.pairing == "siamese":
            v = self.embed(input_ids_b, attention_mask_b, token_type_ids_b)
            if self.head == "cosine":
                logits = F.cosine_similarity(u, v, dim=-1).unsqueeze(-1)
            else:
                logits = self.classifier(self.dropout(torch.cat([u, v, (u - v).abs(), u * v], dim=-1)))
        else:
            logits = self.classifier(self.dropout(u))
        loss = None
        if labels is not None:
            if self.regression:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)


class TaskCollator:
    """Dynamic padding of one (joint / single) or two (siamese) encoded sentences per example."""

    def __init__(self, tokenizer, regression: bool):
        self.tokenizer = tokenizer
        self.regression = regression

    def _pad(self, features, suffix: str) -> dict[str, torch.Tensor]:
        rows = [{k: f[k + suffix] for k in _ENCODED if k + suffix in f} for f in features]
        padded = self.tokenizer.pad(rows, return_tensors="pt")
        return {k + suffix: v for k, v in padded.items()}

    def __call__(self, features) -> dict[str, torch.Tensor]:
        batch = self._pad(features, "")
        if "input_ids_b" in features[0]:
            batch.update(self._pad(features, "_b"))
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
        return batch


def encode(task: Task, dataset, tokenizer, pairing: str, max_length: int):
    """Tokenised columns (``*_b`` for the second sentence when siamese) and ``labels`` for training."""
    low, high = task.score_range or (0.0, 1.0)

    def fn(batch):
        if pairing == "joint":
            out = dict(tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, max_length=max_length))
        else:
            out = dict(tokenizer(batch["sentence1"], truncation=True, max_length=max_length))
            if pairing == "siamese":
                second = tokenizer(batch["sentence2"], truncation=True, max_length=max_length)
                out.update({f"{k}_b": v for k, v in second.items()})
        out["labels"] = [(y - low) / (high - low) for y in batch["label"]] if task.is_regression else batch["label"]
        return out

    return dataset.map(fn, batched=True, remove_columns=dataset.column_names, desc=f"tokenising {task.name}")


def ensure_padding(tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token to pad batches with")
        # Padding is masked out of attention and pooling, so which id fills it does not matter.
        tokenizer.pad_token = tokenizer.eos_token


def build_model(ref: ModelRef, task: Task, settings: FinetuneSettings) -> SentenceTaskModel:
    encoder = load_encoder(ref)
    if settings.peft == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(settings.lora_targets) if settings.lora_targets else lora_target_modules(encoder)
        config = LoraConfig(
            r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=targets, bias="none",
        )
        try:
            encoder = get_peft_model(encoder, config)
        except ValueError as err:
            raise ModelError(
                f"LoRA cannot adapt {type(encoder).__name__} ({str(err).splitlines()[0]}); "
                "name its Linear layers with --lora-targets"
            ) from None
    return SentenceTaskModel(
        encoder,
        num_labels=task.num_labels,
        regression=task.is_regression,
        pairing=pairing_of(task, settings),
        head=head_of(task, settings),
        dropout=settings.dropout,
    )


def finetune_once(
    ref: ModelRef,
    tokenizer,
    data: TaskData,
    settings: FinetuneSettings,
    seed: int,
    *,
    max_eval_samples: int | None = None,
    show_progress: bool = False,
) -> dict:
    """One fine-tune of ``data.task`` with ``seed``: selection on a train slice, then the reported
    splits predicted once. Returns ``{"splits": {split: {metric: value}}, "selection": {...}}``."""
    task = data.task
    pairing = pairing_of(task, settings)
    train = data.splits["train"]
    if settings.max_train_samples is not None and settings.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(settings.max_train_samples))
    if len(train) < 4:
        raise TaskError(f"{task.name}: {len(train)} training rows are too few to hold out a selection slice")
    parts = train.train_test_split(test_size=settings.selection_fraction, seed=seed)
    fit, selection = parts["train"], parts["test"]

    set_seed(seed)  # the head's initialisation, dropout and LoRA's init follow the seed
    model = build_model(ref, task, settings)
    max_length = effective_max_length(model.encoder.config, settings.max_length)
    columns = {
        "fit": encode(task, fit, tokenizer, pairing, max_length),
        "selection": encode(task, selection, tokenizer, pairing, max_length),
    }

    def compute_metrics(prediction) -> dict[str, float]:
        predicted = task_metrics.predictions_from_logits(prediction.predictions, task.is_regression)
        gold = np.asarray(prediction.label_ids)
        return task_metrics.compute(task.metrics, predicted, gold)

    with tempfile.TemporaryDirectory(prefix="decollapse-eval-") as work:
        args = _training_arguments(work, task, settings, seed, len(columns["fit"]), show_progress)
        callbacks = []
        if settings.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=columns["fit"],
            eval_dataset=columns["selection"],
            data_collator=TaskCollator(tokenizer, task.is_regression),
            compute_metrics=compute_metrics,
            callbacks=callbacks,
        )
        if not show_progress:
            # Quiet runs: the Trainer's printer would write every log dict to stdout.
            trainer.remove_callback(PrinterCallback)
        trainer.train()
        best = _selection_summary(trainer, task)
        results = {}
        for split in task.reported_splits:
            reported = data.splits[split]
            if max_eval_samples is not None and max_eval_samples < len(reported):
                reported = reported.select(range(max_eval_samples))
            output = trainer.predict(encode(task, reported, tokenizer, pairing, max_length))
            predicted = task_metrics.predictions_from_logits(output.predictions, task.is_regression)
            gold = np.asarray(reported["label"])
            results[split] = {"metrics": task_metrics.compute(task.metrics, predicted, gold), "rows": len(reported)}
    best.update({"fit_rows": len(fit), "selection_rows": len(selection)})
    return {"splits": results, "selection": best}


def _training_arguments(work, task: Task, settings: FinetuneSettings, seed: int, fit_rows: int, progress: bool):
    steps_per_epoch = max(1, math.ceil(fit_rows / settings.batch_size))
    if settings.max_steps is not None:
        # A step budget may end mid-epoch: evaluate (and keep the best) three times along the way.
        schedule = {"eval_strategy": "steps", "save_strategy": "steps",
                    "eval_steps": max(1, math.ceil(settings.max_steps / 3)), "max_steps": settings.max_steps}
        schedule["save_steps"] = schedule["eval_steps"]
        total = settings.max_steps
    else:
        schedule = {"eval_strategy": "epoch", "save_strategy": "epoch", "num_train_epochs": settings.epochs}
        total = math.ceil(steps_per_epoch * settings.epochs)
    return TrainingArguments(
        output_dir=work,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=2 * settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=int(settings.warmup_ratio * total),
        lr_scheduler_type="linear",
        load_best_model_at_end=True,
        metric_for_best_model=task.primary_metric,
        greater_is_better=True,
        save_total_limit=1,
        save_only_model=True,
        logging_strategy="epoch" if settings.max_steps is None else "steps",
        logging_steps=max(1, schedule.get("eval_steps", 1)),
        report_to=[],
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **schedule,
    )


def _selection_summary(trainer, task: Task) -> dict:
    state = trainer.state
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(str(state.best_model_checkpoint).rsplit("-", 1)[-1])
    best_epoch = None
    for entry in state.log_history:
        if entry.get("step") == best_step and f"eval_{task.primary_metric}" in entry:
            best_epoch = entry.get("epoch")
    metric = state.best_metric
    return {
        "metric": task.primary_metric,
        "best_value": None if metric is None or (isinstance(metric, float) and math.isnan(metric)) else float(metric),
        "best_step": best_step,
        "best_epoch": best_epoch,
        "total_steps": state.global_step,
    }
