"""Trainer callbacks: the collapse monitor and the non-finite-gradient guard."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections import deque
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .trainer import NonFiniteLossError

logger = logging.getLogger(__name__)


@dataclass
class CollapseAlarm:
    step: int
    criterion: str
    message: str


@dataclass(frozen=True)
class HealthCriterion:
    """One rule on a collapse report: the metrics named ``*<suffix>`` must stay on the healthy side
    of ``threshold``. ``worst`` picks the metric the rule is judged on (``"min"`` for a floor,
    ``"max"`` for a ceiling); a value exactly at the threshold is healthy."""

    name: str
    suffix: str
    threshold: float
    worst: str  # "min" (a floor: below it trips) or "max" (a ceiling: above it trips)
    meaning: str

    @property
    def op(self) -> str:
        """The comparison that trips the rule, as it is printed in an alarm."""
        return "<" if self.worst == "min" else ">"

    def trips(self, value: float, threshold: float | None = None) -> bool:
        threshold = self.threshold if threshold is None else threshold
        return value < threshold if self.worst == "min" else value > threshold


# The report criteria that define a healthy unit group, shared by the training-time monitor and the
# model card. The rank floor is low on purpose: MLP activation patterns of an untrained control
# model sit near 0.07 of the possible rank early in training, and an alarm that fires on the
# control is noise. Metric definitions: ``modeling/diagnostics.py::unit_report``.
HEALTH_CRITERIA: dict[str, HealthCriterion] = {
    c.name: c
    for c in (
        HealthCriterion(
            "effective_rank_floor", "effective_rank_entropy_ratio", 0.05, "min",
            "entropy effective rank exp(H(σ/Σσ)) of the group's n unit vectors of width d"
            " ÷ the largest possible rank min(n, d)",
        ),
        HealthCriterion(
            "similar_pair_ceiling", "similar_pair_fraction", 0.9, "max",
            "share of unit pairs whose signed cosine similarity is above 0.8",
        ),
        HealthCriterion(
            "dead_unit_ceiling", "dead_share", 0.5, "max",
            "share of units never used on the probe batch",
        ),
    )
}


@dataclass(frozen=True)
class CriterionCheck:
    """A criterion judged on one report: the worst matching metric (``None`` when the report has
    no ``*<suffix>`` metric), its value, the threshold used and whether it tripped."""

    criterion: HealthCriterion
    metric: str | None
    value: float | None
    threshold: float
    tripped: bool


def check_health(
    metrics: dict[str, float], thresholds: dict[str, float | None] | None = None
) -> list[CriterionCheck]:
    """Judges every criterion of :data:`HEALTH_CRITERIA` that is on.

    ``thresholds`` overrides a criterion's threshold by name; ``None`` turns the criterion off (it
    is left out of the result). Each criterion is judged on its worst metric: the lowest value for a
    floor, the highest for a ceiling.
    """
    thresholds = thresholds or {}
    checks = []
    for criterion in HEALTH_CRITERIA.values():
        threshold = thresholds.get(criterion.name, criterion.threshold)
        if threshold is None:
            continue
        values = {k: v for k, v in metrics.items() if k.endswith(criterion.suffix)}
        if not values:
            checks.append(CriterionCheck(criterion, None, None, threshold, False))
            continue
        pick = min if criterion.worst == "min" else max
        name = pick(values, key=values.get)
        value = values[name]
        checks.append(CriterionCheck(criterion, name, value, threshold, criterion.trips(value, threshold)))
    return checks


def collapse_alarms(
    metrics: dict[str, float], step: int, thresholds: dict[str, float | None] | None = None
) -> list[CollapseAlarm]:
    """The alarms one collapse report raises under :data:`HEALTH_CRITERIA` (see :func:`check_health`
    for ``thresholds``). Pure: usable on any report, e.g. a ``diagnostics.json`` read back."""
    return [
        CollapseAlarm(
            step,
            check.criterion.name,
            f"{check.metric}={check.value:.4g} {check.criterion.op} {check.threshold} at step {step}",
        )
        for check in check_health(metrics, thresholds)
        if check.tripped
    ]


class CollapseMonitorCallback(TrainerCallback):
    """Every ``every_n_steps`` steps, computes ``model.collapse_report(probe_batch)`` on a fixed probe
    batch and logs its scalar metrics as ``collapse/<name>`` through the Trainer's logging.

    An alarm warns (and with ``stop_on_alarm`` stops training) when a criterion trips. The first
    three are :data:`HEALTH_CRITERIA`, judged by :func:`collapse_alarms`:

    - ``effective_rank_floor``: any ``*effective_rank_entropy_ratio`` metric below the floor;
    - ``similar_pair_ceiling``: any ``*similar_pair_fraction`` above the ceiling;
    - ``dead_unit_ceiling``: any ``*dead_share`` above the ceiling;
    - ``stall``: auxiliary losses falling while the task loss stays
      flat. Over the last ``stall_window`` training logs, the summed unweighted auxiliary terms fell
      by more than ``stall_aux_drop`` (relative) while the task loss fell by less than
      ``stall_task_tolerance`` (relative), comparing the first and second half of the window. Terms
      whose weighted sum (``aux_weighted/*``, else the unweighted terms) is below
      ``stall_min_aux_share`` of the task loss are too small to be what the optimizer spends itself
      on, and do not raise it (a floor-subtracted term falling from 0.01 to 0.005 is not a stall).

    A criterion set to ``None`` is off. Alarms are kept in ``self.alarms``. The defaults are the
    thresholds of :data:`HEALTH_CRITERIA` (why the rank floor is as low as 0.05 is noted there).
    """

    def __init__(
        self,
        probe_batch: dict[str, torch.Tensor],
        every_n_steps: int = 200,
        effective_rank_floor: float | None = HEALTH_CRITERIA["effective_rank_floor"].threshold,
        similar_pair_ceiling: float | None = HEALTH_CRITERIA["similar_pair_ceiling"].threshold,
        dead_unit_ceiling: float | None = HEALTH_CRITERIA["dead_unit_ceiling"].threshold,
        stall_window: int | None = 10,
        stall_aux_drop: float = 0.2,
        stall_task_tolerance: float = 0.01,
        stall_min_aux_share: float = 0.01,
        stop_on_alarm: bool = False,
    ):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps={every_n_steps} is not allowed: expected a positive integer")
        if stall_window is not None and stall_window < 4:
            raise ValueError(f"stall_window={stall_window} is not allowed: expected None or an integer >= 4")
        self.probe_batch = probe_batch
        self.every_n_steps = every_n_steps
        self.effective_rank_floor = effective_rank_floor
        self.similar_pair_ceiling = similar_pair_ceiling
        self.dead_unit_ceiling = dead_unit_ceiling
        self.stall_window = stall_window
        self.stall_aux_drop = stall_aux_drop
        self.stall_task_tolerance = stall_task_tolerance
        self.stall_min_aux_share = stall_min_aux_share
        self.stop_on_alarm = stop_on_alarm
        self.alarms: list[CollapseAlarm] = []
        self.history: list[tuple[int, dict[str, float]]] = []
        self._pending: dict[str, float] = {}
        self._loss_log: list[tuple[float, float, float]] = []  # (task loss, summed aux, summed weighted aux)
        self._stall_raised = False

    # -- hooks ---------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps != 0:
            return control
        model = getattr(model, "module", model)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in self.probe_batch.items() if isinstance(v, torch.Tensor)}
        report = model.collapse_report(batch)
        metrics = {k: float(v) for k, v in report.metrics.items()}
        self.history.append((state.global_step, metrics))
        self._pending.update({f"collapse/{k}": v for k, v in metrics.items()})
        control.should_log = True
        for alarm in self.check_report(metrics, state.global_step):
            self._raise(alarm, control)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "task_loss" not in logs:
            return control
        aux = sum(v for k, v in logs.items() if k.startswith("aux/"))
        weighted = [v for k, v in logs.items() if k.startswith("aux_weighted/")]
        self._loss_log.append((logs["task_loss"], aux, sum(weighted) if weighted else aux))
        alarm = self.check_stall(state.global_step)
        if alarm is not None:
            self._raise(alarm, control)
        return control

    def pop_pending_logs(self) -> dict[str, float]:
        pending, self._pending = self._pending, {}
        return pending

    # -- criteria (pure: usable on any report or loss history) ------------------------------------
    def check_report(self, metrics: dict[str, float], step: int) -> list[CollapseAlarm]:
        return collapse_alarms(
            metrics,
            step,
            {
                "effective_rank_floor": self.effective_rank_floor,
                "similar_pair_ceiling": self.similar_pair_ceiling,
                "dead_unit_ceiling": self.dead_unit_ceiling,
            },
        )

    def check_stall(self, step: int) -> CollapseAlarm | None:
        if self.stall_window is None or self._stall_raised or len(self._loss_log) < self.stall_window:
            return None
        window = self._loss_log[-self.stall_window :]
        half = len(window) // 2
        task_a = sum(t for t, _, _ in window[:half]) / half
        task_b = sum(t for t, _, _ in window[half:]) / (len(window) - half)
        aux_a = sum(a for _, a, _ in window[:half]) / half
        aux_b = sum(a for _, a, _ in window[half:]) / (len(window) - half)
        weighted_a = sum(w for _, _, w in window[:half]) / half
        if aux_a <= 0 or abs(weighted_a) < self.stall_min_aux_share * abs(task_a):
            return None
        aux_drop = (aux_a - aux_b) / abs(aux_a)
        task_drop = (task_a - task_b) / max(abs(task_a), 1e-12)
        if aux_drop > self.stall_aux_drop and task_drop < self.stall_task_tolerance:
            self._stall_raised = True
            return CollapseAlarm(
                step,
                "stall",
                f"auxiliary losses fell {aux_drop:.1%} while the task loss moved {-task_drop:+.1%} over the "
                f"last {len(window)} logs (step {step}): the regularizers are being optimised instead of the task",
            )
        return None

    def _raise(self, alarm: CollapseAlarm, control) -> None:
        self.alarms.append(alarm)
        logger.warning("collapse alarm [%s]: %s", alarm.criterion, alarm.message)
        if self.stop_on_alarm:
            control.should_training_stop = True


class NonFiniteGuardCallback(TrainerCallback):
    """Refuses an optimizer step whose gradients are NaN or infinite, so a bad step can never
    overwrite the last good weights (clipping an infinite norm would turn every weight into NaN),
    and keeps a copy of the last good state.

    When a loss goes non-finite the weights in memory are the very ones that produced it, so the last
    good state is the one before the last update. Before every optimizer step (which
    ``DecollapseTrainer`` reaches only when every loss of the step was finite) the model's
    ``state_dict`` (parameters and persistent buffers, such as moh's router step counter) is copied
    into tensors allocated once, on the model's device;
    :meth:`restore_last_good` puts it back. The copy costs one more set of weights in memory and
    0.15-0.4 ms per step for the default models on two CPU cores, 1-3% of their 10-30 ms steps (less
    at real sizes: a step grows with tokens x weights, the copy with the weights only). Reading a fresh
    ``state_dict`` each time is two thirds of that, and is kept: it stays right if a parameter is
    replaced rather than updated in place.
    """

    def __init__(self, keep_last_good: bool = True):
        self.keep_last_good = keep_last_good
        self.last_good: dict[str, torch.Tensor] | None = None
        self.last_good_step: int | None = None  # optimizer updates the snapshot had seen

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return control
        if self.keep_last_good:
            self._snapshot(model, state.global_step)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            if not bool(torch.isfinite(torch.stack(norms)).all()):
                raise NonFiniteLossError("gradient", state.global_step)
        return control

    def _snapshot(self, model, step: int) -> None:
        current = model.state_dict()
        if self.last_good is None or self.last_good.keys() != current.keys():
            self.last_good = {name: value.detach().clone() for name, value in current.items()}
        else:
            torch._foreach_copy_(list(self.last_good.values()), [current[name] for name in self.last_good])
        self.last_good_step = step

    def restore_last_good(self, model) -> int:
        """Loads the snapshot into ``model``; returns its step. Raises when there is none."""
        if self.last_good is None:
            raise ValueError("no state with a finite loss was seen")
        model.load_state_dict(self.last_good)
        return self.last_good_step


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bars without a printed dict per log: the terms still reach every
    ``report_to`` integration, ``trainer.state.log_history`` and the run's ``training_log.json``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return control


class StepUpdateCallback(TrainerCallback):
    """Calls ``model.after_optimizer_step()`` once after every optimizer step, and logs what it returns
    (averaged over the steps since the last training log) with the next training log.

    This is where state that is not trained by gradients moves: SoME's key stores (Knowledge Gravity),
    usage EMAs and balance biases. The hook runs on every process at the same step, after the weights
    were updated and before the gradients are zeroed, once per optimizer step whatever the gradient
    accumulation. ``DecollapseTrainer`` adds it by itself; with a plain ``transformers.Trainer`` pass
    ``callbacks=[StepUpdateCallback()]``. A model without the hook is left alone.
    """

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._steps = 0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        update = getattr(getattr(model, "module", model), "after_optimizer_step", None)
        if update is None:
            return control
        logs = update() or {}
        for key, value in logs.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._steps += 1 if logs else 0
        return control

    def pop_pending_logs(self) -> dict[str, float]:
        if not self._steps:
            return {}
        logs = {key: value / self._steps for key, value in self._sums.items()}
        self._sums, self._steps = {}, 0
        return logs


class StopOnSignalCallback(TrainerCallback):
    """SIGINT or SIGTERM (what a cluster scheduler sends before it kills a job) stops training at the
    next step boundary with a checkpoint, instead of losing the run: the handler only records the
    signal, and the next ``on_step_end`` asks the Trainer to save and stop. A second signal stops at
    once (KeyboardInterrupt). Under data parallelism the ranks agree (any rank signalled stops all),
    so every rank saves the same step and none waits in a collective for another that has left.

    Use as a context manager around ``trainer.train()``; handlers are installed only in the main
    thread (Python delivers signals nowhere else) and restored on exit.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.received: str | None = None
        self.step: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        logger.warning("%s received: stopping after this step with a checkpoint (again to stop at once)", self.received)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.received is None:
                self.received = "a signal to another process"
        if stop:
            self.step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class CollatorStateCallback(TrainerCallback):
    """Saves the data collator's own random stream with each checkpoint and restores it on resume.

    A seeded collator (masking, deletion, prefix lengths) draws from a generator of its own, so that its
    batches do not depend on what else uses the global RNGs; the Trainer checkpoints the global RNGs
    only. Without this, a resumed masked-LM run would mask its remaining batches as from step 0.
    The state saved is the one before the first batch training has not consumed: the data loader
    collates ahead of training (accelerate looks one batch ahead to find the end of an epoch), so the
    collator's current state is already past the checkpoint. Give the Trainer ``wrap()`` as its
    collator so the states before each batch are recorded.
    Handles ``transformers``' collators (a ``torch.Generator`` in ``generator``) and decollapse's
    (``rng_state()`` / ``set_rng_state()``).
    """

    FILE = "collator_rng.json"

    def __init__(self, collator):
        self.collator = collator
        self._before: deque = deque(maxlen=64)  # stream state before each of the latest batches
        self._produced = 0
        self._start_step = 0

    def wrap(self):
        def collate(features):
            self._before.append(self._state())
            self._produced += 1
            return self.collator(features)

        return collate

    def _state(self) -> dict | None:
        getter = getattr(self.collator, "rng_state", None)
        if getter is not None:
            state = getter()
            return None if state is None else {"kind": "decollapse", "state": state}
        generator = getattr(self.collator, "generator", None)
        if isinstance(generator, torch.Generator):
            return {"kind": "torch", "state": generator.get_state().tolist()}
        return None  # unseeded, or no draw yet: a fresh stream is the right one

    def on_train_begin(self, args, state, control, **kwargs):
        self._before.clear()
        self._produced, self._start_step = 0, state.global_step

    def on_save(self, args, state, control, **kwargs):
        consumed = (state.global_step - self._start_step) * args.gradient_accumulation_steps
        ahead = self._produced - consumed
        saved = self._before[-ahead] if 0 < ahead <= len(self._before) else self._state()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if saved is not None and os.path.isdir(folder) and args.should_save:
            with open(os.path.join(folder, self.FILE), "w") as fh:
                json.dump(saved, fh)

    def restore(self, checkpoint: str) -> None:
        """Puts the collator's stream where it was when ``checkpoint`` was saved (no-op without one)."""
        path = os.path.join(checkpoint, self.FILE)
        if not os.path.isfile(path):
            return
        with open(path) as fh:
            saved = json.load(fh)
        if saved["kind"] == "decollapse":
            self.collator.set_rng_state(saved["state"])
        else:
            self.collator.create_rng("pt")  # the generator transformers would create on the first batch
            self.collator.generator.set_state(torch.tensor(saved["state"], dtype=torch.uint8))
