"""The ``moh`` architecture: Mixture-of-Heads attention in the dense control's pre-LN causal LM.

Reads top to bottom: routing result -> head router -> attention (all heads, weighted heads, or only the
active heads) -> MLP -> block -> pretrained base (collapse report) -> model -> causal-LM head.
``MoHAttention`` takes only a config with the attention and routing fields of ``MoHConfig``, so other
architectures can use it as their attention layer.

What the original (github.com/ryancinsight/RustGPT) got wrong and this file does not: the routing weights
multiply the head outputs inside autograd, so every router parameter and predictor receives the
language-model gradient; the mixing weights α₁/α₂ are applied; heads whose weight is zero are really not
computed; and the "soft" gate keeps a head while the probability mass *before* it is below the
threshold (the original's ``σ((C_i − τ)·T)`` grows down the sorted list, favouring the weakest heads).

Imports only torch, transformers and sibling modules (plus the one configuration import that the Hub
export rewrites to ``from .configuration_moh import MoHConfig``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils.deprecation import deprecate_kwarg

from ..configuration.moh import MoHConfig
from .common import (
    CausalLMHeadMixin,
    DecollapsePreTrainedModel,
    TokenStemMixin,
    causal_lm_loss,
    document_starts,
    selected_first,
)
from .diagnostics import CollapseReport, effective_rank_entropy, gini, normalized_entropy, unit_report
from .outputs import DecollapseModelOutput
from .regularizers import load_balancing_loss, router_z_loss, routing_entropy


# Packed query slots attended per SDPA call on the sparse path (see MoHAttention._active_heads_only).
SLOT_CHUNK = 256
# flex_attention's block size: packed query lengths are rounded up to it, so the compiled kernel meets a
# few shapes rather than one per batch, and the padding adds only blocks it skips.
FLEX_BLOCK = 128
_compiled_flex = None


def _flex_attention():
    """``flex_attention``, compiled once per process where a compiler backend exists for it (CUDA);
    elsewhere the unfused reference, whose "called without torch.compile" warning is expected."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.cuda.is_available():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        return _compiled_flex
    return flex_attention


@dataclass
class HeadRouting:
    """One layer's routing decision for a batch; every tensor is per token, shape (B, T, ...).

    ``weights`` multiply the head outputs (0 = the head is not used); ``active`` is the hard decision.
    ``probs`` / ``logits`` are the router distribution the load-balance, z and entropy terms read
    (the routed heads only for standard MoH) and ``selected`` its hard selection. ``soft_gates`` are the
    adaptive sigmoid gates in (0, 1); ``gates`` are the gates the forward pass used (soft, or hard with
    the soft gradient), which the head budget counts. Predictor outputs are None when absent.
    """

    weights: torch.Tensor  # (B, T, H)
    active: torch.Tensor  # (B, T, H) bool
    probs: torch.Tensor  # (B, T, E)
    logits: torch.Tensor  # (B, T, E)
    selected: torch.Tensor  # (B, T, E) bool
    soft_gates: torch.Tensor | None = None  # (B, T, H)
    gates: torch.Tensor | None = None  # (B, T, H)
    threshold: torch.Tensor | None = None  # (B, T)
    complexity: torch.Tensor | None = None  # (B, T): the predicted head count n_t
    temperature: torch.Tensor | None = None  # (B, T)
    alpha: torch.Tensor | None = None  # (B, T, 2)


