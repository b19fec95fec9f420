"""Trainer callbacks: the collapse monitor and the non-finite-gradient guard."""

from __future__ import annotations

import logging
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


class CollapseMonitorCallback(TrainerCallback):
    """Every ``every_n_steps`` steps, computes ``model.collapse_report(probe_batch)`` on a fixed probe
    batch and logs its scalar metrics as ``collapse/<name>`` through the Trainer's logging.

    An alarm warns (and with ``stop_on_alarm`` stops training) when a criterion trips:

    - ``effective_rank_floor``: any ``*effective_rank_entropy_ratio`` metric below the floor;
    - ``similar_pair_ceiling``: any ``*similar_pair_fraction`` above the ceiling;
    - ``dead_unit_ceiling``: any ``*dead_share`` above the ceiling;
    - ``stall``: the failure seed 004 documents — auxiliary losses falling while the task loss stays
      flat. Over the last ``stall_window`` training logs, the summed unweighted auxiliary terms fell
      by more than ``stall_aux_drop`` (relative) while the task loss fell by less than
      ``stall_task_tolerance`` (relative), comparing the first and second half of the window. Terms
      whose weighted sum (``aux_weighted/*``, else the unweighted terms) is below
      ``stall_min_aux_share`` of the task loss are too small to be what the optimizer spends itself
      on, and do not raise it (a floor-subtracted term falling from 0.01 to 0.005 is not a stall).

    A criterion set to ``None`` is off. Alarms are kept in ``self.alarms``. The default rank floor
    (0.05 of the possible rank) is low on purpose: MLP activation patterns of an untrained control
    model sit near 0.07 early in training, and an alarm that fires on the control is noise.
    """

    def __init__(
        self,
        probe_batch: dict[str, torch.Tensor],
        every_n_steps: int = 200,
        effective_rank_floor: float | None = 0.05,
        similar_pair_ceiling: float | None = 0.9,
        dead_unit_ceiling: float | None = 0.5,
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
        alarms = []
        rules = [
            ("effective_rank_floor", "effective_rank_entropy_ratio", self.effective_rank_floor, min, "<"),
            ("similar_pair_ceiling", "similar_pair_fraction", self.similar_pair_ceiling, max, ">"),
            ("dead_unit_ceiling", "dead_share", self.dead_unit_ceiling, max, ">"),
        ]
        for criterion, suffix, threshold, pick, op in rules:
            if threshold is None:
                continue
            values = {k: v for k, v in metrics.items() if k.endswith(suffix)}
            if not values:
                continue
            name = pick(values, key=values.get)
            value = values[name]
            tripped = value < threshold if op == "<" else value > threshold
            if tripped:
                alarms.append(
                    CollapseAlarm(step, criterion, f"{name}={value:.4g} {op} {threshold} at step {step}")
                )
        return alarms

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
    overwrite the last good weights (clipping an infinite norm would turn every weight into NaN)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return control
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            if not bool(torch.isfinite(torch.stack(norms)).all()):
                raise NonFiniteLossError("gradient", state.global_step)
        return control


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bars without a printed dict per log: the terms still reach every
    ``report_to`` integration, ``trainer.state.log_history`` and the run's ``training_log.json``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return control
