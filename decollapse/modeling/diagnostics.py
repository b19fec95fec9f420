"""Collapse measurements for groups of sub-units (neurons, experts, heads, concepts, blocks).

Everything here is a measurement, not a loss: inputs are detached, no graph is built, and
results are Python floats (or small CPU-friendly tensors where stated). No function returns
NaN on degenerate input; each documents the value it returns instead.

Conventions:

* "vectors" are given one unit per row. A 2-D ``[n, d]`` tensor is used as is; a higher-rank
  tensor is flattened to ``[n, -1]`` (e.g. a ``[heads, d_head, d_model]`` weight gives one
  vector per head); a 1-D tensor is ``n`` one-dimensional units.
* signed versus absolute cosine is always explicit in the name or in a required argument,
  because the field mixes them up (MrCogito's concept analysis reports the mean *absolute* but the
  max *signed* cosine; DAWN's ``analyze_dawn.py`` counts *signed* similar pairs).
* :class:`CollapseReport` and :func:`unit_report` are the cross-architecture contract: every
  model reports the same metric names, prefixed per layer / unit group by the caller.

Only the standard library, ``torch`` and ``transformers`` may be imported here (plus the
sibling ``regularizers`` module): this file is copied into Hub remote-code bundles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .regularizers import pairwise_cosine, uniformity_gaussian

__all__ = [
    "cosine_similarity_matrix",
    "mean_off_diagonal_cosine",
    "max_off_diagonal_cosine",
    "similar_pair_fraction",
    "effective_rank_entropy",
    "effective_rank_nuclear",
    "top1_singular_dominance",
    "participation_ratio",
    "usage_counts",
    "usage_share",
    "gini",
    "normalized_entropy",
    "dead_unit_share",
    "top_k_share",
    "max_violation",
    "silhouette_score",
    "mutual_information",
    "normalized_mutual_information",
    "count_homonyms",
    "homonym_separation",
    "homonym_report",
    "within_unit_cosine",
    "coactivation_strong_pairs",
    "jensen_shannon_divergence",
    "CollapseReport",
    "unit_report",
    "concept_geometry",
    "CONCEPT_HEALTH_THRESHOLDS",
    "grade_concept_health",
]

# Tokens per block when accumulating co-activation counts: bounds memory at
# block × num_units floats while keeping each block's counts exact in float32.
_COACT_BLOCK = 4096


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_units(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.dim() == 0:
        raise ValueError("expected at least a 1-D tensor of units")
    x = x.reshape(-1, 1) if x.dim() == 1 else x.flatten(1)
    return x.to(_work_dtype(x))


def _as_cpu_vector(v: torch.Tensor) -> torch.Tensor:
    # Usage vectors are small (one entry per unit); float64 on CPU avoids float32 rounding in
    # entropies/Gini and works for devices without float64 support.
    return v.detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def _non_negative_cpu_vector(v: torch.Tensor, what: str) -> torch.Tensor:
    out = _as_cpu_vector(v)
    if out.numel() and bool((out < 0).any()):
        raise ValueError(f"{what} must be non-negative")
    return out


def _off_diagonal(s: torch.Tensor) -> torch.Tensor:
    n = s.shape[-1]
    return s[~torch.eye(n, dtype=torch.bool, device=s.device)]


def _upper_pairs(s: torch.Tensor) -> torch.Tensor:
    n = s.shape[-1]
    rows, cols = torch.triu_indices(n, n, offset=1, device=s.device)
    return s[rows, cols]


def _singular_values(x: torch.Tensor) -> torch.Tensor:
    u = _as_units(x)
    if u.numel() == 0:
        return u.new_zeros(0)
    return torch.linalg.svdvals(u)


def _entropy_from_counts(c: torch.Tensor) -> float:
    """Shannon entropy (nats) of the distribution ``c / Σc``; 0 for an empty or all-zero c."""
    total = float(c.sum())
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------------------------
# similarity
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix of the units (rows) of ``x``.

    ``S_ij = x̂_i · x̂_j``, ``x̂_i = x_i / max(‖x_i‖, 1e-8)``; zero rows have cosine 0 with
    everything (their diagonal entry is 0, not 1).

    Returns a detached ``[n, n]`` float32 tensor (float64 for float64 input) on ``x``'s device.

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``analysis/concept_analysis.py``; DAWN v5.0
    (github.com/madst0614/DAWN, commit 1356f29), ``scripts/analyze_dawn.py``.
    """
    return pairwise_cosine(_as_units(x))


def _mean_off_diag(s: torch.Tensor, absolute: bool) -> float:
    if s.shape[-1] < 2:
        return 0.0
    off = _off_diagonal(s)
    return float((off.abs() if absolute else off).mean())


def _max_off_diag(s: torch.Tensor, absolute: bool) -> float:
    if s.shape[-1] < 2:
        return 0.0
    off = _off_diagonal(s)
    return float((off.abs() if absolute else off).max())


def _similar_fraction(s: torch.Tensor, threshold: float, absolute: bool) -> float:
    if s.shape[-1] < 2:
        return 0.0
    pairs = _upper_pairs(s)
    pairs = pairs.abs() if absolute else pairs
    return float((pairs > threshold).to(torch.float64).mean())


@torch.no_grad()
def mean_off_diagonal_cosine(x: torch.Tensor, absolute: bool) -> float:
    """Mean off-diagonal cosine of the units of ``x``.

    ``absolute=True``: ``Σ_{i≠j} |S_ij| / (n(n−1))``; ``absolute=False``: ``Σ_{i≠j} S_ij / (n(n−1))``.
    The signed mean can be near 0 for units that are all ±copies of one vector; use the
    absolute one to detect collapse up to sign. ``n < 2`` returns 0.0.

    Reference: MrCogito (github.com/ksopyla/MrCogito), mean pairwise similarity (absolute); SOSM
    (github.com/PlanetDestroyyer/Self-Organizing-State-Model), block similarity.
    """
    return _mean_off_diag(cosine_similarity_matrix(x), absolute)


@torch.no_grad()
def max_off_diagonal_cosine(x: torch.Tensor, absolute: bool) -> float:
    """Largest off-diagonal cosine, ``max_{i≠j} S_ij`` (signed) or ``max_{i≠j} |S_ij|`` (absolute).

    ``n < 2`` returns 0.0. Reference: MrCogito (github.com/ksopyla/MrCogito), max pairwise
    similarity (signed).
    """
    return _max_off_diag(cosine_similarity_matrix(x), absolute)


@torch.no_grad()
def similar_pair_fraction(x: torch.Tensor, threshold: float = 0.8, absolute: bool = False) -> float:
    """Fraction of unordered pairs whose cosine exceeds ``threshold`` (strictly).

    ``#{i < j : S_ij > τ} / (n(n−1)/2)`` (``|S_ij|`` when ``absolute``). Every pair is counted,
    no sampling. ``n < 2`` returns 0.0.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), ``scripts/analyze_dawn.py``,
    similar pairs above 0.8 (signed, unordered; the repository reports 99.9% for its
    uniform-initialised run).
    """
    return _similar_fraction(cosine_similarity_matrix(x), threshold, absolute)


# --------------------------------------------------------------------------------------------
# spectrum
# --------------------------------------------------------------------------------------------


