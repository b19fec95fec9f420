"""``DecollapseTrainer``: the Hugging Face Trainer, with the auxiliary (anti-collapse) losses
combined by a weighting strategy and every term logged through the Trainer's own logging, so
``report_to`` (tensorboard / wandb / trackio) shows them. There is no training loop here: only
``compute_loss``, ``create_optimizer``, ``log``, ``evaluation_loop`` and, for a stream divided between
processes, ``get_train_dataloader`` are extended.

Logged while training (averaged over the steps since the last log):
  ``task_loss``, ``aux/<term>`` (unweighted), ``aux_weighted/<term>`` (its contribution to the loss),
  ``aux_weight/<term>`` and ``aux_weight/task`` (the current multipliers), plus the Trainer's own
  ``loss`` (the total that was back-propagated) and ``grad_norm``.
At evaluation: ``eval_loss`` is the **task** loss (so ``exp(eval_loss)`` is a perplexity for language
models), ``eval_total_loss`` the weighted total and ``eval_aux/<term>`` each term.
A model output's ``extra_metrics`` (scalars that are logged, never added to the loss, e.g. the plain
cross-entropy beside a weighted diffusion loss) appear as ``metric/<name>`` and ``eval_<name>``.

``eval_data_collator`` (a callable returning a collator) builds a fresh collator for every evaluation:
a seeded masking or deletion collator then gives the same evaluation batches every time, so two
evaluations of one checkpoint report the same loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from .weighting import STRATEGIES, LossWeighting

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised before the optimizer step when a loss term (or the gradient) is NaN or infinite, so the
    weights in memory are still the last good ones."""

    def __init__(self, term: str, step: int, value: float | None = None):
        self.term = term
        self.step = step
        shown = "" if value is None else f" ({value})"
        super().__init__(f"loss term {term!r} became non-finite{shown} at step {step}")