class MoHRouter(nn.Module):
    """Per-token head weights for standard MoH (shared + top-k / top-p routed) or adaptive MoH."""

    def __init__(self, config: MoHConfig):
        super().__init__()
        self.config = config
        self.mode = config.routing
        self.num_heads = config.num_attention_heads
        hidden = config.hidden_size
        if self.mode in ("topk", "topp"):
            self.shared = nn.Linear(hidden, config.num_shared_heads, bias=False) if config.num_shared_heads else None
            self.routed = nn.Linear(hidden, config.num_routed_heads, bias=False)
            self.mix = nn.Linear(hidden, 2, bias=False)
        else:
            self.scores = nn.Linear(hidden, self.num_heads, bias=False)
            self.complexity = nn.Linear(hidden, 1) if config.use_complexity_head else None
            self.threshold = nn.Linear(hidden, 1) if config.use_threshold_head else None
            self.temperature = nn.Linear(hidden, 1) if config.use_temperature_head else None
            # Training forwards seen, for the Gumbel temperature schedule; saved with the weights so a
            # resumed run continues the schedule instead of restarting it.
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def reset_predictor_biases(self) -> None:
        """Start each predictor in the middle of the behaviour the config asks for: a uniform router
        then keeps about ``target_head_share`` of the heads, at temperature ``gate_temperature``."""
        c = self.config
        if self.mode != "adaptive":
            return

        def logit(p: float) -> float:
            p = min(max(p, 1e-4), 1 - 1e-4)
            return math.log(p / (1 - p))

        share = c.target_head_share
        if self.complexity is not None:
            # Keeping ranks r < n − ½ keeps round(n) heads: aim n at share·H + ½.
            target = share * self.num_heads + 0.5
            init.constant_(self.complexity.bias, logit((target - c.min_active_heads) / max(c.max_active_heads - c.min_active_heads, 1e-6)))
        if self.threshold is not None:
            # Uniform probabilities put mass r/H before rank r: τ = share keeps share·H heads.
            init.constant_(self.threshold.bias, logit((share - c.threshold_min) / (c.threshold_max - c.threshold_min)))
        if self.temperature is not None:
            span = c.temperature_max - c.temperature_min
            init.constant_(self.temperature.bias, logit((c.gate_temperature - c.temperature_min) / span))

    def forward(self, hidden_states: torch.Tensor) -> HeadRouting:
        # Routing decisions in float32 whatever the autocast dtype.
        if self.mode in ("topk", "topp"):
            return self._standard(hidden_states, torch.float32)
        return self._adaptive(hidden_states, torch.float32)

    def _standard(self, x: torch.Tensor, dtype: torch.dtype) -> HeadRouting:
        c = self.config
        logits = self.routed(x).to(dtype)
        probs = logits.softmax(-1)
        if self.mode == "topk":
            top = probs.topk(c.routing_top_k, dim=-1).indices
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
        else:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < c.routing_top_p  # mass before < p: ≥ 1 head
            selected = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        alpha = self.mix(x).to(dtype).softmax(-1)
        routed_w = alpha[..., 1:] * probs * selected
        parts, active = [routed_w], [selected]
        if self.shared is not None:
            parts.insert(0, alpha[..., :1] * self.shared(x).to(dtype).softmax(-1))
            active.insert(0, torch.ones_like(selected[..., : c.num_shared_heads]))
        weights = (torch.cat(parts, dim=-1) * self.num_heads).to(x.dtype)
        return HeadRouting(
            weights=weights, active=torch.cat(active, dim=-1), probs=probs, logits=logits, selected=selected, alpha=alpha
        )

    def _squash(self, layer: nn.Linear | None, x: torch.Tensor, low: float, high: float, dtype) -> torch.Tensor | None:
        if layer is None:
            return None
        return low + (high - low) * torch.sigmoid(layer(x).to(dtype).squeeze(-1))

    def gumbel_temperature(self) -> float:
        c = self.config
        progress = min(float(self.steps) / c.gumbel_anneal_steps, 1.0)
        return c.gumbel_temperature_start * (c.gumbel_temperature_end / c.gumbel_temperature_start) ** progress

    def _adaptive(self, x: torch.Tensor, dtype: torch.dtype) -> HeadRouting:
        c = self.config
        grad_mode = c.routing_grad
        heads = self.num_heads
        training = self.training and torch.is_grad_enabled()
        if grad_mode == "none":
            # The seed's discrete router: the whole decision is made outside autograd.
            with torch.no_grad():
                routing = self._adaptive_gates(x, dtype, perturb=False)
            routing.gates = routing.active.to(dtype)
            routing.weights = routing.gates.to(x.dtype)
            return routing
        perturb = grad_mode == "gumbel" and training
        routing = self._adaptive_gates(x, dtype, perturb)
        if training:
            self.steps += 1
        probs, soft, active = routing.probs, routing.soft_gates, routing.active
        if grad_mode == "soft":
            # Training uses the soft gate; inference drops the heads whose gate is below ½ (they are
            # then not computed) and keeps the others at their trained weight.
            gate = soft if training else soft * active
        else:  # ste, gumbel: hard forward, the soft gate's gradient backward
            hard = active.to(soft.dtype)
            gate = hard + soft - soft.detach() if training else hard
        routing.gates = gate
        routing.weights = (heads * probs * gate).to(x.dtype)
        return routing

    def _adaptive_gates(self, x: torch.Tensor, dtype: torch.dtype, perturb: bool) -> HeadRouting:
        c = self.config
        heads = self.num_heads
        logits = self.scores(x).to(dtype)
        probs = logits.softmax(-1)
        if perturb:
            # Gumbel top-k: heads are walked in the order of Gumbel-perturbed logits (sampling without
            # replacement from P), the noise scaled by the annealed temperature so exploration fades;
            # the masses and gates still read the clean P. Sharpening P itself instead would make the
            # top head hold all the mass and the threshold keep one head.
            uniform = torch.rand_like(logits).clamp_(1e-9, 1 - 1e-9)
            order = (logits - self.gumbel_temperature() * torch.log(-torch.log(uniform))).argsort(-1, descending=True)
            sorted_probs = probs.gather(-1, order)
        else:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (B, T, H), 0 for the top head
        rank = torch.arange(heads, device=x.device, dtype=dtype)
        threshold = self._squash(self.threshold, x, c.threshold_min, c.threshold_max, dtype)
        complexity = self._squash(self.complexity, x, c.min_active_heads, c.max_active_heads, dtype)
        temperature = self._squash(self.temperature, x, c.temperature_min, c.temperature_max, dtype)
        temp = temperature.unsqueeze(-1) if temperature is not None else c.gate_temperature
        soft_sorted = torch.ones_like(sorted_probs)
        keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
        if threshold is not None:
            margin = threshold.unsqueeze(-1) - mass_before
            soft_sorted = soft_sorted * torch.sigmoid(margin * temp)
            keep_sorted &= margin > 0
        if complexity is not None:
            # Ranks are divided by H so both gates read the same temperature on a [0, 1] scale.
            margin = (complexity.unsqueeze(-1) - rank - 0.5) / heads
            soft_sorted = soft_sorted * torch.sigmoid(margin * temp)
            keep_sorted &= margin > 0
        # Back from sorted order to head order (scatter is differentiable in its source).
        soft = torch.zeros_like(soft_sorted).scatter(-1, order, soft_sorted)
        active = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return HeadRouting(
            weights=soft,  # replaced by the caller
            active=active,
            probs=probs,
            logits=logits,
            selected=active,
            soft_gates=soft,
            threshold=threshold,
            complexity=complexity,
            temperature=temperature,
        )


