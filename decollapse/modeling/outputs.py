"""Output classes of every decollapse model: the standard `transformers` outputs plus the two fields
the anti-collapse training contract needs.

- ``task_loss``: the objective's own loss (next-token or masked-token cross-entropy, ...).
- ``aux_losses``: the auxiliary terms by name, each a scalar tensor, **unweighted**.

``loss`` is always ``task_loss + sum(config default weight * term)``, so a plain
``transformers.Trainer`` trains with the regularizers; ``DecollapseTrainer`` recombines the same terms
with its own weighting strategy. This module imports only torch and transformers (Hub bundles copy it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    ModelOutput,
    SequenceClassifierOutput,
)


@dataclass
class DecollapseModelOutput(BaseModelOutputWithPast):
    aux_losses: dict[str, torch.Tensor] | None = None


@dataclass
class DecollapseCausalLMOutput(CausalLMOutputWithPast):
    task_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None


@dataclass
class DecollapseMaskedLMOutput(MaskedLMOutput):
    task_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None


@dataclass
class DecollapseSequenceClassifierOutput(SequenceClassifierOutput):
    task_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None


@dataclass
class DecollapseDiffusionOutput(ModelOutput):
    """Output of a masked-diffusion head.

    ``logits`` are over the noised positions only (``[n_masked, V]``), in the order of
    ``noised_mask.nonzero()``; ``noise_level`` is the t of each sequence. ``extra_metrics`` holds
    scalars the trainer logs beside the loss without adding them to it (e.g. the plain cross-entropy
    next to the weighted, smoothed training loss).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    task_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    noise_level: torch.Tensor | None = None
    noised_mask: torch.Tensor | None = None
    extra_metrics: dict[str, torch.Tensor] | None = None


def combine_losses(
    task_loss: torch.Tensor | None,
    aux_losses: dict[str, torch.Tensor],
    weights: dict[str, float],
) -> torch.Tensor | None:
    """``task_loss + sum_k weights[k] * aux_losses[k]`` (terms without a weight count 0)."""
    if task_loss is None:
        return None
    total = task_loss
    for name, term in aux_losses.items():
        weight = weights.get(name, 0.0)
        if weight:
            total = total + weight * term
    return total
