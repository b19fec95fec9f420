"""How the task loss and the auxiliary (anti-collapse) terms are combined into the loss that is
back-propagated.

Strategies:

- ``fixed``: ``L = L_task + r(t) * Σ_k w_k L_k`` with per-term weights ``w_k`` (the config's defaults
  unless overridden).
- ``kendall_gal`` (Kendall, Gal & Cipolla 2018, "Multi-task learning using uncertainty to weigh
  losses"): one learned log-variance ``s_k`` per auxiliary term,
  ``L = L_task + r(t) * Σ_k (½ exp(−s_k) L_k + ½ s_k)``.
  ``s_k`` starts at ``−log(2 w_k)`` so the first step weighs every term exactly as ``fixed`` would.
  The task weight stays fixed at 1 unless ``learn_task_weight=True``: the MrCogito repository's run
  reports (github.com/ksopyla/MrCogito) record Kendall–Gal on the task term muting the masked-LM
  gradient (its log-variance grew until the task barely counted) and driving the total loss negative. The term's optimum is ``s_k = log L_k``, which needs
  ``L_k > 0``: a term that can be negative (e.g. the log-form uniformity) makes ``s_k`` run away, so a
  warning is logged when one shows up.

``r(t) = min(1, t / warmup_steps)`` is the linear warm-up of the auxiliary weights (1 without warm-up).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

STRATEGIES = ("fixed", "kendall_gal")


class LossWeighting(nn.Module):
    """Combines ``task_loss`` and ``aux_losses`` and reports the weights it used.

    Its parameters (Kendall–Gal log-variances) are trained by the Trainer's optimizer, without weight
    decay, and are never part of the model checkpoint.
    """

    def __init__(
        self,
        weights: dict[str, float],
        strategy: str = "fixed",
        warmup_steps: int = 0,
        learn_task_weight: bool = False,
    ):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"loss_weighting={strategy!r} is not allowed: expected one of {', '.join(STRATEGIES)}")
        if warmup_steps < 0:
            raise ValueError(f"aux_warmup_steps={warmup_steps} is not allowed: expected an integer >= 0")
        bad = {k: w for k, w in weights.items() if not (w >= 0 and math.isfinite(w))}
        if bad:
            raise ValueError(f"auxiliary weights must be finite and >= 0, got {bad}")
        self.strategy = strategy
        self.warmup_steps = warmup_steps
        self.fixed_weights = {k: float(w) for k, w in weights.items() if w > 0}
        self.learn_task_weight = learn_task_weight and strategy == "kendall_gal"
        self.log_vars = nn.ParameterDict()
        if strategy == "kendall_gal":
            for name, weight in self.fixed_weights.items():
                self.log_vars[name] = nn.Parameter(torch.tensor(-math.log(2.0 * weight)))
            if self.learn_task_weight:
                self.log_vars["task"] = nn.Parameter(torch.tensor(-math.log(2.0)))
        self._warned_negative: set[str] = set()

    def ramp(self, step: int) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)

    def current_weights(self, step: int) -> dict[str, float]:
        """Effective multiplier of each auxiliary term (and of the task) at ``step``."""
        ramp = self.ramp(step)
        if self.strategy == "fixed":
            out = {name: ramp * w for name, w in self.fixed_weights.items()}
            out["task"] = 1.0
            return out
        out = {name: ramp * 0.5 * math.exp(-s.item()) for name, s in self.log_vars.items() if name != "task"}
        out["task"] = 0.5 * math.exp(-self.log_vars["task"].item()) if self.learn_task_weight else 1.0
        return out

    def forward(
        self, task_loss: torch.Tensor, aux_losses: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the total loss and each auxiliary term's weighted contribution."""
        ramp = self.ramp(step)
        weighted: dict[str, torch.Tensor] = {}
        if self.strategy == "kendall_gal" and self.learn_task_weight:
            s = self.log_vars["task"]
            total = 0.5 * torch.exp(-s) * task_loss + 0.5 * s
        else:
            total = task_loss
        for name, term in aux_losses.items():
            if name not in self.fixed_weights:
                continue  # computed by the model for monitoring only
            if self.strategy == "fixed":
                contribution = ramp * self.fixed_weights[name] * term
            else:
                if name not in self._warned_negative and bool(term.detach() < 0):
                    self._warned_negative.add(name)
                    logger.warning(
                        "auxiliary term %r is negative (%.4g): Kendall–Gal weighting has no optimum for "
                        "negative terms and its weight will grow without bound; use 'fixed' for it.",
                        name,
                        term.item(),
                    )
                s = self.log_vars[name]
                contribution = ramp * (0.5 * torch.exp(-s) * term + 0.5 * s)
            weighted[name] = contribution
            total = total + contribution
        return total, weighted
