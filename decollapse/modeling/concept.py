"""The ``concept`` architecture: a Perceiver-style concept encoder (the MrCogito line,
github.com/ksopyla/MrCogito) and its pre-training and downstream heads.

C learned concept vectors read a sequence through cross-attention, then self-attend and pass a
gated-GELU FFN (pre-LN); a final LayerNorm gives the concepts ``[B, C, H]``. Decoders read the concepts
back out through cross-attention only, so everything a head predicts has passed the bottleneck.

Reads top to bottom: attention -> FFN -> encoder layer -> decoder layer (optionally AdaLN-Zero
conditioned on the noise level) -> pretrained base (init, concept losses, collapse report) -> encoder
model -> pre-training heads (Perceiver MLM, TSDAE, masked diffusion, prefix diffusion) -> downstream
heads (weighted pooling, via the decoder, sentence pairs) and parameter-free pooling.

Departures from the original, each fixing a defect of its code (docs/CONCEPT.md): every module is initialised
explicitly; BiXT skips the last token update, whose output nothing reads; the recursive encoder names
its shared layer ``layers.0`` so ``from_pretrained`` of a standard checkpoint warm-starts it; padding is
never a key, a target or a noised token; the token keys of every cross-attention are layer-normalised;
the diffusion timestep is embedded as ``1000 t`` (t in [0, 1] barely moved the sinusoids); the
diffusion evaluation loss is a plain cross-entropy on a fixed noise grid and a fixed seed.

Imports only torch, transformers and sibling modules (plus the configuration import that the Hub
export rewrites to ``from .configuration_concept import ConceptEncoderConfig``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.loss.loss_utils import ForSequenceClassificationLoss

from ..configuration.concept import ConceptEncoderConfig
from .common import (
    IGNORE_INDEX,
    DecollapsePreTrainedModel,
    document_ids,
    loss_share,
    masked_lm_loss,
    selected_first,
)
from .diagnostics import CollapseReport, concept_geometry, grade_concept_health, unit_report
from .outputs import (
    DecollapseDiffusionOutput,
    DecollapseMaskedLMOutput,
    DecollapseModelOutput,
    DecollapseSequenceClassifierOutput,
    combine_losses,
)
from .regularizers import (
    mean_squared_off_diagonal_cosine,
    nearest_neighbour_spread,
    slot_input_variance,
    soft_orthogonality,
    uniformity_gaussian,
    variance_uniformity,
    vicreg_covariance,
    vicreg_variance,
)

# Health grades as numbers, so they travel in a CollapseReport next to the metrics they grade.
_GRADE_VALUE = {"POOR": 0.0, "OK": 1.0, "GOOD": 2.0}


def _key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, 1, 1, S]`` boolean "may attend" mask for SDPA, or None when nothing is padded.

    A row without a single real token would leave every query with nothing to attend to (SDPA returns
    NaN, which reaches the gradients); such a row may attend everywhere instead and its output is
    meaningless but finite.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    keep = attention_mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


class ConceptAttention(nn.Module):
    """Multi-head attention from one set of states (queries) to another (keys / values), with SDPA.

    Separate query and key/value projections: in a Perceiver the two sides are different objects
    (concepts and tokens).
    """

    def __init__(self, config: ConceptEncoderConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, nh, S, hd)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        key, value = self.kv_proj(keys).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(queries)),
            self._heads(key),
            self._heads(value),
            attn_mask=key_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(out.transpose(1, 2).reshape(queries.shape))

    def probabilities(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention probabilities ``[B, nh, Q, S]`` (diagnostics only; forward uses fused SDPA)."""
        key = self.kv_proj(keys).chunk(2, dim=-1)[0]
        scores = self._heads(self.q_proj(queries)) @ self._heads(key).transpose(-1, -2) / math.sqrt(self.head_dim)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        return scores.softmax(dim=-1)


