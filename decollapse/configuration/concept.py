"""Configuration of ``concept``: a Perceiver-style concept encoder, C learned concept vectors that
read a sequence through cross-attention (the MrCogito line, github.com/ksopyla/MrCogito;
docs/CONCEPT.md)."""

from __future__ import annotations

from typing import ClassVar

from .config_utils import DecollapseConfig

CONCEPT_OBJECTIVES = ("masked_lm", "tsdae", "masked_diffusion", "prefix_diffusion")
DECODER_QUERIES = ("input_position", "position")
DECODER_FFNS = ("gated", "plain")
ELBO_WEIGHTINGS = ("normalized", "unnormalized", "none")
PAIR_POOLINGS = ("weighted", "mean")


class ConceptEncoderConfig(DecollapseConfig):
    r"""Configuration of a concept encoder and its pre-training and downstream heads.

    ``num_concepts`` learned vectors cross-attend to the token embeddings, self-attend, and pass a
    gated-GELU FFN (pre-LN), ``num_hidden_layers`` times; a final LayerNorm gives the concepts
    ``[B, C, H]``. A decoder reads the concepts back out through cross-attention only, so every bit a
    head predicts has passed through the bottleneck.

    The defaults are a CPU-sized version of the H512/L6/C128 shape of MrCogito's reported runs,
    sized for the embedded corpus's two-minute recipe (``docs/CORPUS.md``), with
    ``num_concepts <= hidden_size`` so that C mutually orthogonal concepts are possible at all.

    Args:
        objective: ``"masked_lm"`` (Perceiver MLM), ``"tsdae"`` (denoising auto-encoder on 60% token
            deletion), ``"masked_diffusion"`` (the encoder reads clean text, a conditioned decoder
            denoises a masked copy) or ``"prefix_diffusion"`` (the encoder reads a prefix, the decoder
            generates the suffix).
        num_concepts: C, the concept vectors per input.
        num_attention_heads: heads of every attention (encoder and decoder).
        intermediate_size: width I of the gated-GELU FFNs (``W_in: H -> 2I``); ``None`` means
            ``2 * hidden_size``.
        attention_dropout: dropout on attention probabilities.
        token_embedding_dim: width T of the token and position embeddings; ``None`` means
            ``hidden_size``. ``T != H`` adds a ``Linear(T, H)``; ``T < H`` is MrCogito's "dimension
            inversion" (cheap tokens, wide concepts), ``T > H`` lets a wide pre-trained embedding table
            (e.g. 384-wide MiniLM) feed a narrow concept space.
        use_bixt: BiXT layers: tokens also cross-attend to the concepts, so later layers read
            contextualised tokens. The last layer (last iteration) skips the token update, whose
            output nothing reads (the original computed it and left its parameters without gradient).
        recursive: one shared layer applied ``num_iterations`` times (weight tying). A standard
            checkpoint warm-starts it through ``from_pretrained(dir, recursive=True)``: the shared
            layer is ``layers.0``, so the standard first layer loads into it by name.
        num_iterations: K for ``recursive``; ``None`` means ``num_hidden_layers``. It can be changed
            at inference (``forward(num_iterations=K)``) for test-time compute scaling.
        decoder_query: what the decoder's per-position queries are. ``"input_position"``: the
            (masked) input token's embedding plus a position embedding (the Perceiver MLM).
            ``"position"``: the position embedding only (PosOnly). ``None`` picks
            ``"input_position"`` for ``masked_lm`` and ``"position"`` otherwise; ``tsdae`` refuses
            ``"input_position"`` because the decoder would then see the tokens it must reconstruct.
            The diffusion objectives always query with the noised tokens plus positions (their
            decoder has its own embedding table) and ignore this field.
        decoder_layers: cross-attention-only decoder blocks; ``None`` means 1 for ``masked_lm`` /
            ``tsdae`` (the original's single block) and 2 for the diffusion objectives.
        decoder_ffn: the decoder blocks' FFN. ``"gated"``: gated GELU like the encoder's
            (``W_in: H -> 2I``); ``"plain"``: ``W_out(GELU(W_in x))`` with ``W_in: H -> I``, the
            original's decoder FFN, a third fewer FLOPs at the same width.
        decoder_intermediate_size: width I of the decoder FFN; ``None`` means ``intermediate_size``.
        mask_token_id: the [MASK] id the diffusion objectives noise with (4 is the embedded corpus's;
            ``decollapse train`` sets it from the tokenizer).
        t_min: lowest noise level of the diffusion objectives (t ~ U(t_min, 1) per sequence).
        label_smoothing: label smoothing of the diffusion training loss (never of the evaluation loss).
        elbo_weighting: estimator of the diffusion loss. ``"normalized"``: per-token weights
            ``1/t`` normalised by their sum over the batch (each sequence counts about equally,
            whatever its t; the original's estimator). ``"unnormalized"``: the masked-diffusion ELBO
            ``Σ_b (1/t_b) Σ_{masked i} ℓ_i / Σ_b n_b`` with ``n_b`` the real tokens of sequence b, an
            unbiased per-token bound on the negative log-likelihood. ``"none"``: plain mean over
            masked tokens.
        eval_noise_levels: size G of the fixed noise grid of evaluation: sequence b of an evaluation
            batch uses the midpoint ``t_min + (1 - t_min)(g + 1/2)/G`` with ``g = b mod G``.
        eval_seed: seed of the evaluation masks, so the evaluation loss of a checkpoint is a
            deterministic number.
        pair_pooling: pooling of the sentence-pair head: ``"weighted"`` (a learned score per concept)
            or ``"mean"`` (parameter-free).
        pair_cosine_only: the pair head predicts ``cos(u, v)`` (trained with MSE against the label)
            instead of classifying ``[u; v; |u - v|; u * v]``.
        init_from: the checkpoint the token embeddings were initialised from (recorded by
            ``init_from_pretrained``; the model card's ``base_model``).
        concept_losses: ``False`` turns every concept loss off whatever its weight: the unregularised
            control (``--set concept_losses=false``).
        orthogonality_weight, soft_orthogonality_weight, uniformity_weight, variance_weight,
        covariance_weight, combined_weight, t_regs_mst_weight: default weights of the concept losses
            (``modeling/regularizers.py``), applied to the concept outputs ``[B, C, H]``: within each
            input for the pairwise terms (orthogonality, soft orthogonality, uniformity, t_regs_mst),
            pooled over inputs and concepts for VICReg's variance and covariance and for ``combined``
            (variance + uniformity). ``docs/CONCEPT.md`` gives the measured effect of each.
        input_variance_weight: weight of ``slot_input_variance``, VICReg's variance hinge per slot over
            the batch's inputs (with target ``variance_target_std``): the term that makes a slot differ
            between inputs. The defaults (VICReg variance and covariance and ``t_regs_mst`` at 0.02,
            this at 0.1) are the measured recipe of docs/CONCEPT.md.
        soft_orthogonality_threshold: cosines up to this are free in ``soft_orthogonality``.
        uniformity_temperature: τ of the Gaussian potential in ``uniformity`` and ``combined``.
        variance_target_std: γ of the VICReg variance hinge.
    """

    model_type = "decollapse_concept"
    supported_objectives: ClassVar[tuple[str, ...]] = CONCEPT_OBJECTIVES
    aux_loss_weight_fields: ClassVar[dict[str, str]] = {
        "orthogonality": "orthogonality_weight",
        "soft_orthogonality": "soft_orthogonality_weight",
        "uniformity": "uniformity_weight",
        "vicreg_variance": "variance_weight",
        "vicreg_covariance": "covariance_weight",
        "combined": "combined_weight",
        "t_regs_mst": "t_regs_mst_weight",
        "slot_input_variance": "input_variance_weight",
    }

    objective: str = "masked_lm"
    num_concepts: int = 32
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    attention_dropout: float = 0.0
    token_embedding_dim: int | None = None
    use_bixt: bool = False
    recursive: bool = False
    num_iterations: int | None = None
    decoder_query: str | None = None
    decoder_layers: int | None = None
    decoder_ffn: str = "gated"
    decoder_intermediate_size: int | None = None
    mask_token_id: int | None = 4
    t_min: float = 0.3
    label_smoothing: float = 0.1
    elbo_weighting: str = "normalized"
    eval_noise_levels: int = 8
    eval_seed: int = 0
    pair_pooling: str = "weighted"
    pair_cosine_only: bool = False
    init_from: str | None = None
    orthogonality_weight: float = 0.0
    soft_orthogonality_weight: float = 0.0
    uniformity_weight: float = 0.0
    # The default recipe keeps concepts diverse and input-dependent (docs/CONCEPT.md, three seeds);
    # concept_losses=False is the unregularised control, one flag away.
    concept_losses: bool = True
    variance_weight: float = 0.02
    covariance_weight: float = 0.02
    combined_weight: float = 0.0
    t_regs_mst_weight: float = 0.02
    input_variance_weight: float = 0.1
    soft_orthogonality_threshold: float = 0.1
    uniformity_temperature: float = 2.0
    variance_target_std: float = 1.0
    # Concepts are recomputed from the whole input at every step: there is no incremental state.
    use_cache: bool = False

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """The concept losses' weights; all 0 with ``concept_losses=False``."""
        weights = super().aux_loss_weights
        return weights if self.concept_losses else {term: 0.0 for term in weights}

    def validate(self) -> None:
        if not isinstance(self.concept_losses, bool):
            self._fail("concept_losses", "true or false")
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.hidden_size
        if self.token_embedding_dim is None:
            self.token_embedding_dim = self.hidden_size
        if self.num_iterations is None:
            self.num_iterations = self.num_hidden_layers
        diffusion = self.objective in ("masked_diffusion", "prefix_diffusion")
        if self.decoder_query is None:
            self.decoder_query = "input_position" if self.objective == "masked_lm" else "position"
        if self.decoder_layers is None:
            self.decoder_layers = 2 if diffusion else 1
        if self.decoder_intermediate_size is None:
            self.decoder_intermediate_size = self.intermediate_size
        self.check_positive(
            "num_concepts", "num_attention_heads", "intermediate_size", "token_embedding_dim", "num_iterations",
            "decoder_layers", "decoder_intermediate_size", "eval_noise_levels",
        )
        self.check_choice("decoder_ffn", DECODER_FFNS)
        self.check_divisible("hidden_size", "num_attention_heads")
        self.check_range("attention_dropout", 0.0, 1.0, high_inclusive=False)
        self.check_choice("decoder_query", DECODER_QUERIES)
        if self.objective == "tsdae" and self.decoder_query == "input_position":
            self._fail(
                "decoder_query",
                "'position' for tsdae (input_position queries hand the decoder the very tokens it must "
                "reconstruct, deleted ones included)",
            )
        self.check_range("t_min", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        self.check_range("label_smoothing", 0.0, 1.0, high_inclusive=False)
        self.check_choice("elbo_weighting", ELBO_WEIGHTINGS)
        self.check_choice("pair_pooling", PAIR_POOLINGS)
        if diffusion and self.mask_token_id is None:
            self._fail("mask_token_id", "the tokenizer's [MASK] id (the diffusion objectives noise with it)")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            self._fail("mask_token_id", f"an id in [0, vocab_size={self.vocab_size})")
        self.check_range("soft_orthogonality_threshold", 0.0, 1.0)
        self.check_range("uniformity_temperature", 0.0, float("inf"), low_inclusive=False)
        self.check_range("variance_target_std", 0.0, float("inf"), low_inclusive=False)
        # An output layer can share the [V, T] input table only when it predicts from width T == H.
        if self.token_embedding_dim != self.hidden_size:
            self.tie_word_embeddings = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
