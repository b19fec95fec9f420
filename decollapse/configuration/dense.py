"""Configuration of ``dense``, the plain pre-LN transformer every experiment compares to."""

from __future__ import annotations

from typing import ClassVar

from .config_utils import DecollapseConfig


class DenseConfig(DecollapseConfig):
    r"""Configuration of the dense control model (GPT-2-style pre-LN transformer, SDPA attention,
    learned absolute positions, tied embeddings).

    The defaults are the recipe measured to train well on the embedded corpus in about two minutes on
    two CPU cores (d=64, 2 layers, see docs/CORPUS.md); scale them with
    ``--set`` for real data.

    Args:
        num_attention_heads: heads per layer; ``hidden_size`` must be a multiple of it.
        intermediate_size: MLP width; ``None`` means ``4 * hidden_size``.
        attention_dropout: dropout on attention probabilities during training.
        head_diversity_weight: weight of the optional ``head_similarity`` auxiliary term (mean squared
            off-diagonal cosine between what the heads of a layer write into the residual stream).
            0 keeps the control model plain and skips the computation.
        objective: ``"causal_lm"`` (``DenseForCausalLM``) or ``"masked_lm"`` (``DenseForMaskedLM``,
            bidirectional attention).
    """

    model_type = "decollapse_dense"
    aux_loss_weight_fields: ClassVar[dict[str, str]] = {"head_similarity": "head_diversity_weight"}

    num_attention_heads: int = 2
    intermediate_size: int | None = None
    attention_dropout: float = 0.0
    head_diversity_weight: float = 0.0

    @property
    def supports_packed_documents(self) -> bool:
        """Attention is the only path between positions, and it is masked per document."""
        return True

    def validate(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.check_positive("num_attention_heads", "intermediate_size")
        self.check_divisible("hidden_size", "num_attention_heads")
        self.check_range("attention_dropout", 0.0, 1.0, high_inclusive=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
