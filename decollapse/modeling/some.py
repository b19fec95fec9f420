"""The ``some`` architecture: a Self-Organizing Mixture of Experts ("learning as routing").

Each block is the dense control's attention followed by a SoME layer. The layer's experts are small
FFNs frozen at their random initialisation; a trainable query network maps each token to a unit query,
the ``num_experts_per_tok`` experts whose keys score highest run, and their outputs are mixed by a softmax
of the scores. The key store is state, not a parameter: once per optimizer step, "Knowledge Gravity" moves it
from that step's routing statistics (attraction α, co-activation β, forgetting δ). Two controls ask
whether the heuristics matter: keys trained by gradient (an ordinary learned router) and keys that
never move; an optional auxiliary-loss-free balancer (DeepSeek-V3's sign-of-load bias) is the
non-gradient baseline.

Who moves the keys: ``model.after_optimizer_step()`` applies the pending update. ``DecollapseTrainer``
calls it after every optimizer step (``decollapse.trainers.StepUpdateCallback``); with a plain
``transformers.Trainer``, add a callback whose ``on_optimizer_step`` calls it. Under data parallelism
every process reduces the statistics of all processes before applying them, so the key stores stay
identical (DDP's buffer broadcast then copies equal values).

Reads top to bottom: experts -> router (with Knowledge Gravity) -> SoME layer -> block -> pretrained
base -> model -> LM heads. Imports only torch, transformers and sibling modules.

References: the SoME public implementation (github.com/TesterSim2/Self-Organizing-Mixture-of-Experts-SoME-,
notebooks v2-v7); Wang et al. 2024 (arXiv:2408.15664) for the balancer; van den Oord et al. 2017 and
Dhariwal et al. 2020 (Jukebox) for the dead-code restart of a vector-quantisation codebook.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from ..configuration.some import SomeConfig
from .common import CausalLMHeadMixin, DecollapsePreTrainedModel, MaskedLMHeadMixin, TokenStemMixin
from .dense import DenseAttention
from .diagnostics import (
    CollapseReport,
    gini,
    max_violation,
    normalized_mutual_information,
    silhouette_score,
    unit_report,
    usage_counts,
)
from .outputs import DecollapseModelOutput

logger = logging.get_logger(__name__)

# A router that has accumulated this many training forwards without an update is being trained by a
# loop that never calls after_optimizer_step(): its keys are not moving. Warned once.
_STALE_FORWARDS = 1000


# On CPU, ``grouped_mm`` runs one small matmul per expert (8 µs each in ``benchmarks/throughput.py some
# --profile``), so one ``bmm`` over a zero-padded (N, capacity, d) tensor is faster until the padding
# outweighs the real rows several times over. A collapsed router (one expert taking most tokens) would
# make that tensor huge, so past this factor the grouped path runs.
_MAX_PADDING_FACTOR = 4


class _PaddedExpertFFN(torch.autograd.Function):
    """The frozen experts' FFN for every (token, expert) pair on a zero-padded ``(N, capacity, ·)`` layout,
    with a hand-written backward for the input only (the experts are frozen).

    Pair ``p`` (token ``p // k``) sits at row ``slots[p]`` of the flattened layout; the slots are unique,
    so moving rows in and out is an ``index_copy`` / ``index_select`` both ways, where autograd's
    versions of the same ops would scatter-add. The padding rows compute ``gelu(b1)``, which no pair reads.
    """

    @staticmethod
    def forward(ctx, hidden_states, slots, k, capacity, up_proj, up_bias, down_proj, down_bias):
        n, width = up_proj.shape[0], hidden_states.shape[-1]
        pairs = hidden_states.unsqueeze(1).expand(-1, k, -1).reshape(-1, width)
        padded = pairs.new_zeros(n * capacity, width).index_copy_(0, slots, pairs).view(n, capacity, width)
        # In the inputs' dtype, as the backward (which autocast never reaches) will be.
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            pre = torch.baddbmm(up_bias.unsqueeze(1), padded, up_proj)
            out = torch.baddbmm(down_bias.unsqueeze(1), F.gelu(pre, approximate="tanh"), down_proj)
        ctx.save_for_backward(slots, pre, up_proj, down_proj)
        ctx.k = k
        return out.view(n * capacity, -1).index_select(0, slots)

    @staticmethod
    def backward(ctx, grad):
        slots, pre, up_proj, down_proj = ctx.saved_tensors
        n, capacity, _ = pre.shape
        padded = grad.new_zeros(n * capacity, grad.shape[-1]).index_copy_(0, slots, grad).view(n, capacity, -1)
        grad_pre = torch.ops.aten.gelu_backward(padded.bmm(down_proj.transpose(1, 2)), pre, approximate="tanh")
        grad_pairs = grad_pre.bmm(up_proj.transpose(1, 2)).view(n * capacity, -1).index_select(0, slots)
        grad_tokens = grad_pairs.view(-1, ctx.k, grad_pairs.shape[-1]).sum(1)
        return grad_tokens, None, None, None, None, None, None, None


class SomeExperts(nn.Module):
    """``num_experts`` frozen FFNs ``E_i(x) = W2_i · gelu(W1_i · x + b1_i) + b2_i``, computed for the
    selected (token, expert) pairs only.

    Each projection is one batched matmul over all experts, no Python loop over tokens or experts and no
    work for the experts a token was not routed to: a ``bmm`` over the pairs laid out in a zero-padded
    ``(N, capacity, ·)`` tensor (:class:`_PaddedExpertFFN`), or, where padding would cost more than it
    saves, one ``grouped_mm`` over the pairs sorted by expert (a real kernel on CUDA in bfloat16).
    Weights are stored input-major (``W1: N × d × d_ffn``), the layout both read.
    """

    def __init__(self, config: SomeConfig):
        super().__init__()
        n, d, f = config.num_experts, config.hidden_size, config.expert_intermediate_size
        self.num_experts = n
        # Parameters (saved, moved by .to(), counted) that never train: the "knowledge" is frozen.
        self.up_proj = nn.Parameter(torch.empty(n, d, f), requires_grad=False)
        self.up_bias = nn.Parameter(torch.empty(n, f), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, f, d), requires_grad=False)
        self.down_bias = nn.Parameter(torch.empty(n, d), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(n, d) tokens and (n, k) expert ids -> (n, k, d) expert outputs."""
        n_tokens, k = indices.shape
        flat = indices.reshape(-1)  # (P,) pair p = token p // k, slot p % k
        order = torch.argsort(flat, stable=True)
        expert_of = flat[order]
        counts = torch.bincount(flat, minlength=self.num_experts)
        dtype = hidden_states.dtype
        weights = [w.to(dtype) for w in (self.up_proj, self.up_bias, self.down_proj, self.down_bias)]
        if self.uses_padding(counts, dtype, hidden_states.device):
            capacity = int(counts.max())
            starts = counts.cumsum(0) - counts
            rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[expert_of]
            slots = torch.empty_like(order).index_copy_(0, order, expert_of * capacity + rank_in_expert)
            out = _PaddedExpertFFN.apply(hidden_states, slots, k, capacity, *weights)
            return out.view(n_tokens, k, -1)
        up_proj, up_bias, down_proj, down_bias = weights
        offsets = counts.cumsum(0).to(torch.int32)
        inputs = hidden_states.index_select(0, order // k)  # (P, d), grouped by expert
        inner = F.grouped_mm(inputs, up_proj, offs=offsets) + up_bias.index_select(0, expert_of)
        out = F.grouped_mm(F.gelu(inner, approximate="tanh"), down_proj, offs=offsets)
        out = out + down_bias.index_select(0, expert_of)
        return torch.empty_like(out).index_copy(0, order, out).view(n_tokens, k, -1)

    def uses_padding(self, counts: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the padded ``bmm`` (rather than ``grouped_mm``) computes pairs with these per-expert counts."""
        if getattr(F, "grouped_mm", None) is None:
            return True
        if device.type == "cuda" and dtype == torch.bfloat16:
            return False
        total = int(counts.sum())
        return total > 0 and counts.numel() * int(counts.max()) <= _MAX_PADDING_FACTOR * total

    def per_token_parameters(self, k: int) -> int:
        """Parameters one token's forward touches: ``k`` experts' weights and biases."""
        return k * sum(p[0].numel() for p in self.parameters())


@dataclass
class SomeRouting:
    """One layer's routing of a batch: expert ids and gate weights ``(B, T, k)`` and unit queries
    ``(B, T, d_key)`` (float32)."""

    indices: torch.Tensor
    gates: torch.Tensor
    queries: torch.Tensor


class RoutingStatistics:
    """Sufficient statistics of the training forwards since the last key update (float32).

    Sums add up over micro-batches and over processes; the restart candidates are the ``capacity``
    worst-served queries (lowest best score), whose merge keeps the lowest over all of them. Both
    merges give the same result whether a step's batch was seen by one process or split over many.
    Only what the configured update reads is accumulated; the rest stays zero (controls whose keys do
    not move by heuristics keep counts and gate mass only).
    """

    SUMS = ("tokens", "counts", "mass", "query_sum", "weighted_query_sum", "coselection")

    def __init__(self, config: SomeConfig, device: torch.device):
        n, key_size = config.num_experts, config.key_size
        gravity = config.key_update == "gravity"
        self.track_query_sum = gravity and config.use_alpha and config.alpha_rule == "damped_sum"
        self.track_weighted_query_sum = gravity and config.use_alpha and config.alpha_rule == "mean"
        self.track_coselection = gravity and config.use_beta and config.num_experts_per_tok > 1
        self.track_candidates = gravity and config.use_delta and config.forget_rule == "restart"
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float32)  # noqa: E731
        self.tokens = zeros(1)
        self.counts = zeros(n)  # selections of expert i
        self.mass = zeros(n)  # Σ gate weight of expert i
        self.query_sum = zeros(n, key_size)  # Σ q over the tokens expert i served
        self.weighted_query_sum = zeros(n, key_size)  # Σ g · q over the same
        self.coselection = zeros(n, n)  # tokens on which i and j were both selected (i != j)
        self.candidate_scores = torch.full((n,), float("inf"), device=device)
        self.candidates = zeros(n, key_size)

    def add(self, queries: torch.Tensor, best: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> None:
        n = self.counts.numel()
        k = indices.shape[-1]
        flat = indices.reshape(-1)
        self.tokens += queries.shape[0]
        self.counts += torch.bincount(flat, minlength=n).float()
        self.mass.index_add_(0, flat, gates.reshape(-1))
        if self.track_query_sum:
            self.query_sum.index_add_(0, flat, queries.repeat_interleave(k, 0))
        if self.track_weighted_query_sum:
            weighted = gates.unsqueeze(-1) * queries.unsqueeze(1)  # (n, k, dk)
            self.weighted_query_sum.index_add_(0, flat, weighted.reshape(-1, queries.shape[-1]))
        if self.track_coselection:
            # every ordered pair (i, j), i != j, of each token's k experts, counted as one bincount
            rows = indices.unsqueeze(-1).expand(-1, k, k)
            cols = indices.unsqueeze(-2).expand(-1, k, k)
            off_diagonal = ~torch.eye(k, dtype=torch.bool, device=indices.device)
            pairs = (rows * n + cols)[:, off_diagonal]
            self.coselection += torch.bincount(pairs.reshape(-1), minlength=n * n).view(n, n).float()
        if self.track_candidates:
            self.merge_candidates(best, queries)

    def merge_candidates(self, scores: torch.Tensor, queries: torch.Tensor) -> None:
        scores = torch.cat([self.candidate_scores, scores])
        queries = torch.cat([self.candidates, queries])
        keep = torch.argsort(scores, stable=True)[: self.candidate_scores.numel()]
        self.candidate_scores, self.candidates = scores[keep], queries[keep]

    def all_reduce(self) -> None:
        """Sums over every process and the worst-served candidates of all; no-op on one process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        sums = [getattr(self, name) for name in self.SUMS]
        packed = torch.cat([t.reshape(-1) for t in sums])
        dist.all_reduce(packed)
        for name, part in zip(self.SUMS, packed.split([t.numel() for t in sums])):
            setattr(self, name, part.view_as(getattr(self, name)))
        world = dist.get_world_size()
        scores = [torch.empty_like(self.candidate_scores) for _ in range(world)]
        queries = [torch.empty_like(self.candidates) for _ in range(world)]
        dist.all_gather(scores, self.candidate_scores)
        dist.all_gather(queries, self.candidates)
        self.candidate_scores = torch.full_like(self.candidate_scores, float("inf"))
        self.merge_candidates(torch.cat(scores), torch.cat(queries))


def _faiss():
    """The ``faiss`` module, or an ImportError naming the extra. Imported by name so that a Hub copy of
    this file (which may import only torch and transformers) loads without it."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        raise ImportError(
            "SoME key_search with a FAISS index needs faiss: pip install 'decollapse[ann]' (or faiss-cpu), "
            "or set config.key_search='exact'"
        ) from None


class KeySearchIndex:
    """A FAISS index over one router's keys for the top-k search of evaluation and generation.

    Scores are inner products of unit vectors. The balance bias, which the selection adds to every
    score, is one more coordinate: a key ``[k, b]`` against a query ``[q, 1]`` scores ``q · k + b``,
    so the index finds what the exact selection finds. ``stamp`` identifies the keys and bias it was
    built from (their tensors' in-place version counters), so a moved key store is never searched stale.
    """

    def __init__(self, config: SomeConfig, vectors: torch.Tensor, stamp: tuple):
        faiss = _faiss()
        n, width = vectors.shape
        metric = faiss.METRIC_INNER_PRODUCT
        data = vectors.detach().float().cpu().contiguous().numpy()
        if config.key_search == "faiss_flat":
            index = faiss.IndexFlatIP(width)
        elif config.key_search == "faiss_ivf":
            # FAISS wants >= 39 training points per list; 4·sqrt(N) lists is its usual starting point.
            lists = max(1, min(round(4 * n**0.5), n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, metric)
            index.train(data)
            index.nprobe = min(config.key_search_nprobe, lists)
        else:  # faiss_hnsw
            index = faiss.IndexHNSWFlat(width, 32, metric)
            index.hnsw.efSearch = config.key_search_ef
        index.add(data)
        self.index, self.stamp = index, stamp

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(n, width) float32 queries -> (n, k) key ids, -1 where the index found fewer than k."""
        _, found = self.index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(found).to(device=queries.device, dtype=torch.long)


class SomeRouter(nn.Module):
    """Query network, key store and Knowledge Gravity of one SoME layer.

    Routing (per token, float32): ``q = normalize(query(x))``, ``scores = q · Kᵀ``; the k =
    ``num_experts_per_tok`` experts with the highest ``scores`` (+ the balance bias, for selection only) run
    with gates ``softmax(scores of the k / T)``. With k = 1 that softmax is the constant 1 and the query
    network would never get a gradient, so the single gate is the Switch Transformer's
    ``softmax(scores / T)[top_1]`` over all experts instead.

    Buffers (saved in checkpoints, restored by ``from_pretrained`` and ``resume_from_checkpoint``):
    ``key_store`` (a Parameter with ``key_update="gradient"``), ``usage`` (EMA of each expert's share
    of tokens per step; Σ = k), ``balance_bias`` and ``updates`` (key updates applied).
    """

    def __init__(self, config: SomeConfig):
        super().__init__()
        self.config = config
        d, dk, n = config.hidden_size, config.key_size, config.num_experts
        if config.query_network == "linear":
            self.query = nn.Linear(d, dk)
        else:
            hidden = config.query_hidden_size
            self.query = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dk))
        if config.key_update == "gradient":
            self.key_store = nn.Parameter(torch.empty(n, dk))
        else:
            self.register_buffer("key_store", torch.empty(n, dk))
        self.register_buffer("usage", torch.empty(n))
        self.register_buffer("balance_bias", torch.empty(n))
        self.register_buffer("updates", torch.empty((), dtype=torch.long))
        # Plain attributes, not buffers: DDP broadcasts rank 0's buffers before each forward, which
        # would replace every other process's statistics with rank 0's.
        self._pending: RoutingStatistics | None = None
        self._stale_forwards = 0
        self._search_index: KeySearchIndex | None = None  # built on first indexed search, not saved

    def reset_state(self) -> None:
        """Random unit keys, uniform usage, zero bias: the state of a new layer."""
        c = self.config
        init.copy_(self.key_store, F.normalize(torch.randn(c.num_experts, c.key_size), dim=-1))
        init.constant_(self.usage, c.num_experts_per_tok / c.num_experts)
        init.zeros_(self.balance_bias)
        init.zeros_(self.updates)
        self._pending = None

    def keys(self) -> torch.Tensor:
        keys = self.key_store.float()
        # Gradient-trained keys are free parameters; the router reads them on the unit sphere.
        return F.normalize(keys, dim=-1) if self.config.key_update == "gradient" else keys

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        """(n, d) tokens -> (indices (n, k), gates (n, k) float32, queries (n, dk), scores (n, N), or None when
        an index searched the keys)."""
        c = self.config
        # Routing in float32 whatever the autocast dtype: top-k over nearly equal bf16 scores is noise.
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            queries = F.normalize(self.query(hidden_states.float()), dim=-1)
            temperature = c.router_temperature if self.training else c.router_eval_temperature
            if c.key_search != "exact" and not self.training:
                indices = self._indexed_top_k(queries)
                picked = (queries.unsqueeze(1) * self.keys()[indices]).sum(-1)  # exact scores of the found keys
                return indices, torch.softmax(picked / temperature, dim=-1), queries, None
            scores = queries @ self.keys().T  # (n, N)
            selection = scores + self.balance_bias if c.balance == "bias_sign" else scores
            indices = selection.detach().topk(c.num_experts_per_tok, dim=-1).indices
            if c.num_experts_per_tok == 1:
                gates = torch.softmax(scores / temperature, dim=-1).gather(-1, indices)
            else:
                gates = torch.softmax(scores.gather(-1, indices) / temperature, dim=-1)
        if self.training:
            self._accumulate(queries, scores, indices, gates, token_mask)
        return indices, gates, queries, scores

    @torch.no_grad()
    def _indexed_top_k(self, queries: torch.Tensor) -> torch.Tensor:
        """The ``num_experts_per_tok`` best keys of each query by ``config.key_search``'s index (rebuilt
        when the keys, the bias or the search settings changed since it was built)."""
        c = self.config
        stamp = (
            c.key_search, c.key_search_nprobe, c.key_search_ef, c.balance,
            self.key_store._version, self.key_store.data_ptr(), self.balance_bias._version, self.balance_bias.data_ptr(),
        )
        if self._search_index is None or self._search_index.stamp != stamp:
            self._search_index = KeySearchIndex(c, self._search_vectors(), stamp)
        if c.balance == "bias_sign":
            queries = torch.cat([queries, queries.new_ones(queries.shape[0], 1)], dim=-1)
        indices = self._search_index.search(queries, c.num_experts_per_tok)
        missing = (indices < 0).any(-1)
        if bool(missing.any()):
            # An inverted-list search can visit fewer than k keys; those queries fall back to the exact search.
            exact = queries[missing] @ self._search_vectors().T
            indices[missing] = exact.topk(c.num_experts_per_tok, dim=-1).indices
        return indices

    def _search_vectors(self) -> torch.Tensor:
        """Keys as the selection scores them: ``[k, b]`` with the balance bias ``b`` (queries get a 1)."""
        keys = self.keys()
        if self.config.balance != "bias_sign":
            return keys
        return torch.cat([keys, self.balance_bias.float().unsqueeze(-1)], dim=-1)

    @torch.no_grad()
    def _accumulate(self, queries, scores, indices, gates, token_mask) -> None:
        if token_mask is not None:  # padding never counts: not in usage, not in key updates
            queries, scores, indices, gates = (t[token_mask] for t in (queries, scores, indices, gates))
        if self._pending is None:
            self._pending = RoutingStatistics(self.config, queries.device)
        self._pending.add(queries.detach(), scores.max(-1).values, indices, gates.detach())
        self._stale_forwards += 1
        if self._stale_forwards == _STALE_FORWARDS:
            logger.warning_once(
                f"SoME keys have not been updated for {_STALE_FORWARDS} training forwards: call "
                "model.after_optimizer_step() after each optimizer step (DecollapseTrainer does; with a plain "
                "Trainer add decollapse.trainers.StepUpdateCallback)."
            )

    @torch.no_grad()
    def apply_update(self) -> dict[str, float]:
        """One optimizer step's update from the pending statistics of every process: usage EMA,
        Knowledge Gravity (or nothing, for gradient-trained and frozen keys) and the balance bias.
        Returns what happened, for logging: the step's load ``max_violation`` (max ÷ mean load − 1) and,
        with Gravity, ``forgotten`` and ``key_shift``."""
        c = self.config
        stats = self._pending or RoutingStatistics(c, self.usage.device)
        self._pending, self._stale_forwards = None, 0
        stats.all_reduce()  # every process must call this at the same step, with or without tokens
        tokens = float(stats.tokens)
        if tokens == 0:
            return {}
        uniform = c.num_experts_per_tok / c.num_experts
        previous_usage = self.usage.float().clone()
        self.usage.mul_(c.ema_decay).add_((1.0 - c.ema_decay) * stats.counts / tokens)
        load = stats.counts.float()
        logs = {"max_violation": float(load.max() / load.mean() - 1.0)}
        if c.key_update == "gravity":
            keys = self.key_store.float()
            new, moved = keys.clone(), torch.zeros(c.num_experts, dtype=torch.bool, device=keys.device)
            served = stats.counts > 0
            if c.use_alpha and bool(served.any()):
                if c.alpha_rule == "mean":
                    target = stats.weighted_query_sum / stats.mass.clamp_min(1e-12).unsqueeze(-1)
                    step = c.alpha * (target - keys)
                else:  # damped_sum: an online k-means step damped by the expert's usual load
                    damping = c.alpha / (1.0 + previous_usage * tokens)
                    step = damping.unsqueeze(-1) * (stats.query_sum - stats.counts.unsqueeze(-1) * keys)
                new[served] += step[served]
                moved |= served
            partners = stats.coselection.sum(-1)
            if c.use_beta and c.num_experts_per_tok > 1 and bool((partners > 0).any()):
                has = partners > 0
                target = (stats.coselection @ keys) / partners.clamp_min(1.0).unsqueeze(-1)
                new[has] += c.beta * (target - keys)[has]
                moved |= has
            new[moved] = F.normalize(new[moved], dim=-1)
            if c.use_delta:
                forgotten = (self.usage < c.forgetting_threshold * uniform).nonzero().squeeze(-1)
                if c.forget_rule == "restart":
                    available = int(torch.isfinite(stats.candidate_scores).sum())
                    forgotten = forgotten[:available]
                    new[forgotten] = stats.candidates[: forgotten.numel()]
                    self.usage[forgotten] = uniform  # a fresh chance, as a VQ codebook's restarted code
                else:  # shrink: the forgotten key fades and becomes less reachable (public v2)
                    new[forgotten] *= 1.0 - c.delta
            logs["forgotten"] = float(forgotten.numel()) if c.use_delta else 0.0
            logs["key_shift"] = float((new - keys).norm(dim=-1).mean())
            self.key_store.copy_(new.to(self.key_store.dtype))
        if c.balance == "bias_sign":
            self.balance_bias.add_(c.balance_rate * torch.sign(stats.counts.mean() - stats.counts))
        self.updates += 1
        return logs


class SomeLayer(nn.Module):
    """The SoME feed-forward: route each token to ``num_experts_per_tok`` frozen experts, mix their outputs."""

    def __init__(self, config: SomeConfig):
        super().__init__()
        self.router = SomeRouter(config)
        self.experts = SomeExperts(config)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SomeRouting]:
        batch, seq_len, width = hidden_states.shape
        flat = hidden_states.reshape(-1, width)
        mask = token_mask.reshape(-1) if token_mask is not None else None
        indices, gates, queries, _ = self.router(flat, mask)
        outputs = self.experts(flat, indices)  # (n, k, d)
        mixed = (outputs * gates.unsqueeze(-1).to(outputs.dtype)).sum(1)
        routing = SomeRouting(
            indices.view(batch, seq_len, -1),
            gates.view(batch, seq_len, -1),
            queries.view(batch, seq_len, -1),
        )
        return mixed.view(batch, seq_len, width), routing


class SomeBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)) with the dense control's attention, then x + SoME(ln(x))."""

    def __init__(self, config: SomeConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = DenseAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.moe = SomeLayer(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attn_mask, is_causal, cache=None, token_mask=None):
        attn_out, _ = self.attn(self.attn_norm(hidden_states), attn_mask, is_causal, cache)
        hidden_states = hidden_states + self.dropout(attn_out)
        moe_out, routing = self.moe(self.mlp_norm(hidden_states), token_mask)
        return hidden_states + self.dropout(moe_out), routing


class SomePreTrainedModel(DecollapsePreTrainedModel):
    config_class = SomeConfig
    config: SomeConfig
    # The frozen expert library is an FSDP unit of its own (FSDP1 cannot flatten frozen and trained
    # parameters together) and, with the blocks, a ZeRO-3 leaf (DecollapseTrainer marks them).
    _no_split_modules = ["SomeBlock", "SomeExperts"]
    lora_target_modules = ["qkv_proj", "o_proj"]
    collapse_headline = {
        "usage Gini (max layer)": ("layer*.experts.usage_gini", "max"),
        "usage Gini by gate mass (max layer)": ("layer*.experts.usage_gini_mass", "max"),
        "training-load Gini (max layer)": ("layer*.experts.training_usage_gini", "max"),
        "MaxVio (max layer)": ("layer*.experts.max_violation", "max"),
        "dead experts (max layer)": ("layer*.experts.dead_share", "max"),
        "NMI top-1 expert vs domain (mean)": ("layer*.experts.nmi_domain", "mean"),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config
        if isinstance(module, DenseAttention):
            # GPT-2's residual scaling, as in the dense control.
            std = config.initializer_range / (2 * config.num_hidden_layers) ** 0.5
            init.normal_(module.o_proj.weight, mean=0.0, std=std)
        elif isinstance(module, SomeRouter):
            module.reset_state()
        elif isinstance(module, SomeExperts):
            for weight, bias in ((module.up_proj, module.up_bias), (module.down_proj, module.down_bias)):
                init.copy_(weight, _expert_init(config, weight.shape))
                bound = weight.shape[1] ** -0.5  # nn.Linear's bias init: U(±1/√fan_in)
                init.uniform_(bias, -bound, bound)

    def after_optimizer_step(self) -> dict[str, float]:
        """Applies every layer's pending router update (see ``SomeRouter.apply_update``); returns
        ``routing/load_max_violation`` (the step's training load, max ÷ mean − 1, averaged over layers: what
        the balance bias steers) and, with Knowledge Gravity, ``gravity/forgotten`` (experts forgotten this
        step, summed over layers) and ``gravity/key_shift`` (mean distance a key moved, averaged over layers)."""
        logs = [m.apply_update() for m in self.modules() if isinstance(m, SomeRouter)]
        logs = [entry for entry in logs if entry]
        if not logs:
            return {}
        result = {"routing/load_max_violation": sum(entry["max_violation"] for entry in logs) / len(logs)}
        if self.config.key_update == "gravity":
            result["gravity/forgotten"] = sum(entry["forgotten"] for entry in logs)
            result["gravity/key_shift"] = sum(entry["key_shift"] for entry in logs) / len(logs)
        return result

    def num_active_parameters(self) -> int:
        """Parameters one token's forward uses: all but the experts it is not routed to."""
        experts = [m for m in self.modules() if isinstance(m, SomeExperts)]
        library = sum(p.numel() for m in experts for p in m.parameters())
        active = sum(m.per_token_parameters(self.config.num_experts_per_tok) for m in experts)
        return self.num_parameters() - library + active

    @torch.no_grad()
    def collapse_report(self, batch: dict[str, torch.Tensor]) -> CollapseReport:
        """Per layer, group ``experts``: usage share, Gini by count (``usage_gini``) and by gate mass
        (``usage_gini_mass``) on the batch, Gini of the training usage EMA (``training_usage_gini``),
        normalised entropy, dead share, MaxVio (``max_violation``); similarity and effective rank of the
        key store; NMI of each token's top-1 expert with ``domain`` and
        ``word_class`` (when given); the silhouette of the queries grouped by top-1 expert. The key
        store itself, coloured by the domain each expert serves most, is kept for the 2-D map."""
        base: SomeModel = self.base_model
        was_training = self.training
        self.eval()
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        routings: dict[int, SomeRouting] = {}
        hooks = [
            layer.moe.register_forward_hook(lambda mod, args, out, i=i: routings.__setitem__(i, out[1]))
            for i, layer in enumerate(base.layers)
        ]
        try:
            base(input_ids=input_ids, attention_mask=mask, position_ids=batch.get("position_ids"))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)

        report = CollapseReport()
        n = self.config.num_experts
        domain, word_class = batch.get("domain"), batch.get("word_class")
        for i, layer in enumerate(base.layers):
            routing = routings[i]
            indices, gates = routing.indices[valid], routing.gates[valid]  # (n_tokens, k)
            top1 = indices.gather(-1, gates.argmax(-1, keepdim=True)).squeeze(-1)
            counts = usage_counts(indices, n)
            mass = torch.zeros(n, device=gates.device).index_add_(0, indices.reshape(-1), gates.reshape(-1).float())
            keys = layer.moe.router.keys()
            group = unit_report(vectors=keys, counts=counts)
            group.metrics["usage_gini"] = group.metrics["gini"]
            group.metrics["usage_gini_mass"] = gini(mass)
            group.metrics["max_violation"] = max_violation(counts)
            # The training load the balancer steers (usage EMA over the last ~1 / (1 - ema_decay) steps),
            # beside the probe's snapshot: a router that moves every step can be balanced over time and
            # unbalanced at any one moment, and only the snapshot is the model a user runs.
            group.metrics["training_usage_gini"] = gini(layer.moe.router.usage)
            group.metrics["query_silhouette"] = silhouette_score(routing.queries[valid], top1)
            for name, labels in (("domain", domain), ("word_class", word_class)):
                if labels is None:
                    continue
                labelled = labels[valid] >= 0
                group.metrics[f"nmi_{name}"] = normalized_mutual_information(top1[labelled], labels[valid][labelled])
            if domain is not None:
                labelled = domain[valid] >= 0
                group.points["key_store"] = keys
                group.point_labels["key_store"] = _dominant_label(top1[labelled], domain[valid][labelled], n)
            report.update(group, prefix=f"layer{i}.experts.")
        return report


def _expert_init(config: SomeConfig, shape: torch.Size) -> torch.Tensor:
    """Weights of ``shape`` (N, fan_in, fan_out) for the frozen experts, by ``config.init_method``."""
    fan_in = shape[1]
    std = fan_in**-0.5
    if config.init_method == "default":  # nn.Linear's kaiming_uniform(a=√5): U(±1/√fan_in)
        return torch.empty(shape).uniform_(-std, std)
    weights = torch.empty(shape[0], shape[2], shape[1])  # one (fan_out, fan_in) matrix per expert
    for matrix in weights:
        if config.init_method == "orthogonal":
            nn.init.orthogonal_(matrix)
        else:  # sparse: zero a share of each column, the rest normal with std 1/√fan_in
            nn.init.sparse_(matrix, sparsity=config.init_sparsity, std=std)
    return weights.transpose(1, 2).contiguous()


def _dominant_label(top1: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each expert, the label of most tokens whose top-1 expert it is; -1 for experts no token chose."""
    if top1.numel() == 0:
        return torch.full((num_experts,), -1, dtype=torch.long)
    num_labels = int(labels.max()) + 1
    table = torch.zeros(num_experts, num_labels, dtype=torch.long, device=top1.device)
    table.index_put_((top1, labels.long()), torch.ones_like(top1), accumulate=True)
    dominant = table.argmax(-1)
    return torch.where(table.sum(-1) > 0, dominant, torch.full_like(dominant, -1)).cpu()


class SomeModel(TokenStemMixin, SomePreTrainedModel):
    """Embeddings -> SoME blocks -> final LayerNorm. Causal or bidirectional by ``config.objective``."""

    def __init__(self, config: SomeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([SomeBlock(config, i) for i in range(config.num_hidden_layers)])
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
        use_cache = (use_cache if use_cache is not None else self.config.use_cache) and causal and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        hidden_states, attn_mask, is_causal = self._embed(
            input_ids, inputs_embeds, attention_mask, position_ids, past_len, causal
        )
        seq_len = hidden_states.shape[1]
        token_mask = attention_mask[:, -seq_len:].bool() if attention_mask is not None else None
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, _ = layer(hidden_states, attn_mask, is_causal, cache, token_mask)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return DecollapseModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_losses={},
        )


class SomeForCausalLM(CausalLMHeadMixin, SomePreTrainedModel, GenerationMixin):
    def __init__(self, config: SomeConfig):
        if config.objective != "causal_lm":
            raise ValueError(
                f"SomeForCausalLM needs objective='causal_lm', got {config.objective!r}; "
                "use SomeForMaskedLM for 'masked_lm'."
            )
        super().__init__(config)
        self.model = SomeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class SomeForMaskedLM(MaskedLMHeadMixin, SomePreTrainedModel):
    """Bidirectional encoder with a BERT-style prediction head (transform -> tied decoder)."""

    def __init__(self, config: SomeConfig):
        if config.objective != "masked_lm":
            raise ValueError(
                f"SomeForMaskedLM needs objective='masked_lm', got {config.objective!r}; "
                "use SomeForCausalLM for 'causal_lm'."
            )
        super().__init__(config)
        self.model = SomeModel(config)
        self._init_masked_lm_head(config)
        self.post_init()
