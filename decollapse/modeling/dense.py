"""The ``dense`` control architecture: a plain pre-LN transformer (GPT-2 layout, SDPA attention,
learned absolute positions, tied embeddings). Every decollapse experiment compares to it.

Reads top to bottom: attention -> MLP -> block -> pretrained base -> model -> LM heads.
Imports only torch, transformers and sibling modules (plus the one configuration import that the Hub
export rewrites to ``from .configuration_dense import DenseConfig``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils.deprecation import deprecate_kwarg

from ..configuration.dense import DenseConfig
from .common import (
    CausalLMHeadMixin,
    DecollapsePreTrainedModel,
    MaskedLMHeadMixin,
    TokenStemMixin,
)
from .diagnostics import CollapseReport, effective_rank_entropy, homonym_separation, unit_report
from .outputs import DecollapseModelOutput
from .regularizers import mean_squared_off_diagonal_cosine


class DenseAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and PyTorch SDPA."""

    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, C)
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq_len, width = hidden_states.shape
        # Splitting along the last dimension keeps the backward to a single concatenation.
        query, key, value = (
            part.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
            for part in self.qkv_proj(hidden_states).split(width, dim=-1)
        )
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        heads = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        heads = heads.transpose(1, 2)  # (B, T, nh, hd)
        return self.o_proj(heads.reshape(batch, seq_len, width)), heads

    def head_contributions(self, heads: torch.Tensor) -> torch.Tensor:
        """What each head writes into the residual stream: (B, T, nh, hd) -> (B, T, nh, C).

        Heads live in different bases before the output projection, so they are only comparable after
        it: head h contributes ``heads[..., h, :] @ W_o[:, h]ᵀ``.
        """
        weight = self.o_proj.weight.view(-1, self.num_heads, self.head_dim)  # (C, nh, hd)
        return torch.einsum("bthd,chd->bthc", heads, weight)


class DenseMLP(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # tanh-approximate GELU, as GPT-2, so the throughput benchmark compares like with like.
        return self.down_proj(F.gelu(self.up_proj(hidden_states), approximate="tanh"))


class DenseBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = DenseAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DenseMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attn_mask, is_causal, cache=None):
        attn_out, heads = self.attn(self.attn_norm(hidden_states), attn_mask, is_causal, cache)
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, heads


class DensePreTrainedModel(DecollapsePreTrainedModel):
    config_class = DenseConfig
    config: DenseConfig
    _no_split_modules = ["DenseBlock"]
    lora_target_modules = ["qkv_proj", "o_proj"]
    collapse_headline = {
        "head mean |cos| (max layer)": ("layer*.heads.mean_abs_cosine", "max"),
        "dead MLP neurons (max layer)": ("layer*.neurons.dead_share", "max"),
        "hidden erank": ("hidden.effective_rank_entropy", "mean"),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # GPT-2's residual scaling: each block adds two residual branches, so their output projections
        # start 1/sqrt(2 * layers) smaller to keep the residual stream's variance flat with depth.
        if isinstance(module, (DenseAttention, DenseMLP)):
            std = self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5
            proj = module.o_proj if isinstance(module, DenseAttention) else module.down_proj
            nn.init.normal_(proj.weight, mean=0.0, std=std)

    @torch.no_grad()
    def collapse_report(self, batch: dict[str, torch.Tensor]) -> CollapseReport:
        """Units of the control model: attention heads (what they write into the residual stream),
        MLP neurons (activation patterns, usage, dead share, MI of the most active neuron with the
        ``domain`` labels when given) and the final hidden states (effective rank, homonym separation
        when ``sense`` labels are given)."""
        base: DenseModel = self.base_model
        was_training = self.training
        self.eval()
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        # Hooks read what the diagnostics need, so forward() carries no diagnostics-only options.
        neuron_acts: dict[int, torch.Tensor] = {}
        head_outputs: dict[int, torch.Tensor] = {}
        hooks = []
        for i, layer in enumerate(base.layers):
            hooks.append(
                layer.mlp.down_proj.register_forward_hook(
                    lambda mod, args, out, i=i: neuron_acts.__setitem__(i, args[0].detach())
                )
            )
            hooks.append(
                layer.attn.register_forward_hook(lambda mod, args, out, i=i: head_outputs.__setitem__(i, out[1]))
            )
        try:
            out = base(input_ids=input_ids, attention_mask=mask, position_ids=batch.get("position_ids"))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)

        report = CollapseReport()
        labels = batch.get("domain")
        label_valid = valid & (labels >= 0) if labels is not None else valid
        for i, layer in enumerate(base.layers):
            contrib = layer.attn.head_contributions(head_outputs[i])[valid]  # (N, nh, C)
            head_vectors = contrib.permute(1, 0, 2).reshape(contrib.size(1), -1)  # (nh, N * C)
            report.update(unit_report(vectors=head_vectors), prefix=f"layer{i}.heads.")
            acts = neuron_acts[i][label_valid]  # (N, I)
            report.update(
                unit_report(
                    vectors=acts.T,
                    counts=(acts > 0).sum(0),
                    assignments=acts.argmax(-1),
                    labels=labels[label_valid] if labels is not None else None,
                ),
                prefix=f"layer{i}.neurons.",
            )
        hidden = out.last_hidden_state[valid]
        report.metrics["hidden.effective_rank_entropy"] = effective_rank_entropy(hidden)
        if "sense" in batch:
            report.metrics["hidden.homonym_separation"] = homonym_separation(
                hidden, input_ids[valid], batch["sense"][valid]
            )
        return report


