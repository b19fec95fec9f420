"""Configuration of ``sosm``: a transformer whose token state is a semantic state of 16 named blocks
(the Self-Organizing State Model), with the four tiers of anti-collapse measures as switches."""

from __future__ import annotations

from typing import ClassVar

from .config_utils import DecollapseConfig

# The 16 blocks, in the order of the 4 × 4 grid of the state matrix (row-major): identity,
# structure, local and global context, syntactic and semantic relations, transformation, knowledge,
# global, modality, discourse, frame, position, entity, affect, extension. The names are labels; only
# the auxiliary heads (tier 3) give any block a job.
BLOCK_NAMES: tuple[str, ...] = ("I", "S", "C1", "C2", "R1", "R2", "T", "K", "G", "M", "D", "F", "P", "E", "A", "X")


def block_shape(block_dim: int) -> tuple[int, int] | None:
    """``(rows, cols)`` of one block of ``block_dim`` features, or ``None`` when the layout cannot hold it.

    The layout is the 2 × 2 one generalised: the state is a ``4r × 4c`` matrix cut into a 4 × 4 grid
    of ``r × c`` blocks. Blocks stay near-square (``r ≤ c ≤ 2r``, ``r`` the largest such divisor), so
    4 → 2 × 2 (an 8 × 8 state), 8 → 2 × 4, 16 → 4 × 4, 1 → 1 × 1, 2 → 1 × 2; a width such as 3, 5 or 7
    has no near-square factorisation and is refused.
    """
    if isinstance(block_dim, bool) or not isinstance(block_dim, int) or block_dim < 1:
        return None
    for rows in range(int(block_dim**0.5), 0, -1):
        if block_dim % rows == 0:
            cols = block_dim // rows
            return (rows, cols) if cols <= 2 * rows else None
    return None