def _erank_entropy(sv: torch.Tensor) -> float:
    total = float(sv.sum())
    if total <= 0:
        return 0.0
    return math.exp(_entropy_from_counts(sv.to(device="cpu", dtype=torch.float64)))


def _erank_nuclear(sv: torch.Tensor) -> float:
    if sv.numel() == 0 or float(sv.max()) <= 0:
        return 0.0
    return float(sv.sum() / sv.max())


def _top1_dominance(sv: torch.Tensor) -> float:
    total = float(sv.sum()) if sv.numel() else 0.0
    if total <= 0:
        return 0.0
    return float(sv.max()) / total


@torch.no_grad()
def effective_rank_entropy(x: torch.Tensor) -> float:
    """Roy–Vetterli effective rank of the unit matrix.

    ``erank = exp(H(p))``, ``H(p) = −Σ_i p_i log p_i``, ``p_i = σ_i / Σ_j σ_j`` over the singular
    values ``σ`` of ``x`` (not squared). Range ``[1, min(n, d)]`` for a non-zero matrix; an
    all-zero (or empty) matrix returns 0.0.

    Reference: Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
    EUSIPCO 2007; DAWN v5.0 (github.com/madst0614/DAWN), whose docs target a ratio above 0.75.
    """
    return _erank_entropy(_singular_values(x))


@torch.no_grad()
def effective_rank_nuclear(x: torch.Tensor) -> float:
    """Nuclear-to-spectral ratio ``Σ_i σ_i / σ_1`` (the concept-encoder "effective rank").

    Range ``[1, min(n, d)]`` for a non-zero matrix; all-zero returns 0.0. Not the same number
    as :func:`effective_rank_entropy`.

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``analysis/concept_analysis.py`` (its
    "effective rank").
    """
    return _erank_nuclear(_singular_values(x))


@torch.no_grad()
def top1_singular_dominance(x: torch.Tensor) -> float:
    """Share of the nuclear norm held by the top singular direction, ``σ_1 / Σ_i σ_i``.

    Range ``[1/min(n, d), 1]``; 1 = rank-one collapse. All-zero returns 0.0 (so it is
    ``1 / effective_rank_nuclear`` except in that case, where both are 0).

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``analysis/concept_analysis.py`` (top-1
    dominance).
    """
    return _top1_dominance(_singular_values(x))


@torch.no_grad()
def participation_ratio(x: torch.Tensor) -> float:
    """Participation ratio of the covariance spectrum of the rows (samples) of ``x``.

    ``PR = (Σ_k λ_k)² / Σ_k λ_k²`` over the eigenvalues ``λ`` of ``Cov(X)``, ``X = x.reshape(-1, d)``.
    Computed from the singular values ``s`` of the centred ``X`` (``λ ∝ s²``; the ratio is
    scale-free). Range ``[1, min(N − 1, d)]``; a single row or constant rows (no variance)
    return 0.0.

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``analysis/concept_analysis.py``; Gao et al.,
    "A theory of multineuronal dimensionality, dynamics and measurement", 2017.
    """
    xd = x.detach()
    flat = xd.reshape(-1, xd.shape[-1]) if xd.dim() > 1 else xd.reshape(-1, 1)
    flat = flat.to(_work_dtype(flat))
    if flat.shape[0] < 2:
        return 0.0
    centred = flat - flat.mean(dim=0, keepdim=True)
    lam = torch.linalg.svdvals(centred).to(device="cpu", dtype=torch.float64).pow(2)
    denom = float(lam.pow(2).sum())
    if denom <= 0:
        return 0.0
    return float(lam.sum() ** 2 / denom)


