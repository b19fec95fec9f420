"""``dawn``: neurons as combinations of shared basis FFN blocks, picked per token by a neuron router
(DAWN v5.0, github.com/madst0614/DAWN), built causal where the original leaked.

Per layer (pre-LN, two residual writes):

1. ``u = LN(x)``; the **router** scores the layer's N neurons from ``u`` and from a context attention
   over the tokens ``u`` may see, mixed by a learned gate; it keeps the top k and softmax-weights
   them. ``x += Σ_j w_j · neuron_j`` (plus ``W_o · context`` with ``context_residual``, the default:
   v5.0 wrote nothing of the context attention into the residual stream).
2. ``v = LN(x)``; the **basis FFN** composes the token's up-projection from its selected neurons'
   coefficient rows over M shared low-rank basis blocks, ``W_up = (Σ_m a_m A_m)(Σ_m b_m B_m)``, and
   ``x += down(GELU(v W_up) ⊙ σ(modulation(Σ_j w_j · neuron_j)))``.

What differs from the original, on purpose: the up-projection is composed per token (or
from a causal prefix), never pooled over the whole sequence for a causal LM; padding enters no
pooling and no attention; the masked-LM variant routes with a bidirectional context attention;
the sparsity loss is differentiable; a load-balancing term keeps the router using its pool; every
loss is reported minus its floor. docs/DAWN.md gives the reasons and the measurements.

Reads top to bottom: router -> basis FFN -> layer -> pretrained base -> model -> LM heads.
Imports only torch, transformers and sibling modules (plus the one configuration import that the Hub
export rewrites to ``from .configuration_dawn import DawnConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init

from ..configuration.dawn import DawnConfig
from .common import (
    CausalLMHeadMixin,
    DecollapsePreTrainedModel,
    MaskedLMHeadMixin,
    TokenStemMixin,
)
from .diagnostics import (
    CollapseReport,
    coactivation_strong_pairs,
    effective_rank_entropy,
    gini,
    homonym_separation,
    jensen_shannon_divergence,
    normalized_entropy,
    top_k_share,
    unit_report,
    usage_counts,
    usage_share,
)
from .outputs import DecollapseModelOutput
from .regularizers import (
    load_balancing_loss,
    mean_squared_off_diagonal_cosine,
    row_participation_ratio,
    support_shortfall,
    welch_floor,
)


@dataclass
class DawnRouting:
    """What a router decided for every token. B batch, T tokens, k selected of N neurons."""

    scores: torch.Tensor  # (B, T, N) the mixed scores of every neuron
    indices: torch.Tensor  # (B, T, k) selected neuron ids
    weights: torch.Tensor  # (B, T, k) softmax over the selected scores
    dense_weights: torch.Tensor  # (B, T, N) the same weights scattered over the pool, 0 elsewhere
    written: torch.Tensor  # (B, T, D) Σ_j w_j · neuron_j, added to the residual stream
    context_gate: torch.Tensor  # (B, T) share of the score taken from the context attention
    context_out: torch.Tensor | None = None  # (B, T, D) projected context, if written to the residual


class DawnContextAttention(nn.Module):
    """Multi-head attention over the tokens a position may see: queries, keys and values. Its result
    moves the router's scores; the router's ``context_proj`` (``context_residual``) is its output
    projection into the residual stream."""

    def __init__(self, config: DawnConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        batch, seq_len, width = hidden_states.shape
        query, key, value = (
            part.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            for part in self.qkv_proj(hidden_states).split(width, dim=-1)
        )
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal)
        return context.transpose(1, 2).reshape(batch, seq_len, width)


class DawnNeuronRouter(nn.Module):
    """Scores a low-rank pool of N neurons per token and keeps the top k.

    Neurons are the rows of ``neuron_factors @ neuron_basis`` (N × r_n times r_n × D).
    ``score = (g_tok · u·neuronᵀ + g_ctx · c·neuronᵀ) / router_temperature`` with
    ``(g_tok, g_ctx) = softmax(W_g [u; c])``; the k kept are weighted by a softmax over their scores.
    With ``context_residual`` the context ``c`` is also projected (``context_proj``) for the residual
    stream; without it, ``c`` only moves the scores, as in v5.0.
    """

    def __init__(self, config: DawnConfig):
        super().__init__()
        self.top_k = config.neuron_top_k
        self.temperature = config.router_temperature
        self.neuron_factors = nn.Parameter(torch.empty(config.num_neurons, config.neuron_rank))
        self.neuron_basis = nn.Parameter(torch.empty(config.neuron_rank, config.hidden_size))
        self.context = DawnContextAttention(config)
        self.gate = nn.Linear(2 * config.hidden_size, 2)
        self.context_proj = nn.Linear(config.hidden_size, config.hidden_size) if config.context_residual else None

    def neurons(self) -> torch.Tensor:
        return self.neuron_factors @ self.neuron_basis  # (N, D)

    def forward(self, hidden_states: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> DawnRouting:
        context = self.context(hidden_states, attn_mask, is_causal)
        gate = self.gate(torch.cat([hidden_states, context], dim=-1)).softmax(dim=-1)  # (B, T, 2)
        neurons = self.neurons()
        # g_tok · u·Nᵀ + g_ctx · c·Nᵀ = (g_tok · u + g_ctx · c)·Nᵀ: one (B, T, D) × (D, N) matmul.
        mixed = gate[..., :1] * hidden_states + gate[..., 1:] * context
        scores = (mixed @ neurons.t()) / self.temperature  # (B, T, N)
        top_scores, indices = scores.topk(self.top_k, dim=-1)
        weights = top_scores.softmax(dim=-1)
        # Scattering the k weights over the pool turns every later gather into a dense matmul.
        dense_weights = torch.zeros_like(scores).scatter(-1, indices, weights)
        return DawnRouting(
            scores=scores,
            indices=indices,
            weights=weights,
            dense_weights=dense_weights,
            written=dense_weights @ neurons,
            context_gate=gate[..., 1],
            context_out=self.context_proj(context) if self.context_proj is not None else None,
        )


class DawnBasisFFN(nn.Module):
    """An FFN whose up-projection each token composes from its neurons' coefficient rows.

    With mixing vectors ``a = Σ_j w_j coef_A[j]`` and ``b = Σ_j w_j coef_B[j]`` (length M), the
    up-projection is ``W_up = (Σ_m a_m A_m)(Σ_m b_m B_m)`` (D × r_b times r_b × F). It is never
    materialised: ``v W_up = ((Σ_m a_m v A_m) ⊗ b) · [B_1; …; B_M]``, two dense matmuls per token.
    """

    def __init__(self, config: DawnConfig):
        super().__init__()
        self.composition = config.ffn_composition
        self.mixing_norm = config.mixing_norm
        self.num_basis = config.num_basis
        self.basis_rank = config.basis_rank
        self.basis_A = nn.Parameter(torch.empty(config.num_basis, config.hidden_size, config.basis_rank))
        self.basis_B = nn.Parameter(torch.empty(config.num_basis, config.basis_rank, config.intermediate_size))
        self.coef_A = nn.Parameter(torch.empty(config.num_neurons, config.num_basis))
        self.coef_B = nn.Parameter(torch.empty(config.num_neurons, config.num_basis))
        self.modulation_in = nn.Linear(config.hidden_size, config.modulation_rank)
        self.modulation_out = nn.Linear(config.modulation_rank, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def compose(self, dense_weights: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, T, M) mixing vectors ``a`` and ``b`` each position uses, by ``ffn_composition``."""
        mix = dense_weights @ torch.cat([self.coef_A, self.coef_B], dim=-1)  # (B, T, 2M)
        if self.composition != "token":
            keep = valid.unsqueeze(-1).to(mix.dtype) if valid is not None else torch.ones_like(mix[..., :1])
            mix = mix * keep  # padding never enters a pool
            if self.composition == "causal_prefix":
                # Mean over the real tokens up to and including t: sees nothing after t.
                mix = mix.cumsum(dim=1) / keep.cumsum(dim=1).clamp_min(1.0)
            else:  # "sequence" (masked LM only, the config refuses it for a causal LM)
                mix = (mix.sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1.0)).expand_as(mix)
        mix_a, mix_b = mix.split(self.num_basis, dim=-1)
        if self.mixing_norm:
            # Only the direction of each mixing vector is kept: the composed up-projection's scale no
            # longer shrinks with the averaging over k neurons, and cannot collapse towards zero.
            mix_a, mix_b = F.normalize(mix_a, dim=-1, eps=1e-6), F.normalize(mix_b, dim=-1, eps=1e-6)
        return mix_a, mix_b

    def forward(self, hidden_states: torch.Tensor, routing: DawnRouting, valid: torch.Tensor | None) -> torch.Tensor:
        batch, seq_len, width = hidden_states.shape
        mix_a, mix_b = self.compose(routing.dense_weights, valid)
        # v A_m for every basis at once: (B, T, D) × (D, M·r_b).
        projected = hidden_states @ self.basis_A.permute(1, 0, 2).reshape(width, -1)
        # Σ_m a_m (v A_m) as multiply-and-sum: the equivalent einsum lowers to B·T tiny (1 × M)(M × r_b)
        # matmuls on CPU, which are slower.
        low = (mix_a.unsqueeze(-1) * projected.view(batch, seq_len, self.num_basis, self.basis_rank)).sum(-2)
        # (Σ_m b_m B_m)ᵀ applied to low = (b ⊗ low) · stacked B: (B, T, M·r_b) × (M·r_b, F).
        outer = (mix_b.unsqueeze(-1) * low.unsqueeze(-2)).reshape(batch, seq_len, -1)
        hidden = F.gelu(outer @ self.basis_B.reshape(-1, self.basis_B.size(-1)), approximate="tanh")
        modulation = self.modulation_out(F.relu(self.modulation_in(routing.written)))
        return self.down_proj(hidden * torch.sigmoid(modulation))