class SosmConfig(DecollapseConfig):
    r"""Configuration of the Self-Organizing State Model (SOSM).

    Each token's **semantic state** is ``16 × block_dim`` features: 16 named blocks laid out as a 4 × 4
    grid of ``r × c`` sub-squares of a ``4r × 4c`` matrix (``block_dim=4``: the 8 × 8 matrix of 2 × 2
    blocks). One block map (:func:`block_shape`, ``SosmBlockLayout`` in the modeling file) is used by
    the state, the losses, the diagnostics and the plots. The state may be context-free (an embedding
    row, ``mu_layers=0``) or contextual (``mu_layers`` layers of per-block attention over the earlier
    tokens and cross-block mixing); it is projected into the residual stream of the dense control's
    blocks, which optionally attend only along a causal token graph.

    The four tiers of anti-collapse measures are switches, each term reported in ``aux_losses`` above
    its floor (0 is the best the term can reach):

    - Tier 1: ``orthogonality_weight`` (cosines between the blocks' mean vectors, above the floor
      ``n²/d − n``: 48 for 16 blocks of 4), ``decorrelation_weight`` (mean linear CKA between blocks over the
      batch's tokens), ``balance_weight`` (KL of the blocks' energy shares from uniform),
      ``block_init="orthogonal"`` (the blocks' embedding columns start mutually orthogonal) and
      capacity (``block_dim``).
    - Tier 2: ``contrastive_weight`` (InfoNCE over the 16 blocks of a token between two dropout
      views: block b of view 1 must find block b of view 2 among the token's blocks) and
      ``coherence_weight`` (``1 − cos`` between the two views of each block).
    - Tier 3: ``aux_head_weight``: linear heads that read given blocks and predict given label
      columns (``aux_heads``, e.g. word class from S and R1); ``reconstruction_weight``: without
      labels, block group g (blocks 4g…4g+3) predicts the token g positions back (0: itself).
    - Tier 4, one of: ``block_routing="moe"`` (a router keeps the top ``routing_top_k`` blocks of each
      token, with the Switch load-balance term ``routing_balance_weight``), ``"separate"`` (a
      network of its own per block) or ``"slots"`` (slot-style competitive attention: blocks compete,
      by a softmax over blocks, for the token's input features).

    Args:
        num_attention_heads, intermediate_size, attention_dropout: the dense control's blocks.
        block_dim: features per block (the capacity knob: 4, 8, 16, …); see :func:`block_shape`.
        temporal_size: width of the optional TEMPORAL table (a second per-token table, zero at
            initialisation, concatenated to the semantic state before the projection); 0 = off.
        mu_layers: contextual layers of the semantic state (0: context-free). Their attention is
            causal for ``causal_lm`` and never sees padding.
        graph_attention: the stack attends only along a token graph built per sample: the token
            itself, the previous token, ``graph_semantic_k`` earlier tokens (``j < i − 1``) whose
            ``graph_blocks`` are most similar (cosine ≥ ``graph_threshold``) and shortcuts to tokens
            ``graph_shortcuts`` Fibonacci distances back. Every edge points backward (``j ≤ i``); there
            is no way to configure a forward one. ``causal_lm`` only.
        state_dropout: dropout on the semantic state; ``view_dropout``: the dropout of tier 2's views.
        aux_heads: label column -> names of the blocks its head reads (tier 3).
        aux_head_classes: label column -> number of classes; filled from the data by ``decollapse train``.
        contrastive_temperature: τ of tier 2's InfoNCE.
        routing_top_k: blocks kept per token by ``block_routing="moe"``.
    """

    model_type = "decollapse_sosm"
    aux_loss_weight_fields: ClassVar[dict[str, str]] = {
        "block_orthogonality": "orthogonality_weight",
        "block_decorrelation": "decorrelation_weight",
        "block_balance": "balance_weight",
        "inter_block_contrastive": "contrastive_weight",
        "intra_block_coherence": "coherence_weight",
        "aux_heads": "aux_head_weight",
        "reconstruction": "reconstruction_weight",
        "routing_balance": "routing_balance_weight",
    }
    BLOCK_INITS: ClassVar[tuple[str, ...]] = ("normal", "orthogonal")
    BLOCK_ROUTINGS: ClassVar[tuple[str, ...]] = ("none", "moe", "separate", "slots")
    GROUPS: ClassVar[int] = 4  # reconstruction groups of 4 blocks

    num_attention_heads: int = 2
    intermediate_size: int | None = None
    attention_dropout: float = 0.0
    block_dim: int = 4
    temporal_size: int = 0
    mu_layers: int = 0
    graph_attention: bool = False
    graph_semantic_k: int = 4
    graph_threshold: float = 0.05
    graph_blocks: list[str] | None = None
    graph_shortcuts: int = 4
    state_dropout: float = 0.0
    block_init: str = "orthogonal"
    orthogonality_weight: float = 0.01
    decorrelation_weight: float = 0.1
    balance_weight: float = 0.1
    contrastive_weight: float = 0.0
    coherence_weight: float = 0.0
    contrastive_temperature: float = 0.1
    view_dropout: float = 0.1
    aux_heads: dict[str, list[str]] | None = None
    aux_head_classes: dict[str, int] | None = None
    aux_head_weight: float = 0.0
    reconstruction_weight: float = 0.0
    block_routing: str = "none"
    routing_top_k: int = 8
    routing_balance_weight: float = 0.0

    @property
    def supports_packed_documents(self) -> bool:
        """Attention is masked per document; the token graph (``graph_attention``) picks its neighbours
        over the whole row, so with it on, documents are not packed."""
        return not self.graph_attention

    def validate(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.graph_blocks is None:
            self.graph_blocks = ["I", "R2", "K"]
        if self.aux_heads is None:
            self.aux_heads = {"word_class": ["S", "R1"], "domain": ["K", "C2"], "sense": ["R2"]}
        if self.aux_head_classes is None:
            self.aux_head_classes = {}
        self.check_positive("num_attention_heads", "intermediate_size")
        self.check_divisible("hidden_size", "num_attention_heads")
        self.check_range("attention_dropout", 0.0, 1.0, high_inclusive=False)
        if block_shape(self.block_dim) is None:
            self._fail(
                "block_dim",
                "a positive integer the 4 x 4 block layout can hold as a near-square r x c block "
                "(r <= c <= 2r), e.g. 1, 2, 4, 6, 8, 9, 12, 16",
            )
        for name in ("temporal_size", "mu_layers", "graph_semantic_k", "graph_shortcuts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self._fail(name, "an integer >= 0")
        if not isinstance(self.graph_attention, bool):
            self._fail("graph_attention", "true or false")
        if self.graph_attention and self.objective != "causal_lm":
            self._fail("graph_attention", "false unless objective='causal_lm' (the graph is causal)")
        self.check_range("graph_threshold", -1.0, 1.0)
        self._check_blocks("graph_blocks", self.graph_blocks)
        for name in ("state_dropout", "view_dropout"):
            self.check_range(name, 0.0, 1.0, high_inclusive=False)
        self.check_choice("block_init", self.BLOCK_INITS)
        self.check_choice("block_routing", self.BLOCK_ROUTINGS)
        self.check_range("contrastive_temperature", 0.0, float("inf"), low_inclusive=False, high_inclusive=False)
        if isinstance(self.routing_top_k, bool) or not isinstance(self.routing_top_k, int) or not (
            1 <= self.routing_top_k <= len(BLOCK_NAMES)
        ):
            self._fail("routing_top_k", f"an integer in [1, {len(BLOCK_NAMES)}]")
        if not isinstance(self.aux_heads, dict) or not all(isinstance(k, str) and k.isidentifier() for k in self.aux_heads):
            self._fail("aux_heads", "a mapping from label column names (identifiers) to lists of block names")
        for column, blocks in self.aux_heads.items():
            self._check_blocks(f"aux_heads[{column!r}]", blocks, value=blocks)
        if not isinstance(self.aux_head_classes, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.aux_head_classes.values()
        ):
            self._fail("aux_head_classes", "a mapping from label column names to positive class counts")
        # The LM head can share the embedding matrix only when the state is as wide as the stream.
        if self.state_size != self.hidden_size:
            self.tie_word_embeddings = False
        # The semantic state of earlier tokens is recomputed at every step of generation when it is
        # contextual or feeds a graph: the key-value cache holds the stack's attention only.
        if self.mu_layers or self.graph_attention:
            self.use_cache = False

    def _check_blocks(self, field: str, blocks, value=None) -> None:
        value = getattr(self, field) if value is None else value
        if not isinstance(blocks, (list, tuple)) or not blocks or any(b not in BLOCK_NAMES for b in blocks):
            raise ValueError(
                f"{type(self).__name__}.{field}={value!r} is not allowed: expected a non-empty list of "
                f"block names from {', '.join(BLOCK_NAMES)}."
            )

    @property
    def aux_label_columns(self) -> tuple[str, ...]:
        """The label columns a training batch must carry: those of the tier-3 heads, when they train."""
        return tuple(self.aux_heads) if self.aux_head_weight > 0 else ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def state_size(self) -> int:
        return len(BLOCK_NAMES) * self.block_dim