@dataclass
class DecollapseTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the auxiliary-loss knobs."""

    loss_weighting: str = field(default="fixed", metadata={"help": f"one of {', '.join(STRATEGIES)}"})
    aux_weights: dict[str, float] | None = field(
        default=None, metadata={"help": "per-term weights overriding the config's defaults"}
    )
    aux_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up of the auxiliary weights"})
    learn_task_weight: bool = field(
        default=False, metadata={"help": "kendall_gal only: also learn the task weight (risky: it can shrink the task loss away)"}
    )


def _unwrap(model):
    return getattr(model, "module", model)


def mark_zero3_leaf_modules(model) -> list[type]:
    """Under DeepSpeed ZeRO-3, makes each class in ``model._no_split_modules`` (an architecture's
    blocks and its routed units) a leaf module, whose parameters are gathered whole when it runs.

    ZeRO-3 otherwise gathers each submodule's parameters as that submodule's own forward starts: a
    routed unit whose experts run for some tokens on one rank and not on another makes the ranks wait
    for different gathers and hang, and code that reads a child's weight without calling the child
    (a head's contribution through ``o_proj.weight``) would find it partitioned. No-op outside ZeRO-3.
    Returns the classes marked.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return []
    from deepspeed.utils import set_z3_leaf_modules

    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes


class DecollapseTrainer(Trainer):
    """``transformers.Trainer`` for models that return ``task_loss`` and ``aux_losses``.

    Works with any model following the decollapse output contract; a model without ``aux_losses``
    trains exactly as with the plain Trainer.
    """

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        args: TrainingArguments = self.args
        model = _unwrap(self.model)
        defaults = dict(getattr(model.config, "aux_loss_weights", {}) or {})
        overrides = getattr(args, "aux_weights", None) or {}
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ValueError(
                f"aux_weights names unknown term(s) {unknown}; this model reports: "
                f"{', '.join(sorted(defaults)) or 'no auxiliary terms'}"
            )
        self._start_run(model)
        if self.is_deepspeed_enabled:
            mark_zero3_leaf_modules(model)
        # State that moves outside the gradient (SoME's key stores) moves after each optimizer step.
        # Imported here: the callbacks module imports this one.
        from .callbacks import StepUpdateCallback

        if not any(isinstance(cb, StepUpdateCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(StepUpdateCallback())
        # Our compute_loss returns a per-batch mean: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._eval_terms: dict[str, torch.Tensor] = {}
        self._eval_count = 0

    def _start_run(self, model) -> None:
        """The loss weighting of ``model``'s terms, and nothing accumulated for the next training log."""
        args = self.args
        defaults = dict(getattr(model.config, "aux_loss_weights", {}) or {})
        self.loss_weighting = LossWeighting(
            {**defaults, **(getattr(args, "aux_weights", None) or {})},
            strategy=getattr(args, "loss_weighting", "fixed"),
            warmup_steps=getattr(args, "aux_warmup_steps", 0),
            learn_task_weight=getattr(args, "learn_task_weight", False),
        ).to(args.device)
        self._train_terms: dict[str, torch.Tensor] = {}
        self._train_count = 0
        self._weighting_grads_step: int | None = None

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        # With ``model_init``, every train() trains a fresh model (hyperparameter_search's trials): its
        # learned Kendall-Gal log-variances and the terms averaged for the next log start afresh too,
        # or a trial would begin where the previous one (or a diverged one) stopped.
        if hasattr(self, "loss_weighting"):  # Trainer.__init__ calls this before ours builds them
            self._start_run(model)
        return model

    # -- optimisation --------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        # The Trainer zeroes the model's gradients after each optimizer step, not those of parameters
        # that live outside the model: without this, the Kendall-Gal log-variances would be moved by the
        # sum of every gradient since step 0 (and a resumed run, whose sums restart, would diverge).
        if self._weighting_grads_step != self.state.global_step:
            self.loss_weighting.zero_grad(set_to_none=True)
            self._weighting_grads_step = self.state.global_step
        return super().training_step(model, inputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = [p for p in self.loss_weighting.parameters() if p.requires_grad]
        if params:
            # Log-variances are not weights to shrink: no weight decay (the original applied it).
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        task_loss = getattr(outputs, "task_loss", None)
        if task_loss is None:
            task_loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        aux_losses = getattr(outputs, "aux_losses", None) or {}
        extra = getattr(outputs, "extra_metrics", None) or {}
        step = self.state.global_step
        total, weighted = self.loss_weighting(task_loss, aux_losses, step)

        if model.training:
            self._check_finite(task_loss, aux_losses, total, step)
            self._accumulate(self._train_terms, task_loss, aux_losses, weighted, total, extra)
            self._train_count += 1
            return (total, outputs) if return_outputs else total
        self._accumulate(self._eval_terms, task_loss, aux_losses, weighted, total, extra)
        self._eval_count += 1
        # Evaluation reports the task loss: exp(eval_loss) is then the model's perplexity, not a
        # number inflated or deflated by regularizers.
        return (task_loss, outputs) if return_outputs else task_loss

    @staticmethod
    def _check_finite(task_loss, aux_losses, total, step):
        for name, value in [("task_loss", task_loss), *aux_losses.items(), ("total", total)]:
            if not bool(torch.isfinite(value.detach()).all()):
                raise NonFiniteLossError(name, step, float(value.detach().float().mean()))

    @staticmethod
    def _accumulate(store, task_loss, aux_losses, weighted, total, extra):
        values = {"task_loss": task_loss, "total_loss": total}
        values.update({f"aux/{k}": v for k, v in aux_losses.items()})
        values.update({f"aux_weighted/{k}": v for k, v in weighted.items()})
        values.update({f"metric/{k}": v for k, v in extra.items()})
        for key, value in values.items():
            value = value.detach().float()
            store[key] = store[key] + value if key in store else value

    # -- logging -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_train_log = "loss" in logs and not any(k.startswith("eval_") for k in logs)
        if is_train_log and self._train_count:
            for key, value in self._mean_over_processes(self._train_terms, self._train_count).items():
                if key != "total_loss":  # the Trainer already logs the total as "loss"
                    logs[key] = value
            for name, weight in self.loss_weighting.current_weights(self.state.global_step).items():
                logs[f"aux_weight/{name}"] = weight
            self._train_terms, self._train_count = {}, 0
        for callback in self.callback_handler.callbacks:
            pop = getattr(callback, "pop_pending_logs", None)
            if pop is not None:
                logs.update(pop())
        super().log(logs, start_time)

    def _mean_over_processes(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Each term's mean over the batches this process saw, averaged over the processes (the Trainer
        averages its own ``loss`` the same way): otherwise a multi-process run would log the main
        process's share of the batch only. Called by every process at the same log or evaluation."""
        names = sorted(sums)
        means = torch.stack([sums[name].float() / count for name in names])
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            means = means.to(self.args.device)
            torch.distributed.all_reduce(means)
            means = means / self.args.world_size
        return dict(zip(names, means.tolist()))

    def get_train_dataloader(self):
        """A stream already divided between the processes (``datasets.distributed.split_dataset_by_node``,
        as ``decollapse train --streaming`` does) is each rank's own: ``accelerator.prepare`` would
        divide it again, or by default have the main process read for every rank. It gets a plain
        ``DataLoader``; the Trainer moves its batches to the device as it does any batch."""
        dataset = self.train_dataset
        if getattr(dataset, "_distributed", None) is None or self.args.world_size <= 1:
            return super().get_train_dataloader()
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            collate_fn=self._get_collator_with_removed_columns(self.data_collator, description="training"),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator = self.data_collator
        self.data_collator = self.eval_data_collator()
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def evaluation_loop(self, *args, **kwargs):
        self._eval_terms, self._eval_count = {}, 0
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._eval_count:
            for key, value in self._mean_over_processes(self._eval_terms, self._eval_count).items():
                name = key.replace("aux_weighted/", "aux_weighted_").replace("aux/", "aux_").replace("metric/", "")
                if key == "task_loss":
                    continue  # that is eval_loss
                output.metrics[f"{prefix}_{name}"] = value
        if f"{prefix}_loss" in output.metrics:
            loss = output.metrics[f"{prefix}_loss"]
            output.metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 50 else float("inf")
        return output

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The Trainer restores the optimizer state of the log-variances (their own parameter group) but
        # not their values, which live beside the weights: without this, a resumed Kendall-Gal run
        # weights its terms as at step 0 while the optimizer continues from step N.
        path = os.path.join(resume_from_checkpoint, "loss_weighting.json")
        if self.loss_weighting.strategy != "kendall_gal":
            return
        if not os.path.isfile(path):
            raise ValueError(
                f"{resume_from_checkpoint}: no loss_weighting.json, so the Kendall-Gal log-variances cannot be "
                "restored (was it saved by a run with loss_weighting=kendall_gal?)"
            )
        with open(path) as fh:
            saved = json.load(fh)["log_vars"]
        if set(saved) != set(self.loss_weighting.log_vars):
            raise ValueError(
                f"{path}: log-variances of {sorted(saved)}, this run weights {sorted(self.loss_weighting.log_vars)}"
            )
        with torch.no_grad():
            for name, value in saved.items():
                self.loss_weighting.log_vars[name].fill_(value)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.loss_weighting.strategy == "kendall_gal" and self.args.should_save:
            # Learned loss weights travel beside, never inside, the model checkpoint.
            path = os.path.join(output_dir or self.args.output_dir, "loss_weighting.json")
            state = {k: v.item() for k, v in self.loss_weighting.log_vars.items()}
            with open(path, "w") as fh:
                json.dump({"strategy": "kendall_gal", "log_vars": state}, fh, indent=2)
