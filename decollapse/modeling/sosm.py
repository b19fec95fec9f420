"""The ``sosm`` architecture: the Self-Organizing State Model, built as its design says and not as its
first code ran.

Each token carries a **semantic state** of 16 named blocks (identity, structure, contexts, relations,
…) of ``block_dim`` features. The state is an embedding row (context-free) or, with ``mu_layers``,
the output of layers in which every block attends over the earlier tokens with its own projections and
the blocks then mix. A linear projection takes the state (and an optional TEMPORAL table) into the
residual stream of the dense control's blocks, which may attend only along a causal token graph.

The design's question is whether the blocks stay different from one another. Four tiers of measures
are switches (see ``SosmConfig``); every term is reported above its floor.

What the public code did and this file does not: its attention let a position see the token it
predicts (forward graph edges, a non-causal block attention, a batch-wide PairNorm), its block
regularisation never reached the loss, its graph was built from the first sample of a batch in Python
loops, and three different "block" coordinate systems were mixed. Here every edge points backward,
every mask is per sample, padding never counts, and one block map (``SosmBlockLayout``) serves the
state, the losses and the diagnostics.

Reads top to bottom: block layout -> block-wise modules (norm, attention, the contextual layer, tier 4)
-> causal graph -> pretrained base (collapse report) -> model -> LM heads. Imports only torch,
transformers and sibling modules.

References: SOSM (github.com/PlanetDestroyyer/Self-Organizing-State-Model); Kornblith et al. 2019 (linear
CKA); Locatello et al. 2020 (slot attention); Fedus et al. 2022 (Switch load balance); van den Oord et
al. 2018 (InfoNCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils.deprecation import deprecate_kwarg

from ..configuration.sosm import BLOCK_NAMES, SosmConfig, block_shape
from .common import (
    IGNORE_INDEX,
    CausalLMHeadMixin,
    DecollapsePreTrainedModel,
    MaskedLMHeadMixin,
    attention_bias,
    document_ids,
    position_ids_from_mask,
)
from .dense import DenseBlock
from .diagnostics import CollapseReport, homonym_report, unit_report, within_unit_cosine
from .outputs import DecollapseModelOutput
from .regularizers import (
    block_mean_orthogonality,
    info_nce,
    linear_cka_matrix,
    load_balancing_loss,
    mean_off_diagonal_cka,
)

NUM_BLOCKS = len(BLOCK_NAMES)
FIBONACCI = (2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987)


class SosmBlockLayout:
    """The one block map. Features are stored block-major (block ``b`` is features ``b·d … (b+1)·d − 1``);
    :meth:`matrix` shows the same state as the ``4r × 4c`` matrix of the design, block ``b`` the ``r × c``
    sub-square at grid cell ``(b // 4, b % 4)`` (``block_dim=4``: the 8 × 8 matrix of 2 × 2 blocks)."""

    def __init__(self, block_dim: int):
        self.block_dim = block_dim
        self.rows, self.cols = block_shape(block_dim)

    def blocks(self, state: torch.Tensor) -> torch.Tensor:
        """(…, 16·d) -> (…, 16, d), a view."""
        return state.unflatten(-1, (NUM_BLOCKS, self.block_dim))

    def matrix(self, state: torch.Tensor) -> torch.Tensor:
        """(…, 16·d) -> (…, 4r, 4c): the state as the design draws it."""
        r, c = self.rows, self.cols
        grid = state.unflatten(-1, (4, 4, r, c))  # (…, grid row, grid col, r, c)
        return grid.transpose(-3, -2).flatten(-4, -3).flatten(-2, -1)

    def index(self, names) -> list[int]:
        return [BLOCK_NAMES.index(name) for name in names]


class BlockNorm(nn.Module):
    """LayerNorm within each block, with an affine transform of its own per block."""

    def __init__(self, block_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(NUM_BLOCKS, block_dim))
        self.bias = nn.Parameter(torch.zeros(NUM_BLOCKS, block_dim))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:  # (…, 16, d)
        return F.layer_norm(blocks, blocks.shape[-1:], eps=self.eps) * self.weight + self.bias


class BlockLinear(nn.Module):
    """A separate ``Linear(d_in, d_out)`` for each of the 16 blocks, applied in one einsum."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(NUM_BLOCKS, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(NUM_BLOCKS, d_out))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:  # (…, 16, d_in) -> (…, 16, d_out)
        return torch.einsum("...ni,nio->...no", blocks, self.weight) + self.bias


class BlockAttention(nn.Module):
    """Every block attends over the tokens with its own query, key, value and output maps: 16 heads of
    width ``d``, one per block, so a block only ever reads the same block of other tokens."""

    def __init__(self, config: SosmConfig):
        super().__init__()
        self.qkv = BlockLinear(config.block_dim, 3 * config.block_dim)
        self.out = BlockLinear(config.block_dim, config.block_dim)
        self.dropout = config.attention_dropout

    def forward(self, blocks: torch.Tensor, attn_mask, is_causal: bool) -> torch.Tensor:
        query, key, value = (part.transpose(1, 2) for part in self.qkv(blocks).chunk(3, dim=-1))  # (B, 16, T, d)
        heads = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.out(heads.transpose(1, 2))


class SosmContextLayer(nn.Module):
    """One contextual layer of the semantic state: block-wise attention over the tokens, then a
    cross-block MLP over the whole state (the only place blocks exchange information), both pre-norm
    and residual."""

    def __init__(self, config: SosmConfig):
        super().__init__()
        size = config.state_size
        self.attn_norm = BlockNorm(config.block_dim, config.layer_norm_eps)
        self.attn = BlockAttention(config)
        self.mix_norm = nn.LayerNorm(size, eps=config.layer_norm_eps)
        self.mix_up = nn.Linear(size, 4 * size)
        self.mix_down = nn.Linear(4 * size, size)

    def forward(self, state: torch.Tensor, attn_mask, is_causal: bool) -> torch.Tensor:
        blocks = state.unflatten(-1, (NUM_BLOCKS, -1))
        state = state + self.attn(self.attn_norm(blocks), attn_mask, is_causal).flatten(-2)
        return state + self.mix_down(F.gelu(self.mix_up(self.mix_norm(state)), approximate="tanh"))


class BlockRouter(nn.Module):
    """Tier 4 ``moe``: a router scores the 16 blocks of each token from its whole state and keeps the
    top ``routing_top_k``; kept blocks are scaled by their renormalised probability × k (mean gate 1),
    the others are zeroed. The probabilities carry the router's gradient."""

    def __init__(self, config: SosmConfig):
        super().__init__()
        self.top_k = config.routing_top_k
        self.router = nn.Linear(config.state_size, NUM_BLOCKS)

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.router(state).float(), dim=-1)  # (B, T, 16)
        top = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        blocks = state.unflatten(-1, (NUM_BLOCKS, -1)) * (gates * self.top_k).to(state.dtype).unsqueeze(-1)
        return blocks.flatten(-2), probs, top.indices