# --------------------------------------------------------------------------------------------
# usage / routing balance
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def usage_counts(
    assignments: torch.Tensor, num_units: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """How often each unit was selected.

    ``count_u = Σ_{kept positions} 1[assignments = u]`` for ``u = 0 … num_units − 1``.

    Args:
        assignments: integer tensor of unit ids of any shape, e.g. top-k selections ``[B, S, k]``.
        num_units: length of the result; ids must lie in ``[0, num_units)``.
        mask: optional, over the *leading* dims of ``assignments`` (e.g. ``[B, S]`` attention
            mask for ``[B, S, k]``; broadcasting of size-1 dims allowed); 0/False drops a position.

    Returns:
        ``[num_units]`` int64 tensor on ``assignments``' device.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), ``scripts/analyze_dawn.py``
    (neuron usage); SoME (github.com/TesterSim2/Self-Organizing-Mixture-of-Experts-SoME-, expert
    usage).
    """
    a = assignments.detach().long()
    if mask is not None:
        m = mask.detach().to(device=a.device, dtype=torch.bool)
        if m.dim() > a.dim():
            raise ValueError("mask has more dims than assignments")
        m = m.reshape(tuple(m.shape) + (1,) * (a.dim() - m.dim())).expand_as(a)
        a = a[m]
    else:
        a = a.reshape(-1)
    if a.numel() and (int(a.min()) < 0 or int(a.max()) >= num_units):
        raise ValueError(f"unit ids must be in [0, {num_units}), got [{int(a.min())}, {int(a.max())}]")
    return torch.bincount(a, minlength=num_units)


@torch.no_grad()
def usage_share(counts: torch.Tensor) -> torch.Tensor:
    """Usage counts as a distribution, ``share_u = count_u / Σ_v count_v``.

    All-zero counts give all-zero shares (not NaN). Returns float32 (float64 for float64 input) on
    ``counts``' device. Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29),
    ``scripts/analyze_dawn.py``.
    """
    c = counts.detach().reshape(-1)
    c = c.to(_work_dtype(c))
    total = c.sum()
    if float(total) <= 0:
        return torch.zeros_like(c)
    return c / total


@torch.no_grad()
def gini(values: torch.Tensor) -> float:
    """Gini coefficient of a non-negative vector.

    ``G = Σ_i Σ_j |x_i − x_j| / (2 n Σ_i x_i)``, computed as
    ``G = 2 Σ_i i·x_(i) / (n Σ x) − (n + 1)/n`` with ``x_(1) ≤ … ≤ x_(n)``, ``i`` from 1.
    0 = perfectly equal, ``(n−1)/n`` = all mass on one unit. All zeros, a single unit, or an
    empty vector return 0.0. Negative entries raise ``ValueError``.

    Reference: Gini 1912; DAWN v5.0 (github.com/madst0614/DAWN) and SoME
    (github.com/TesterSim2/Self-Organizing-Mixture-of-Experts-SoME-) report usage Gini.
    """
    v = _non_negative_cpu_vector(values, "gini values")
    n = v.numel()
    total = float(v.sum())
    if n < 2 or total <= 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    g = 2.0 * float((ranks * v.sort().values).sum()) / (n * total) - (n + 1.0) / n
    # Rounding can leave a -1e-17 for a perfectly flat vector.
    return max(0.0, g)


@torch.no_grad()
def normalized_entropy(counts_or_probs: torch.Tensor) -> float:
    """Shannon entropy of the normalised vector divided by its maximum.

    ``H(p) / log n`` with ``p = v / Σ v``, ``0 log 0 = 0``. 1 = perfectly uniform, 0 = one unit
    takes everything. Conventions: a single unit returns 1.0 (one unit cannot be unbalanced);
    all zeros or an empty vector return 0.0. Negative entries raise ``ValueError``.

    Reference: Shannon 1948; DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29),
    ``scripts/analyze_dawn.py``.
    """
    v = _non_negative_cpu_vector(counts_or_probs, "counts_or_probs")
    n = v.numel()
    if n == 0 or float(v.sum()) <= 0:
        return 0.0
    if n == 1:
        return 1.0
    return _entropy_from_counts(v) / math.log(n)


@torch.no_grad()
def dead_unit_share(counts: torch.Tensor, threshold: float = 0) -> float:
    """Share of units used at most ``threshold`` times: ``#{u : count_u ≤ threshold} / n``.

    Empty input returns 0.0. It is 1 − usage in DAWN's ``analyze_dawn.py``
    (github.com/madst0614/DAWN).
    """
    c = _as_cpu_vector(counts)
    if c.numel() == 0:
        return 0.0
    return float((c <= threshold).to(torch.float64).mean())


@torch.no_grad()
def top_k_share(counts: torch.Tensor, k: int) -> float:
    """Share of the total mass held by the ``k`` most used units: ``Σ_{top-k} count / Σ count``.

    ``k ≥ n`` gives 1.0; ``k == 0`` or all-zero counts give 0.0; ``k < 0`` raises.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), ``scripts/analyze_dawn.py``
    (top-10 and top-50 shares).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    c = _non_negative_cpu_vector(counts, "counts")
    total = float(c.sum())
    if total <= 0 or k == 0:
        return 0.0
    k = min(k, c.numel())
    return float(c.topk(k).values.sum()) / total


@torch.no_grad()
def max_violation(counts: torch.Tensor) -> float:
    """Load imbalance of a routed group: ``MaxVio = max_u count_u / mean_u count_u − 1``.

    0 = perfectly balanced; ``n − 1`` = every selection on one of ``n`` units. All-zero counts or an
    empty vector give 0.0.

    Reference: Wang et al. 2024, *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts*,
    arXiv:2408.15664 (the balance measure of DeepSeek-V3's router).
    """
    c = _non_negative_cpu_vector(counts, "counts")
    if c.numel() == 0 or float(c.sum()) <= 0:
        return 0.0
    return float(c.max() / c.mean()) - 1.0


@torch.no_grad()
def silhouette_score(x: torch.Tensor, labels: torch.Tensor, metric: str = "cosine") -> float:
    """Mean silhouette of points ``x`` ``[n, d]`` grouped by ``labels`` ``[n]``.

    For point i in cluster A: ``a_i`` = mean distance to the other points of A, ``b_i`` = the smallest
    mean distance to the points of another cluster, ``s_i = (b_i − a_i) / max(a_i, b_i)``; a point alone
    in its cluster has ``s_i = 0``. Distances are ``1 − cosine`` (``metric="cosine"``) or Euclidean
    (``"euclidean"``). Returns the mean over points in [−1, 1]; fewer than two clusters (or fewer than
    two points) give 0.0. Matches ``sklearn.metrics.silhouette_score``.

    Reference: Rousseeuw 1987, *Silhouettes: a graphical aid to the interpretation and validation of
    cluster analysis*, J. Comput. Appl. Math. 20.
    """
    points = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)
    ids = torch.unique(labels.detach().reshape(-1).to("cpu"), return_inverse=True)[1]
    n = points.shape[0]
    if ids.numel() != n:
        raise ValueError(f"x has {n} points but labels has {ids.numel()}")
    k = int(ids.max()) + 1 if n else 0
    if n < 2 or k < 2:
        return 0.0
    if metric == "cosine":
        unit = torch.nn.functional.normalize(points, dim=-1)
        dist = (1.0 - unit @ unit.T).clamp_min(0.0)
    elif metric == "euclidean":
        dist = torch.cdist(points, points)
    else:
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    members = torch.nn.functional.one_hot(ids, k).to(torch.float64)  # (n, k)
    sizes = members.sum(0)  # (k,)
    sums = dist @ members  # (n, k): total distance from each point to each cluster
    own = sizes[ids]
    a = sums.gather(1, ids[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    other = sums / sizes
    other.scatter_(1, ids[:, None], float("inf"))
    b = other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s = torch.where(own > 1, s, torch.zeros_like(s))
    return float(s.mean())


# --------------------------------------------------------------------------------------------
# information between assignments and labels
# --------------------------------------------------------------------------------------------


def _paired_ids(assignments: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = assignments.detach().reshape(-1).to("cpu")
    b = labels.detach().reshape(-1).to("cpu")
    if a.numel() != b.numel():
        raise ValueError(f"assignments ({a.numel()}) and labels ({b.numel()}) differ in length")
    return a, b


def _mi_and_entropies(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, int, int]:
    """MI (nats), H(a), H(b) and the number of distinct values of a and b."""
    n = a.numel()
    if n == 0:
        return 0.0, 0.0, 0.0, 0, 0
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    na, nb = int(ai.max()) + 1, int(bi.max()) + 1
    row = torch.bincount(ai, minlength=na).to(torch.float64)
    col = torch.bincount(bi, minlength=nb).to(torch.float64)
    # Sparse contingency table: only non-empty cells, so many units × many labels stays cheap.
    cells, nij = torch.unique(ai * nb + bi, return_counts=True)
    nij = nij.to(torch.float64)
    terms = (nij / n) * (nij.log() + math.log(n) - row[cells // nb].log() - col[cells % nb].log())
    # Same cancellation guard as scikit-learn, so exact independence gives exactly 0.
    terms = torch.where(terms.abs() < torch.finfo(torch.float64).eps, torch.zeros_like(terms), terms)
    mi = max(0.0, float(terms.sum()))
    return mi, _entropy_from_counts(row), _entropy_from_counts(col), na, nb


@torch.no_grad()
def mutual_information(assignments: torch.Tensor, labels: torch.Tensor) -> float:
    """Mutual information (nats) between two labellings of the same items.

    ``I(A; L) = Σ_{a,l} p(a,l) log( p(a,l) / (p(a) p(l)) )`` from the contingency counts.
    Ids are arbitrary integers (only equality matters); both tensors are flattened and must
    have equal length. A constant labelling or empty input gives 0.0. Matches
    ``sklearn.metrics.mutual_info_score``.

    Reference: Cover & Thomas, "Elements of Information Theory". Here it asks whether a unit's
    selection tracks the corpus's ground-truth token classes or domains.
    """
    a, b = _paired_ids(assignments, labels)
    return _mi_and_entropies(a, b)[0]


@torch.no_grad()
def normalized_mutual_information(assignments: torch.Tensor, labels: torch.Tensor) -> float:
    """Normalised mutual information with arithmetic-mean normalisation.

    ``NMI = I(A; L) / ((H(A) + H(L)) / 2)``, in ``[0, 1]``. Degenerate cases follow
    ``sklearn.metrics.normalized_mutual_info_score`` (its default ``average_method="arithmetic"``):
    both labellings constant, or both empty, give 1.0 (identical trivial partitions); MI = 0
    otherwise (e.g. only one of them constant) gives 0.0.

    Reference: Strehl & Ghosh, JMLR 2002; Vinh, Epps & Bailey, JMLR 2010.
    """
    a, b = _paired_ids(assignments, labels)
    mi, ha, hb, na, nb = _mi_and_entropies(a, b)
    if na == nb and na <= 1:
        return 1.0
    if mi == 0.0:
        return 0.0
    return mi / ((ha + hb) / 2.0)


# --------------------------------------------------------------------------------------------
# homonyms and co-activation
# --------------------------------------------------------------------------------------------


def _sense_groups(surface_ids: torch.Tensor, sense_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = surface_ids.detach().reshape(-1).long()
    k = sense_ids.detach().reshape(-1).long().to(s.device)
    if s.numel() != k.numel():
        raise ValueError("surface_ids and sense_ids differ in length")
    if s.numel() == 0:
        empty = s.new_zeros((0, 2))
        return empty, s.new_zeros(0)
    return torch.unique(torch.stack([s, k], dim=1), dim=0, return_inverse=True)


@torch.no_grad()
def count_homonyms(surface_ids: torch.Tensor, sense_ids: torch.Tensor) -> int:
    """Number of distinct surface tokens that occur with at least two distinct senses.

    Check this before trusting :func:`homonym_separation`, which returns 0.0 when it is 0.
    Reference: SOSM (github.com/PlanetDestroyyer/Self-Organizing-State-Model), homonym test.
    """
    groups, _ = _sense_groups(surface_ids, sense_ids)
    if groups.shape[0] == 0:
        return 0
    _, senses_per_surface = torch.unique(groups[:, 0], return_counts=True)
    return int((senses_per_surface >= 2).sum())


@torch.no_grad()
def homonym_separation(hidden: torch.Tensor, surface_ids: torch.Tensor, sense_ids: torch.Tensor) -> float:
    """Contextual sense separation of homonyms.

    For each surface token ``w`` with ``≥ 2`` senses, take the sense centroids
    ``μ_{w,s} = mean{h_t : surface_t = w, sense_t = s}`` and
    ``sep(w) = mean_{s < s'} (1 − cos(μ_{w,s}, μ_{w,s'}))``; the result is ``mean_w sep(w)``.
    Range ``[0, 2]``; 0 = senses indistinguishable. Measured on contextual hidden states (not
    embedding tables, which is what the original SOSM test compared).

    Conventions: no homonym present returns 0.0 — use :func:`count_homonyms` to tell this
    apart from real collapse; two all-zero centroids count as identical (separation 0); a zero
    centroid against a non-zero one has cosine 0 (separation 1).

    Args:
        hidden: ``[T, d]`` or ``[B, S, d]`` hidden states.
        surface_ids, sense_ids: one integer per position (``[T]`` or ``[B, S]``).

    Reference: SOSM (github.com/PlanetDestroyyer/Self-Organizing-State-Model),
    ``test_homonym_separation.py`` (1 − cos, 0.3 and above graded good); here measured on contextual
    states rather than on embedding tables.
    """
    h = hidden.detach()
    h = h.reshape(-1, h.shape[-1])
    h = h.to(_work_dtype(h))
    groups, inverse = _sense_groups(surface_ids, sense_ids)
    if inverse.numel() != h.shape[0]:
        raise ValueError(f"{inverse.numel()} ids for {h.shape[0]} hidden vectors")
    if groups.shape[0] == 0:
        return 0.0
    inverse = inverse.to(h.device)
    sums = torch.zeros(groups.shape[0], h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, inverse, h)
    sizes = torch.bincount(inverse, minlength=groups.shape[0]).to(h.dtype)
    centroids = sums / sizes.unsqueeze(1)
    surfaces = groups[:, 0].to(h.device)
    per_surface: list[float] = []
    for w in torch.unique(surfaces):
        idx = (surfaces == w).nonzero().squeeze(1)
        if idx.numel() < 2:
            continue
        c = centroids[idx]
        sim = pairwise_cosine(c)
        is_zero = c.abs().sum(dim=1) == 0
        sim = torch.where(is_zero.unsqueeze(0) & is_zero.unsqueeze(1), torch.ones_like(sim), sim)
        per_surface.append(float((1.0 - _upper_pairs(sim)).mean()))
    if not per_surface:
        return 0.0
    return sum(per_surface) / len(per_surface)


@torch.no_grad()
def homonym_report(hidden: torch.Tensor, surface_ids: torch.Tensor, sense_ids: torch.Tensor) -> dict[str, float]:
    """:func:`homonym_separation` beside the two baselines that say what it means on these states.

    Contextual states are anisotropic (Ethayarajh 2019): any two centroids have a high cosine, and
    ``1 − cos`` between centroids measures noise and word identity as much as sense. So on the same
    states:

    * ``same_sense_baseline``: each sense of each homonym with ``≥ 2`` occurrences, its occurrences
      split in two halves (alternating, in order), ``1 − cos`` of the half centroids, averaged. What
      separation looks like when there is no sense difference at all. Half centroids average fewer
      states than sense centroids, so this baseline is, if anything, too high: a conservative margin.
    * ``random_pair_baseline``: ``1 − cos`` between the centroids of two different surface tokens,
      averaged over every pair of surface tokens present. What separation looks like between words.
    * ``margin = separation − same_sense_baseline``: the part of the separation that is sense.

    Also ``homonyms``: the homonyms present (surfaces with ``≥ 2`` senses), and
    ``same_sense_groups``. A baseline with nothing to average is 0. Deterministic (no sampling).

    Args:
        hidden: ``[T, d]`` or ``[B, S, d]``; surface_ids, sense_ids: one integer per state.

    Reference: Ethayarajh, "How Contextual are Contextualized Word Representations?", EMNLP 2019;
    Timkey & van Schijndel, "All Bark and No Bite: Rogue Dimensions...", EMNLP 2021.
    """
    h = hidden.detach()
    h = h.reshape(-1, h.shape[-1]).to(_work_dtype(h))
    surface = surface_ids.detach().reshape(-1).long().to(h.device)
    sense = sense_ids.detach().reshape(-1).long().to(h.device)
    if surface.numel() != h.shape[0] or sense.numel() != h.shape[0]:
        raise ValueError(f"{surface.numel()} surface and {sense.numel()} sense ids for {h.shape[0]} states")
    out = {
        "separation": homonym_separation(h, surface, sense),
        "homonyms": float(count_homonyms(surface, sense)),
    }
    groups, inverse = _sense_groups(surface, sense)
    same: list[float] = []
    if groups.shape[0]:
        _, senses_per_surface = torch.unique(groups[:, 0], return_counts=True, sorted=True)
        homonym_surfaces = torch.unique(groups[:, 0], sorted=True)[senses_per_surface >= 2]
        for g in range(groups.shape[0]):
            if not bool((homonym_surfaces == groups[g, 0]).any()):
                continue
            rows = (inverse == g).nonzero().squeeze(1)
            if rows.numel() < 2:
                continue
            first, second = h[rows[0::2]].mean(0), h[rows[1::2]].mean(0)
            same.append(1.0 - float(pairwise_cosine(torch.stack([first, second]))[0, 1]))
    out["same_sense_groups"] = float(len(same))
    out["same_sense_baseline"] = sum(same) / len(same) if same else 0.0
    words, word_of = torch.unique(surface, return_inverse=True)
    if words.numel() >= 2:
        sums = torch.zeros(words.numel(), h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, word_of, h)
        centroids = sums / torch.bincount(word_of, minlength=words.numel()).to(h.dtype).unsqueeze(1)
        out["random_pair_baseline"] = float((1.0 - _upper_pairs(pairwise_cosine(centroids))).mean())
    else:
        out["random_pair_baseline"] = 0.0
    out["margin"] = out["separation"] - out["same_sense_baseline"]
    return out


@torch.no_grad()
def within_unit_cosine(units: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Per unit, the mean cosine between the two ends of each edge: ``c_u = mean_(i,j) cos(x_iu, x_ju)``.

    With ``units`` a token state's blocks and ``edges`` the attention graph's token pairs, this is
    the "block similarity" the SOSM repository reported (its ``analyze_provenance`` tool): how alike
    one block is *across connected tokens*. It is not a similarity *between* blocks (that is
    :func:`linear_cka_matrix`); a value near 1 mostly says the states are anisotropic.

    Args:
        units: ``[N, U, d]`` (item, unit, feature).
        edges: ``[E, 2]`` item index pairs.

    Returns:
        ``[U]``; zeros when there is no edge.
    """
    x = units.detach().to(_work_dtype(units))
    if edges.numel() == 0:
        return torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    edges = edges.to(x.device).long()
    a, b = x[edges[:, 0]], x[edges[:, 1]]  # [E, U, d]
    cos = (F.normalize(a, dim=-1, eps=1e-8) * F.normalize(b, dim=-1, eps=1e-8)).sum(-1)
    return cos.mean(0)