class DawnLayer(nn.Module):
    def __init__(self, config: DawnConfig):
        super().__init__()
        self.router_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.router = DawnNeuronRouter(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = DawnBasisFFN(config)

    def forward(self, hidden_states, attn_mask, is_causal, valid) -> tuple[torch.Tensor, DawnRouting]:
        routing = self.router(self.router_norm(hidden_states), attn_mask, is_causal)
        hidden_states = hidden_states + routing.written
        if routing.context_out is not None:
            hidden_states = hidden_states + routing.context_out
        hidden_states = hidden_states + self.ffn(self.ffn_norm(hidden_states), routing, valid)
        return hidden_states, routing


def _coefficient_init(kind: str, num_neurons: int, num_basis: int) -> torch.Tensor:
    """Coefficient matrix (N × M) of ``neuron_init``.

    ``qr``: Q of a reduced QR of a Gaussian. Q has orthonormal **columns** (QᵀQ = I_M), so its rows
    form a tight frame: they have norm ≈ sqrt(M/N), not 1, and N > M rows cannot be mutually
    orthogonal. What it does give is a perfectly flat spectrum (effective rank M) and a mean squared
    row cosine close to the Welch floor (N/M − 1)/(N − 1), the smallest any N rows can have; only
    equal row norms would put it exactly on the floor (0.0608 against 0.0607 at 512 × 16, 0.004 above
    it at 32 × 8). ``normal``: the same entry scale, i.i.d. ``uniform``: the nearly identical rows of
    the original's collapsed run.
    """
    if kind == "qr":
        return torch.linalg.qr(torch.randn(num_neurons, num_basis))[0]
    if kind == "normal":
        return torch.randn(num_neurons, num_basis) / num_neurons**0.5
    return torch.full((num_neurons, num_basis), num_basis**-0.5) + 0.01 * torch.randn(num_neurons, num_basis)


class DawnPreTrainedModel(DecollapsePreTrainedModel):
    config_class = DawnConfig
    config: DawnConfig
    _no_split_modules = ["DawnLayer"]
    # The router's attention and the FFN's output; the shared basis is parameters, not Linear layers.
    lora_target_modules = ["qkv_proj", "down_proj"]
    collapse_headline = {
        "neuron usage (min layer)": ("layer*.neurons.usage", "min"),
        "top-10 share (max layer)": ("layer*.neurons.top10_share", "max"),
        "coef similar pairs > 0.8 (max)": ("layer*.coef_*.similar_pair_fraction", "max"),
        "coef erank / M (min)": ("layer*.coef_*.effective_rank_entropy_ratio", "min"),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config
        if isinstance(module, DawnNeuronRouter):
            # Unit-norm-ish factor rows and Linear-scale basis: each neuron starts like a row of a
            # standard Linear weight (entries ~ initializer_range).
            init.normal_(module.neuron_factors, std=config.neuron_rank**-0.5)
            init.normal_(module.neuron_basis, std=config.initializer_range)
        elif isinstance(module, DawnBasisFFN):
            init.normal_(module.basis_A, std=config.basis_init_std)
            init.normal_(module.basis_B, std=config.basis_init_std)
            init.copy_(module.coef_A, _coefficient_init(config.neuron_init, config.num_neurons, config.num_basis))
            init.copy_(module.coef_B, _coefficient_init(config.neuron_init, config.num_neurons, config.num_basis))
            # GPT-2's residual scaling for the FFN's write into the residual stream.
            std = config.initializer_range / (2 * config.num_hidden_layers) ** 0.5
            init.normal_(module.down_proj.weight, std=std)

    @torch.no_grad()
    def collapse_report(self, batch: dict[str, torch.Tensor]) -> CollapseReport:
        """Per layer: the neurons (usage over every real token of the batch, Gini, normalised entropy,
        top-10 / top-50 share, co-activation strong pairs, similarity of the composed neuron vectors,
        mutual information of the top-1 neuron with ``domain`` when given), the coefficient rows of
        ``coef_A`` / ``coef_B`` (signed similar-pair fraction over all unordered pairs, effective rank
        (entropy form) ÷ M, participation ratio), the bases (similarity and effective rank of the
        flattened blocks, usage share from the tokens' mixing weights) and the context gate; across
        layers the Jensen–Shannon divergence of consecutive layers' neuron usage."""
        base: DawnModel = self.base_model
        was_training = self.training
        self.eval()
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        routings: dict[int, DawnRouting] = {}
        hooks = [
            layer.router.register_forward_hook(lambda mod, args, out, i=i: routings.__setitem__(i, out))
            for i, layer in enumerate(base.layers)
        ]
        try:
            out = base(input_ids=input_ids, attention_mask=mask, position_ids=batch.get("position_ids"))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)

        config = self.config
        report = CollapseReport()
        labels = batch.get("domain")
        usage = []
        for i, layer in enumerate(base.layers):
            routing = routings[i]
            selected = routing.indices[valid]  # (tokens, k)
            counts = usage_counts(selected, config.num_neurons)
            usage.append(counts)
            label_valid = valid & (labels >= 0) if labels is not None else valid
            neurons = unit_report(
                vectors=layer.router.neurons(),
                counts=counts,
                assignments=routing.indices[label_valid][:, 0],
                labels=labels[label_valid] if labels is not None else None,
                num_units=config.num_neurons,
            )
            neurons.metrics["top10_share"] = top_k_share(counts, 10)
            neurons.metrics["top50_share"] = top_k_share(counts, 50)
            neurons.metrics["coactivation_strong_pairs"] = float(
                coactivation_strong_pairs(selected, config.num_neurons, threshold=0.8)
            )
            neurons.metrics["context_gate_mean"] = float(routing.context_gate[valid].mean())
            report.update(neurons, prefix=f"layer{i}.neurons.")

            ffn = layer.ffn
            for name in ("coef_A", "coef_B"):
                coef = getattr(ffn, name)
                rows = unit_report(vectors=coef)
                rows.metrics["participation_ratio_mean"] = float(row_participation_ratio(coef).mean())
                # The original's hard count (|c| > 0.1), kept for comparison with its reports.
                rows.metrics["active_entries_mean"] = float((coef.abs() > 0.1).sum(-1).float().mean())
                report.update(rows, prefix=f"layer{i}.{name}.")
            for name in ("basis_A", "basis_B"):
                report.update(unit_report(vectors=getattr(ffn, name)), prefix=f"layer{i}.{name}.")
            mix_a, mix_b = ffn.compose(routing.dense_weights, valid)
            basis_mass = (mix_a.abs() + mix_b.abs())[valid].sum(0)  # (M,)
            share = usage_share(basis_mass)
            report.metrics[f"layer{i}.basis.usage_gini"] = gini(basis_mass)
            report.metrics[f"layer{i}.basis.usage_normalized_entropy"] = normalized_entropy(basis_mass)
            # A basis carrying under a tenth of the uniform share 1/M counts as inactive.
            report.metrics[f"layer{i}.basis.active_count"] = float((share > 0.1 / config.num_basis).sum())
            report.distributions[f"layer{i}.basis.usage_share"] = share.float().cpu()
        for i in range(1, len(usage)):
            report.metrics[f"layers.{i - 1}-{i}.usage_js_divergence"] = jensen_shannon_divergence(
                usage[i - 1], usage[i]
            )
        hidden = out.last_hidden_state[valid]
        report.metrics["hidden.effective_rank_entropy"] = effective_rank_entropy(hidden)
        if "sense" in batch:
            report.metrics["hidden.homonym_separation"] = homonym_separation(
                hidden, input_ids[valid], batch["sense"][valid]
            )
        return report


class DawnModel(TokenStemMixin, DawnPreTrainedModel):
    """Embeddings -> DAWN layers -> final LayerNorm. Causal or bidirectional by ``config.objective``."""

    def __init__(self, config: DawnConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([DawnLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def aux_losses(self, routings: list[DawnRouting], valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The anti-collapse terms with non-zero weight, each averaged over layers and reported minus
        its floor, so 0 is the best any parameter setting can do:

        - ``router_orthogonality``: mean squared off-diagonal cosine of the rows of ``neuron_factors``
          − (N/r_n − 1)/(N − 1);
        - ``coefficient_diversity``: the same on ``coef_A`` and ``coef_B`` (their mean)
          − (N/M − 1)/(N − 1);
        - ``basis_sparsity``: ``support_shortfall`` of ``coef_A`` and ``coef_B`` (their mean) below
          ``min_bases_per_neuron``; floor 0;
        - ``neuron_balance``: the Switch load-balancing loss ``N Σ_i f_i P_i`` over the real tokens
          (``f_i`` share of the selections going to neuron i, ``P_i`` its mean softmax probability
          over all N scores) − 1, its value at perfect balance.

        The Welch floors (N unit vectors in R^r; 0 when N ≤ r) are met exactly by unit-norm tight
        frames (the QR initialisation comes close). Rounding can dip those terms a hair below the
        floor; they are clamped at 0, where the unclamped gradient is zero anyway. The balance term
        is not a bound (f and P could anti-correlate), so it is not clamped.
        """
        config = self.config
        weights = config.aux_loss_weights
        terms: dict[str, torch.Tensor] = {}
        # Every layer's matrices in one stack: one batched call per term instead of one per layer.
        # mean_squared_off_diagonal_cosine and support_shortfall average over the stacked dim.
        if weights["router_orthogonality"]:
            factors = torch.stack([layer.router.neuron_factors for layer in self.layers])  # (L, N, r_n)
            floor = welch_floor(config.num_neurons, config.neuron_rank)
            terms["router_orthogonality"] = (mean_squared_off_diagonal_cosine(factors) - floor).clamp_min(0.0)
        if weights["coefficient_diversity"] or weights["basis_sparsity"]:
            coefs = torch.stack([c for layer in self.layers for c in (layer.ffn.coef_A, layer.ffn.coef_B)])
            if weights["coefficient_diversity"]:
                floor = welch_floor(config.num_neurons, config.num_basis)
                terms["coefficient_diversity"] = (mean_squared_off_diagonal_cosine(coefs) - floor).clamp_min(0.0)
            if weights["basis_sparsity"]:
                terms["basis_sparsity"] = support_shortfall(coefs, config.min_bases_per_neuron)
        if weights["neuron_balance"]:
            terms["neuron_balance"] = (
                torch.stack(
                    [
                        load_balancing_loss(r.scores.softmax(dim=-1), r.dense_weights > 0, attention_mask=valid)
                        for r in routings
                    ]
                ).mean()
                - 1.0
            )
        return terms

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DecollapseModelOutput:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("DAWN keeps no incremental decoding state (no KV cache); call it without a cache.")
        causal = self.config.objective == "causal_lm"
        hidden_states, attn_mask, is_causal = self._embed(input_ids, inputs_embeds, attention_mask, position_ids, 0, causal)
        valid = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None

        all_hidden = [] if output_hidden_states else None
        routings = []
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, routing = layer(hidden_states, attn_mask, is_causal, valid)
            routings.append(routing)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return DecollapseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_losses=self.aux_losses(routings, valid),
        )


class DawnForCausalLM(CausalLMHeadMixin, DawnPreTrainedModel, GenerationMixin):
    def __init__(self, config: DawnConfig):
        if config.objective != "causal_lm":
            raise ValueError(
                f"DawnForCausalLM needs objective='causal_lm', got {config.objective!r}; "
                "use DawnForMaskedLM for 'masked_lm'."
            )
        super().__init__(config)
        self.model = DawnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: every step re-encodes the whole prefix.
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class DawnForMaskedLM(MaskedLMHeadMixin, DawnPreTrainedModel):
    """Bidirectional DAWN (the router's context attention sees the whole sequence) with a BERT-style
    prediction head."""

    def __init__(self, config: DawnConfig):
        if config.objective != "masked_lm":
            raise ValueError(
                f"DawnForMaskedLM needs objective='masked_lm', got {config.objective!r}; "
                "use DawnForCausalLM for 'causal_lm'."
            )
        super().__init__(config)
        self.model = DawnModel(config)
        self._init_masked_lm_head(config)
        self.post_init()
