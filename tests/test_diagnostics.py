"""Tests for decollapse.modeling.diagnostics: hand-computed values, numpy/scipy/sklearn references, edge cases."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from decollapse.modeling import diagnostics as D


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def np_erank(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------------------ similarity


def test_cosine_similarity_matrix_hand_values_and_no_grad():
    x = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    s = D.cosine_similarity_matrix(x)
    h = 1 / math.sqrt(2)
    torch.testing.assert_close(s, torch.tensor([[1.0, h, 0.0], [h, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert not s.requires_grad


def test_cosine_similarity_matrix_flattens_trailing_dims():
    w = randn(4, 3, 5, seed=1)
    torch.testing.assert_close(D.cosine_similarity_matrix(w), D.cosine_similarity_matrix(w.reshape(4, 15)))
    assert D.cosine_similarity_matrix(w).shape == (4, 4)


def test_mean_and_max_off_diagonal_cosine_signed_vs_absolute():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    # off-diagonal cosines: (0,1) = -1, (0,2) = 0, (1,2) = 0 (each twice when ordered)
    assert D.mean_off_diagonal_cosine(x, absolute=False) == pytest.approx(-1 / 3)
    assert D.mean_off_diagonal_cosine(x, absolute=True) == pytest.approx(1 / 3)
    assert D.max_off_diagonal_cosine(x, absolute=False) == pytest.approx(0.0, abs=1e-7)
    assert D.max_off_diagonal_cosine(x, absolute=True) == pytest.approx(1.0)
    for fn in (D.mean_off_diagonal_cosine, D.max_off_diagonal_cosine):
        assert fn(torch.randn(1, 3), absolute=True) == 0.0
        assert fn(torch.zeros(4, 3), absolute=False) == 0.0
        assert fn(torch.ones(4, 3), absolute=False) == pytest.approx(1.0, abs=1e-6)
        assert isinstance(fn(x, absolute=True), float)


def test_mean_off_diagonal_cosine_matches_scipy():
    x = randn(9, 5, seed=2)
    cos = 1 - pdist(x.double().numpy(), metric="cosine")
    assert D.mean_off_diagonal_cosine(x, absolute=False) == pytest.approx(cos.mean(), abs=1e-6)
    assert D.mean_off_diagonal_cosine(x, absolute=True) == pytest.approx(np.abs(cos).mean(), abs=1e-6)
    assert D.max_off_diagonal_cosine(x, absolute=False) == pytest.approx(cos.max(), abs=1e-6)


def test_similar_pair_fraction_hand_and_reference():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [0.0, 1.0]])
    # unordered cosines: (0,1) 0.995, (0,2) -1, (0,3) 0, (1,2) -0.995, (1,3) 0.0995, (2,3) 0
    assert D.similar_pair_fraction(x, 0.8) == pytest.approx(1 / 6)
    assert D.similar_pair_fraction(x, 0.8, absolute=True) == pytest.approx(3 / 6)
    y = randn(30, 3, seed=3)
    cos = 1 - pdist(y.double().numpy(), metric="cosine")
    assert D.similar_pair_fraction(y, 0.5) == pytest.approx((cos > 0.5).mean())
    assert D.similar_pair_fraction(torch.ones(5, 2), 0.8) == 1.0
    assert D.similar_pair_fraction(torch.ones(1, 2), 0.8) == 0.0
    assert D.similar_pair_fraction(torch.zeros(5, 2), 0.8) == 0.0


# ------------------------------------------------------------------------------ spectrum


def test_effective_ranks_hand_values():
    x = torch.diag(torch.tensor([3.0, 1.0]))
    # sigma = (3, 1): p = (0.75, 0.25), erank = exp(-(0.75 ln 0.75 + 0.25 ln 0.25))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert D.effective_rank_entropy(x) == pytest.approx(expected, rel=1e-6)
    assert D.effective_rank_nuclear(x) == pytest.approx(4 / 3, rel=1e-6)
    assert D.top1_singular_dominance(x) == pytest.approx(3 / 4, rel=1e-6)


def test_effective_ranks_match_numpy_svd():
    x = randn(12, 7, seed=4)
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    assert D.effective_rank_entropy(x) == pytest.approx(np_erank(x.double().numpy()), rel=1e-5)
    assert D.effective_rank_nuclear(x) == pytest.approx(s.sum() / s[0], rel=1e-5)
    assert D.top1_singular_dominance(x) == pytest.approx(s[0] / s.sum(), rel=1e-5)


def test_effective_ranks_edges():
    assert D.effective_rank_entropy(torch.eye(5)) == pytest.approx(5.0, rel=1e-6)
    assert D.effective_rank_nuclear(torch.eye(5)) == pytest.approx(5.0, rel=1e-6)
    rank1 = torch.ones(6, 4) * torch.arange(1.0, 5.0)
    assert D.effective_rank_entropy(rank1) == pytest.approx(1.0, abs=1e-5)
    assert D.top1_singular_dominance(rank1) == pytest.approx(1.0, abs=1e-5)
    for fn in (D.effective_rank_entropy, D.effective_rank_nuclear, D.top1_singular_dominance):
        assert fn(torch.zeros(4, 3)) == 0.0
    assert D.effective_rank_entropy(torch.randn(1, 8)) == pytest.approx(1.0, rel=1e-6)


def test_participation_ratio_hand_and_reference():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    # Cov = diag(2/3, 8/3) -> (10/3)² / (4/9 + 64/9) = 100/68
    assert D.participation_ratio(x) == pytest.approx(100 / 68, rel=1e-6)
    z = randn(3, 20, 6, seed=5)
    lam = np.linalg.eigvalsh(np.cov(z.reshape(-1, 6).double().numpy(), rowvar=False))
    assert D.participation_ratio(z) == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-5)
    assert D.participation_ratio(torch.randn(1, 4)) == 0.0
    assert D.participation_ratio(torch.ones(5, 4)) == 0.0


# ------------------------------------------------------------------------------ usage


def test_usage_counts_with_mask():
    a = torch.tensor([[[0, 1], [1, 2]], [[3, 3], [0, 0]]])  # [B=2, S=2, k=2]
    assert D.usage_counts(a, 4).tolist() == [3, 2, 1, 2]
    mask = torch.tensor([[1, 1], [1, 0]])  # drops the last token's two selections of unit 0
    assert D.usage_counts(a, 4, mask).tolist() == [1, 2, 1, 2]
    assert D.usage_counts(a, 6).tolist() == [3, 2, 1, 2, 0, 0]
    with pytest.raises(ValueError):
        D.usage_counts(a, 3)


def test_usage_share():
    torch.testing.assert_close(D.usage_share(torch.tensor([1, 3])), torch.tensor([0.25, 0.75]))
    assert D.usage_share(torch.zeros(3, dtype=torch.long)).tolist() == [0.0, 0.0, 0.0]


def _gini_direct(v: np.ndarray) -> float:
    # mean absolute difference over all ordered pairs / (2 * mean)
    return float(np.abs(v[:, None] - v[None, :]).sum() / (2 * len(v) ** 2 * v.mean()))


def test_gini_values():
    # [1, 2, 3]: ordered |xi - xj| sum = 2 * (1 + 2 + 1) = 8; / (2 * 9 * 2) = 2/9
    assert D.gini(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 9)
    assert D.gini(torch.tensor([0.0, 0.0, 0.0, 7.0])) == pytest.approx(3 / 4)  # (n-1)/n
    assert D.gini(torch.tensor([2, 2, 2])) == pytest.approx(0.0, abs=1e-12)
    assert D.gini(torch.zeros(5)) == 0.0
    assert D.gini(torch.tensor([4.0])) == 0.0
    v = torch.rand(50, generator=gen(6)) ** 3
    assert D.gini(v) == pytest.approx(_gini_direct(v.double().numpy()), rel=1e-6)
    with pytest.raises(ValueError):
        D.gini(torch.tensor([1.0, -1.0]))


def test_normalized_entropy_values():
    assert D.normalized_entropy(torch.tensor([1, 1, 1, 1])) == pytest.approx(1.0)
    assert D.normalized_entropy(torch.tensor([5, 0, 0, 0])) == pytest.approx(0.0, abs=1e-12)
    # p = (1/4, 3/4): H / ln 2
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert D.normalized_entropy(torch.tensor([1.0, 3.0])) == pytest.approx(expected)
    assert D.normalized_entropy(torch.tensor([0.1, 0.3])) == pytest.approx(expected)  # probs or counts
    assert D.normalized_entropy(torch.tensor([9])) == 1.0
    assert D.normalized_entropy(torch.zeros(4)) == 0.0


def test_dead_unit_share_and_top_k_share():
    c = torch.tensor([0, 1, 2, 0])
    assert D.dead_unit_share(c) == 0.5
    assert D.dead_unit_share(c, threshold=1) == 0.75
    assert D.dead_unit_share(torch.zeros(0)) == 0.0
    c = torch.tensor([5, 1, 3, 1])
    assert D.top_k_share(c, 1) == pytest.approx(0.5)
    assert D.top_k_share(c, 2) == pytest.approx(0.8)
    assert D.top_k_share(c, 10) == pytest.approx(1.0)
    assert D.top_k_share(c, 0) == 0.0
    assert D.top_k_share(torch.zeros(3), 2) == 0.0
    with pytest.raises(ValueError):
        D.top_k_share(c, -1)


# ------------------------------------------------------------------------------ mutual information


def test_mutual_information_hand_value():
    a = torch.tensor([0, 0, 1, 1])
    assert D.mutual_information(a, a) == pytest.approx(math.log(2))
    assert D.mutual_information(a, torch.tensor([0, 1, 0, 1])) == 0.0  # independent
    assert D.normalized_mutual_information(a, torch.tensor([7, 7, 3, 3])) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutual_information_matches_sklearn(seed):
    g = gen(seed)
    a = torch.randint(0, 6, (300,), generator=g) * 1000 + 7  # arbitrary, sparse ids
    lab = (a // 1000 + torch.randint(0, 3, (300,), generator=g)) % 5
    assert D.mutual_information(a, lab) == pytest.approx(mutual_info_score(lab.numpy(), a.numpy()), rel=1e-9)
    assert D.normalized_mutual_information(a, lab) == pytest.approx(
        normalized_mutual_info_score(lab.numpy(), a.numpy()), rel=1e-9
    )


@pytest.mark.parametrize(
    "a,b",
    [
        ([3, 3, 3, 3], [1, 1, 1, 1]),  # both constant
        ([3, 3, 3, 3], [0, 1, 2, 3]),  # one constant
        ([0, 1, 2, 3], [5, 5, 5, 5]),
        ([0, 1, 0, 1], [0, 0, 1, 1]),  # independent
        ([4], [9]),
    ],
)
def test_mutual_information_degenerate_cases_match_sklearn(a, b):
    ta, tb = torch.tensor(a), torch.tensor(b)
    assert D.mutual_information(ta, tb) == pytest.approx(mutual_info_score(b, a), abs=1e-12)
    assert D.normalized_mutual_information(ta, tb) == pytest.approx(normalized_mutual_info_score(b, a), abs=1e-12)


def test_mutual_information_empty_and_length_mismatch():
    e = torch.zeros(0, dtype=torch.long)
    assert D.mutual_information(e, e) == 0.0
    assert D.normalized_mutual_information(e, e) == normalized_mutual_info_score([], [])  # 1.0
    with pytest.raises(ValueError):
        D.mutual_information(torch.tensor([0, 1]), torch.tensor([0]))


# ------------------------------------------------------------------------------ homonyms / co-activation


def test_homonym_separation_hand_value():
    surface = torch.tensor([5, 5, 5, 7, 7, 9, 8, 8, 8])
    sense = torch.tensor([0, 1, 1, 0, 0, 0, 0, 1, 2])
    hidden = torch.tensor(
        [
            [1.0, 0.0],  # 5/sense0
            [0.0, 1.0],  # 5/sense1 } centroid (0, 2)
            [0.0, 3.0],  # 5/sense1 }
            [1.0, 1.0],  # 7: one sense only -> ignored
            [5.0, 1.0],
            [1.0, 9.0],  # 9: one occurrence -> ignored
            [1.0, 0.0],  # 8/sense0
            [-1.0, 0.0],  # 8/sense1
            [0.0, 1.0],  # 8/sense2
        ]
    )
    # surface 5: 1 - cos((1,0), (0,2)) = 1
    # surface 8: pairs (0,1): 1 - (-1) = 2, (0,2): 1, (1,2): 1 -> 4/3
    # mean over the two homonyms: (1 + 4/3) / 2 = 7/6
    assert D.count_homonyms(surface, sense) == 2
    assert D.homonym_separation(hidden, surface, sense) == pytest.approx(7 / 6, rel=1e-6)
    # batched [B, S, d] layout gives the same answer
    assert D.homonym_separation(hidden.reshape(3, 3, 2), surface.reshape(3, 3), sense.reshape(3, 3)) == pytest.approx(
        7 / 6, rel=1e-6
    )


def test_homonym_separation_edges():
    surface = torch.tensor([1, 1, 2])
    sense = torch.tensor([0, 1, 0])
    assert D.homonym_separation(torch.randn(3, 4), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0])) == 0.0
    assert D.count_homonyms(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0])) == 0
    assert D.homonym_separation(torch.zeros(3, 4), surface, sense) == 0.0  # identical (zero) centroids
    same = torch.ones(3, 4)
    assert D.homonym_separation(same, surface, sense) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        D.homonym_separation(torch.randn(4, 2), surface, sense)


def _strong_pairs_reference(sel: list[list[int]], n: int, thr: float) -> int:
    sets = [set(s) for s in sel]
    count = [sum(i in s for s in sets) for i in range(n)]
    strong = 0
    for i in range(n):
        for j in range(i + 1, n):
            both = sum(i in s and j in s for s in sets)
            pji = both / count[i] if count[i] else 0.0
            pij = both / count[j] if count[j] else 0.0
            strong += pji > thr and pij > thr
    return strong


def test_coactivation_strong_pairs_hand_value_and_mask():
    sel = torch.tensor([[0, 1], [0, 1], [0, 1], [2, 3], [2, 0]])
    # n = (4, 3, 2, 1); C01 = 3 -> P(1|0) = 0.75, P(0|1) = 1; C23 = 1 -> P(3|2) = 0.5; C02 = 1
    assert D.coactivation_strong_pairs(sel, 4, threshold=0.8) == 0
    assert D.coactivation_strong_pairs(sel, 4, threshold=0.7) == 1
    # drop the last token: P(1|0) = P(0|1) = 1 and P(3|2) = P(2|3) = 1 -> 2 strong pairs
    mask = torch.tensor([1, 1, 1, 1, 0])
    assert D.coactivation_strong_pairs(sel, 4, threshold=0.8, mask=mask) == 2
    assert D.coactivation_strong_pairs(torch.tensor([0, 1, 2]), 3) == 0  # one unit per token
    # a repeated id counts once: n0 = 2, n1 = 1, C01 = 1 -> P(1|0) = 0.5, P(0|1) = 1 -> strong at 0.4
    # (counting the repeat twice would give n0 = 5 and P(1|0) = 0.2)
    assert D.coactivation_strong_pairs(torch.tensor([[0, 0], [0, 1]]), 2, threshold=0.4) == 1


def test_coactivation_strong_pairs_matches_bruteforce_across_blocks(monkeypatch):
    g = gen(7)
    # units (0,1), (2,3), (4,5) are mostly selected together; the third slot is random noise
    base = 2 * torch.randint(0, 3, (40, 1), generator=g)
    sel = torch.cat([base, base + 1, torch.randint(0, 8, (40, 1), generator=g)], dim=1)
    expected = _strong_pairs_reference(sel.tolist(), 8, 0.6)
    assert 0 < expected < 28
    assert D.coactivation_strong_pairs(sel, 8, threshold=0.6) == expected
    monkeypatch.setattr(D, "_COACT_BLOCK", 7)  # force several uneven blocks
    assert D.coactivation_strong_pairs(sel, 8, threshold=0.6) == expected
    assert D.coactivation_strong_pairs(sel.reshape(4, 10, 3), 8, threshold=0.6) == expected
    assert D.coactivation_strong_pairs(sel, 8, threshold=0.9) == _strong_pairs_reference(sel.tolist(), 8, 0.9)


# ------------------------------------------------------------------------------ report


def test_collapse_report_update_prefix_and_round_trip():
    inner = D.CollapseReport(
        metrics={"b": 0.123456, "a": 2.0},
        matrices={"similarity": torch.eye(2)},
        distributions={"usage_share": torch.tensor([0.25, 0.75])},
    )
    out = D.CollapseReport()
    assert out.update(inner, prefix="layer0.heads") is out
    out.update(inner, prefix="layer1.")
    out.update(D.CollapseReport(metrics={"loss": 1.0}))
    assert set(out.metrics) == {"layer0.heads.a", "layer0.heads.b", "layer1.a", "layer1.b", "loss"}
    assert set(out.matrices) == {"layer0.heads.similarity", "layer1.similarity"}
    d = json.loads(json.dumps(out.to_dict()))
    assert d["distributions"]["layer1.usage_share"] == [0.25, 0.75]
    assert d["matrices"]["layer0.heads.similarity"] == [[1.0, 0.0], [0.0, 1.0]]
    back = D.CollapseReport.from_dict(d)
    assert back.metrics == out.metrics
    torch.testing.assert_close(back.matrices["layer1.similarity"], torch.eye(2))
    torch.testing.assert_close(back.distributions["layer0.heads.usage_share"], torch.tensor([0.25, 0.75]))


def test_collapse_report_markdown():
    r = D.CollapseReport(metrics={"b": 0.123456, "a": 2.0, "c": 12345.678})
    assert r.to_markdown() == "| metric | value |\n|---|---|\n| a | 2 |\n| b | 0.1235 |\n| c | 1.235e+04 |"


VECTOR_KEYS = {
    "mean_abs_cosine",
    "mean_signed_cosine",
    "max_signed_cosine",
    "max_abs_cosine",
    "similar_pair_fraction",
    "effective_rank_entropy",
    "effective_rank_entropy_ratio",
    "effective_rank_nuclear",
    "top1_dominance",
}
USAGE_KEYS = {"usage", "gini", "normalized_entropy", "dead_share", "top1_share"}


def test_unit_report_collapsed_units():
    v = torch.ones(4, 8) * torch.arange(1.0, 9.0)
    counts = torch.tensor([10, 0, 0, 0])
    r = D.unit_report(vectors=v, counts=counts)
    assert set(r.metrics) == VECTOR_KEYS | USAGE_KEYS
    assert r.metrics["mean_abs_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert r.metrics["similar_pair_fraction"] == 1.0
    assert r.metrics["effective_rank_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert r.metrics["effective_rank_entropy_ratio"] == pytest.approx(0.25, abs=1e-4)
    assert r.metrics["top1_dominance"] == pytest.approx(1.0, abs=1e-5)
    assert r.metrics["usage"] == 0.25 and r.metrics["dead_share"] == 0.75
    assert r.metrics["gini"] == pytest.approx(0.75) and r.metrics["top1_share"] == 1.0
    assert r.metrics["normalized_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert r.matrices["similarity"].shape == (4, 4)
    assert r.distributions["usage_share"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_unit_report_matches_individual_functions():
    v = randn(6, 5, seed=8)
    a = torch.randint(0, 6, (4, 9, 2), generator=gen(9))
    labels = torch.randint(0, 3, (4, 9), generator=gen(10))
    r = D.unit_report(vectors=v, assignments=a, labels=labels)
    assert set(r.metrics) == VECTOR_KEYS | USAGE_KEYS | {"mutual_information", "normalized_mutual_information"}
    assert r.metrics["mean_signed_cosine"] == pytest.approx(D.mean_off_diagonal_cosine(v, absolute=False))
    assert r.metrics["max_abs_cosine"] == pytest.approx(D.max_off_diagonal_cosine(v, absolute=True))
    assert r.metrics["effective_rank_nuclear"] == pytest.approx(D.effective_rank_nuclear(v))
    counts = D.usage_counts(a, 6)
    assert r.metrics["gini"] == pytest.approx(D.gini(counts))
    # per-token labels are repeated over the k slots
    flat_labels = labels.unsqueeze(-1).expand(4, 9, 2).reshape(-1)
    assert r.metrics["mutual_information"] == pytest.approx(
        mutual_info_score(flat_labels.numpy(), a.reshape(-1).numpy()), rel=1e-9
    )


def test_unit_report_degenerate_inputs_have_no_nan():
    r = D.unit_report(vectors=torch.zeros(3, 4), counts=torch.zeros(3))
    assert all(math.isfinite(v) for v in r.metrics.values())
    r1 = D.unit_report(vectors=torch.randn(1, 4), counts=torch.tensor([5]))
    assert all(math.isfinite(v) for v in r1.metrics.values())
    assert r1.metrics["normalized_entropy"] == 1.0 and r1.metrics["gini"] == 0.0
    assert D.unit_report().metrics == {}
    with pytest.raises(ValueError):
        D.unit_report(labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        D.unit_report(counts=torch.tensor([1, 2]), num_units=3)


def test_jensen_shannon_divergence_is_symmetric_bounded_and_finite():
    from decollapse.modeling.diagnostics import jensen_shannon_divergence

    p = torch.tensor([3.0, 1.0, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 5.0, 5.0])
    assert jensen_shannon_divergence(p, p * 7) == 0.0
    assert abs(jensen_shannon_divergence(p, q) - math.log(2)) < 1e-12, "disjoint supports give log 2"
    r = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert jensen_shannon_divergence(p, r) == jensen_shannon_divergence(r, p)
    # Against the definition computed by hand.
    a, b = p.double() / p.sum(), r.double() / r.sum()
    m = (a + b) / 2
    kl = lambda x: sum(float(xi * math.log(xi / mi)) for xi, mi in zip(x, m) if xi > 0)  # noqa: E731
    assert abs(jensen_shannon_divergence(p, r) - (kl(a) + kl(b)) / 2) < 1e-12
    assert jensen_shannon_divergence(torch.zeros(4), p) == 0.0


# ------------------------------------------------------------------------------ concept geometry

CONCEPT_KEYS = {
    *(f"global.{k}" for k in (
        "effective_rank_nuclear", "effective_rank_nuclear_ratio", "effective_rank_entropy",
        "effective_rank_entropy_ratio", "top1_dominance", "top1_variance_ratio", "top5_variance_ratio",
        "dims_for_95pct_variance",
    )),
    *(f"within.{k}" for k in (
        "effective_rank_entropy", "effective_rank_entropy_ratio", "effective_rank_nuclear",
        "effective_rank_nuclear_ratio", "top1_dominance",
    )),
    "mean_abs_cosine", "max_signed_cosine", "offdiag_cosine_std", "similar_pair_fraction",
    "slot_cross_input_cosine",
    "dim_std_mean", "dim_std_min", "dim_std_max", "collapsed_dims", "collapsed_dim_ratio", "active_dim_fraction",
    "uniformity", "isotropy", "participation_ratio", "participation_ratio_normalized",
    "norm_mean", "norm_std", "norm_min", "norm_max",
}  # fmt: skip


def orthonormal_concepts(b: int, c: int, h: int, seed: int = 0) -> torch.Tensor:
    """[b, c, h]: per input, c orthonormal rows from a different random rotation."""
    return torch.stack([torch.linalg.qr(randn(h, c, seed=seed + i))[0].T for i in range(b)])


def test_concept_geometry_orthonormal_concepts_are_healthy_within_inputs():
    c = orthonormal_concepts(5, 4, 8, seed=60)
    r = D.concept_geometry(c)
    assert set(r.metrics) == CONCEPT_KEYS
    assert all(isinstance(v, float) for v in r.metrics.values())
    m = r.metrics
    assert m["within.effective_rank_entropy"] == pytest.approx(4.0, abs=1e-4)
    assert m["within.effective_rank_entropy_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert m["within.effective_rank_nuclear_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert m["within.top1_dominance"] == pytest.approx(0.25, abs=1e-5)
    assert m["mean_abs_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert abs(m["max_signed_cosine"]) < 1e-6 and m["similar_pair_fraction"] == 0.0
    assert m["uniformity"] == pytest.approx(math.exp(-4), rel=1e-5)  # every pair at cos 0
    assert m["norm_mean"] == pytest.approx(1.0, abs=1e-6) and m["norm_std"] == pytest.approx(0.0, abs=1e-6)
    assert r.matrices["similarity"].shape == (4, 4)
    assert r.distributions["global_singular_values"].shape == (4,)


def test_concept_geometry_copies_of_one_vector_collapse_within():
    v = randn(6, seed=61)
    scale = torch.arange(1.0, 4.0).reshape(3, 1, 1)  # inputs differ only in length
    c = v.expand(3, 5, 6) * scale
    m = D.concept_geometry(c).metrics
    assert m["within.effective_rank_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert m["within.effective_rank_nuclear"] == pytest.approx(1.0, abs=1e-4)
    assert m["within.top1_dominance"] == pytest.approx(1.0, abs=1e-5)
    assert m["max_signed_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["mean_abs_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["similar_pair_fraction"] == 1.0
    assert m["offdiag_cosine_std"] == pytest.approx(0.0, abs=1e-6)
    assert m["uniformity"] == pytest.approx(1.0, abs=1e-5)
    assert m["global.effective_rank_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert m["global.top1_variance_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["global.dims_for_95pct_variance"] == 1.0
    # rows vary along one direction only: one non-zero covariance eigenvalue out of 6
    assert m["isotropy"] == pytest.approx(0.0, abs=1e-9)
    assert m["participation_ratio"] == pytest.approx(1.0, abs=1e-4)
    # the threshold is strict and signed: negated copies are not "similar"
    flipped = c.clone()
    flipped[:, ::2] *= -1
    mf = D.concept_geometry(flipped).metrics
    assert mf["mean_abs_cosine"] == pytest.approx(1.0, abs=1e-6)
    # signs (-, +, -, +, -): same-sign pairs are 3 among the negatives + 1 among the positives, of 10
    assert mf["similar_pair_fraction"] == pytest.approx(4 / 10)
    assert D.concept_geometry(c, similar_threshold=1.0).metrics["similar_pair_fraction"] == 0.0


def test_concept_geometry_slot_cross_input_cosine():
    base = randn(4, 16, seed=62)
    constant = base.expand(6, 4, 16).clone()
    assert D.concept_geometry(constant).metrics["slot_cross_input_cosine"] == pytest.approx(1.0, abs=1e-6)
    # scaling per input keeps the direction: still input-independent
    scaled = constant * torch.arange(1.0, 7.0).reshape(6, 1, 1)
    assert D.concept_geometry(scaled).metrics["slot_cross_input_cosine"] == pytest.approx(1.0, abs=1e-6)
    varied = randn(6, 4, 16, seed=63)
    assert abs(D.concept_geometry(varied).metrics["slot_cross_input_cosine"]) < 0.2
    # hand value: slot 0 is e1 then e2 (cos 0), slot 1 is e1 then -e1 (cos -1) -> mean -0.5
    hand = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [-1.0, 0.0]]])
    assert D.concept_geometry(hand).metrics["slot_cross_input_cosine"] == pytest.approx(-0.5)
    assert D.concept_geometry(constant[:1]).metrics["slot_cross_input_cosine"] == 0.0  # B = 1


def test_concept_geometry_global_and_within_views_disagree():
    # each input is rank 1 (concept i = a_bi · u_b) but the direction u_b differs per input and the
    # loadings a_b are independent, so the batch mean has rank 2.
    u = torch.eye(6)[:2]
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, -1.0, 2.0, 0.5]])
    c = a.unsqueeze(-1) * u.unsqueeze(1)  # [2, 4, 6]
    m = D.concept_geometry(c).metrics
    assert m["within.effective_rank_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert m["within.effective_rank_nuclear"] == pytest.approx(1.0, abs=1e-4)
    assert m["global.effective_rank_entropy"] > 1.8
    assert m["global.effective_rank_nuclear"] > 1.5
    # the reverse: full rank within each input, but the second input is the negation of the first,
    # so the mean is zero and the global view reports no rank at all.
    q = orthonormal_concepts(1, 4, 8, seed=64)[0]
    cancel = torch.stack([q, -q])
    mc = D.concept_geometry(cancel).metrics
    assert mc["within.effective_rank_entropy_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert mc["global.effective_rank_entropy"] == 0.0 and mc["global.effective_rank_nuclear"] == 0.0
    assert mc["global.dims_for_95pct_variance"] == 0.0


def test_concept_geometry_global_spectrum_matches_numpy():
    c = randn(7, 5, 9, seed=65)
    r = D.concept_geometry(c)
    m = r.metrics
    mean = c.double().mean(0).numpy()
    s = np.linalg.svd(mean, compute_uv=False)
    assert m["global.effective_rank_nuclear"] == pytest.approx(s.sum() / s[0], rel=1e-5)
    assert m["global.effective_rank_nuclear_ratio"] == pytest.approx(s.sum() / s[0] / 5, rel=1e-5)
    assert m["global.effective_rank_entropy"] == pytest.approx(np_erank(mean), rel=1e-5)
    assert m["global.top1_dominance"] == pytest.approx(s[0] / s.sum(), rel=1e-5)
    e = s**2 / (s**2).sum()
    assert m["global.top1_variance_ratio"] == pytest.approx(e[0], rel=1e-5)
    assert m["global.top5_variance_ratio"] == pytest.approx(1.0, rel=1e-6)  # r = 5
    assert m["global.dims_for_95pct_variance"] == float(np.searchsorted(np.cumsum(e), 0.95) + 1)
    torch.testing.assert_close(r.distributions["global_singular_values"], torch.tensor(s, dtype=torch.float32))
    within = np.mean([np_erank(x) for x in c.double().numpy()])
    assert m["within.effective_rank_entropy"] == pytest.approx(within, rel=1e-5)
    z = c.reshape(-1, 9).double().numpy()
    lam = np.linalg.eigvalsh(np.cov(z, rowvar=False))
    assert m["isotropy"] == pytest.approx(lam.min() / lam.max(), rel=1e-4)
    assert m["participation_ratio"] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-5)
    assert m["participation_ratio_normalized"] == pytest.approx(m["participation_ratio"] / 9)
    std = z.std(axis=0, ddof=1)
    assert m["dim_std_mean"] == pytest.approx(std.mean(), rel=1e-5)
    assert m["dim_std_min"] == pytest.approx(std.min(), rel=1e-5)
    norms = np.linalg.norm(z, axis=1)
    assert m["norm_std"] == pytest.approx(norms.std(ddof=1), rel=1e-5)
    assert m["norm_max"] == pytest.approx(norms.max(), rel=1e-5)
    cos = D.cosine_similarity_matrix(torch.tensor(mean))
    torch.testing.assert_close(r.matrices["similarity"], cos.float())


def test_concept_geometry_counts_a_zeroed_dimension():
    c = randn(4, 3, 10, seed=66)
    c[..., 7] = 0.0
    c[..., 2] = 5.0  # constant, also no spread
    m = D.concept_geometry(c).metrics
    assert m["collapsed_dims"] == 2.0
    assert m["collapsed_dim_ratio"] == pytest.approx(0.2)
    assert m["active_dim_fraction"] == pytest.approx(0.8)
    assert m["dim_std_min"] == 0.0
    assert m["isotropy"] == pytest.approx(0.0, abs=1e-9)  # a zero-variance dimension is a zero eigenvalue
    healthy = D.concept_geometry(randn(4, 3, 10, seed=66)).metrics
    assert healthy["collapsed_dims"] == 0.0 and healthy["active_dim_fraction"] == 1.0


@pytest.mark.parametrize(
    "concepts",
    [torch.zeros(3, 4, 5), torch.ones(3, 4, 5), randn(1, 4, 5, seed=67), randn(3, 1, 5, seed=68), torch.zeros(1, 1, 3)],
    ids=["all_zero", "all_equal", "one_input", "one_concept", "single_zero"],
)
def test_concept_geometry_degenerate_inputs_are_finite(concepts):
    r = D.concept_geometry(concepts)
    assert set(r.metrics) == CONCEPT_KEYS
    assert all(math.isfinite(v) for v in r.metrics.values())
    assert torch.isfinite(r.matrices["similarity"]).all()
    assert set(D.grade_concept_health(r.metrics)) == set(D.CONCEPT_HEALTH_THRESHOLDS)


def test_concept_geometry_all_zero_values_and_bad_shapes():
    m = D.concept_geometry(torch.zeros(3, 4, 5)).metrics
    assert m["global.effective_rank_nuclear"] == 0.0 and m["within.effective_rank_entropy"] == 0.0
    assert m["collapsed_dims"] == 5.0 and m["active_dim_fraction"] == 0.0
    assert m["isotropy"] == 0.0 and m["participation_ratio"] == 0.0 and m["norm_max"] == 0.0
    assert m["uniformity"] == pytest.approx(math.exp(-4), rel=1e-6)  # zero rows have cosine 0
    with pytest.raises(ValueError):
        D.concept_geometry(torch.zeros(4, 5))
    with pytest.raises(ValueError):
        D.concept_geometry(torch.zeros(0, 4, 5))


def test_concept_geometry_half_precision_and_prefixing():
    c = orthonormal_concepts(3, 4, 8, seed=69)
    lo = D.concept_geometry(c.to(torch.bfloat16)).metrics
    assert lo["within.effective_rank_entropy_ratio"] == pytest.approx(1.0, abs=2e-2)
    report = D.CollapseReport().update(D.concept_geometry(c), prefix="concepts")
    assert "concepts.within.effective_rank_entropy" in report.metrics
    assert "concepts.similarity" in report.matrices


def test_grade_concept_health_boundaries_both_directions():
    t = D.CONCEPT_HEALTH_THRESHOLDS
    assert t["global.effective_rank_nuclear_ratio"] == (0.3, 0.7, True)
    assert t["within.effective_rank_entropy_ratio"] == (0.3, 0.7, True)
    assert t["mean_abs_cosine"] == (0.5, 0.3, False)
    assert t["global.top1_dominance"] == (0.5, 0.3, False)
    grade = lambda name, v: D.grade_concept_health({name: v})[name]  # noqa: E731
    # higher is better: POOR < 0.3 <= OK < 0.7 <= GOOD
    name = "global.effective_rank_nuclear_ratio"
    assert [grade(name, v) for v in (0.29, 0.3, 0.69, 0.7, 1.0)] == ["POOR", "OK", "OK", "GOOD", "GOOD"]
    assert [grade("isotropy", v) for v in (0.0009, 0.001, 0.01)] == ["POOR", "OK", "GOOD"]
    assert [grade("global.dims_for_95pct_variance", v) for v in (9, 10, 49, 50)] == ["POOR", "OK", "OK", "GOOD"]
    # lower is better: GOOD < 0.3 <= OK < 0.5 <= POOR
    assert [grade("mean_abs_cosine", v) for v in (0.0, 0.29, 0.3, 0.49, 0.5, 0.9)] == [
        "GOOD", "GOOD", "OK", "OK", "POOR", "POOR",
    ]  # fmt: skip
    assert [grade("max_signed_cosine", v) for v in (0.59, 0.6, 0.8)] == ["GOOD", "OK", "POOR"]
    assert grade("uniformity", float("nan")) == "POOR"
    # only threshold metrics that are present are graded
    assert D.grade_concept_health({"norm_mean": 1.0, "dim_std_min": 0.05}) == {"dim_std_min": "OK"}


def test_grade_concept_health_on_concept_geometry():
    healthy = D.grade_concept_health(D.concept_geometry(orthonormal_concepts(8, 4, 8, seed=70)).metrics)
    assert healthy["within.effective_rank_entropy_ratio"] == "GOOD"
    assert healthy["mean_abs_cosine"] == "GOOD" and healthy["max_signed_cosine"] == "GOOD"
    collapsed = D.grade_concept_health(D.concept_geometry(randn(8, seed=71).expand(8, 4, 8)).metrics)
    for name in ("within.effective_rank_entropy_ratio", "mean_abs_cosine", "max_signed_cosine", "uniformity"):
        assert collapsed[name] == "POOR", name
    assert collapsed["global.top1_dominance"] == "POOR" and collapsed["active_dim_fraction"] == "POOR"


def test_max_violation_is_max_load_over_mean_load_minus_one():
    assert D.max_violation(torch.tensor([2, 2, 2, 2])) == pytest.approx(0.0)
    assert D.max_violation(torch.tensor([4, 0, 0, 0])) == pytest.approx(3.0)
    assert D.max_violation(torch.tensor([3, 1, 1, 1])) == pytest.approx(1.0)
    assert D.max_violation(torch.zeros(5)) == 0.0 and D.max_violation(torch.zeros(0)) == 0.0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_silhouette_matches_sklearn_including_singleton_clusters(metric, seed):
    from sklearn.metrics import silhouette_score

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    labels[0] = 7  # a cluster of one point: its silhouette is 0
    want = silhouette_score(x.numpy(), labels.numpy(), metric=metric)
    assert D.silhouette_score(x, labels, metric=metric) == pytest.approx(want, abs=1e-6)  # sklearn: float32


def test_silhouette_of_one_cluster_is_zero_and_separated_clusters_score_near_one():
    assert D.silhouette_score(torch.randn(10, 3), torch.zeros(10)) == 0.0
    x = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(5, 1), torch.tensor([[0.0, 1.0]]).repeat(5, 1)])
    x = x + 1e-3 * torch.randn_like(x)
    assert D.silhouette_score(x, torch.tensor([0] * 5 + [1] * 5)) > 0.99


def test_report_points_survive_the_json_round_trip():
    report = D.CollapseReport()
    group = D.CollapseReport(points={"keys": torch.randn(4, 3)}, point_labels={"keys": torch.tensor([0, 2, -1, 1])})
    report.update(group, prefix="layer0.experts.")
    back = D.CollapseReport.from_dict(json.loads(json.dumps(report.to_dict())))
    torch.testing.assert_close(back.points["layer0.experts.keys"], report.points["layer0.experts.keys"])
    assert back.point_labels["layer0.experts.keys"].tolist() == [0, 2, -1, 1]