class SeparateBlockNetworks(nn.Module):
    """Tier 4 ``separate``: a residual MLP of its own for each block (no parameter shared across blocks)."""

    def __init__(self, config: SosmConfig):
        super().__init__()
        d = config.block_dim
        self.norm = BlockNorm(d, config.layer_norm_eps)
        self.up = BlockLinear(d, 4 * d)
        self.down = BlockLinear(4 * d, d)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        blocks = state.unflatten(-1, (NUM_BLOCKS, -1))
        return (blocks + self.down(F.gelu(self.up(self.norm(blocks)), approximate="tanh"))).flatten(-2)


class SlotCompetition(nn.Module):
    """Tier 4 ``slots``: one round of slot attention within a token. The token's 16 block vectors are the
    inputs; each block (slot) has its own query map. The attention is normalised over the *blocks*
    (they compete for each input), then over the inputs (a weighted mean), and each block adds what it
    won through an output map of its own."""

    def __init__(self, config: SosmConfig):
        super().__init__()
        d = config.block_dim
        self.norm = BlockNorm(d, config.layer_norm_eps)
        self.query = BlockLinear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = BlockLinear(d, d)
        self.scale = d**-0.5

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        blocks = self.norm(state.unflatten(-1, (NUM_BLOCKS, -1)))
        logits = torch.einsum("...sd,...id->...si", self.query(blocks), self.key(blocks)) * self.scale
        attn = torch.softmax(logits, dim=-2)  # competition: over slots, per input
        attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-8)  # weighted mean over inputs
        won = torch.einsum("...si,...id->...sd", attn, self.value(blocks))
        return state + self.out(won).flatten(-2)