@torch.no_grad()
def jensen_shannon_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen–Shannon divergence between two usage distributions (natural log).

    ``JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)``, ``m = ½ (p + q)``, after normalising ``p`` and ``q``
    (counts or shares) to sum 1. Symmetric, finite when a unit is unused in one of the two (where
    ``KL`` is infinite), 0 for identical distributions and at most ``log 2``. An all-zero input
    returns 0.0. Negative entries raise ``ValueError``.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), ``scripts/analyze_dawn.py``
    (layer differences, reported there as the KL divergence of layer usage).
    """
    a = _non_negative_cpu_vector(p, "p")
    b = _non_negative_cpu_vector(q, "q")
    if a.numel() != b.numel():
        raise ValueError(f"p and q have different lengths: {a.numel()} and {b.numel()}")
    if float(a.sum()) <= 0 or float(b.sum()) <= 0:
        return 0.0
    a, b = a / a.sum(), b / b.sum()
    m = 0.5 * (a + b)

    def kl(x: torch.Tensor) -> float:
        keep = x > 0
        return float((x[keep] * (x[keep] / m[keep]).log()).sum())

    return max(0.0, 0.5 * kl(a) + 0.5 * kl(b))


@torch.no_grad()
def coactivation_strong_pairs(
    assignments: torch.Tensor,
    num_units: int,
    threshold: float = 0.8,
    mask: torch.Tensor | None = None,
) -> int:
    """Number of unordered unit pairs that (almost) always fire together.

    With ``C_ij = #{tokens selecting both i and j}`` (``i ≠ j``) and ``n_i = #{tokens selecting i}``,
    ``P(j | i) = C_ij / n_i`` (0 when ``n_i = 0``). A pair is strong when
    ``P(j | i) > τ`` and ``P(i | j) > τ``. Such pairs act as one unit.

    Args:
        assignments: ``[T, k]`` (or ``[..., k]``) unit ids selected per token; a repeated id within
            one token counts once. ``[T]`` (one unit per token) has no pairs and returns 0.
        num_units: number of units; ids must lie in ``[0, num_units)``.
        threshold: ``τ``.
        mask: optional ``[T]`` (or the leading dims) weights; 0 drops a token.

    Reference: DAWN v5.0 (github.com/madst0614/DAWN, commit 1356f29), ``scripts/analyze_dawn.py``
    (co-activation, strong pairs at 0.8).
    """
    a = assignments.detach().long()
    if a.dim() < 2:
        return 0
    k = a.shape[-1]
    m = None
    if mask is not None:
        m = mask.detach().to(device=a.device, dtype=torch.float32)
        m = m.reshape(tuple(m.shape) + (1,) * (a.dim() - 1 - m.dim())).expand(a.shape[:-1]).reshape(-1)
    a = a.reshape(-1, k)
    if a.numel() and (int(a.min()) < 0 or int(a.max()) >= num_units):
        raise ValueError(f"unit ids must be in [0, {num_units})")
    co = torch.zeros(num_units, num_units, dtype=torch.int64, device=a.device)
    for start in range(0, a.shape[0], _COACT_BLOCK):
        block = a[start : start + _COACT_BLOCK]
        onehot = torch.zeros(block.shape[0], num_units, dtype=torch.float32, device=a.device)
        onehot.scatter_(1, block, 1.0)
        if m is not None:
            onehot = onehot * (m[start : start + _COACT_BLOCK] != 0).to(torch.float32).unsqueeze(1)
        # Each block holds ≤ 4096 tokens, so float32 counts are exact before the int64 sum.
        co += (onehot.transpose(0, 1) @ onehot).round().to(torch.int64)
    n_i = co.diagonal().clone()
    co.fill_diagonal_(0)
    cond = co.to(torch.float32) / n_i.clamp_min(1).to(torch.float32).unsqueeze(1)  # cond[i, j] = P(j | i)
    strong = (cond > threshold) & (cond.transpose(0, 1) > threshold)
    return int(torch.triu(strong, diagonal=1).sum())


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    return f"{prefix}{name}" if prefix.endswith(".") else f"{prefix}.{name}"


@dataclass
class CollapseReport:
    """Named collapse measurements, shared by every architecture.

    ``metrics`` are scalars (e.g. ``"layer0.heads.mean_abs_cosine"``), ``matrices`` 2-D tensors
    (similarity heatmaps), ``distributions`` 1-D tensors (usage histograms), ``points`` unit vectors
    ``[n, d]`` to draw as a 2-D map (e.g. a key store) and ``point_labels`` an integer colour per
    point of the map of the same name (-1: none). Tensors are stored detached on CPU.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    distributions: dict[str, torch.Tensor] = field(default_factory=dict)
    points: dict[str, torch.Tensor] = field(default_factory=dict)
    point_labels: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, other: "CollapseReport", prefix: str = "") -> "CollapseReport":
        """Merge ``other`` into this report, naming each entry ``prefix + "." + name``.

        A prefix that already ends in ``"."`` is used as is; ``""`` keeps the names. Entries with
        the same final name are overwritten. Returns ``self`` for chaining.
        """
        for name, value in other.metrics.items():
            self.metrics[_join(prefix, name)] = float(value)
        for name, mat in other.matrices.items():
            self.matrices[_join(prefix, name)] = mat.detach().cpu()
        for name, dist in other.distributions.items():
            self.distributions[_join(prefix, name)] = dist.detach().cpu()
        for name, pts in other.points.items():
            self.points[_join(prefix, name)] = pts.detach().to("cpu", torch.float32)
        for name, labels in other.point_labels.items():
            self.point_labels[_join(prefix, name)] = labels.detach().cpu()
        return self

    def to_dict(self) -> dict:
        """JSON-able dict: ``{"metrics": {name: float}, "distributions": {name: list},
        "matrices": {name: list of lists}}``, plus ``"points"`` and ``"point_labels"`` when there are any."""
        out = {
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "distributions": {k: v.detach().cpu().reshape(-1).tolist() for k, v in self.distributions.items()},
            "matrices": {k: v.detach().cpu().tolist() for k, v in self.matrices.items()},
        }
        if self.points:
            out["points"] = {k: v.detach().cpu().tolist() for k, v in self.points.items()}
            out["point_labels"] = {k: v.detach().cpu().reshape(-1).tolist() for k, v in self.point_labels.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CollapseReport":
        """Inverse of :meth:`to_dict` (tensors come back as float32); missing sections are empty."""
        return cls(
            metrics={k: float(v) for k, v in d.get("metrics", {}).items()},
            matrices={k: torch.tensor(v, dtype=torch.float32) for k, v in d.get("matrices", {}).items()},
            distributions={
                k: torch.tensor(v, dtype=torch.float32) for k, v in d.get("distributions", {}).items()
            },
            points={k: torch.tensor(v, dtype=torch.float32) for k, v in d.get("points", {}).items()},
            point_labels={k: torch.tensor(v, dtype=torch.long) for k, v in d.get("point_labels", {}).items()},
        )

    def to_markdown(self) -> str:
        """Two-column markdown table ``| metric | value |`` of the scalar metrics, sorted by name,
        values with 4 significant digits."""
        lines = ["| metric | value |", "|---|---|"]
        for name in sorted(self.metrics):
            # A literal "|" in a name would split the row into extra cells.
            shown = name.replace("|", "\\|")
            lines.append(f"| {shown} | {self.metrics[name]:.4g} |")
        return "\n".join(lines)


def _aligned_labels(assignments: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Top-k assignments [B, S, k] with per-token labels [B, S]: each (token, slot) pair gets the
    # token's label, so MI measures how much a selection tells about the token's label.
    if assignments.numel() != labels.numel() and labels.dim() < assignments.dim():
        if tuple(assignments.shape[: labels.dim()]) == tuple(labels.shape):
            extra = assignments.dim() - labels.dim()
            labels = labels.reshape(tuple(labels.shape) + (1,) * extra).expand_as(assignments)
    return assignments.reshape(-1), labels.reshape(-1)


@torch.no_grad()
def unit_report(
    vectors: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    assignments: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_units: int | None = None,
    similar_threshold: float = 0.8,
) -> CollapseReport:
    """The standard collapse bundle for one group of units, with unprefixed names.

    From ``vectors`` ``[n, d]`` (one unit per row, see module conventions):
    ``mean_abs_cosine``, ``mean_signed_cosine``, ``max_signed_cosine``, ``max_abs_cosine``,
    ``similar_pair_fraction`` (signed, ``> similar_threshold``), ``effective_rank_entropy``,
    ``effective_rank_entropy_ratio`` (÷ ``min(n, d)``), ``effective_rank_nuclear``,
    ``top1_dominance``, and the matrix ``similarity``.

    From ``counts`` ``[n]`` — or, if ``counts`` is None, from ``assignments`` counted with
    ``num_units`` (default: ``len(vectors)`` if given, else ``max id + 1``): ``usage`` (share of
    units used at least once), ``gini``, ``normalized_entropy``, ``dead_share`` (count 0),
    ``top1_share``, and the distribution ``usage_share``.

    From ``labels`` together with ``assignments``: ``mutual_information`` and
    ``normalized_mutual_information``. Both are flattened and paired element-wise; per-token
    labels ``[B, S]`` are repeated over the slots of ``[B, S, k]`` assignments.

    Callers prefix the names with :meth:`CollapseReport.update`, e.g.
    ``report.update(unit_report(...), prefix="layer0.heads")``.

    Reference: the concept analysis of MrCogito (github.com/ksopyla/MrCogito) and the neuron
    analysis of DAWN v5.0 (github.com/madst0614/DAWN), whose metrics are unified here.
    """
    report = CollapseReport()
    if vectors is not None:
        units = _as_units(vectors)
        n, d = units.shape
        sim = pairwise_cosine(units)
        sv = torch.linalg.svdvals(units) if units.numel() else units.new_zeros(0)
        erank = _erank_entropy(sv)
        report.metrics.update(
            {
                "mean_abs_cosine": _mean_off_diag(sim, absolute=True),
                "mean_signed_cosine": _mean_off_diag(sim, absolute=False),
                "max_signed_cosine": _max_off_diag(sim, absolute=False),
                "max_abs_cosine": _max_off_diag(sim, absolute=True),
                "similar_pair_fraction": _similar_fraction(sim, similar_threshold, absolute=False),
                "effective_rank_entropy": erank,
                "effective_rank_entropy_ratio": erank / min(n, d) if min(n, d) > 0 else 0.0,
                "effective_rank_nuclear": _erank_nuclear(sv),
                "top1_dominance": _top1_dominance(sv),
            }
        )
        report.matrices["similarity"] = sim.detach().to("cpu", torch.float32)

    if counts is None and assignments is not None:
        if num_units is None:
            if vectors is not None:
                num_units = int(vectors.shape[0])
            else:
                num_units = int(assignments.max()) + 1 if assignments.numel() else 0
        counts = usage_counts(assignments, num_units)
    if counts is not None:
        c = counts.detach().reshape(-1)
        if num_units is not None and c.numel() != num_units:
            raise ValueError(f"counts has {c.numel()} entries but num_units={num_units}")
        report.metrics.update(
            {
                "usage": 1.0 - dead_unit_share(c, threshold=0) if c.numel() else 0.0,
                "gini": gini(c),
                "normalized_entropy": normalized_entropy(c),
                "dead_share": dead_unit_share(c, threshold=0),
                "top1_share": top_k_share(c, 1),
            }
        )
        report.distributions["usage_share"] = usage_share(c).to("cpu", torch.float32)

    if labels is not None:
        if assignments is None:
            raise ValueError("labels need assignments to compute mutual information")
        a, b = _aligned_labels(assignments, labels)
        report.metrics["mutual_information"] = mutual_information(a, b)
        report.metrics["normalized_mutual_information"] = normalized_mutual_information(a, b)
    return report


# --------------------------------------------------------------------------------------------
# concept encoders: geometry of [B, C, H] concept outputs and its health grading
# --------------------------------------------------------------------------------------------

# A per-dimension std below this counts the dimension as collapsed (MrCogito's concept analysis).
_COLLAPSED_DIM_STD = 1e-4


def _spectrum_metrics(sv: torch.Tensor, rank_cap: int) -> dict[str, float]:
    # Rank and dominance of one singular-value vector; ratios divide by min(C, H).
    erank_e = _erank_entropy(sv)
    erank_n = _erank_nuclear(sv)
    return {
        "effective_rank_entropy": erank_e,
        "effective_rank_entropy_ratio": erank_e / rank_cap if rank_cap > 0 else 0.0,
        "effective_rank_nuclear": erank_n,
        "effective_rank_nuclear_ratio": erank_n / rank_cap if rank_cap > 0 else 0.0,
        "top1_dominance": _top1_dominance(sv),
    }


def _variance_shares(sv: torch.Tensor) -> tuple[float, float, int]:
    # (σ_1²/Σσ², Σ_{i≤5} σ_i²/Σσ², smallest k with Σ_{i≤k} σ_i²/Σσ² ≥ 0.95); zeros for no energy.
    energy = sv.to(device="cpu", dtype=torch.float64).pow(2).sort(descending=True).values
    total = float(energy.sum())
    if total <= 0:
        return 0.0, 0.0, 0
    share = energy / total
    cumulative = share.cumsum(0)
    # The 1e-12 slack keeps an exact 95% (e.g. shares 0.95 + 0.05) from rounding one dim up.
    k = int((cumulative < 0.95 - 1e-12).sum()) + 1
    return float(share[0]), float(share[:5].sum()), min(k, share.numel())


@torch.no_grad()
def concept_geometry(concepts: torch.Tensor, similar_threshold: float = 0.8) -> CollapseReport:
    """Geometry and collapse metrics of concept-encoder outputs, with unprefixed names.

    ``concepts`` is ``[B, C, H]``: ``B`` inputs, ``C`` concept vectors per input, width ``H``
    (computed in float32, float64 for float64 input; detached). ``ĉ = c / max(‖c‖, 1e-8)``,
    ``S_b = ĉ_b ĉ_bᵀ`` is the ``[C, C]`` cosine matrix of input ``b``, ``r = min(C, H)`` and
    ``Z = concepts.reshape(B·C, H)``. Metrics (Python floats):

    Global view (the one MrCogito reports), on the batch-mean ``M = mean_b c_b`` ``[C, H]`` with
    singular values ``σ_1 ≥ … ≥ σ_r``:

    * ``global.effective_rank_nuclear`` ``= Σσ_i / σ_1``; ``global.effective_rank_nuclear_ratio`` ``÷ r``.
    * ``global.effective_rank_entropy`` ``= exp(−Σ p_i log p_i)``, ``p_i = σ_i / Σσ`` (Roy–Vetterli);
      ``global.effective_rank_entropy_ratio`` ``÷ r``.
    * ``global.top1_dominance`` ``= σ_1 / Σσ_i``.
    * ``global.top1_variance_ratio`` ``= σ_1² / Σσ_i²``;
      ``global.top5_variance_ratio`` ``= Σ_{i≤5} σ_i² / Σσ_i²``.
    * ``global.dims_for_95pct_variance`` ``= min{k : Σ_{i≤k} σ_i² / Σσ_i² ≥ 0.95}``.

    Averaging over inputs before the SVD measures how distinct the *average slots* are, not how
    diverse one input's concepts are: inputs whose concepts are rank 1 but point in different
    directions give a high global rank, and inputs that cancel out give a low one.

    Within-input view (absent from the original analysis), the same spectrum on each input's own
    ``c_b`` ``[C, H]``, then the mean over ``b``: ``within.effective_rank_entropy``,
    ``within.effective_rank_entropy_ratio``, ``within.effective_rank_nuclear``,
    ``within.effective_rank_nuclear_ratio`` and ``within.top1_dominance``.

    Concepts of the same input, over the ordered pairs ``i ≠ j`` of every input
    (``N_off = B·C·(C−1)`` entries):

    * ``mean_abs_cosine`` ``= Σ_b Σ_{i≠j} |S_bij| / N_off``;
    * ``max_signed_cosine`` ``= max_{b, i≠j} S_bij``;
    * ``offdiag_cosine_std``: population std (divisor ``N_off``) of those ``S_bij``;
    * ``similar_pair_fraction`` ``= #{(b, i≠j) : S_bij > similar_threshold} / N_off`` (signed).

    ``slot_cross_input_cosine``: for each slot ``i``, the mean of ``cos(c_bi, c_b'i)`` over input
    pairs ``b ≠ b'``, then the mean over slots. 1.0 = each concept is the same whatever the input
    (slots are input-independent constants); near 0 = unrelated across inputs. ``B = 1`` has no
    input pairs and gives 0.0, as do all-zero concepts (zero rows have cosine 0).

    Per dimension of ``Z`` (unbiased std, ``σ_d = sqrt(Σ_n (Z_nd − Z̄_d)² / (B·C − 1))``; a single
    row ``B·C = 1`` has std 0): ``dim_std_mean``, ``dim_std_min``, ``dim_std_max``,
    ``collapsed_dims`` ``= #{d : σ_d < 1e-4}``, ``collapsed_dim_ratio`` ``= collapsed_dims / H``,
    ``active_dim_fraction`` ``= 1 − collapsed_dim_ratio``.

    Spread:

    * ``uniformity`` ``= mean_b Σ_{i≠j} exp(−2 (2 − 2 S_bij)) / (C(C−1))`` (Gaussian potential,
      ``τ = 2``, within-input pairs; :func:`~.regularizers.uniformity_gaussian`); 0 when ``C = 1``.
    * ``isotropy`` ``= λ_min / λ_max`` of the ``H × H`` covariance of ``Z`` (``λ_min = 0`` when
      ``B·C − 1 < H``); 0.0 when ``λ_max = 0``.
    * ``participation_ratio`` ``= (Σλ)² / Σλ²`` (:func:`participation_ratio` on ``Z``) and
      ``participation_ratio_normalized`` ``÷ H``.

    Norms ``‖c_bi‖₂``: ``norm_mean``, ``norm_std`` (unbiased; 0 for a single concept),
    ``norm_min``, ``norm_max``.

    Matrices: ``similarity`` (cosine matrix of ``M``, ``[C, C]``). Distributions:
    ``global_singular_values`` (``σ`` of ``M``, descending). Both float32 on CPU.

    Degenerate inputs (all-equal or all-zero concepts, ``B = 1``, ``C = 1``) give finite values: the
    rank/dominance helpers return 0 for a zero matrix, means over no pairs are 0.

    Args:
        concepts: ``[B, C, H]`` concept outputs (``B, C, H ≥ 1``).
        similar_threshold: threshold of ``similar_pair_fraction``.

    Grade the result with :func:`grade_concept_health`; prefix the names with
    :meth:`CollapseReport.update`.

    Reference: MrCogito (github.com/ksopyla/MrCogito), ``analysis/concept_analysis.py``
    (``compute_concept_geometry_metrics``: global rank, top-1 dominance, variance ratios, pairwise
    similarity, per-dimension std, uniformity, isotropy, participation ratio, norms); Roy &
    Vetterli, EUSIPCO 2007 (entropy effective rank).
    """
    c = concepts.detach()
    if c.dim() != 3:
        raise ValueError(f"expected concepts of shape [B, C, H], got {tuple(c.shape)}")
    b, n, h = c.shape
    if b == 0 or n == 0 or h == 0:
        raise ValueError(f"concepts must be non-empty, got shape {tuple(c.shape)}")
    c = c.to(_work_dtype(c))
    rank_cap = min(n, h)
    metrics: dict[str, float] = {}

    # global view: spectrum of the batch-mean concept matrix
    mean_concepts = c.mean(dim=0)
    global_sv = _singular_values(mean_concepts)
    for name, value in _spectrum_metrics(global_sv, rank_cap).items():
        metrics[f"global.{name}"] = value
    top1_var, top5_var, dims95 = _variance_shares(global_sv)
    metrics["global.top1_variance_ratio"] = top1_var
    metrics["global.top5_variance_ratio"] = top5_var
    metrics["global.dims_for_95pct_variance"] = float(dims95)

    # within-input view: the same spectrum per input, averaged over inputs
    per_input_sv = torch.linalg.svdvals(c).to(device="cpu", dtype=torch.float64)
    sums: dict[str, float] = {}
    for sv in per_input_sv:
        for name, value in _spectrum_metrics(sv, rank_cap).items():
            sums[name] = sums.get(name, 0.0) + value
    for name, total in sums.items():
        metrics[f"within.{name}"] = total / b

    # cosines among the concepts of one input
    sim = pairwise_cosine(c)  # [B, C, C]
    if n >= 2:
        off = sim[:, ~torch.eye(n, dtype=torch.bool, device=sim.device)]  # [B, C(C-1)]
        metrics["mean_abs_cosine"] = float(off.abs().mean())
        metrics["max_signed_cosine"] = float(off.max())
        metrics["offdiag_cosine_std"] = float(off.std(correction=0))
        metrics["similar_pair_fraction"] = float((off > similar_threshold).to(torch.float64).mean())
    else:
        for name in ("mean_abs_cosine", "max_signed_cosine", "offdiag_cosine_std", "similar_pair_fraction"):
            metrics[name] = 0.0

    # the same slot across different inputs
    if b >= 2:
        per_slot = pairwise_cosine(c.transpose(0, 1))  # [C, B, B]
        cross = per_slot[:, ~torch.eye(b, dtype=torch.bool, device=per_slot.device)]
        metrics["slot_cross_input_cosine"] = float(cross.mean())
    else:
        metrics["slot_cross_input_cosine"] = 0.0

    # per-dimension spread of all concept vectors pooled
    flat = c.reshape(b * n, h)
    if flat.shape[0] >= 2:
        dim_std = flat.std(dim=0)
    else:
        dim_std = flat.new_zeros(h)
    collapsed = int((dim_std < _COLLAPSED_DIM_STD).sum())
    metrics["dim_std_mean"] = float(dim_std.mean())
    metrics["dim_std_min"] = float(dim_std.min())
    metrics["dim_std_max"] = float(dim_std.max())
    metrics["collapsed_dims"] = float(collapsed)
    metrics["collapsed_dim_ratio"] = collapsed / h
    metrics["active_dim_fraction"] = 1.0 - collapsed / h

    metrics["uniformity"] = float(uniformity_gaussian(c, t=2.0))
    centred_sv = torch.linalg.svdvals(flat - flat.mean(dim=0, keepdim=True)).to("cpu", torch.float64)
    lam_max = float(centred_sv.max()) ** 2
    # Centring leaves rank <= B·C − 1, so with fewer rows than that Cov(Z) has an exact zero
    # eigenvalue (set to 0 rather than left to rounding).
    lam_min = float(centred_sv.min()) ** 2 if flat.shape[0] - 1 >= h else 0.0
    metrics["isotropy"] = lam_min / lam_max if lam_max > 0 else 0.0
    pr = participation_ratio(flat)
    metrics["participation_ratio"] = pr
    metrics["participation_ratio_normalized"] = pr / h

    norms = c.norm(dim=-1).reshape(-1)
    metrics["norm_mean"] = float(norms.mean())
    metrics["norm_std"] = float(norms.std()) if norms.numel() >= 2 else 0.0
    metrics["norm_min"] = float(norms.min())
    metrics["norm_max"] = float(norms.max())

    report = CollapseReport(metrics=metrics)
    report.matrices["similarity"] = pairwise_cosine(mean_concepts).to("cpu", torch.float32)
    report.distributions["global_singular_values"] = global_sv.to("cpu", torch.float32)
    return report


# Health bands of MrCogito's ``analysis/run_concept_analysis.py`` (github.com/ksopyla/MrCogito),
# keyed by the metric names of :func:`concept_geometry`: name -> (bad_edge, good_edge,
# higher_is_better).
CONCEPT_HEALTH_THRESHOLDS: dict[str, tuple[float, float, bool]] = {
    # higher is better: POOR < bad_edge <= OK < good_edge <= GOOD
    "global.effective_rank_nuclear_ratio": (0.3, 0.7, True),
    # Not in MrCogito: the same 0.3 / 0.7 band on the within-input entropy rank, the view this
    # package accepts a concept encoder on (the global rank can look healthy while every input
    # collapses to one direction).
    "within.effective_rank_entropy_ratio": (0.3, 0.7, True),
    "participation_ratio_normalized": (0.1, 0.3, True),
    "global.dims_for_95pct_variance": (10.0, 50.0, True),
    "active_dim_fraction": (0.9, 0.99, True),
    "isotropy": (0.001, 0.01, True),
    "dim_std_mean": (0.3, 0.8, True),
    "dim_std_min": (0.01, 0.1, True),
    # lower is better: GOOD < good_edge <= OK < bad_edge <= POOR
    "mean_abs_cosine": (0.5, 0.3, False),
    "max_signed_cosine": (0.8, 0.6, False),
    "uniformity": (0.6, 0.3, False),
    "global.top1_dominance": (0.5, 0.3, False),
}


def grade_concept_health(metrics: dict[str, float]) -> dict[str, str]:
    """Grade concept metrics as ``"GOOD"``, ``"OK"`` or ``"POOR"`` with :data:`CONCEPT_HEALTH_THRESHOLDS`.

    For each threshold metric present in ``metrics`` (unprefixed names, as returned by
    :func:`concept_geometry`), with ``(bad, good, higher_is_better)``:

    * higher is better: ``v < bad`` → POOR, ``bad ≤ v < good`` → OK, ``v ≥ good`` → GOOD;
    * lower is better: ``v < good`` → GOOD, ``good ≤ v < bad`` → OK, ``v ≥ bad`` → POOR.

    A NaN value is graded POOR. Metrics without a threshold are ignored; the result follows the
    order of :data:`CONCEPT_HEALTH_THRESHOLDS`.

    MrCogito's raw global rank band (40 / 90) is left out: it assumes ``min(C, H) = 128``; the
    normalized rank carries the same information for any size. ``global.dims_for_95pct_variance``
    (10 / 50) is kept as MrCogito has it and likewise assumes concept matrices of about that size.

    Reference: MrCogito (github.com/ksopyla/MrCogito), grading thresholds of
    ``analysis/run_concept_analysis.py`` (POOR < lo ≤ OK < hi ≤ GOOD; for lower-is-better metrics
    GOOD below the first number and OK below the second).
    """
    grades: dict[str, str] = {}
    for name, (bad, good, higher_is_better) in CONCEPT_HEALTH_THRESHOLDS.items():
        if name not in metrics:
            continue
        v = float(metrics[name])
        if math.isnan(v):
            grades[name] = "POOR"
        elif higher_is_better:
            grades[name] = "POOR" if v < bad else ("OK" if v < good else "GOOD")
        else:
            grades[name] = "GOOD" if v < good else ("OK" if v < bad else "POOR")
    return grades