class MoHAttention(nn.Module):
    """Grouped-query attention whose heads are weighted (and skipped) per token by ``MoHRouter``.

    ``routing="all"`` has no router and is ordinary MHA / GQA. Otherwise each head's output is
    multiplied by its weight before the output projection, inside autograd. Without gradient (or in
    training for selections that allow it, see ``skip_inactive_heads``) only the (token, head) pairs
    with a non-zero weight are attended: per head, the active queries of every sequence are packed and
    attend to their sequence's keys in one batched SDPA call (a loop over heads, never over tokens).
    Keys and values are computed for every token, since any later token may need them.
    """

    def __init__(self, config: MoHConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.skip_inactive = config.skip_inactive_heads
        self.skip_kernel = config.skip_kernel
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden)
        self.router = MoHRouter(config) if config.routing != "all" else None

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, C)
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, HeadRouting | None]:
        """Returns the attention output (B, T, C), the unweighted head outputs (B, T, H, d) when every
        head was computed (None on the sparse path) and the routing (None for ``"all"``)."""
        batch, seq_len, _ = hidden_states.shape
        routing = self.router(hidden_states) if self.router is not None else None
        key = self.k_proj(hidden_states).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past_len = 0
        if cache is not None:
            past_len = cache.get_seq_length(self.layer_idx)
            key, value = cache.update(key, value, self.layer_idx)
        if routing is not None and self._skips(routing):
            skip = self._active_heads_flex if self.skip_kernel == "flex" else self._active_heads_only
            out = skip(hidden_states, key, value, routing, attn_mask, is_causal, past_len)
            return out, None, routing

        query = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        heads = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        ).transpose(1, 2)  # (B, T, H, d)
        weighted = heads if routing is None else heads * routing.weights.unsqueeze(-1)
        return self.o_proj(weighted.reshape(batch, seq_len, -1)), heads, routing

    def _skips(self, routing: HeadRouting) -> bool:
        if self.skip_inactive == "never":
            return False
        if self.skip_inactive == "inference":
            return not torch.is_grad_enabled()
        return True  # "always": the config only allows it where no backward needs a dropped head

    def _active_heads_only(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor,  # (B, n_kv, K, d)
        value: torch.Tensor,
        routing: HeadRouting,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        past_len: int,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        weights = routing.weights.masked_fill(~routing.active, 0)  # (B, T, H)
        active = weights != 0
        # The projections stay dense (one GEMM each, a small share of the layer once T is long); what
        # is skipped is the attention of every inactive (token, head) pair, the part that grows with T.
        query = self.q_proj(hidden_states).view(batch, seq_len, heads, dim)
        # Per sequence and head: the positions of its active tokens first, in time order.
        order = selected_first(active)  # (B, T, H)
        # Each head is packed to its own longest sequence, not to the longest over all heads, so an
        # unpopular head does not pay for a popular one (one host sync for the counts).
        slots = active.sum(1).amax(0).tolist()  # (H,)
        k_len = key.shape[-2]
        group = heads // self.num_kv_heads
        out_heads = hidden_states.new_zeros(heads, batch, seq_len, dim)
        # The causal/padding mask once per call, additive (the CPU kernels take a float mask far faster
        # than a boolean one); each packed query then copies its own row.
        bias_rows = None
        if attn_mask is not None:
            bias_rows = torch.zeros(attn_mask.shape[0], seq_len, k_len, dtype=query.dtype, device=query.device)
            bias_rows.masked_fill_(~attn_mask[:, 0].expand(-1, seq_len, k_len), float("-inf"))
        elif is_causal:
            future = torch.arange(k_len, device=query.device) > torch.arange(past_len, past_len + seq_len, device=query.device).unsqueeze(-1)
            bias_rows = torch.zeros(1, seq_len, k_len, dtype=query.dtype, device=query.device).masked_fill_(future, float("-inf"))
        for h, n in enumerate(slots):
            kv = slice(h // group, h // group + 1)
            # Packed queries are in time order, so a chunk of slots needs keys only up to its latest
            # position: the keys no query of the chunk may see are never scored.
            for start in range(0, n, SLOT_CHUNK):
                index = order[:, start : min(start + SLOT_CHUNK, n), h]  # (B, c); tail slots: inactive tokens
                keys = k_len
                bias = None
                if bias_rows is not None:  # causal or padded: no query sees past its own position
                    keys = min(int(index.max()) + 1 + past_len, k_len)
                    if bias_rows.shape[0] == 1:
                        bias = bias_rows[0, :, :keys][index]  # (B, c, keys): whole rows copied
                    else:
                        bias = bias_rows[:, :, :keys][torch.arange(batch, device=index.device).unsqueeze(-1), index]
                    bias = bias.unsqueeze(1)
                packed_q = query[:, :, h].gather(1, index.unsqueeze(-1).expand(-1, -1, dim))
                attended = F.scaled_dot_product_attention(
                    packed_q.unsqueeze(1), key[:, kv, :keys], value[:, kv, :keys], attn_mask=bias
                ).squeeze(1)  # (B, c, d)
                # Inactive tokens in the tail slots carry weight 0: they write zeros where zeros are.
                slot_weight = weights[:, :, h].gather(1, index).unsqueeze(-1)
                out_heads[h].scatter_(
                    1, index.unsqueeze(-1).expand(-1, -1, dim), (attended * slot_weight).to(out_heads.dtype)
                )
        return self.o_proj(out_heads.permute(1, 2, 0, 3).reshape(batch, seq_len, heads * dim))

    def _active_heads_flex(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor,  # (B, n_kv, K, d)
        value: torch.Tensor,
        routing: HeadRouting,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        past_len: int,
    ) -> torch.Tensor:
        """The skipped path as one ``flex_attention`` call: each head's active queries packed to the
        front in time order (as in :meth:`_active_heads_only`), and a block mask allowing packed query
        i of head h only what its token may see. Query blocks past a head's active count hold no
        allowed pair and key blocks after a block's latest query none either: the kernel skips both."""
        from torch.nn.attention.flex_attention import create_block_mask

        batch, seq_len, _ = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        weights = routing.weights.masked_fill(~routing.active, 0)  # (B, T, H)
        active = weights != 0
        query = self.q_proj(hidden_states).view(batch, seq_len, heads, dim)
        order = selected_first(active)  # (B, T, H)
        counts = active.sum(1)  # (B, H)
        slots = max(int(counts.max()), 1)
        padded = -(-slots // FLEX_BLOCK) * FLEX_BLOCK
        index = order[:, :slots]  # (B, S, H): tail slots of a head are its inactive tokens
        packed = query.gather(1, index.unsqueeze(-1).expand(-1, -1, -1, dim)).permute(0, 2, 1, 3)  # (B, H, S, d)
        packed = F.pad(packed, (0, 0, 0, padded - slots))
        token = F.pad(index.permute(0, 2, 1), (0, padded - slots))  # (B, H, S') the token each slot holds
        k_len = key.shape[-2]
        # Causal, padding and packed documents, as the dense path sees them; (1, ...) masks broadcast.
        allowed = attn_mask.expand(batch, -1, -1, -1) if attn_mask is not None else None

        def mask_mod(b, h, q, kv):
            mine = q < counts[b, h]
            if allowed is not None:
                return mine & allowed[b, 0, token[b, h, q], kv]
            if is_causal:
                return mine & (kv <= token[b, h, q] + past_len)
            return mine

        block_mask = create_block_mask(mask_mod, batch, heads, padded, k_len, device=query.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            attended = _flex_attention()(
                packed, key, value, block_mask=block_mask, enable_gqa=self.num_kv_heads != heads
            )[:, :, :slots]  # (B, H, S, d); a slot with nothing allowed comes back as zeros
        slot_weight = weights.gather(1, index).permute(0, 2, 1).unsqueeze(-1)  # (B, H, S, 1), 0 in tail slots
        out_heads = hidden_states.new_zeros(batch, heads, seq_len, dim)
        out_heads.scatter_(2, index.permute(0, 2, 1).unsqueeze(-1).expand(-1, -1, -1, dim),
                           (attended * slot_weight).to(out_heads.dtype))
        return self.o_proj(out_heads.transpose(1, 2).reshape(batch, seq_len, heads * dim))

    def head_contributions(self, heads: torch.Tensor) -> torch.Tensor:
        """What each head writes into the residual stream at weight 1: (B, T, H, d) -> (B, T, H, C)."""
        weight = self.o_proj.weight.view(-1, self.num_heads, self.head_dim)  # (C, H, d)
        return torch.einsum("bthd,chd->bthc", heads, weight)


class MoHMLP(nn.Module):
    def __init__(self, config: MoHConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(hidden_states), approximate="tanh"))


class MoHBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: MoHConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = MoHAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MoHMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attn_mask, is_causal, cache=None):
        attn_out, heads, routing = self.attn(self.attn_norm(hidden_states), attn_mask, is_causal, cache)
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, heads, routing


def routing_losses(routings: list[HeadRouting], valid: torch.Tensor | None, config: MoHConfig) -> dict[str, torch.Tensor]:
    """The auxiliary terms, averaged over layers, on real tokens only (``valid``: (B, T) or None).

    - ``load_balance``: Switch ``E Σ_e f_e P̄_e`` of the router (routed heads for standard MoH);
    - ``router_z``: ``mean_t (log Σ_e exp l_te)²``; ``router_entropy``: ``mean_t −Σ_e p_te log p_te``;
    - ``head_budget`` (adaptive): ``|mean_t Σ_i g_ti / H − target_head_share|`` with ``g`` the gates
      the forward pass used: soft for ``"soft"``, the hard count (soft gradient) for ``"ste"`` and
      ``"gumbel"``, so the budget binds on the heads actually used.
    """
    if not routings:
        return {}
    weights = config.aux_loss_weights
    terms: dict[str, list[torch.Tensor]] = {name: [] for name, w in weights.items() if w}
    for r in routings:
        if "load_balance" in terms:
            terms["load_balance"].append(load_balancing_loss(r.probs, r.selected, attention_mask=valid))
        if "router_z" in terms:
            terms["router_z"].append(router_z_loss(r.logits, attention_mask=valid))
        if "router_entropy" in terms:
            terms["router_entropy"].append(routing_entropy(r.probs, attention_mask=valid))
        if "head_budget" in terms and r.gates is not None:
            share = r.gates.sum(-1) / r.gates.shape[-1]  # (B, T)
            if valid is not None:
                share = share[valid]
            terms["head_budget"].append((share.float().mean() - config.target_head_share).abs())
    return {name: torch.stack(values).mean() for name, values in terms.items() if values}


class MoHPreTrainedModel(DecollapsePreTrainedModel):
    config_class = MoHConfig
    config: MoHConfig
    _no_split_modules = ["MoHBlock"]
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    collapse_headline = {
        "active heads / token (mean)": ("layer*.routing.active_heads_mean", "mean"),
        "head usage Gini (max layer)": ("layer*.heads.gini", "max"),
        "head mean |cos| (max layer)": ("layer*.heads.mean_abs_cosine", "max"),
        "router LM grad (min layer)": ("layer*.grad_norm.router", "min"),
        "predictor LM grad (min layer)": ("layer*.grad_norm.predictors", "min"),
        "heads LM grad (mean)": ("layer*.grad_norm.heads", "mean"),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (MoHAttention, MoHMLP)):
            # GPT-2's residual scaling, as in the dense control.
            std = self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5
            proj = module.o_proj if isinstance(module, MoHAttention) else module.down_proj
            init.normal_(proj.weight, mean=0.0, std=std)
        if isinstance(module, MoHRouter):
            module.reset_predictor_biases()
            if module.mode == "adaptive":
                init.zeros_(module.steps)

    def collapse_report(self, batch: dict[str, torch.Tensor]) -> CollapseReport:
        """Per layer: the heads (what each writes into the residual stream, computed for every head;
        usage share, Gini and entropy of the hard selections), the routing (active heads per token as a
        hard count and as Σ weights, router entropy, load balance, the predicted threshold / head count /
        temperature distributions) and the language-model gradient norm reaching the heads, the router
        and each predictor (task loss only, on this batch, with training-mode routing)."""
        base: MoHModel = self.base_model
        was_training = self.training
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        captured: dict[int, tuple] = {}
        hooks = [
            layer.attn.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
            for i, layer in enumerate(base.layers)
        ]
        skip_modes = [layer.attn.skip_inactive for layer in base.layers]
        try:
            self.eval()
            for layer in base.layers:
                layer.attn.skip_inactive = "never"  # every head's output, for the head similarity
            with torch.no_grad():
                out = base(input_ids=input_ids, attention_mask=mask, position_ids=batch.get("position_ids"))
        finally:
            for hook in hooks:
                hook.remove()
            for layer, skip in zip(base.layers, skip_modes):
                layer.attn.skip_inactive = skip
            self.train(was_training)

        report = CollapseReport()
        heads = self.config.num_attention_heads
        for i, layer in enumerate(base.layers):
            _, head_out, routing = captured[i]
            contrib = layer.attn.head_contributions(head_out.detach())[valid]  # (N, H, C)
            active = routing.active[valid] if routing is not None else torch.ones(contrib.shape[:2], dtype=torch.bool)
            report.update(
                unit_report(vectors=contrib.permute(1, 0, 2).reshape(heads, -1), counts=active.sum(0)),
                prefix=f"layer{i}.heads.",
            )
            report.update(self._routing_report(routing, valid), prefix=f"layer{i}.routing.")
        report.metrics["hidden.effective_rank_entropy"] = effective_rank_entropy(out.last_hidden_state[valid])
        report.update(self._gradient_report(input_ids, mask, batch.get("position_ids")))
        return report

    @torch.no_grad()
    def _routing_report(self, routing: HeadRouting | None, valid: torch.Tensor) -> CollapseReport:
        report = CollapseReport()
        heads = self.config.num_attention_heads
        if routing is None:
            report.metrics.update({"active_heads_mean": float(heads), "active_share": 1.0, "weight_sum_mean": float(heads)})
            return report
        active = routing.active[valid].float()  # (N, H)
        count = active.sum(-1)
        probs = routing.probs[valid].float()
        report.metrics.update(
            {
                "active_heads_mean": float(count.mean()),
                "active_heads_min": float(count.min()),
                "active_heads_max": float(count.max()),
                "active_share": float(count.mean()) / heads,
                "weight_sum_mean": float(routing.weights[valid].float().sum(-1).mean()),
                "router_entropy": float(routing_entropy(probs)),
                "router_entropy_normalized": float(routing_entropy(probs)) / math.log(probs.shape[-1])
                if probs.shape[-1] > 1
                else 0.0,
                "load_balance": float(load_balancing_loss(probs, routing.selected[valid])),
                "active_count_gini": gini(count),
                "active_count_entropy": normalized_entropy(torch.bincount(count.long(), minlength=heads + 1).float()),
            }
        )
        report.distributions["active_heads"] = count.cpu()
        if routing.soft_gates is not None:
            report.metrics["soft_count_mean"] = float(routing.soft_gates[valid].float().sum(-1).mean())
        if routing.alpha is not None:
            report.metrics["alpha_shared_mean"] = float(routing.alpha[valid][:, 0].mean())
        for name in ("threshold", "complexity", "temperature"):
            value = getattr(routing, name)
            if value is None:
                continue
            v = value[valid].float()
            report.metrics.update(
                {f"{name}_mean": float(v.mean()), f"{name}_std": float(v.std(unbiased=False)),
                 f"{name}_min": float(v.min()), f"{name}_max": float(v.max())}
            )
            report.distributions[name] = v.cpu()
        return report

    def _gradient_report(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> CollapseReport:
        """L2 norm of d(task loss)/d(parameters) per layer and part. Runs a training-mode forward (the
        routing training uses) with a fixed RNG, restores every ``.grad`` and the Gumbel step counters,
        so the report leaves the model exactly as it found it."""
        base: MoHModel = self.base_model
        params = list(self.parameters())
        saved_grads = [p.grad for p in params]
        step_buffers = [b for name, b in self.named_buffers() if name.endswith("steps")]
        saved_steps = [b.clone() for b in step_buffers]
        was_training = self.training
        labels = input_ids.masked_fill(mask == 0, -100) if mask is not None else input_ids
        if position_ids is not None:  # packed documents: no document is scored on the one before it
            labels = labels.masked_fill(document_starts(position_ids), -100)
        report = CollapseReport()
        try:
            for p in params:
                p.grad = None
            self.train()
            with torch.enable_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                out = base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
                loss = causal_lm_loss(self.get_output_embeddings()(out.last_hidden_state), labels)
                loss.backward()
            for i, layer in enumerate(base.layers):
                attn = layer.attn
                parts = {"heads": [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]}
                router = attn.router
                if router is not None:
                    if router.mode == "adaptive":
                        parts["router"] = [router.scores]
                        predictors = {n: getattr(router, n) for n in ("complexity", "threshold", "temperature")}
                        predictors = {n: m for n, m in predictors.items() if m is not None}
                        parts.update({n: [m] for n, m in predictors.items()})
                        parts["predictors"] = list(predictors.values())
                    else:
                        parts["router"] = [m for m in (router.shared, router.routed, router.mix) if m is not None]
                for name, modules in parts.items():
                    grads = [p.grad.float() for m in modules for p in m.parameters() if p.grad is not None]
                    norm = torch.sqrt(sum((g**2).sum() for g in grads)) if grads else torch.tensor(0.0)
                    report.metrics[f"layer{i}.grad_norm.{name}"] = float(norm)
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g
            for b, saved in zip(step_buffers, saved_steps):
                b.copy_(saved)
            self.train(was_training)
        return report


class MoHModel(TokenStemMixin, MoHPreTrainedModel):
    """Embeddings -> pre-LN MoH blocks -> final LayerNorm (causal)."""

    def __init__(self, config: MoHConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([MoHBlock(config, i) for i in range(config.num_hidden_layers)])
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
        use_cache = (use_cache if use_cache is not None else self.config.use_cache) and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        hidden_states, attn_mask, is_causal = self._embed(
            input_ids, inputs_embeds, attention_mask, position_ids, past_len, True
        )
        seq_len = hidden_states.shape[1]
        all_hidden = [] if output_hidden_states else None
        routings = []
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, _, routing = layer(hidden_states, attn_mask, is_causal, cache)
            if routing is not None:
                routings.append(routing)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)

        valid = attention_mask[:, -seq_len:].bool() if attention_mask is not None else None
        return DecollapseModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_losses=routing_losses(routings, valid, self.config),
        )


class MoHForCausalLM(CausalLMHeadMixin, MoHPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoHConfig):
        super().__init__(config)
        self.model = MoHModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
