"""Tests for decollapse.modeling.regularizers: hand-computed values, references, edge cases, gradients."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import pdist
from scipy.stats import entropy as scipy_entropy

from decollapse.modeling import regularizers as R

SQRT_HALF = math.sqrt(0.5)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def assert_grad_ok(loss_fn, x: torch.Tensor) -> None:
    """backward() gives finite gradients that are not all zero on a generic input."""
    x = x.clone().requires_grad_(True)
    loss = loss_fn(x)
    assert loss.dim() == 0
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


# Losses over a set of points [N, d] (or [..., N, d]); used by the shared degenerate-input tests.
POINT_LOSSES = {
    "mean_squared_off_diagonal_cosine": R.mean_squared_off_diagonal_cosine,
    "orthogonality": R.orthogonality,
    "orthogonality_raw": lambda x: R.orthogonality(x, normalize=False),
    "soft_orthogonality": R.soft_orthogonality,
    "vicreg_variance": R.vicreg_variance,
    "vicreg_covariance": R.vicreg_covariance,
    "uniformity_log": R.uniformity_log,
    "uniformity_gaussian": R.uniformity_gaussian,
    "variance_uniformity": R.variance_uniformity,
    "nearest_neighbour_spread": R.nearest_neighbour_spread,
    "info_nce": lambda x: R.info_nce(x, x.flip(0) if x.shape[0] > 1 else x),
}


# ------------------------------------------------------------------------------ cosine family


def test_pairwise_cosine_hand_values_and_zero_row():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    # rows: e1, (e1+e2)/sqrt2, zero -> cos(e1, (1,1)) = 1/sqrt2; the zero row has cosine 0 with all.
    expected = torch.tensor([[1.0, SQRT_HALF, 0.0], [SQRT_HALF, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(R.pairwise_cosine(x), expected)


def test_pairwise_cosine_batched_low_precision_matches_float64():
    x = randn(2, 5, 7, seed=1)
    s = R.pairwise_cosine(x.to(torch.bfloat16))
    assert s.shape == (2, 5, 5) and s.dtype == torch.float32
    ref = F.normalize(x.double(), dim=-1) @ F.normalize(x.double(), dim=-1).transpose(-1, -2)
    torch.testing.assert_close(s.double(), ref, atol=2e-2, rtol=0)
    assert R.pairwise_cosine(x.double()).dtype == torch.float64


def test_mean_squared_off_diagonal_cosine_hand_value():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # unordered cos²: (0,1)=1/2, (0,2)=0, (1,2)=1/2; ordered sum = 2, n(n-1) = 6 -> 1/3.
    assert R.mean_squared_off_diagonal_cosine(x).item() == pytest.approx(1 / 3, abs=1e-6)
    # batch mean: [1/3, identical rows -> 1] -> 2/3
    batch = torch.stack([x, torch.ones(3, 2)])
    assert R.mean_squared_off_diagonal_cosine(batch).item() == pytest.approx(2 / 3, abs=1e-6)


def test_mean_squared_off_diagonal_cosine_edges():
    assert R.mean_squared_off_diagonal_cosine(torch.randn(1, 4)).item() == 0.0
    assert R.mean_squared_off_diagonal_cosine(torch.ones(4, 3) * 2.5).item() == pytest.approx(1.0, abs=1e-6)
    # sign does not matter: ±copies are still collapsed
    v = randn(1, 6, seed=2)
    assert R.mean_squared_off_diagonal_cosine(torch.cat([v, -v, 3 * v])).item() == pytest.approx(1.0, abs=1e-6)
    assert R.mean_squared_off_diagonal_cosine(torch.zeros(4, 3)).item() == 0.0
    assert_grad_ok(R.mean_squared_off_diagonal_cosine, randn(6, 4, seed=3))


def test_welch_floor_values():
    assert R.welch_floor(512, 16) == pytest.approx(31 / 511)  # Welch bound for 512 vectors in 16 dimensions
    assert R.welch_floor(3, 2) == pytest.approx(0.25)  # (3/2 - 1) / 2
    assert R.welch_floor(4, 4) == 0.0
    assert R.welch_floor(3, 8) == 0.0
    assert R.welch_floor(1, 1) == 0.0
    assert R.welch_floor(0, 3) == 0.0
    with pytest.raises(ValueError):
        R.welch_floor(3, 0)


def _simplex_frame(n: int) -> torch.Tensor:
    # n centred one-hots in R^n span an (n-1)-dim subspace; all pairwise cosines are -1/(n-1).
    return torch.eye(n, dtype=torch.float64) - 1.0 / n


def _harmonic_frame(n: int, m: int) -> torch.Tensor:
    # Real harmonic frame: n unit vectors in R^{2m}, tight when 2j != 0 and j±j' != 0 (mod n).
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(1, m + 1, dtype=torch.float64).unsqueeze(0)
    ang = 2 * math.pi * k * j / n
    return torch.cat([ang.cos(), ang.sin()], dim=1) / math.sqrt(m)


@pytest.mark.parametrize(
    "frame,n,d",
    [
        (_simplex_frame(5), 5, 4),
        (_harmonic_frame(7, 2), 7, 4),
        (_harmonic_frame(11, 3), 11, 6),
        # n lines through the origin at angles pi*k/n form a unit-norm tight frame of R^2.
        (torch.stack([torch.cos(math.pi * torch.arange(6.0) / 6), torch.sin(math.pi * torch.arange(6.0) / 6)], 1), 6, 2),
    ],
)
def test_welch_floor_is_attained_by_tight_frames(frame, n, d):
    assert frame.shape[0] == n
    assert R.mean_squared_off_diagonal_cosine(frame).item() == pytest.approx(R.welch_floor(n, d), abs=1e-6)


@pytest.mark.parametrize("n,d,seed", [(12, 4, 0), (32, 8, 1), (9, 3, 2)])
def test_welch_floor_is_a_lower_bound_for_qr_and_random_frames(n, d, seed):
    g = torch.randn(n, d, generator=gen(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(g)  # [n, d], orthonormal columns; rows normalised inside the loss
    floor = R.welch_floor(n, d)
    assert R.mean_squared_off_diagonal_cosine(q).item() >= floor - 1e-6
    assert R.mean_squared_off_diagonal_cosine(g).item() >= floor - 1e-6
    # and random Gaussians are clearly above it (about 1/d), so the bound is not trivially 0
    assert floor > 0


def test_orthonormal_rows_reach_zero_when_d_at_least_n():
    q, _ = torch.linalg.qr(torch.randn(8, 5, generator=gen(4), dtype=torch.float64))
    rows = q.T  # [5, 8], orthonormal rows
    assert R.mean_squared_off_diagonal_cosine(rows).item() == pytest.approx(0.0, abs=1e-10)
    assert R.orthogonality(rows, normalize=False).item() == pytest.approx(0.0, abs=1e-10)


def test_orthogonality_hand_values():
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # normalised: G = [[1, 1/√2], [1/√2, 1]]; ||G - I||² = 2 * 1/2 = 1; / n² = 1/4
    assert R.orthogonality(w).item() == pytest.approx(0.25, abs=1e-6)
    # raw: G = [[1, 1], [1, 2]]; G - I = [[0, 1], [1, 1]] -> 3; / 4
    assert R.orthogonality(w, normalize=False).item() == pytest.approx(0.75, abs=1e-6)


def test_orthogonality_relation_and_edges():
    x = randn(2, 6, 4, seed=5)
    n = 6
    torch.testing.assert_close(R.orthogonality(x), (n - 1) / n * R.mean_squared_off_diagonal_cosine(x))
    assert R.orthogonality(randn(1, 5, seed=6)).item() == pytest.approx(0.0, abs=1e-6)
    # zero rows stay zero: each contributes (0 - 1)² on the diagonal -> n / n² = 1/n
    assert R.orthogonality(torch.zeros(4, 3)).item() == pytest.approx(0.25)
    assert_grad_ok(R.orthogonality, randn(5, 3, seed=7))
    assert_grad_ok(lambda t: R.orthogonality(t, normalize=False), randn(5, 3, seed=7))


def test_soft_orthogonality_hand_value_and_threshold():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # |cos| = 1/√2 for two unordered pairs, 0 for the third; relu(0.7071 - 0.1)² each;
    # ordered sum = 4 * (√½ - 0.1)², divided by n(n-1) = 6.
    expected = 4 * (SQRT_HALF - 0.1) ** 2 / 6
    assert R.soft_orthogonality(x, threshold=0.1).item() == pytest.approx(expected, abs=1e-6)
    assert R.soft_orthogonality(x, threshold=0.75).item() == 0.0
    assert R.soft_orthogonality(torch.ones(3, 2)).item() == pytest.approx(0.81, abs=1e-6)  # (1 - 0.1)²
    assert R.soft_orthogonality(torch.ones(1, 2)).item() == 0.0
    assert_grad_ok(R.soft_orthogonality, randn(6, 3, seed=8))


# ------------------------------------------------------------------------------ routing


def test_load_balancing_loss_perfect_balance_is_one():
    t, e = 8, 4
    probs = torch.full((t, e), 1.0 / e)
    top1 = F.one_hot(torch.arange(t) % e, e)
    assert R.load_balancing_loss(probs, top1).item() == pytest.approx(1.0, abs=1e-6)
    # top-2 [T, k, E], still perfectly balanced -> still 1 (HF's helper would give k)
    top2 = F.one_hot(torch.stack([torch.arange(t) % e, (torch.arange(t) + 1) % e], 1), e)
    assert R.load_balancing_loss(probs, top2).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_total_collapse_is_num_experts():
    t, e = 6, 5
    probs = F.one_hot(torch.zeros(t, dtype=torch.long), e).float()
    assert R.load_balancing_loss(probs, probs).item() == pytest.approx(float(e))


def test_load_balancing_loss_hand_value_and_padding():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    mask = torch.tensor([[1, 0], [1, 0]])
    # f = (1, 0), P = (0.7, 0.3) -> E * f·P = 2 * 0.7 = 1.4
    assert R.load_balancing_loss(probs, mask).item() == pytest.approx(1.4, abs=1e-6)
    # add a padded token that would otherwise change both f and P
    probs_b = torch.tensor([[[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]]])  # [B=1, S=3, E]
    mask_b = torch.tensor([[[1, 0], [1, 0], [0, 1]]])
    attn = torch.tensor([[1, 1, 0]])
    assert R.load_balancing_loss(probs_b, mask_b, attn).item() == pytest.approx(1.4, abs=1e-6)
    assert R.load_balancing_loss(probs_b, mask_b).item() != pytest.approx(1.4, abs=1e-3)
    # two layers concatenated along tokens reuse (tile) the same mask
    two_layers = torch.cat([probs_b.reshape(3, 2), probs_b.reshape(3, 2)])
    assert R.load_balancing_loss(two_layers, torch.cat([mask_b[0], mask_b[0]]), attn).item() == pytest.approx(1.4, abs=1e-6)
    # everything padded -> 0, no NaN
    assert R.load_balancing_loss(probs_b, mask_b, torch.zeros(1, 3)).item() == 0.0
    with pytest.raises(ValueError):
        R.load_balancing_loss(probs_b, mask_b, torch.ones(2))


def test_load_balancing_loss_matches_hf_mixtral_up_to_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    b, s, e, k = 3, 5, 6, 2
    logits = randn(b * s, e, seed=9)
    attn = torch.ones(b, s)
    attn[0, 3:] = 0
    attn[2, 4:] = 0
    probs = logits.softmax(-1)
    mask = F.one_hot(probs.topk(k, dim=-1).indices, e)  # [T, k, E]
    ours = R.load_balancing_loss(probs, mask, attn)
    hf = load_balancing_loss_func((logits,), num_experts=e, top_k=k, attention_mask=attn)
    # HF normalises f by tokens (sum over k slots), we by assignments: HF = k * ours
    assert float(hf) == pytest.approx(k * ours.item(), rel=1e-5)


def test_load_balancing_loss_gradient():
    logits = randn(10, 4, seed=10).requires_grad_(True)
    probs = logits.softmax(-1)
    mask = F.one_hot(probs.argmax(-1), 4)
    R.load_balancing_loss(probs, mask).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_router_z_loss_hand_value_and_mask():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4 = 2 ln 2 -> mean of squares = (1 + 4)/2 * (ln 2)²
    ln2 = math.log(2.0)
    assert R.router_z_loss(logits).item() == pytest.approx(2.5 * ln2**2, rel=1e-6)
    assert R.router_z_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(ln2**2, rel=1e-6)
    assert R.router_z_loss(logits, torch.tensor([0, 0])).item() == 0.0
    assert R.router_z_loss(logits.to(torch.bfloat16)).dtype == torch.float32
    assert_grad_ok(R.router_z_loss, randn(2, 5, 4, seed=11))


def test_routing_entropy_values():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # H = (ln 2 + 0) / 2
    assert R.routing_entropy(probs).item() == pytest.approx(math.log(2.0) / 2, rel=1e-6)
    assert R.routing_entropy(probs, torch.tensor([0, 1])).item() == pytest.approx(0.0, abs=1e-7)
    assert R.routing_entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8.0), rel=1e-6)
    p = randn(2, 4, 6, seed=12).softmax(-1)
    ref = scipy_entropy(p.reshape(-1, 6).numpy(), axis=1).mean()
    assert R.routing_entropy(p).item() == pytest.approx(ref, rel=1e-5)


def test_routing_entropy_gradient_finite_with_zero_probabilities():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], requires_grad=True)
    R.routing_entropy(probs).backward()
    assert torch.isfinite(probs.grad).all() and probs.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ VICReg


def test_vicreg_variance_hand_value():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    # unbiased Var = (2, 0); std = (√2.0001, 0.01) -> relu(1 - std) = (0, 0.99) -> mean 0.495
    assert R.vicreg_variance(z).item() == pytest.approx(0.495, abs=1e-6)
    # target 2: (2 - √2.0001 + 2 - 0.01) / 2
    assert R.vicreg_variance(z, target_std=2.0).item() == pytest.approx((2 - math.sqrt(2.0001) + 1.99) / 2, abs=1e-6)


def test_vicreg_variance_reference_and_edges():
    z = randn(4, 8, 5, seed=13)
    flat = z.reshape(-1, 5).double().numpy()
    ref = np.maximum(0.0, 1.0 - np.sqrt(flat.var(axis=0, ddof=1) + 1e-4)).mean()
    assert R.vicreg_variance(z * 0.5, target_std=1.0).item() != pytest.approx(ref, abs=1e-3)
    assert R.vicreg_variance(z).item() == pytest.approx(ref, abs=1e-6)
    # N == 1: variance taken as 0 -> relu(1 - sqrt(1e-4)) = 0.99
    assert R.vicreg_variance(torch.randn(1, 4)).item() == pytest.approx(0.99, abs=1e-6)
    assert R.vicreg_variance(torch.zeros(5, 3)).item() == pytest.approx(0.99, abs=1e-6)
    assert_grad_ok(lambda t: R.vicreg_variance(t * 0.1), randn(6, 3, seed=14))


def test_slot_input_variance_sees_slots_that_ignore_the_input():
    """Constant but distinct slots satisfy the pooled variance; only the per-slot one over inputs
    penalises them."""
    slots = randn(1, 6, 5, seed=16) * 3.0
    constant = slots.expand(4, 6, 5).clone()
    assert R.vicreg_variance(constant).item() < 0.05  # pooled over slots: spread enough
    assert R.slot_input_variance(constant).item() == pytest.approx(0.99, abs=1e-6)
    z = randn(4, 6, 5, seed=17)
    ref = np.maximum(0.0, 1.0 - np.sqrt(z.double().numpy().var(axis=0, ddof=1) + 1e-4)).mean()
    assert R.slot_input_variance(z).item() == pytest.approx(ref, abs=1e-6)
    assert R.slot_input_variance(torch.randn(1, 3, 4)).item() == pytest.approx(0.99, abs=1e-6)
    with pytest.raises(ValueError, match=r"expects \[B, C, H\]"):
        R.slot_input_variance(torch.randn(4, 5))
    assert_grad_ok(lambda t: R.slot_input_variance(t * 0.1), randn(5, 3, 4, seed=18))


def test_vicreg_covariance_hand_value_and_reference():
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    # centred already; Cov = ZᵀZ/(2-1) = [[2, 2], [2, 2]]; off-diagonal² sum = 8; / d = 4
    assert R.vicreg_covariance(z).item() == pytest.approx(4.0, abs=1e-6)
    x = randn(3, 7, 4, seed=15)
    cov = np.cov(x.reshape(-1, 4).double().numpy(), rowvar=False)
    ref = ((cov**2).sum() - (np.diag(cov) ** 2).sum()) / 4
    assert R.vicreg_covariance(x).item() == pytest.approx(ref, rel=1e-5)
    assert R.vicreg_covariance(torch.randn(1, 4)).item() == 0.0
    assert R.vicreg_covariance(torch.randn(5, 1)).item() == 0.0
    assert_grad_ok(R.vicreg_covariance, randn(6, 3, seed=16))


# ------------------------------------------------------------------------------ uniformity / spread


THREE_POINTS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])  # third row normalised to e2


def test_uniformity_log_hand_value():
    # squared distances: (0,1) = 4, (0,2) = 2, (1,2) = 2 -> log((e^-8 + 2 e^-4) / 3)
    expected = math.log((math.exp(-8) + 2 * math.exp(-4)) / 3)
    assert R.uniformity_log(THREE_POINTS, t=2.0).item() == pytest.approx(expected, rel=1e-6)
    # two antipodal points: log e^{-8} = -8
    assert R.uniformity_log(THREE_POINTS[:2]).item() == pytest.approx(-8.0, rel=1e-6)


def test_uniformity_log_matches_wang_isola_pdist_form_and_batches():
    z = randn(3, 10, 6, seed=17)
    per = [torch.pdist(F.normalize(b, dim=-1)).pow(2).mul(-2.0).exp().mean().log() for b in z]
    assert R.uniformity_log(z).item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)
    assert R.uniformity_log(z).item() <= 0.0


def test_uniformity_log_edges():
    assert R.uniformity_log(torch.ones(5, 3)).item() == pytest.approx(0.0, abs=1e-6)  # collapsed
    assert R.uniformity_log(torch.randn(1, 3)).item() == 0.0
    assert R.uniformity_log(torch.zeros(4, 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert_grad_ok(R.uniformity_log, randn(7, 3, seed=18))
    with pytest.raises(ValueError):
        R.uniformity_log(torch.randn(2, 2, 3, 4))


def test_uniformity_gaussian_hand_value_and_relation():
    # cos: (0,1) = -1 -> e^{-2·4}; (0,2), (1,2) = 0 -> e^{-2·2}
    expected = (math.exp(-8) + 2 * math.exp(-4)) / 3
    assert R.uniformity_gaussian(THREE_POINTS).item() == pytest.approx(expected, rel=1e-6)
    z = randn(2, 9, 5, seed=19)
    # for non-zero rows, log of the Gaussian form per batch element is the Wang-Isola value
    per_batch_log = torch.stack([R.uniformity_log(b) for b in z])
    torch.testing.assert_close(R.uniformity_gaussian(z), per_batch_log.exp().mean())
    assert R.uniformity_gaussian(torch.ones(4, 3)).item() == pytest.approx(1.0, abs=1e-6)
    assert R.uniformity_gaussian(torch.randn(1, 3)).item() == 0.0
    assert R.uniformity_gaussian(torch.zeros(4, 3)).item() == pytest.approx(math.exp(-4), rel=1e-6)
    assert_grad_ok(R.uniformity_gaussian, randn(7, 3, seed=20))


def test_variance_uniformity_is_the_weighted_sum():
    z = randn(3, 5, 6, seed=40)
    for wv, wu, gamma, tau in [(1.0, 1.0, 1.0, 2.0), (0.3, 2.5, 1.5, 1.0), (0.0, 1.0, 1.0, 2.0)]:
        expected = wv * R.vicreg_variance(z, target_std=gamma, eps=1e-3) + wu * R.uniformity_gaussian(z, t=tau)
        got = R.variance_uniformity(
            z, variance_weight=wv, uniformity_weight=wu, target_std=gamma, temperature=tau, eps=1e-3
        )
        torch.testing.assert_close(got, expected)
    # both terms are non-trivial here, so a dropped term or swapped weight would show
    assert R.vicreg_variance(z, target_std=1.5).item() > 0.1 and R.uniformity_gaussian(z).item() > 0.01
    # hand value on collapsed concepts: every concept is e1 -> variance (1 - 0.01) per dim, uniformity 1
    ones = torch.zeros(2, 3, 4)
    ones[..., 0] = 1.0
    assert R.variance_uniformity(ones, 0.5, 2.0).item() == pytest.approx(0.5 * 0.99 + 2.0 * 1.0, abs=1e-6)


def test_variance_uniformity_prefers_spread_concepts_and_has_finite_gradient():
    # spread: per input, C = 4 orthonormal concepts (a random rotation per input), scaled so that the
    # pooled per-dimension std is well above 1; collapsed: the same vector for every concept and input.
    qs = [torch.linalg.qr(randn(8, 4, seed=41 + b))[0].T for b in range(6)]
    spread = 4.0 * torch.stack(qs)  # [6, 4, 8]
    collapsed = randn(8, seed=50).expand(6, 4, 8).clone()
    lo, hi = R.variance_uniformity(spread).item(), R.variance_uniformity(collapsed).item()
    assert hi == pytest.approx(0.99 + 1.0, abs=1e-4)
    assert lo < 0.1 < hi
    assert_grad_ok(R.variance_uniformity, randn(4, 5, 6, seed=51))
    x = collapsed.clone().requires_grad_(True)
    R.variance_uniformity(x).backward()
    assert torch.isfinite(x.grad).all()


def test_nearest_neighbour_spread_hand_value():
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # nearest neighbour of each is at distance √2 -> -√2
    assert R.nearest_neighbour_spread(pts).item() == pytest.approx(-math.sqrt(2), rel=1e-6)
    # batched: second element has a duplicate pair -> its nearest distances (0, 0, √2)
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    expected = (-math.sqrt(2) + -(math.sqrt(2) / 3)) / 2
    assert R.nearest_neighbour_spread(torch.stack([pts, dup])).item() == pytest.approx(expected, abs=1e-5)


def test_nearest_neighbour_spread_reference_edges_and_half_precision():
    z = randn(12, 5, seed=21)
    zn = F.normalize(z.double(), dim=-1).numpy()
    d = np.sqrt(((zn[:, None] - zn[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert R.nearest_neighbour_spread(z).item() == pytest.approx(-d.min(1).mean(), abs=1e-5)
    assert R.nearest_neighbour_spread(z.half()).item() == pytest.approx(-d.min(1).mean(), abs=5e-3)
    assert R.nearest_neighbour_spread(torch.randn(1, 4)).item() == 0.0
    assert R.nearest_neighbour_spread(torch.ones(4, 3)).item() == pytest.approx(0.0, abs=1e-5)
    assert_grad_ok(R.nearest_neighbour_spread, z)


def test_info_nce_hand_value_and_reference():
    e = torch.eye(2)
    # tau = 1: logits [[1, 0], [0, 1]] -> -log(e / (e + 1)) = log(1 + e^{-1})
    assert R.info_nce(e, e, temperature=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    a, p = randn(6, 4, seed=22), randn(6, 4, seed=23)
    an, pn = F.normalize(a.double(), dim=-1).numpy(), F.normalize(p.double(), dim=-1).numpy()
    logits = an @ pn.T / 0.1
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ref = (lse - np.diag(logits)).mean()
    assert R.info_nce(a, p).item() == pytest.approx(ref, rel=1e-5)
    assert R.info_nce(a, p).item() != pytest.approx(R.info_nce(p, a).item(), rel=1e-3)  # one direction only


def test_info_nce_edges_and_gradient():
    assert R.info_nce(torch.ones(4, 3), torch.ones(4, 3)).item() == pytest.approx(math.log(4), rel=1e-6)
    assert R.info_nce(torch.zeros(4, 3), torch.zeros(4, 3)).item() == pytest.approx(math.log(4), rel=1e-6)
    assert R.info_nce(torch.randn(1, 3), torch.randn(1, 3)).item() == pytest.approx(0.0, abs=1e-7)
    assert R.info_nce(randn(2, 5, 3, seed=24), randn(2, 5, 3, seed=25)).dim() == 0
    with pytest.raises(ValueError):
        R.info_nce(torch.randn(3, 2), torch.randn(4, 2))
    p = randn(5, 3, seed=26)
    assert_grad_ok(lambda a: R.info_nce(a, p), randn(5, 3, seed=27))


# ------------------------------------------------------------------------------ shared degenerate inputs


@pytest.mark.parametrize("name", sorted(POINT_LOSSES))
@pytest.mark.parametrize(
    "make",
    [lambda: torch.zeros(5, 4), lambda: torch.ones(5, 4), lambda: torch.randn(1, 4, generator=gen(28))],
    ids=["all_zero", "identical", "one_unit"],
)
def test_degenerate_inputs_give_finite_values_and_gradients(name, make):
    x = make().requires_grad_(True)
    loss = POINT_LOSSES[name](x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(POINT_LOSSES))
def test_losses_accept_bfloat16_and_return_float32(name):
    x = randn(6, 4, seed=29)
    lo = POINT_LOSSES[name](x.to(torch.bfloat16))
    hi = POINT_LOSSES[name](x)
    assert lo.dtype == torch.float32 and torch.isfinite(lo)
    assert lo.item() == pytest.approx(hi.item(), rel=5e-2, abs=5e-2)


def test_signs_of_generic_losses_prefer_spread_over_collapse():
    spread = _simplex_frame(4).float()
    collapsed = torch.ones(4, 4) + 0.01 * randn(4, 4, seed=30)
    for fn in (R.mean_squared_off_diagonal_cosine, R.uniformity_log, R.uniformity_gaussian, R.nearest_neighbour_spread):
        assert fn(spread).item() < fn(collapsed).item(), fn.__name__
    assert pdist(spread.numpy()).min() > 1.0  # sanity of the fixture


def test_support_shortfall_counts_the_bases_a_row_uses():
    from decollapse.modeling.regularizers import support_shortfall

    rows = torch.zeros(3, 8)
    rows[0, :2] = 1.0  # two equal entries: PR = 2, one short of 3
    rows[1, :4] = -0.5  # four equal entries: PR = 4, no shortfall; sign and scale do not matter
    rows[2] = 0.0  # a zero row counts as PR = 0: short by 3, and finite
    torch.testing.assert_close(support_shortfall(rows, 3.0), torch.tensor((1.0 + 0.0 + 3.0) / 3))
    torch.testing.assert_close(support_shortfall(rows[:2] * 100.0, 3.0), support_shortfall(rows[:2], 3.0))
    gaussian = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    pr_mean = float((gaussian.pow(2).sum(-1).pow(2) / gaussian.pow(4).sum(-1)).mean())
    # E[(Σx²)²] / E[Σx⁴] = M(M + 2) / 3M = (M + 2)/3 = 6; the mean of the ratio sits a little above.
    assert 6.0 < pr_mean < 7.0, "a Gaussian row uses about (M + 2)/3 of its M bases"
    x = rows.clone().requires_grad_(True)
    support_shortfall(x, 3.0).backward()
    assert torch.isfinite(x.grad).all()