def causal_graph(
    features: torch.Tensor, valid: torch.Tensor, semantic_k: int, threshold: float, shortcuts: int
) -> torch.Tensor:
    """The token graph, per sample: (B, T, T) booleans, ``[b, i, j]`` True where token ``i`` may attend
    to token ``j``. Edges: ``i → i`` and ``i → i − 1``; ``i → i − f`` for the first ``shortcuts`` Fibonacci
    distances ``f`` (2, 3, 5, 8, …); and ``i → j`` for the ``semantic_k`` earlier tokens ``j < i − 1`` whose
    ``features`` have the highest cosine with token ``i``'s, if at least ``threshold``. Keys that are
    padding are dropped; the self edge always stays (a row is never empty).

    Every edge has ``j ≤ i`` by construction: no argument can express a forward edge, so the graph can
    only ever narrow causal attention, never widen it.
    """
    batch, length = valid.shape
    device = valid.device
    position = torch.arange(length, device=device)
    back = position.unsqueeze(1) - position.unsqueeze(0)  # i − j
    allowed = (back == 0) | (back == 1)
    for distance in FIBONACCI[:shortcuts]:
        allowed = allowed | (back == distance)
    allowed = allowed.unsqueeze(0) & valid.unsqueeze(1)
    k = min(semantic_k, max(length - 2, 0))
    if k > 0:
        unit = F.normalize(features.float(), dim=-1, eps=1e-8)
        cosine = unit @ unit.transpose(1, 2)  # (B, T, T)
        candidate = (back > 1).unsqueeze(0) & valid.unsqueeze(1)
        cosine = cosine.masked_fill(~candidate, float("-inf"))
        best = cosine.topk(k, dim=-1)
        keep = torch.isfinite(best.values) & (best.values >= threshold)
        semantic = torch.zeros_like(allowed).scatter(-1, best.indices, keep)
        allowed = allowed | semantic
    return allowed | (back == 0).unsqueeze(0)


def _labelled_mean_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled items (target != -100); 0, still on the graph, when there is
    none (``F.cross_entropy`` would return NaN, and a NaN masked afterwards still poisons the gradient)."""
    losses = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return losses / (target != IGNORE_INDEX).sum().clamp_min(1)


def past_token_targets(input_ids: torch.Tensor, valid: torch.Tensor, back: int) -> torch.Tensor:
    """``target[:, t] = input_ids[:, t − back]``; -100 where ``t < back`` or either token is padding.
    The reconstruction proxy's targets: a block group names a token it has already read, never a later one."""
    source = input_ids.masked_fill(~valid, IGNORE_INDEX)
    target = torch.full_like(source, IGNORE_INDEX)
    length = source.shape[1]
    if back < length:
        target[:, back:] = source[:, : length - back]
    return target.masked_fill(~valid, IGNORE_INDEX)