class DenseModel(TokenStemMixin, DensePreTrainedModel):
    """Embeddings -> pre-LN blocks -> final LayerNorm. Causal or bidirectional by ``config.objective``."""

    def __init__(self, config: DenseConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([DenseBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

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
        **kwargs,  # e.g. a BERT tokenizer's token_type_ids: no segment embeddings here, as in Llama
    ) -> DecollapseModelOutput:
        causal = self.config.objective == "causal_lm"
        # A cache only serves generation; filling one during training is pure overhead.
        use_cache = (use_cache if use_cache is not None else self.config.use_cache) and causal and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        hidden_states, attn_mask, is_causal = self._embed(
            input_ids, inputs_embeds, attention_mask, position_ids, past_len, causal
        )
        seq_len = hidden_states.shape[1]
        all_hidden = [] if output_hidden_states else None
        aux_terms = []
        want_head_sim = self.config.head_diversity_weight > 0
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, heads = layer(hidden_states, attn_mask, is_causal, cache)
            if want_head_sim:
                contrib = layer.attn.head_contributions(heads)  # (B, T, nh, C)
                if attention_mask is not None:
                    contrib = contrib[attention_mask[:, -seq_len:].bool()]
                aux_terms.append(mean_squared_off_diagonal_cosine(contrib))
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)

        aux_losses = {"head_similarity": torch.stack(aux_terms).mean()} if aux_terms else {}
        return DecollapseModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_losses=aux_losses,
        )


class DenseForCausalLM(CausalLMHeadMixin, DensePreTrainedModel, GenerationMixin):
    def __init__(self, config: DenseConfig):
        if config.objective != "causal_lm":
            raise ValueError(
                f"DenseForCausalLM needs objective='causal_lm', got {config.objective!r}; "
                "use DenseForMaskedLM for 'masked_lm'."
            )
        super().__init__(config)
        self.model = DenseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class DenseForMaskedLM(MaskedLMHeadMixin, DensePreTrainedModel):
    """Bidirectional encoder with a BERT-style prediction head (transform -> tied decoder)."""

    def __init__(self, config: DenseConfig):
        if config.objective != "masked_lm":
            raise ValueError(
                f"DenseForMaskedLM needs objective='masked_lm', got {config.objective!r}; "
                "use DenseForCausalLM for 'causal_lm'."
            )
        super().__init__(config)
        self.model = DenseModel(config)
        self._init_masked_lm_head(config)
        self.post_init()