class ConceptFeedForward(nn.Module):
    """Gated-GELU FFN ``W_out(GELU(a) * g)`` with ``[a, g] = W_in x`` (``W_in: H -> 2I``), or with
    ``gated=False`` the plain ``W_out(GELU(W_in x))`` (``W_in: H -> I``)."""

    def __init__(self, config: ConceptEncoderConfig, width: int | None = None, gated: bool = True):
        super().__init__()
        width = width or config.intermediate_size
        self.gated = gated
        self.in_proj = nn.Linear(config.hidden_size, (2 if gated else 1) * width)
        self.out_proj = nn.Linear(width, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.out_proj(self.dropout(F.gelu(self.in_proj(x))))
        a, g = self.in_proj(x).chunk(2, dim=-1)
        return self.out_proj(self.dropout(F.gelu(a) * g))


class ConceptEncoderLayer(nn.Module):
    """Concepts cross-attend to the tokens, self-attend, then pass the FFN (pre-LN residuals).

    With ``update_tokens`` (BiXT) the tokens then cross-attend to the updated concepts, so the next
    layer reads contextualised tokens at O(C·L) cost (tokens get no self-attention and no FFN).
    """

    def __init__(self, config: ConceptEncoderConfig, update_tokens: bool):
        super().__init__()
        eps = config.layer_norm_eps
        self.cross_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        # The token keys/values are normalised too: BiXT tokens grow through residual updates, and
        # normalised keys keep the attention scores on one scale whatever the embedding scale.
        self.token_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.cross_attn = ConceptAttention(config)
        self.self_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attn = ConceptAttention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ffn = ConceptFeedForward(config)
        self.update_tokens = update_tokens
        if update_tokens:
            self.token_query_norm = nn.LayerNorm(config.hidden_size, eps=eps)
            self.concept_kv_norm = nn.LayerNorm(config.hidden_size, eps=eps)
            self.token_cross_attn = ConceptAttention(config)

    def forward(
        self,
        concepts: torch.Tensor,  # (B, C, H)
        tokens: torch.Tensor,  # (B, L, H)
        key_mask: torch.Tensor | None,
        update_tokens: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        concepts = concepts + self.cross_attn(self.cross_norm(concepts), self.token_norm(tokens), key_mask)
        normed = self.self_norm(concepts)
        concepts = concepts + self.self_attn(normed, normed, None)
        concepts = concepts + self.ffn(self.ffn_norm(concepts))
        if update_tokens and self.update_tokens:
            tokens = tokens + self.token_cross_attn(self.token_query_norm(tokens), self.concept_kv_norm(concepts), None)
        return concepts, tokens


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of noise levels ``t`` in [0, 1], ``[B] -> [B, dim]``.

    ``e = [sin(1000 t f), cos(1000 t f)]`` with ``f_i = 10000^(-i / (dim/2))``. The factor 1000 puts t on
    the integer-timestep scale the frequencies were designed for; on [0, 1] the low frequencies barely
    move.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class ConceptDecoderLayer(nn.Module):
    """Positions cross-attend to the concepts, then pass the FFN; no self-attention between positions.

    ``conditioned`` layers use AdaLN-Zero (DiT): a zero-initialised linear map of the noise embedding
    gives a shift, scale and gate per sub-block, so every conditioned block starts as the identity.
    """

    def __init__(self, config: ConceptEncoderConfig, conditioned: bool):
        super().__init__()
        eps = config.layer_norm_eps
        self.cross_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.cross_attn = ConceptAttention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ffn = ConceptFeedForward(config, config.decoder_intermediate_size, gated=config.decoder_ffn == "gated")
        self.modulation = nn.Linear(config.hidden_size, 6 * config.hidden_size) if conditioned else None
        if self.modulation is not None:
            self.modulation.zero_init = True  # read by _init_weights: AdaLN-Zero

    def forward(self, x: torch.Tensor, concepts: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        if self.modulation is None:
            x = x + self.cross_attn(self.cross_norm(x), concepts, None)
            return x + self.ffn(self.ffn_norm(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(condition))[:, None].chunk(6, dim=-1)
        h = self.cross_norm(x) * (1 + scale1) + shift1
        x = x + gate1 * self.cross_attn(h, concepts, None)
        h = self.ffn_norm(x) * (1 + scale2) + shift2
        return x + gate2 * self.ffn(h)


class ConceptDecoder(nn.Module):
    """Per-position queries (built by the head) read the concepts; a final LayerNorm."""

    def __init__(self, config: ConceptEncoderConfig, conditioned: bool = False):
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            [ConceptDecoderLayer(config, conditioned) for _ in range(config.decoder_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        queries: torch.Tensor,
        concepts: torch.Tensor,
        condition: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ):
        """``positions`` (B, M): the sequence position of each query, when the queries are a selection
        of positions (:func:`labelled_queries`); by default query t sits at position t."""
        if positions is None:
            positions = torch.arange(queries.shape[1], device=queries.device)[None]
        x = queries + self.position_embeddings(positions)
        for layer in self.layers:
            x = layer(x, concepts, condition)
        return self.norm(x)


class ConceptEncoderPreTrainedModel(DecollapsePreTrainedModel):
    config_class = ConceptEncoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["ConceptEncoderLayer", "ConceptDecoderLayer"]
    sentence_pooling = "concepts"
    lora_target_modules = ["q_proj", "kv_proj", "o_proj"]
    collapse_headline = {
        "concept erank within (÷C)": ("concepts.within.effective_rank_entropy_ratio", "mean"),
        "concept erank global nuclear (÷C)": ("concepts.global.effective_rank_nuclear_ratio", "mean"),
        "concept mean |cos|": ("concepts.mean_abs_cosine", "mean"),
        "slot cross-input cos": ("concepts.slot_cross_input_cosine", "mean"),
        "token→concept usage gini (max layer)": ("layer*.assignment.gini", "max"),
    }

    def _init_weights(self, module: nn.Module) -> None:
        # Linear / Embedding ~ N(0, initializer_range), biases 0, LayerNorm 1/0 (base class); every
        # module here is one of those, so nothing is left to a library default.
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)  # AdaLN-Zero: each conditioned block starts as the identity
            init.zeros_(module.bias)
            return
        super()._init_weights(module)

    @torch.no_grad()
    def collapse_report(self, batch: dict[str, torch.Tensor]) -> CollapseReport:
        """Collapse diagnostics of the concepts on ``batch`` (clean ``input_ids``, optional
        ``attention_mask`` and per-token ``domain`` / ``word_class`` labels).

        - ``concepts.*``: ``concept_geometry`` of the final concepts ``[B, C, H]``: the original's
          batch-averaged "global" spectrum, the within-input spectrum (each input's own C × H matrix,
          averaged), pairwise cosines, per-dimension spread, isotropy, uniformity, norms; and
          ``concepts.<metric>.grade`` = 0 / 1 / 2 for POOR / OK / GOOD under the thresholds of ``grade_concept_health``.
        - ``prototypes.*``: the learned initial concept vectors (before any input is read).
        - ``layer{i}.assignment.*``: each real token's assignment to the concept that attends to it
          most in layer (iteration) i's cross-attention: usage, Gini, entropy, dead share, and mutual
          information with the ``domain`` / ``word_class`` labels when given.
        """
        base: ConceptEncoderModel = self.base_model
        was_training = self.training
        self.eval()
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        valid = mask.bool()
        captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

        def grab(module, args):
            captured.append((module, *args))

        hooks = [layer.cross_attn.register_forward_pre_hook(grab) for layer in base.layers]
        try:
            concepts = base(input_ids=input_ids, attention_mask=mask, position_ids=batch.get("position_ids")).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)

        geometry = concept_geometry(concepts.float())
        for name, grade in grade_concept_health(geometry.metrics).items():
            geometry.metrics[f"{name}.grade"] = _GRADE_VALUE[grade]
        report = CollapseReport().update(geometry, prefix="concepts")
        report.update(unit_report(vectors=base.concept_embeddings.weight), prefix="prototypes")
        for i, (attn, queries, keys, key_mask) in enumerate(captured):
            probs = attn.probabilities(queries, keys, key_mask).mean(dim=1)  # (B, C, L)
            assignment = probs.argmax(dim=1)  # (B, L): the concept attending most to each token
            labels = {k: batch[k][valid] for k in ("domain", "word_class") if k in batch}
            group = unit_report(assignments=assignment[valid], num_units=base.config.num_concepts)
            for label_name, label in labels.items():
                mi = unit_report(assignments=assignment[valid], labels=label, num_units=base.config.num_concepts)
                group.metrics[f"{label_name}_nmi"] = mi.metrics["normalized_mutual_information"]
            report.update(group, prefix=f"layer{i}.assignment")
        return report


class ConceptEncoderModel(ConceptEncoderPreTrainedModel):
    """Token + position embeddings (width T, projected to H when T != H) -> concept layers (or one
    shared layer applied K times) -> final LayerNorm. Returns the concepts ``[B, C, H]``."""

    def __init__(self, config: ConceptEncoderConfig):
        super().__init__(config)
        width = config.token_embedding_dim
        self.token_embeddings = nn.Embedding(config.vocab_size, width)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.token_projection = nn.Linear(width, config.hidden_size) if width != config.hidden_size else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.concept_embeddings = nn.Embedding(config.num_concepts, config.hidden_size)
        # Recursive: one shared layer named layers.0, so a standard checkpoint's first layer loads into
        # it by name. BiXT: the last layer's token update would be read by nothing, so it is not built
        # (a shared layer keeps it: earlier iterations read it).
        num_layers = 1 if config.recursive else config.num_hidden_layers
        self.layers = nn.ModuleList(
            [
                ConceptEncoderLayer(config, update_tokens=config.use_bixt and (config.recursive or i < num_layers - 1))
                for i in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_embeddings = value

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_projection(x) if self.token_projection is not None else x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence of {input_ids.shape[1]} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}."
            )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.project(self.token_embeddings(input_ids) + self.position_embeddings(positions)[None]))

    @torch.no_grad()
    def load_pretrained_embeddings(self, source: nn.Module) -> list[str]:
        """Initialise the token (and, where the shapes match, position) embeddings from ``source``, any
        ``transformers`` model sharing this model's tokenizer (start the bottleneck from a model
        that already knows the language). Returns the names of the tensors copied and
        records ``source.name_or_path`` in ``config.init_from``.

        Raises ValueError when the vocabularies differ or the embedding width is not
        ``token_embedding_dim`` (set it to the source's width; a ``Linear(T, H)`` then maps to the
        concept width).
        """
        words = source.get_input_embeddings().weight
        ours = self.token_embeddings.weight
        if words.shape[0] != ours.shape[0]:
            raise ValueError(
                f"vocabulary sizes differ: source {words.shape[0]}, model {ours.shape[0]} (use the source's tokenizer)"
            )
        if words.shape[1] != ours.shape[1]:
            raise ValueError(
                f"embedding widths differ: source {words.shape[1]}, token_embedding_dim={ours.shape[1]}; "
                f"set token_embedding_dim={words.shape[1]}"
            )
        ours.copy_(words)
        copied = ["token_embeddings.weight"]
        embeddings = getattr(getattr(source, "base_model", source), "embeddings", None)
        positions = getattr(embeddings, "position_embeddings", None)
        table = self.position_embeddings.weight
        if isinstance(positions, nn.Embedding) and positions.weight.shape[1] == table.shape[1]:
            if positions.weight.shape[0] >= table.shape[0]:
                table.copy_(positions.weight[: table.shape[0]])
                copied.append("position_embeddings.weight")
        self.config.init_from = getattr(source, "name_or_path", None) or type(source).__name__
        return copied

    def concept_losses(self, concepts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The concept terms with non-zero weight, on the concepts ``c`` ``[B, C, H]``:

        - ``orthogonality``: mean squared off-diagonal cosine among each input's concepts;
        - ``soft_orthogonality``: the same with cosines up to ``soft_orthogonality_threshold`` free;
        - ``uniformity``: Gaussian potential ``mean exp(-τ (2 - 2 cos))`` over each input's pairs;
        - ``vicreg_variance`` / ``vicreg_covariance``: VICReg's terms over ``c`` pooled to ``[B·C, H]``;
        - ``combined``: ``vicreg_variance + uniformity`` (the original's ``combined``);
        - ``t_regs_mst``: ``2 - mean_i min_j ‖ĉ_i - ĉ_j‖`` within each input (T-REGS's nearest-neighbour
          proxy for the minimum-spanning-tree length, shifted by the largest possible distance so the
          term is non-negative, which Kendall–Gal weighting needs; gradients are unchanged);
        - ``slot_input_variance``: VICReg's variance hinge per slot over the batch's inputs (a slot
          must differ between inputs; the terms above are all satisfied by input-independent slots).
        """
        weights = self.config.aux_loss_weights
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        if weights["orthogonality"]:
            terms["orthogonality"] = mean_squared_off_diagonal_cosine(concepts)
        if weights["soft_orthogonality"]:
            terms["soft_orthogonality"] = soft_orthogonality(concepts, c.soft_orthogonality_threshold)
        if weights["uniformity"]:
            terms["uniformity"] = uniformity_gaussian(concepts, c.uniformity_temperature)
        if weights["vicreg_variance"]:
            terms["vicreg_variance"] = vicreg_variance(concepts, c.variance_target_std)
        if weights["vicreg_covariance"]:
            terms["vicreg_covariance"] = vicreg_covariance(concepts)
        if weights["combined"]:
            terms["combined"] = variance_uniformity(
                concepts, target_std=c.variance_target_std, temperature=c.uniformity_temperature
            )
        if weights["t_regs_mst"]:
            terms["t_regs_mst"] = 2.0 + nearest_neighbour_spread(concepts)
        if weights["slot_input_variance"]:
            terms["slot_input_variance"] = slot_input_variance(concepts, c.variance_target_std)
        return terms

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_iterations: int | None = None,
        output_hidden_states: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> DecollapseModelOutput:
        """``num_iterations`` overrides K of a recursive encoder (test-time compute scaling).
        ``position_ids`` is accepted to refuse packed rows: every position of a row writes into the
        same concepts, so documents cannot share a row."""
        if document_ids(position_ids) is not None:
            raise ValueError(
                "position_ids restart inside the sequence (packed documents), which a concept encoder cannot "
                "keep apart (every position of a row writes into the same concepts); pass one document per row."
            )
        if num_iterations is not None and not self.config.recursive:
            raise ValueError("num_iterations applies to a recursive encoder only (config.recursive=True)")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        key_mask = _key_padding_mask(attention_mask)
        tokens = self.embed(input_ids)
        concepts = self.concept_embeddings.weight[None].expand(input_ids.shape[0], -1, -1)
        if self.config.recursive:
            steps = num_iterations or self.config.num_iterations
            schedule = [self.layers[0]] * steps
        else:
            schedule = list(self.layers)
        all_hidden = [concepts] if output_hidden_states else None
        for i, layer in enumerate(schedule):
            concepts, tokens = layer(concepts, tokens, key_mask, update_tokens=i < len(schedule) - 1)
            if all_hidden is not None:
                all_hidden.append(concepts)
        concepts = self.norm(concepts)
        return DecollapseModelOutput(
            last_hidden_state=concepts,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_losses=self.concept_losses(concepts),
        )


def decoder_queries(model: "ConceptEncoderModel", input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position decoder queries before the decoder adds positions: the (masked) input token's
    embedding for ``decoder_query="input_position"``, zeros for ``"position"`` (PosOnly)."""
    if model.config.decoder_query == "input_position":
        return model.project(model.token_embeddings(input_ids))
    return model.concept_embeddings.weight.new_zeros(*input_ids.shape, model.config.hidden_size)


def labelled_queries(
    queries: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder queries of the labelled positions only, ``(queries, positions, targets)``.

    Decoder positions never read each other (each only cross-attends to the concepts), so decoding
    just the positions a loss scores gives them the hidden states a full decode gives (up to float
    rounding), for the work of as many positions as the batch's most-labelled row holds. Each row's
    labelled positions come first, in order, padded to the most-labelled row's count (padding slots get
    target -100).
    """
    selected = labels != IGNORE_INDEX
    slots = max(int(selected.sum(dim=1).max()), 1)
    positions = selected_first(selected)[:, :slots]
    gathered = queries.gather(1, positions.unsqueeze(-1).expand(-1, -1, queries.shape[-1]))
    targets = labels.gather(1, positions)  # -100 wherever a row had fewer labelled positions
    return gathered, positions, targets


def _check_objective(model_name: str, config: ConceptEncoderConfig, objectives: tuple[str, ...]) -> None:
    if config.objective not in objectives:
        raise ValueError(
            f"{model_name} needs objective in {objectives}, got {config.objective!r}; "
            "the registry maps each objective to its head (`decollapse list`)."
        )


# ------------------------------------------------------------------------------------------------
# Pre-training heads
# ------------------------------------------------------------------------------------------------


class ConceptEncoderForMaskedLM(ConceptEncoderPreTrainedModel):
    """Perceiver MLM: decoder queries at every position read the concepts and predict the token.

    Queries are the masked input's token embedding plus a position embedding
    (``decoder_query="input_position"``) or the position embedding alone (``"position"``, PosOnly).
    With ``labels`` the loss covers the labelled positions only, and only those are decoded and
    projected to the vocabulary (:func:`labelled_queries`); ``logits`` are then None (full
    ``[B, L, V]`` logits come back when ``labels`` is None).
    """

    _tied_weights_keys = {"lm_head.weight": "model.token_embeddings.weight"}
    objectives = ("masked_lm",)

    def __init__(self, config: ConceptEncoderConfig):
        _check_objective(type(self).__name__, config, self.objectives)
        super().__init__(config)
        self.model = ConceptEncoderModel(config)
        self.decoder = ConceptDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    accepts_loss_kwargs = True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_iterations: int | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> DecollapseMaskedLMOutput:
        encoded = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_iterations=num_iterations,
            position_ids=kwargs.get("position_ids"),
        )
        queries, aux = decoder_queries(self.model, input_ids), encoded.aux_losses
        if labels is None:
            hidden = self.decoder(queries, encoded.last_hidden_state)
            return DecollapseMaskedLMOutput(logits=self.lm_head(hidden), aux_losses=aux)
        queries, positions, targets = labelled_queries(queries, labels)
        hidden = self.decoder(queries, encoded.last_hidden_state, positions=positions)
        task_loss = masked_lm_loss(self.lm_head, hidden, targets)
        share = loss_share(labels, num_items_in_batch, shifted=False)
        return DecollapseMaskedLMOutput(
            loss=share * combine_losses(task_loss, aux, self.config.aux_loss_weights), task_loss=task_loss, aux_losses=aux
        )


class ConceptEncoderForTSDAE(ConceptEncoderForMaskedLM):
    """TSDAE: the encoder reads a sequence with most tokens deleted (attention mask 0, positions kept;
    ``DataCollatorForTSDAE``) and position-only queries reconstruct every real token from the concepts.

    ``labels`` hold the clean ids at every real position and -100 at padding; only those positions
    are projected to the vocabulary (the original computed dense ``[B, L, V]`` logits).
    """

    objectives = ("tsdae",)


class ConceptEncoderForMaskedDiffusion(ConceptEncoderPreTrainedModel):
    """Masked diffusion with a concept bottleneck.

    The encoder reads the clean text. Each sequence draws a noise level t ~ U(t_min, 1) and each of
    its real tokens is replaced by [MASK] with probability t; a cross-attention-only decoder with its
    own embedding table, conditioned on t through AdaLN-Zero, predicts the masked tokens from the
    concepts. Only masked positions reach the vocabulary projection.

    Training loss (``elbo_weighting``, per-token cross-entropy ℓ with ``label_smoothing``):
    ``"normalized"`` ``Σ w ℓ / Σ w`` with ``w = 1/t`` of the token's sequence (each sequence weighs
    about the same whatever its t); ``"unnormalized"`` ``Σ_b (1/t_b) Σ_{i masked in b} ℓ_i / Σ_b n_b``
    with ``n_b`` the real tokens of b, the masked-diffusion ELBO per token, an upper bound on the
    negative log-likelihood (in expectation t_b·n_b tokens are masked, so ``1/t_b`` rescales their sum
    to the whole sequence); ``"none"`` the plain mean over masked tokens. ``extra_metrics["plain_ce"]``
    (unweighted, unsmoothed) is logged beside it.

    Evaluation (``model.eval()``): t comes from a fixed grid of ``eval_noise_levels`` midpoints
    (sequence b uses grid point ``b mod G``) and the masks from a generator seeded with ``eval_seed``,
    so a checkpoint's evaluation loss is a deterministic number; ``task_loss`` is then the plain
    cross-entropy over masked tokens and ``extra_metrics["weighted_loss"]`` the training estimator
    without label smoothing.
    """

    _tied_weights_keys = {"lm_head.weight": "decoder_token_embeddings.weight"}
    objectives = ("masked_diffusion",)

    def __init__(self, config: ConceptEncoderConfig):
        _check_objective(type(self).__name__, config, self.objectives)
        super().__init__(config)
        self.model = ConceptEncoderModel(config)
        self.decoder_token_embeddings = nn.Embedding(config.vocab_size, config.token_embedding_dim)
        self.decoder_token_projection = (
            nn.Linear(config.token_embedding_dim, config.hidden_size)
            if config.token_embedding_dim != config.hidden_size
            else None
        )
        self.time_mlp = nn.Sequential(
            nn.Linear(config.hidden_size, 2 * config.hidden_size),
            nn.SiLU(),
            nn.Linear(2 * config.hidden_size, config.hidden_size),
        )
        self.decoder = ConceptDecoder(config, conditioned=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # -- pieces shared by training, evaluation and generation ------------------------------------
    def decode(self, canvas: torch.Tensor, concepts: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states ``[B, L, H]`` for the noised ``canvas`` at noise levels ``t`` ``[B]``."""
        queries = self.decoder_token_embeddings(canvas)
        if self.decoder_token_projection is not None:
            queries = self.decoder_token_projection(queries)
        condition = self.time_mlp(timestep_embedding(t, self.config.hidden_size).to(queries.dtype))
        return self.decoder(queries, concepts, condition)

    def noise_levels(self, batch: int, device: torch.device) -> torch.Tensor:
        """Training: t ~ U(t_min, 1) per sequence. Evaluation: the fixed grid of midpoints."""
        t_min = self.config.t_min
        if self.training:
            return t_min + (1.0 - t_min) * torch.rand(batch, device=device)
        grid = self.config.eval_noise_levels
        g = torch.arange(batch, device=device) % grid
        return t_min + (1.0 - t_min) * (g.float() + 0.5) / grid

    def diffusion_loss(
        self, concepts: torch.Tensor, targets: torch.Tensor, noise_level: torch.Tensor | None, aux: dict
    ) -> DecollapseDiffusionOutput:
        """Noise the real positions of ``targets`` (``-100`` = not a token), denoise, and score."""
        real = targets != IGNORE_INDEX
        batch, device = targets.shape[0], targets.device
        generator = None
        if not self.training:
            generator = torch.Generator(device=device).manual_seed(self.config.eval_seed)
        t = noise_level.to(device).float() if noise_level is not None else self.noise_levels(batch, device)
        # One draw per (sequence, position up to the model's maximum), then cut to this batch's length:
        # a sequence's noise does not depend on how far the batch is padded.
        draws = torch.rand(batch, self.config.max_position_embeddings, device=device, generator=generator)
        noised = (draws[:, : targets.shape[1]] < t[:, None]) & real
        canvas = torch.where(noised, self.config.mask_token_id, targets.clamp_min(0))
        hidden = self.decode(canvas, concepts, t)
        if not bool(noised.any()):
            zero = hidden.sum() * 0.0
            return DecollapseDiffusionOutput(
                loss=combine_losses(zero, aux, self.config.aux_loss_weights), task_loss=zero, aux_losses=aux,
                noise_level=t, noised_mask=noised, extra_metrics={},
            )
        logits = self.lm_head(hidden[noised]).float()
        gold = targets[noised]
        weights = (1.0 / t)[noised.nonzero()[:, 0]]
        smoothing = self.config.label_smoothing if self.training else 0.0
        per_token = F.cross_entropy(logits, gold, reduction="none", label_smoothing=smoothing)
        weighted = self._weighted(per_token, weights, real)
        plain = per_token if smoothing == 0.0 else F.cross_entropy(logits.detach(), gold, reduction="none")
        if self.training:
            task_loss, extra = weighted, {"plain_ce": plain.mean().detach()}
        else:
            task_loss, extra = plain.mean(), {"weighted_loss": weighted.detach()}
        return DecollapseDiffusionOutput(
            loss=combine_losses(task_loss, aux, self.config.aux_loss_weights),
            logits=logits,
            task_loss=task_loss,
            aux_losses=aux,
            noise_level=t,
            noised_mask=noised,
            extra_metrics=extra,
        )

    def _weighted(self, per_token: torch.Tensor, weights: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        mode = self.config.elbo_weighting
        if mode == "normalized":
            return (weights * per_token).sum() / weights.sum()
        if mode == "unnormalized":
            return (weights * per_token).sum() / real.sum()
        return per_token.mean()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        num_iterations: int | None = None,
        **kwargs,
    ) -> DecollapseDiffusionOutput:
        """``labels``: the clean ids to denoise with -100 at padding (``DataCollatorForMaskedDiffusion``);
        by default ``input_ids`` at the real positions of ``attention_mask``. ``noise_level``: t per
        sequence ``[B]``, instead of sampling it."""
        encoded = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_iterations=num_iterations,
            position_ids=kwargs.get("position_ids"),
        )
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return self.diffusion_loss(encoded.last_hidden_state, labels, noise_level, encoded.aux_losses)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        length: int | None = None,
        num_steps: int = 10,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        banned_token_ids: list[int] | None = None,
    ) -> torch.Tensor:
        """Iterative unmasking conditioned on the concepts of ``input_ids``; returns ``[B, length]`` ids.

        The canvas starts all-[MASK] (``length`` defaults to the input length). At step s of K the
        decoder runs at t = 1 - s/K, a token is drawn at every masked position (``temperature`` 0 is
        greedy; ``top_k`` > 0 keeps the k most likely), and the ``ceil(remaining / (K - s))`` most
        confident draws of each row are revealed, so the last step reveals the rest. [MASK], padding
        and ``banned_token_ids`` are never drawn.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        concepts = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        batch, device = input_ids.shape[0], input_ids.device
        length = length or input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"length {length} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        canvas = torch.full((batch, length), self.config.mask_token_id, dtype=torch.long, device=device)
        hidden_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        banned = {self.config.mask_token_id, self.config.pad_token_id, *(banned_token_ids or [])} - {None}
        for step in range(num_steps):
            t = torch.full((batch,), 1.0 - step / num_steps, device=device)
            logits = self.lm_head(self.decode(canvas, concepts, t)).float()
            logits[..., list(banned)] = float("-inf")
            if temperature == 0:
                probs = logits.softmax(dim=-1)
                drawn = probs.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(dim=-1)
                drawn = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(batch, length)
            confidence = probs.gather(-1, drawn[..., None])[..., 0].masked_fill(~hidden_mask, float("-inf"))
            remaining = hidden_mask.sum(dim=1)
            reveal_count = torch.ceil(remaining.float() / (num_steps - step)).long()
            rank = torch.empty_like(drawn)
            rank.scatter_(1, confidence.argsort(dim=1, descending=True), torch.arange(length, device=device).expand(batch, -1))
            reveal = (rank < reveal_count[:, None]) & hidden_mask
            canvas = torch.where(reveal, drawn, canvas)
            hidden_mask &= ~reveal
        return canvas


class ConceptEncoderForPrefixDiffusion(ConceptEncoderForMaskedDiffusion):
    """Prefix generation: the encoder reads a clean prefix (``input_ids``), the
    conditioned decoder denoises the suffix (``labels``, -100 at padding) with positions counted from
    the suffix start; the loss covers suffix tokens only (``DataCollatorForPrefixGeneration``).
    ``generate(prefix_ids, length=n)`` writes an n-token continuation.
    """

    objectives = ("prefix_diffusion",)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        num_iterations: int | None = None,
        **kwargs,
    ) -> DecollapseDiffusionOutput:
        if labels is None:
            raise ValueError("ConceptEncoderForPrefixDiffusion needs labels: the suffix ids, -100 at padding")
        encoded = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_iterations=num_iterations,
            position_ids=kwargs.get("position_ids"),
        )
        return self.diffusion_loss(encoded.last_hidden_state, labels, noise_level, encoded.aux_losses)


# ------------------------------------------------------------------------------------------------
# Downstream heads
# ------------------------------------------------------------------------------------------------


def mean_pool_concepts(concepts: torch.Tensor) -> torch.Tensor:
    """Parameter-free sentence embedding: the mean of the concepts, ``[B, C, H] -> [B, H]``.

    Zero-shot similarity uses this rather than a pooling head: an untrained scorer makes
    "zero-shot" numbers depend on its random seed.
    """
    return concepts.mean(dim=1)


class ConceptWeightedPooling(nn.Module):
    """``z = LN(Σ_i α_i c_i)`` with ``α = softmax_C(w · c_i)``: a learned score per concept."""

    def __init__(self, config: ConceptEncoderConfig):
        super().__init__()
        self.score = nn.Linear(config.hidden_size, 1)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, concepts: torch.Tensor) -> torch.Tensor:
        alpha = self.score(concepts).softmax(dim=1)  # (B, C, 1)
        return self.norm((alpha * concepts).sum(dim=1))


def _classifier_output(model, logits, labels, aux, num_items_in_batch=None) -> DecollapseSequenceClassifierOutput:
    if labels is None:
        return DecollapseSequenceClassifierOutput(logits=logits, aux_losses=aux)
    # transformers' own rule: one label -> MSE regression, integer labels -> cross-entropy, else BCE.
    task_loss = ForSequenceClassificationLoss(labels, logits, model.config)
    share = loss_share(labels, num_items_in_batch, shifted=False)  # one counted item per example
    return DecollapseSequenceClassifierOutput(
        loss=share * combine_losses(task_loss, aux, model.config.aux_loss_weights), logits=logits, task_loss=task_loss,
        aux_losses=aux,
    )


class ConceptEncoderForSequenceClassification(ConceptEncoderPreTrainedModel):
    """Weighted concept pooling -> dropout -> linear classifier (or regressor, ``num_labels=1``).
    Loads the encoder of any pre-training checkpoint (``model.*``)."""

    def __init__(self, config: ConceptEncoderConfig):
        super().__init__(config)
        self.model = ConceptEncoderModel(config)
        self.pooler = ConceptWeightedPooling(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    accepts_loss_kwargs = True

    def forward(
        self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs
    ) -> DecollapseSequenceClassifierOutput:
        encoded = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=kwargs.get("position_ids"))
        logits = self.classifier(self.dropout(self.pooler(encoded.last_hidden_state)))
        return _classifier_output(self, logits, labels, encoded.aux_losses, num_items_in_batch)


class ConceptEncoderForSequenceClassificationViaDecoder(ConceptEncoderPreTrainedModel):
    """Reuses the pre-trained MLM / TSDAE decoder: its per-position outputs ``[B, L, H]`` -> LayerNorm ->
    mean over real tokens -> dropout -> classifier. Module names match ``ConceptEncoderForMaskedLM``
    (``model.*``, ``decoder.*``), so ``from_pretrained(mlm_checkpoint, num_labels=n)`` loads both and
    drops only the ``lm_head``."""

    def __init__(self, config: ConceptEncoderConfig):
        super().__init__(config)
        self.model = ConceptEncoderModel(config)
        self.decoder = ConceptDecoder(config)
        self.pre_pool_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    accepts_loss_kwargs = True

    def forward(
        self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs
    ) -> DecollapseSequenceClassifierOutput:
        encoded = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=kwargs.get("position_ids"))
        hidden = self.pre_pool_norm(self.decoder(decoder_queries(self.model, input_ids), encoded.last_hidden_state))
        weights = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = weights.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        return _classifier_output(self, logits, labels, encoded.aux_losses, num_items_in_batch)


class ConceptEncoderForSentencePairClassification(ConceptEncoderPreTrainedModel):
    """Siamese sentence pairs: one shared encoder reads each sentence alone; the pooled embeddings
    u, v (``pair_pooling``: learned-weighted or parameter-free mean) feed a classifier on
    ``[u; v; |u - v|; u * v]``, or with ``pair_cosine_only`` the prediction is ``cos(u, v)`` (trained by
    MSE against ``labels``, which must then be on the cosine's scale, e.g. STS-B's 0-5 divided by 5).
    Inputs: ``input_ids`` / ``attention_mask`` (first sentence), ``input_ids_b`` / ``attention_mask_b``."""

    def __init__(self, config: ConceptEncoderConfig):
        super().__init__(config)
        self.model = ConceptEncoderModel(config)
        self.pooler = ConceptWeightedPooling(config) if config.pair_pooling == "weighted" else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = None if config.pair_cosine_only else nn.Linear(4 * config.hidden_size, config.num_labels)
        self.post_init()

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        concepts = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pooler(concepts) if self.pooler is not None else mean_pool_concepts(concepts)

    def forward(
        self, input_ids, attention_mask=None, input_ids_b=None, attention_mask_b=None, labels=None, **kwargs
    ) -> DecollapseSequenceClassifierOutput:
        if input_ids_b is None:
            raise ValueError("a sentence pair needs input_ids_b (the second sentence)")
        u = self.embed(input_ids, attention_mask)
        v = self.embed(input_ids_b, attention_mask_b)
        if self.config.pair_cosine_only:
            logits = F.cosine_similarity(u, v, dim=-1)[:, None]
            if labels is None:
                return DecollapseSequenceClassifierOutput(logits=logits, aux_losses={})
            task_loss = F.mse_loss(logits[:, 0].float(), labels.float())
            return DecollapseSequenceClassifierOutput(loss=task_loss, logits=logits, task_loss=task_loss, aux_losses={})
        logits = self.classifier(self.dropout(torch.cat([u, v, (u - v).abs(), u * v], dim=-1)))
        return _classifier_output(self, logits, labels, {})