class SosmPreTrainedModel(DecollapsePreTrainedModel):
    config_class = SosmConfig
    config: SosmConfig
    _no_split_modules = ["DenseBlock", "SosmContextLayer"]
    lora_target_modules = ["qkv_proj", "o_proj"]
    collapse_headline = {
        "between-block CKA": ("blocks.between_cka_mean", "mean"),
        "within-block cos": ("blocks.within_cosine_mean", "mean"),
        "homonym sep.": ("homonyms.separation", "mean"),
        "homonym margin": ("homonyms.margin", "mean"),
        "aux acc. (mean)": ("aux.*.accuracy", "mean"),
    }

    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this only for modules with parameters of their own when the model is not
        # transformers' own code, so every rule here names such a module.
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, BlockLinear):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        elif isinstance(module, BlockNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(self, SosmModel) and module is self.temporal:
            init.zeros_(module.weight)  # the TEMPORAL table starts empty and learns
        elif isinstance(self, SosmModel) and module is self.embed_tokens and self.config.block_init == "orthogonal":
            if self.config.vocab_size > self.config.state_size:
                # Zero-mean orthonormal columns, scaled to the normal init's entry size: over the
                # vocabulary every feature is uncorrelated with every other, so every pair of blocks
                # starts at linear CKA 0 (centring is what CKA does; plain orthogonal columns are not).
                weight = module.weight
                draw = torch.randn(weight.shape, dtype=torch.float32, device=weight.device)
                columns, _ = torch.linalg.qr(draw - draw.mean(0, keepdim=True))
                init.copy_(weight, (columns * std * self.config.vocab_size**0.5).to(weight.dtype))

    @torch.no_grad()
    def collapse_report(self, batch: dict[str, torch.Tensor]) -> CollapseReport:
        """On the batch's real tokens:

        - ``blocks.between_cka`` (16 × 16 matrix, a heat-map in the run's plots) and ``…_mean``: linear CKA
          between the blocks of the semantic state, the similarity *between* blocks;
        - ``blocks.within_cosine_mean`` (and per block): cosine of the same block across the tokens the
          graph connects (the previous token without a graph), the original repository's "block
          similarity", a reading of anisotropy rather than of collapse between blocks;
        - ``blocks.energy_share`` (a distribution) and ``blocks.usage_variance``: each block's share of
          the state's squared norm;
        - with ``sense`` labels: ``homonyms.*`` on the final hidden states (:func:`homonym_report`:
          separation, same-sense and random-pair baselines, margin) and ``homonyms.block.<B>.*`` on each
          block of the semantic state;
        - with the labels of the tier-3 heads: ``aux.<column>.accuracy``;
        - for a causal LM with ``word_class`` labels: ``ablation.<B>.loss_rise`` (next-token loss when
          block B is zeroed, minus the loss with all blocks) and ``ablation.<B>.<class>`` per word class
          of the predicted token.
        """
        base: SosmModel = self.base_model
        was_training = self.training
        self.eval()
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        captured: dict[str, torch.Tensor] = {}
        hook = base.state_out.register_forward_hook(lambda mod, args, out: captured.__setitem__("state", out))
        try:
            out = base(input_ids=input_ids, attention_mask=mask, position_ids=batch.get("position_ids"))
            losses = self._block_ablation(input_ids, mask, batch["word_class"]) if "word_class" in batch else None
        finally:
            hook.remove()
            self.train(was_training)

        report = CollapseReport()
        layout, names = base.layout, BLOCK_NAMES
        blocks = layout.blocks(captured["state"])[valid].float()  # (N, 16, d)
        cka = linear_cka_matrix(blocks)
        report.matrices["blocks.between_cka"] = cka
        off = ~torch.eye(NUM_BLOCKS, dtype=torch.bool)
        report.metrics["blocks.between_cka_mean"] = float(cka[off].mean())
        report.metrics["blocks.between_cka_max"] = float(cka[off].max())
        edges = base.graph_edges(captured["state"], valid)
        within = within_unit_cosine(blocks, edges)
        report.metrics["blocks.within_cosine_mean"] = float(within.mean())
        for b, name in enumerate(names):
            report.metrics[f"blocks.within_cosine.{name}"] = float(within[b])
        energy = blocks.pow(2).sum(-1)
        # The shared unit-group measures (and so the health criteria of the monitor and the model card):
        # each block one unit, its vector the block over all probe tokens; a block is used by a token
        # when it is not zeroed there (tier-4 routing zeroes the blocks it drops).
        report.update(unit_report(vectors=blocks.transpose(0, 1).reshape(NUM_BLOCKS, -1), counts=(energy > 0).sum(0)),
                      prefix="blocks.")
        share = (energy / energy.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0)
        report.distributions["blocks.energy_share"] = share
        report.metrics["blocks.usage_variance"] = float(share.var(unbiased=False))
        if "sense" in batch:
            surface, sense = input_ids[valid], batch["sense"][valid]
            for key, value in homonym_report(out.last_hidden_state[valid], surface, sense).items():
                report.metrics[f"homonyms.{key}"] = value
            for b, name in enumerate(names):
                per_block = homonym_report(blocks[:, b], surface, sense)
                report.metrics[f"homonyms.block.{name}.separation"] = per_block["separation"]
                report.metrics[f"homonyms.block.{name}.margin"] = per_block["margin"]
        for column, head in base.aux_head_modules().items():
            if column not in batch:
                continue
            labels = batch[column][valid]
            keep = labels >= 0
            logits = head(blocks[:, base.aux_blocks[column]].flatten(-2))
            correct = (logits.argmax(-1) == labels)[keep]
            report.metrics[f"aux.{column}.accuracy"] = float(correct.float().mean()) if correct.numel() else 0.0
        if losses is not None:
            full, ablated, target_class = losses
            for b, name in enumerate(names):
                rise = ablated[b] - full
                report.metrics[f"ablation.{name}.loss_rise"] = float(rise.mean()) if rise.numel() else 0.0
                for c in torch.unique(target_class).tolist():
                    report.metrics[f"ablation.{name}.class{c}"] = float(rise[target_class == c].mean())
        return report

    def _block_ablation(self, input_ids: torch.Tensor, mask: torch.Tensor | None, word_class: torch.Tensor):
        """Per-token next-token losses with every block, and with each block zeroed in turn; None when
        this model has no next-token head. Returns (full (N,), ablated (16, N), word class of the target (N,))."""
        if self.config.objective != "causal_lm" or not hasattr(self, "lm_head"):
            return None
        labels = input_ids.masked_fill(~mask.bool(), IGNORE_INDEX) if mask is not None else input_ids
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX

        def token_losses() -> torch.Tensor:
            logits = self(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            return F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")[keep]

        base: SosmModel = self.base_model
        full = token_losses()
        ablated = []
        for b in range(NUM_BLOCKS):
            base.block_scale = torch.ones(NUM_BLOCKS, device=input_ids.device)
            base.block_scale[b] = 0.0
            try:
                ablated.append(token_losses())
            finally:
                base.block_scale = None
        return full, torch.stack(ablated), word_class[:, 1:][keep]


class SosmModel(SosmPreTrainedModel):
    """Semantic state (embedding [-> contextual layers] [-> tier 4]) -> projection + learned positions ->
    the dense control's blocks (optionally on the causal graph) -> final LayerNorm.

    Auxiliary terms are training signals: they are computed in training mode only (evaluation reports
    the task loss), for every term whose configured weight is non-zero. With ``aux_head_weight > 0`` a
    training batch must carry the heads' label columns (``aux_label_columns``) as keyword arguments.
    """

    def __init__(self, config: SosmConfig):
        super().__init__(config)
        self.layout = SosmBlockLayout(config.block_dim)
        size = config.state_size
        self.embed_tokens = nn.Embedding(config.vocab_size, size)
        self.temporal = nn.Embedding(config.vocab_size, config.temporal_size) if config.temporal_size else None
        self.state_dropout = nn.Dropout(config.state_dropout)
        self.context_layers = nn.ModuleList([SosmContextLayer(config) for _ in range(config.mu_layers)])
        tier4 = {"moe": BlockRouter, "separate": SeparateBlockNetworks, "slots": SlotCompetition}.get(config.block_routing)
        self.tier4 = tier4(config) if tier4 is not None else None
        self.state_out = nn.Identity()  # the semantic state passes here: diagnostics hook it
        self.projector = nn.Linear(size + config.temporal_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([DenseBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Tier 3: a linear head per label column, reading only its blocks.
        self.aux_blocks = {column: self.layout.index(blocks) for column, blocks in config.aux_heads.items()}
        missing = [column for column in config.aux_label_columns if column not in config.aux_head_classes]
        if missing:
            raise ValueError(
                f"SosmConfig.aux_head_classes has no class count for {', '.join(map(repr, missing))}: set it "
                "(decollapse train fills it from the data)"
            )
        self.aux_heads = (
            nn.ModuleDict(
                {
                    column: nn.Linear(len(blocks) * config.block_dim, config.aux_head_classes[column])
                    for column, blocks in self.aux_blocks.items()
                }
            )
            if config.aux_head_weight > 0
            else None
        )
        group = NUM_BLOCKS // SosmConfig.GROUPS
        self.reconstruction = (
            nn.ModuleList([nn.Linear(group * config.block_dim, config.vocab_size) for _ in range(SosmConfig.GROUPS)])
            if config.reconstruction_weight > 0
            else None
        )
        self.block_scale: torch.Tensor | None = None  # (16,) multipliers; set only by the block ablation
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def aux_head_modules(self) -> dict[str, nn.Linear]:
        return dict(self.aux_heads.items()) if self.aux_heads is not None else {}

    def semantic_state(self, embeds: torch.Tensor, attn_mask, is_causal: bool):
        """Embedding rows (B, T, 16·d) -> the semantic state, and tier 4's routing (probabilities, kept
        blocks) or None."""
        state = self.state_dropout(embeds)
        for layer in self.context_layers:
            state = layer(state, attn_mask, is_causal)
        routing = None
        if isinstance(self.tier4, BlockRouter):
            state, probs, kept = self.tier4(state)
            routing = (probs, kept)
        elif self.tier4 is not None:
            state = self.tier4(state)
        return state, routing

    def graph_edges(self, state: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(E, 2) flat token-index pairs ``(i, j)``, ``j < i``, of the attention graph over the batch's
        real tokens (indices into ``state[valid]``); the previous-token edges when the graph is off."""
        if self.config.graph_attention:
            graph = self._graph(state, valid)
        else:
            position = torch.arange(valid.shape[1], device=valid.device)
            graph = (position.unsqueeze(1) - position.unsqueeze(0) == 1).unsqueeze(0) & valid.unsqueeze(1)
        graph = graph & valid.unsqueeze(2) & ~torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
        flat = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
        flat[valid] = torch.arange(int(valid.sum()), device=valid.device)
        b, i, j = graph.nonzero(as_tuple=True)
        return torch.stack([flat[b, i], flat[b, j]], dim=1)

    def _graph(self, state: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        c = self.config
        features = self.layout.blocks(state)[..., self.layout.index(c.graph_blocks), :].flatten(-2)
        return causal_graph(features, valid, c.graph_semantic_k, c.graph_threshold, c.graph_shortcuts)

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,  # the label columns of the tier-3 heads (e.g. word_class=…), or a tokenizer's extras
    ) -> DecollapseModelOutput:
        c = self.config
        causal = c.objective == "causal_lm"
        use_cache = (use_cache if use_cache is not None else c.use_cache) and causal and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=c)
        past_len = cache.get_seq_length() if cache is not None else 0
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq_len = embeds.shape[:2]
        if past_len + seq_len > c.max_position_embeddings:
            raise ValueError(
                f"Sequence of {past_len + seq_len} tokens exceeds max_position_embeddings={c.max_position_embeddings}."
            )
        device = embeds.device
        documents = document_ids(position_ids, past_len)
        if documents is not None and not c.supports_packed_documents:
            raise ValueError(
                "position_ids restart inside the sequence (packed documents), which the token graph "
                "(graph_attention) cannot keep apart; pass one document per row."
            )
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, seq_len, past_len, device)
        attn_mask, is_causal = attention_bias(attention_mask, seq_len, past_len, causal, device, documents)
        valid = (
            attention_mask[:, -seq_len:].bool()
            if attention_mask is not None
            else torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        )

        state, routing = self.semantic_state(embeds, attn_mask, is_causal)
        state = self.state_out(state)
        if self.block_scale is not None:
            state = (self.layout.blocks(state) * self.block_scale.unsqueeze(-1).to(state.dtype)).flatten(-2)
        parts = [state]
        if self.temporal is not None:
            if input_ids is None:
                raise ValueError("the TEMPORAL table needs input_ids (temporal_size > 0)")
            parts.append(self.temporal(input_ids))
        hidden_states = self.projector(torch.cat(parts, dim=-1) if len(parts) > 1 else state)
        hidden_states = self.dropout(hidden_states + self.embed_positions(position_ids))
        if c.graph_attention:
            # The graph narrows the causal, padding-masked attention; it never adds an edge to it.
            attn_mask, is_causal = self._graph(state, valid).unsqueeze(1), False

        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, _ = layer(hidden_states, attn_mask, is_causal, cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)

        aux_losses = {}
        if self.training:
            aux_losses = self._aux_losses(input_ids, embeds, state, routing, valid, attn_mask, is_causal, kwargs)
        return DecollapseModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_losses=aux_losses,
        )

    def _aux_losses(self, input_ids, embeds, state, routing, valid, attn_mask, is_causal, columns) -> dict:
        """The tiers' terms on the batch's real tokens, each above its floor (0 = the best it can be)."""
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        blocks = self.layout.blocks(state)[valid]  # (N, 16, d)
        if c.orthogonality_weight:
            terms["block_orthogonality"] = block_mean_orthogonality(blocks)
        if c.decorrelation_weight:
            terms["block_decorrelation"] = mean_off_diagonal_cka(blocks)
        if c.balance_weight:
            # KL(p || uniform) of the blocks' mean share of each token's squared norm.
            energy = blocks.float().pow(2).sum(-1)
            share = (energy / energy.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0)
            terms["block_balance"] = (share * (share * NUM_BLOCKS).clamp_min(1e-12).log()).sum()
        if c.contrastive_weight or c.coherence_weight:
            # Two views of the same tokens: independent dropout on the embedding rows, through the same
            # contextual layers. Block b of one view must find block b of the other among its token's
            # 16 blocks (InfoNCE), and stay close to it (coherence).
            views = [
                self.layout.blocks(
                    self.semantic_state(F.dropout(embeds, c.view_dropout, training=True), attn_mask, is_causal)[0]
                )[valid]
                for _ in range(2)
            ]
            if c.contrastive_weight:
                terms["inter_block_contrastive"] = info_nce(views[0], views[1], c.contrastive_temperature)
            if c.coherence_weight:
                terms["intra_block_coherence"] = (1.0 - F.cosine_similarity(views[0], views[1], dim=-1)).mean()
        if c.aux_head_weight:
            head_losses = []
            for column, head in self.aux_head_modules().items():
                if column not in columns:
                    raise ValueError(
                        f"aux_head_weight={c.aux_head_weight} but the batch has no {column!r} column: pass the "
                        f"label columns {', '.join(self.aux_label_columns)} to forward(), or set aux_head_weight=0."
                    )
                labels = columns[column].to(blocks.device)[valid]
                logits = head(blocks[:, self.aux_blocks[column]].flatten(-2))
                head_losses.append(_labelled_mean_ce(logits, labels.masked_fill(labels < 0, IGNORE_INDEX)))
            terms["aux_heads"] = torch.stack(head_losses).mean()
        if c.reconstruction_weight and input_ids is not None:
            # Group g (blocks 4g … 4g+3) names the token g positions back: only the past, never the future.
            grouped = self.layout.blocks(state).unflatten(-2, (SosmConfig.GROUPS, -1)).flatten(-2)  # (B, T, 4, 4d)
            losses = []
            for g, head in enumerate(self.reconstruction):
                target = past_token_targets(input_ids, valid, g)
                logits = head(grouped[:, :, g])
                losses.append(_labelled_mean_ce(logits.flatten(0, 1), target.flatten()))
            terms["reconstruction"] = torch.stack(losses).mean()
        if routing is not None and c.routing_balance_weight:
            probs, kept = routing
            one_hot = F.one_hot(kept, NUM_BLOCKS)
            terms["routing_balance"] = load_balancing_loss(probs, one_hot, valid) - 1.0  # 1 at perfect balance
        return terms


class SosmForCausalLM(CausalLMHeadMixin, SosmPreTrainedModel, GenerationMixin):
    def __init__(self, config: SosmConfig):
        if config.objective != "causal_lm":
            raise ValueError(
                f"SosmForCausalLM needs objective='causal_lm', got {config.objective!r}; "
                "use SosmForMaskedLM for 'masked_lm'."
            )
        super().__init__(config)
        self.model = SosmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class SosmForMaskedLM(MaskedLMHeadMixin, SosmPreTrainedModel):
    """Bidirectional encoder with a BERT-style prediction head (transform -> tied decoder)."""

    def __init__(self, config: SosmConfig):
        if config.objective != "masked_lm":
            raise ValueError(
                f"SosmForMaskedLM needs objective='masked_lm', got {config.objective!r}; "
                "use SosmForCausalLM for 'causal_lm'."
            )
        super().__init__(config)
        self.model = SosmModel(config)
        self._init_masked_lm_head(config)
        self.post_init()
