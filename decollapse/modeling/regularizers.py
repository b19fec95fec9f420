"""Differentiable anti-collapse losses for groups of sub-units.

Every loss here returns a scalar tensor where *lower is better*, is differentiable in its
floating-point inputs, and is computed in float32 (float64 inputs stay float64) whatever
the input dtype, so it behaves the same under bf16/fp16 autocast and on any device.

Degenerate inputs never produce NaN. The conventions, stated once and repeated in each
docstring:

* a row of all zeros is L2-"normalised" to the zero vector, so its cosine with anything is 0;
* a mean over an empty set of pairs (a single unit, ``n == 1``) is 0;
* a mean over an empty set of tokens (everything masked out) is 0.

Only the standard library, ``torch`` and ``transformers`` may be imported here: this file is
copied verbatim into self-contained Hugging Face Hub remote-code bundles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "pairwise_cosine",
    "mean_squared_off_diagonal_cosine",
    "welch_floor",
    "orthogonality",
    "soft_orthogonality",
    "support_shortfall",
    "row_participation_ratio",
    "load_balancing_loss",
    "router_z_loss",
    "routing_entropy",
    "vicreg_variance",
    "vicreg_covariance",
    "uniformity_log",
    "uniformity_gaussian",
    "variance_uniformity",
    "nearest_neighbour_spread",
    "info_nce",
    "linear_cka_matrix",
    "mean_off_diagonal_cka",
    "block_mean_orthogonality",
    "block_mean_orthogonality_floor",
]

# Small enough not to bias real vectors, large enough that 1/eps stays finite in float32.
_NORM_EPS = 1e-8


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision cosines and squared norms lose too many digits for losses whose
    # optimum is a small number (e.g. the Welch floor ~0.06), so widen to float32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(_work_dtype(t)) if t.is_floating_point() else t.to(torch.float32)


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    # F.normalize divides by max(||x||, eps): zero rows stay zero instead of becoming NaN,
    # and its backward is finite at zero.
    return F.normalize(_as_float(x), p=2.0, dim=-1, eps=_NORM_EPS)


def _off_diagonal_mask(n: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    # A zero that is still attached to x's graph, so that ``loss.backward()`` works (and
    # yields zero gradients) on degenerate inputs instead of raising.
    return _as_float(x).sum() * 0.0


def _squared_distances(xn: torch.Tensor) -> torch.Tensor:
    # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b; uses the actual row norms so that zero rows
    # (norm 0) are at distance 1 from unit rows, not 2. Clamped because rounding can push
    # the distance between identical rows slightly below 0.
    sq_norm = (xn * xn).sum(dim=-1)
    gram = xn @ xn.transpose(-1, -2)
    return (sq_norm.unsqueeze(-1) + sq_norm.unsqueeze(-2) - 2.0 * gram).clamp_min(0.0)


def _flatten_token_mask(attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """Flatten an attention mask to ``[num_tokens]`` floats (1 = keep, 0 = padding).

    Router outputs of several layers are often concatenated along the token axis (layer-major,
    the Hugging Face convention), so a mask that divides the token count is tiled.
    """
    if attention_mask is None:
        return None
    m = attention_mask.reshape(-1)
    if m.numel() == num_tokens:
        return m.to(torch.float32)
    if m.numel() > 0 and num_tokens % m.numel() == 0:
        return m.to(torch.float32).repeat(num_tokens // m.numel())
    raise ValueError(
        f"attention_mask has {m.numel()} entries, which does not divide the {num_tokens} router tokens"
    )


def _masked_token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` [T] over kept tokens; 0 when no token is kept."""
    if mask is None:
        count = values.numel()
        return values.sum() / max(count, 1)
    mask = mask.to(device=values.device, dtype=values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# Cosine / orthogonality family
# --------------------------------------------------------------------------------------------


def pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix of the rows of ``x``.

    ``S_ij = x̂_i · x̂_j`` with ``x̂_i = x_i / max(‖x_i‖₂, 1e-8)``.

    Args:
        x: ``[..., n, d]``; leading dims are batch dims.

    Returns:
        ``[..., n, n]`` in float32 (float64 for float64 input). Zero rows give cosine 0 with
        every row, including themselves, instead of NaN.

    Reference: standard; used as ``S = ĉĉᵀ`` by MrCogito's concept losses and ``G = ÂÂᵀ``
    by DAWN's orthogonality loss.
    """
    xn = _normalize_rows(x)
    return xn @ xn.transpose(-1, -2)


def mean_squared_off_diagonal_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine (the "diversity"/"orthogonality" loss of the field).

    ``L = mean_batch [ Σ_{i≠j} S_ij² / (n(n−1)) ]`` with ``S = pairwise_cosine(x)``.

    0 when the rows are mutually orthogonal, 1 when all rows are identical (up to sign).
    For ``n > d`` the minimum is :func:`welch_floor` ``(n, d) > 0``. ``n == 1`` returns 0.

    Args:
        x: ``[..., n, d]``.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), its orthogonality and
    diversity losses; MrCogito (github.com/ksopyla/MrCogito), ``nn/loss_manager.py``
    (``orthogonality``).
    """
    n = x.shape[-2]
    if n < 2:
        return _zero_like_graph(x)
    s = pairwise_cosine(x)
    off = _off_diagonal_mask(n, s.device)
    per_batch = (s.pow(2) * off).sum(dim=(-1, -2)) / (n * (n - 1))
    return per_batch.mean()


def welch_floor(n: int, d: int) -> float:
    """Smallest possible :func:`mean_squared_off_diagonal_cosine` for ``n`` unit vectors in ``R^d``.

    ``floor = max(0, (n/d − 1) / (n − 1))`` for ``n > 1``; 0 for ``n ≤ d`` or ``n ≤ 1``.

    Derivation: the Gram matrix ``G`` of unit vectors has trace ``n`` and rank ``≤ d``, so
    ``‖G‖_F² ≥ n²/d`` and ``Σ_{i≠j} G_ij² ≥ n²/d − n``; dividing by ``n(n−1)`` gives the
    bound, attained exactly by unit-norm tight frames. Report ``loss − welch_floor(n, d)``
    so that 0 means optimal.

    Reference: L. R. Welch, "Lower bounds on the maximum cross correlation of signals",
    IEEE Trans. Inf. Theory 20(3), 1974. For DAWN's pool (n=512, d=16) it is 31/511 ≈ 0.0607.
    """
    if d < 1:
        raise ValueError(f"dimension d must be >= 1, got {d}")
    if n <= 1 or n <= d:
        return 0.0
    return max(0.0, (n / d - 1.0) / (n - 1.0))


def orthogonality(w: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Frobenius orthogonality penalty.

    ``L = mean_batch ‖Ŵ Ŵᵀ − I‖_F² / n²`` where ``Ŵ`` is ``w`` with L2-normalised rows
    (``normalize=True``) or ``w`` itself (``normalize=False``, which also pushes row norms to 1).

    With ``normalize=True`` the diagonal of ``ŴŴᵀ`` is 1 for every non-zero row, so
    ``L = (n−1)/n · mean_squared_off_diagonal_cosine(w)``. A zero row cannot be normalised; it
    stays zero and contributes ``(0 − 1)² = 1`` on the diagonal, so an all-zero ``w`` gives
    ``1/n`` (not a NaN). ``n == 1`` gives 0 for any non-zero row.

    Args:
        w: ``[..., n, d]``.
        normalize: normalise rows first.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), whose orthogonality loss
    divides by n(n−1) instead of n²; Bansal, Chen & Wang, "Can we gain more from orthogonality
    regularizations in training deep CNNs?", NeurIPS 2018.
    """
    wn = _normalize_rows(w) if normalize else _as_float(w)
    n = wn.shape[-2]
    gram = wn @ wn.transpose(-1, -2)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    per_batch = (gram - eye).pow(2).sum(dim=(-1, -2)) / max(n * n, 1)
    return per_batch.mean()


def soft_orthogonality(x: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Hinge-squared cosine penalty that ignores small overlaps.

    ``L = mean_batch [ Σ_{i≠j} relu(|S_ij| − τ)² / (n(n−1)) ]``, ``τ = threshold``.

    Pairs with ``|cos| ≤ τ`` are free, which leaves room for ``n > d`` units (below the Welch
    floor no set of units has all ``|cos|`` tiny). ``n == 1`` returns 0.

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``nn/loss_manager.py``
    (``soft_orthogonality``, threshold 0.1).
    """
    n = x.shape[-2]
    if n < 2:
        return _zero_like_graph(x)
    s = pairwise_cosine(x)
    off = _off_diagonal_mask(n, s.device)
    hinge = torch.relu(s.abs() - threshold).pow(2) * off
    return (hinge.sum(dim=(-1, -2)) / (n * (n - 1))).mean()


def support_shortfall(x: torch.Tensor, minimum: float) -> torch.Tensor:
    """How far rows fall short of spreading over at least ``minimum`` coordinates (differentiable).

    ``L = mean_i relu(minimum − PR_i)``, ``PR_i = (Σ_m x_im²)² / Σ_m x_im⁴``.

    ``PR_i`` (the participation ratio of row ``i``) is a smooth count of the coordinates the row
    uses: ``q`` equal non-zero entries give exactly ``q``, one dominant entry gives about 1. It is
    scale-free, so unlike a hard count ``#{m : |x_im| > τ}`` it neither has a zero gradient nor
    depends on the rows' norm (a QR-initialised N × M matrix has entries near ``1/sqrt(N)``, below
    any fixed τ such as the original's 0.1 for large N). A Gaussian row has ``PR`` a little above
    ``(M + 2)/3``, the ratio of the moments (about 6.5 at M = 16). The floor is 0, reached when every row has ``PR_i ≥ minimum``. A zero row counts as ``PR = 0``. An exactly
    one-hot row is a stationary point (the gradient on its zero entries vanishes, as for any function
    of the squared entries); a row with one dominant entry is pushed to spread.

    Args:
        x: ``[..., n, m]``; rows are units (e.g. neurons), columns what they spread over (bases).
        minimum: the target count, ``1 ≤ minimum ≤ m``.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), whose sparsity loss asks for
    at least 3 bases per neuron through a step-function count that has zero gradient; participation
    ratio as in Gao & Ganguli, "On simplicity and complexity in the brave new world of large-scale
    neuroscience", 2015.
    """
    return torch.relu(minimum - row_participation_ratio(x)).mean()


def row_participation_ratio(x: torch.Tensor) -> torch.Tensor:
    """Participation ratio of each row, a smooth count of the coordinates it uses (differentiable).

    ``PR_i = (Σ_m x_im²)² / Σ_m x_im⁴``, shape ``x.shape[:-1]``. ``q`` equal non-zero entries give
    ``q``; a zero row gives 0 (not NaN) with a finite gradient. Not to be confused with
    ``diagnostics.participation_ratio``, which counts the dimensions of a covariance spectrum.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), the basis count of its
    sparsity loss; Gao & Ganguli 2015.
    """
    sq = _as_float(x).pow(2)
    # A zero row has 0/0; the clamp makes it 0 with a finite gradient.
    return sq.sum(dim=-1).pow(2) / sq.pow(2).sum(dim=-1).clamp_min(_NORM_EPS**2)


# --------------------------------------------------------------------------------------------
# Routing (mixture-of-experts / heads / neurons)
# --------------------------------------------------------------------------------------------


def load_balancing_loss(
    router_probs: torch.Tensor,
    expert_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/GShard auxiliary load-balancing loss.

    ``L = E · Σ_e f_e · P_e`` with

    * ``f_e = (# kept (token, slot) assignments to e) / (# kept assignments)``,
    * ``P_e = mean over kept tokens of router_probs[t, e]``.

    ``L = 1`` at perfect balance with uniform probabilities and ``L = E`` when every token goes
    to one expert with probability 1. Only ``P`` carries gradient (``f`` is a count).
    Unlike the Hugging Face Mixtral helper, ``f`` is normalised by the number of assignments,
    so the balanced value is 1 for any top-k (HF's equals k). No kept token gives 0.

    Args:
        router_probs: ``[T, E]`` or ``[B, S, E]`` (flattened to ``[T, E]``) softmax outputs.
            Several layers may be concatenated along the token axis.
        expert_mask: one-hot / multi-hot selections, ``[T, E]`` or ``[T, k, E]`` (or the
            same with ``[B, S]`` for ``T``); e.g. ``F.one_hot(topk_idx, E)``.
        attention_mask: ``[B, S]`` or ``[T]``, 1 for real tokens, 0 for padding; excluded
            from both ``f`` and ``P``. Tiled if the router tokens are a multiple of it.

    Reference: Fedus, Zoph & Shazeer, "Switch Transformers", JMLR 2022 (eq. 4); Lepikhin et al.,
    "GShard", 2020; Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention", 2024,
    arXiv:2410.11842 (its head load-balance loss).
    """
    num_experts = router_probs.shape[-1]
    probs = _as_float(router_probs).reshape(-1, num_experts)
    num_tokens = probs.shape[0]
    if expert_mask.shape[-1] != num_experts:
        raise ValueError(
            f"expert_mask last dim {expert_mask.shape[-1]} != number of experts {num_experts}"
        )
    if num_tokens == 0:
        return _zero_like_graph(router_probs)
    if expert_mask.numel() % (num_tokens * num_experts) != 0:
        raise ValueError("expert_mask does not match router_probs' token count")
    # [T, k, E] summed over slots gives the per-token assignment counts for each expert.
    assign = expert_mask.reshape(num_tokens, -1, num_experts).to(probs.dtype).sum(dim=1).detach()
    token_mask = _flatten_token_mask(attention_mask, num_tokens)
    if token_mask is not None:
        token_mask = token_mask.to(device=probs.device, dtype=probs.dtype)
        assign = assign * token_mask.unsqueeze(-1)
        prob_per_expert = (probs * token_mask.unsqueeze(-1)).sum(dim=0) / token_mask.sum().clamp_min(1.0)
    else:
        prob_per_expert = probs.mean(dim=0)
    fraction_per_expert = assign.sum(dim=0) / assign.sum().clamp_min(1.0)
    return num_experts * (fraction_per_expert * prob_per_expert).sum()


def router_z_loss(router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: keeps router logits small so the softmax stays well conditioned.

    ``L = mean over kept tokens t of ( log Σ_e exp(x_te) )²``.

    Args:
        router_logits: ``[..., E]``; all leading dims are tokens.
        attention_mask: ``[B, S]`` or ``[T]`` (tiled as in :func:`load_balancing_loss`).

    No kept token gives 0. Reference: Zoph et al., "ST-MoE: Designing stable and transferable
    sparse expert models", 2022 (eq. 5).
    """
    logits = _as_float(router_logits).reshape(-1, router_logits.shape[-1])
    z = torch.logsumexp(logits, dim=-1).pow(2)
    return _masked_token_mean(z, _flatten_token_mask(attention_mask, logits.shape[0]))


def routing_entropy(router_probs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token Shannon entropy of the routing distribution, in nats.

    ``H = mean over kept tokens t of ( −Σ_e p_te log p_te )``, with ``0 log 0 = 0``.

    This is the entropy *value*, not a signed loss: adding ``−λ·H`` (maximising it) spreads
    each token over more units; adding ``+λ·H`` (minimising it) sharpens the per-token choice.
    Note that per-token entropy says nothing about balance *across* tokens — use
    :func:`load_balancing_loss` for that. Range ``[0, log E]``; no kept token gives 0.

    Reference: Shannon 1948; the dynamic (entropy) loss of RustGPT's Mixture-of-Heads router
    (github.com/ryancinsight/RustGPT).
    """
    probs = _as_float(router_probs).reshape(-1, router_probs.shape[-1])
    # clamp keeps log finite at p = 0 (value and gradient), where p·log p → 0 anyway.
    tiny = torch.finfo(probs.dtype).tiny
    ent = -(probs * probs.clamp_min(tiny).log()).sum(dim=-1)
    return _masked_token_mean(ent, _flatten_token_mask(attention_mask, probs.shape[0]))


# --------------------------------------------------------------------------------------------
# Representation-spread losses (VICReg, uniformity, T-REGS, InfoNCE)
# --------------------------------------------------------------------------------------------


def _centred_samples(z: torch.Tensor) -> torch.Tensor:
    flat = _as_float(z).reshape(-1, z.shape[-1])
    return flat - flat.mean(dim=0, keepdim=True)


def vicreg_variance(z: torch.Tensor, target_std: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance term: hinge on the per-dimension standard deviation.

    ``L = mean_d relu(γ − sqrt(Var_d(Z) + ε))`` with ``Var_d = Σ_i (Z_id − Z̄_d)² / (N − 1)``
    (unbiased), ``γ = target_std``, ``Z = z.reshape(-1, d)`` (batch and units pooled).

    ``N == 1``: the variance is taken as 0 (a single sample has no spread), so the value is
    the constant ``relu(γ − sqrt(ε))`` with zero gradient.

    Reference: Bardes, Ponce & LeCun, "VICReg", ICLR 2022 (eq. 1); MrCogito
    (github.com/ksopyla/MrCogito), ``nn/loss_manager.py`` (``variance``).
    """
    centred = _centred_samples(z)
    n = centred.shape[0]
    var = centred.pow(2).sum(dim=0) / max(n - 1, 1)
    return torch.relu(target_std - torch.sqrt(var + eps)).mean()


def slot_input_variance(concepts: torch.Tensor, target_std: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance hinge taken, as VICReg takes it, over *different inputs*: per slot and feature.

    ``L = mean_{i,d} relu(γ − sqrt(Var_b(c_bid) + ε))`` for concepts ``c`` ``[B, C, H]``, the unbiased
    variance over the B inputs of slot i's feature d, ``γ = target_std``. A slot that is the same vector
    whatever the input (a learned constant that the input barely moves) pays γ per feature; the pooled
    :func:`vicreg_variance` cannot see that case, because constant but distinct slots already spread
    the pooled samples. ``B == 1`` gives the constant ``relu(γ − sqrt(ε))`` with zero gradient.

    Reference: Bardes, Ponce & LeCun, "VICReg", ICLR 2022 (eq. 1: the variance of each embedding
    dimension over the batch of inputs), applied per slot of a set-valued embedding.
    """
    if concepts.dim() != 3:
        raise ValueError(f"slot_input_variance expects [B, C, H] concepts, got shape {tuple(concepts.shape)}")
    b = concepts.shape[0]
    centred = concepts - concepts.mean(dim=0, keepdim=True)
    var = centred.pow(2).sum(dim=0) / max(b - 1, 1)  # (C, H)
    return torch.relu(target_std - torch.sqrt(var + eps)).mean()


def vicreg_covariance(z: torch.Tensor) -> torch.Tensor:
    """VICReg covariance term: decorrelates feature dimensions.

    ``Cov = Z_cᵀ Z_c / (N − 1)`` with ``Z_c = Z − mean(Z)``, ``Z = z.reshape(-1, d)``;
    ``L = Σ_{a≠b} Cov_ab² / d``. ``N == 1`` or ``d == 1`` gives 0.

    Reference: Bardes, Ponce & LeCun, "VICReg", ICLR 2022 (eq. 3-4); MrCogito
    (github.com/ksopyla/MrCogito), ``nn/loss_manager.py`` (``covariance``).
    """
    centred = _centred_samples(z)
    n, d = centred.shape
    cov = centred.transpose(0, 1) @ centred / max(n - 1, 1)
    off = _off_diagonal_mask(d, cov.device)
    return (cov.pow(2) * off).sum() / d


def _as_batched_points(z: torch.Tensor) -> torch.Tensor:
    if z.dim() == 2:
        return z.unsqueeze(0)
    if z.dim() == 3:
        return z
    raise ValueError(f"expected [N, d] or [B, N, d], got shape {tuple(z.shape)}")


def uniformity_log(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola uniformity on the unit sphere.

    ``L = mean_batch log [ mean_{i≠j} exp(−t ‖ẑ_i − ẑ_j‖²) ]`` on L2-normalised rows.

    Always ``≤ 0`` (0 = every point identical, i.e. collapsed); its minimum depends on ``N`` and
    ``d`` (it tends to ``log E exp(−t‖u−v‖²)`` for uniform ``u, v`` as ``N → ∞``), so compare
    values only at equal ``N, d``. Pairs are formed within each batch element only. ``N == 1``
    (no pairs) gives 0. Computed with a log-sum-exp for stability.

    Args:
        z: ``[N, d]`` or ``[B, N, d]``.

    Reference: Wang & Isola, "Understanding contrastive representation learning through
    alignment and uniformity on the hypersphere", ICML 2020 (eq. 4).
    """
    zb = _as_batched_points(z)
    n = zb.shape[-2]
    if n < 2:
        return _zero_like_graph(z)
    sq = _squared_distances(_normalize_rows(zb))
    off = _off_diagonal_mask(n, sq.device)
    logits = (-t * sq).masked_fill(~off, float("-inf"))
    per_batch = torch.logsumexp(logits.flatten(-2), dim=-1) - math.log(n * (n - 1))
    return per_batch.mean()


def uniformity_gaussian(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Gaussian-potential uniformity without the log (the concept-encoder variant).

    ``L = mean_batch [ Σ_{i≠j} exp(−t (2 − 2 S_ij)) / (N(N−1)) ]``, ``S = pairwise_cosine(z)``.

    For non-zero rows this is ``exp`` of the inner term of :func:`uniformity_log`. Range
    ``(0, 1]``: 1 for identical points. A zero row has ``S = 0`` with everything. ``N == 1``
    (no pairs) gives 0.

    Args:
        z: ``[N, d]`` or ``[B, N, d]``.

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``nn/loss_manager.py``
    (``uniformity``, τ = 2); Wang & Isola, ICML 2020.
    """
    zb = _as_batched_points(z)
    n = zb.shape[-2]
    if n < 2:
        return _zero_like_graph(z)
    s = pairwise_cosine(zb)
    off = _off_diagonal_mask(n, s.device)
    pot = torch.exp(-t * (2.0 - 2.0 * s)) * off
    return (pot.sum(dim=(-1, -2)) / (n * (n - 1))).mean()


def variance_uniformity(
    z: torch.Tensor,
    variance_weight: float = 1.0,
    uniformity_weight: float = 1.0,
    target_std: float = 1.0,
    temperature: float = 2.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """The concept encoder's ``combined`` loss: a per-dimension variance floor plus uniformity.

    ``L = w_v · vicreg_variance(z; γ, ε) + w_u · uniformity_gaussian(z; τ)``, that is

    * ``w_v · mean_d relu(γ − sqrt(Var_d(Z) + ε))`` with ``Z = z.reshape(-1, H)`` (inputs **and**
      concepts pooled, unbiased variance), which keeps every feature dimension alive, and
    * ``w_u · mean_b Σ_{i≠j} exp(−τ (2 − 2 S_bij)) / (C(C−1))`` with ``S_b`` the cosine matrix of
      the ``C`` concepts of input ``b``, which pushes one input's concepts apart on the sphere.

    The two terms are complementary: the variance floor alone is met by concepts that all
    point the same way but vary in length across inputs; uniformity alone is met by concepts
    that differ within an input but are the same for every input. Lower is better; collapsed
    concepts (one vector everywhere) give about ``w_v (γ − sqrt(ε)) + w_u``. Degenerate inputs
    follow the two terms' conventions (one sample: variance taken as 0; one concept: no pairs,
    uniformity 0; zero rows have cosine 0), so the value and gradient stay finite.

    Args:
        z: concept outputs ``[B, C, H]`` (``[N, H]`` is read as one input with ``N`` concepts).
        variance_weight: ``w_v``.
        uniformity_weight: ``w_u``.
        target_std: ``γ``.
        temperature: ``τ``.
        eps: ``ε`` inside the square root of the variance term.

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``nn/loss_manager.py``
    (``combined(variance_weight=1, uniformity_weight=1, temperature=2, eps)``); Bardes, Ponce &
    LeCun, "VICReg", ICLR 2022; Wang & Isola, ICML 2020.
    """
    variance = vicreg_variance(z, target_std=target_std, eps=eps)
    uniformity = uniformity_gaussian(z, t=temperature)
    return variance_weight * variance + uniformity_weight * uniformity


def nearest_neighbour_spread(z: torch.Tensor) -> torch.Tensor:
    """T-REGS proxy: push every point away from its nearest neighbour on the sphere.

    ``L = − mean_batch mean_i min_{j≠i} ‖ẑ_i − ẑ_j‖₂`` on L2-normalised rows.

    Every point's MST edge is at least its nearest-neighbour distance, so the minimum-spanning-tree
    length that T-REGS maximises is at least half the sum of nearest-neighbour distances; this is
    that cheap, O(N²) proxy. Range ``[−2, 0]``; 0 when every
    point has a coincident neighbour (collapse). The diagonal is excluded with ``+inf`` before
    the ``min`` (computed in float32, so no overflow), and the square root is taken after the
    ``min`` with a 1e-12 floor so identical points give a finite (zero) gradient instead of
    ``∞·0``. ``N == 1`` gives 0.

    Args:
        z: ``[N, d]`` or ``[B, N, d]``.

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``nn/loss_manager.py`` (``t_regs_mst``, there
    with a ``+1e9·I`` diagonal); the T-REGS idea of maximising the minimum-spanning-tree length of
    the embeddings.
    """
    zb = _as_batched_points(z)
    n = zb.shape[-2]
    if n < 2:
        return _zero_like_graph(z)
    sq = _squared_distances(_normalize_rows(zb))
    eye = torch.eye(n, dtype=torch.bool, device=sq.device)
    nearest_sq = sq.masked_fill(eye, float("inf")).min(dim=-1).values
    return -torch.sqrt(nearest_sq.clamp_min(1e-12)).mean()


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE with in-batch negatives (one direction, anchors → positives).

    ``L = mean_i [ −log ( exp(â_i·p̂_i / τ) / Σ_j exp(â_i·p̂_j / τ) ) ]``, i.e. the
    cross-entropy of the logits ``â p̂ᵀ / τ`` against the diagonal. Every other positive in the
    batch is a negative for anchor ``i``.

    Values: ``log N`` when all rows are identical or all zero (logits all equal); ``N == 1``
    gives 0 (the only candidate is the positive). Not symmetrised: average with
    ``info_nce(positives, anchors)`` for the CLIP-style symmetric version.

    Args:
        anchors, positives: ``[N, d]`` or ``[..., N, d]`` (one independent batch per leading index).
        temperature: ``τ > 0``.

    Reference: van den Oord, Li & Vinyals, "Representation learning with contrastive predictive
    coding", 2018; SOSM (github.com/PlanetDestroyyer/Self-Organizing-State-Model), whose inter-block
    contrastive term this is.
    """
    if anchors.shape != positives.shape:
        raise ValueError(f"anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} differ")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a = _normalize_rows(anchors)
    p = _normalize_rows(positives).to(a.dtype)
    n = a.shape[-2]
    if n == 0:
        return _zero_like_graph(anchors)
    logits = (a @ p.transpose(-1, -2)) / temperature
    logits = logits.reshape(-1, n, n)
    target = torch.arange(n, device=logits.device).expand(logits.shape[0], n)
    return F.cross_entropy(logits.reshape(-1, n), target.reshape(-1))


# --------------------------------------------------------------------------------------------
# Similarity between representations (blocks of a state)
# --------------------------------------------------------------------------------------------


def linear_cka_matrix(units: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Linear CKA between ``U`` representations of the same ``N`` items.

    ``CKA(X, Y) = ‖X̃ᵀỸ‖_F² / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)`` with ``X̃ = X − mean_n X`` (each representation
    centred over the items). 1 when one representation is an orthogonal transform and isotropic
    scaling of the other, 0 when their centred features are uncorrelated. Unlike a cosine between
    block vectors it compares what two blocks *say about the items*, whatever basis each uses.

    A representation with zero variance over the items has CKA 0 with every other one and 1 with
    itself. Fewer than two items give the identity.

    Args:
        units: ``[N, U, d]``: item ``n``'s vector in representation ``u`` (e.g. token ``n``'s block ``u``).
        mask: optional ``[N]`` (or any shape with ``N`` entries), 1 for the items to use.

    Returns:
        ``[U, U]``, symmetric, differentiable in ``units``.

    Reference: Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations
    Revisited", ICML 2019 (linear CKA, eq. 5; the feature-space form used here).
    """
    x = _as_float(units)
    if mask is not None:
        x = x[mask.reshape(-1).bool().to(x.device)]
    num_units = x.shape[1]
    eye = torch.eye(num_units, dtype=x.dtype, device=x.device)
    if x.shape[0] < 2:
        return eye + 0.0 * x.sum()
    x = x - x.mean(dim=0, keepdim=True)
    cross = torch.einsum("nad,nbe->abde", x, x)  # [U, U, d, d] cross-covariances (unscaled)
    hsic = cross.pow(2).sum(dim=(-1, -2))
    # Clamped before the square root: sqrt's gradient at 0 is infinite, and a zero-variance block
    # (all its cross terms 0) must give CKA 0 with a finite gradient, not 0 × inf.
    norms = hsic.diagonal().clamp_min(1e-30).sqrt()
    cka = hsic / (norms.unsqueeze(0) * norms.unsqueeze(1))
    return torch.where(eye.bool(), torch.ones_like(cka), cka)


def mean_off_diagonal_cka(units: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean linear CKA over the ordered pairs of distinct representations (floor 0, ceiling 1).

    ``L = mean_{a≠b} CKA(X_a, X_b)``, see :func:`linear_cka_matrix`. One representation gives 0.
    Reference: Kornblith et al. 2019.
    """
    cka = linear_cka_matrix(units, mask)
    n = cka.shape[0]
    if n < 2:
        return cka.sum() * 0.0
    return cka.masked_select(_off_diagonal_mask(n, cka.device)).mean()


def block_mean_orthogonality_floor(num_blocks: int, dim: int) -> float:
    """Smallest possible ``‖Ĝ − I‖_F²`` for ``num_blocks`` unit vectors in ``R^dim``: ``max(0, n²/d − n)``.

    The Gram matrix of unit vectors has trace ``n`` and rank ``≤ d``, so ``‖Ĝ‖_F² ≥ n²/d``. Sixteen
    unit vectors in ``R⁴`` cannot do better than 48 (a term reported as "5-10" there is impossible).
    """
    if num_blocks < 1 or dim < 1:
        raise ValueError(f"need num_blocks >= 1 and dim >= 1, got {num_blocks} and {dim}")
    return max(0.0, num_blocks * num_blocks / dim - num_blocks)


def block_mean_orthogonality(units: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonality of the blocks' mean vectors above its floor:
    ``L = ‖Ĝ − I‖_F² − max(0, n²/d − n)`` with ``Ĝ_ab = cos(μ_a, μ_b)`` and ``μ_a`` block ``a``'s mean over
    the (kept) items. 0 is the best any ``n`` blocks of width ``d`` can do.

    It constrains first moments only (where the blocks point on average), not what they encode:
    two blocks can be orthogonal on average and carry the same information; :func:`mean_off_diagonal_cka`
    measures that. No kept item gives 0. A block whose mean is zero counts 1 (its diagonal) and is left
    out of the floor of the others, so the term is never below 0.

    Args:
        units: ``[N, n, d]`` (item, block, feature).
        mask: optional, 1 for the items to use.

    Reference: SOSM (github.com/PlanetDestroyyer/Self-Organizing-State-Model), ``OrthogonalityLoss`` of
    its block regularisation, here on the documented 2×2 block layout and minus the floor.
    """
    x = _as_float(units)
    if mask is not None:
        x = x[mask.reshape(-1).bool().to(x.device)]
    if x.shape[0] == 0:
        return _zero_like_graph(units)
    num_blocks, dim = x.shape[1], x.shape[2]
    means = x.mean(dim=0)
    gram = pairwise_cosine(means)
    eye = torch.eye(num_blocks, dtype=gram.dtype, device=gram.device)
    # A zero mean (a block routed away from every token) has cosine 0 with everything, itself included:
    # it adds exactly 1 (its diagonal), and the others' floor is that of the non-zero means.
    nonzero = int((means.abs().sum(-1) > 0).sum())
    floor = (block_mean_orthogonality_floor(nonzero, dim) if nonzero else 0.0) + (num_blocks - nonzero)
    return (gram - eye).pow(2).sum() - floor
