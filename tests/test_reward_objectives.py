"""Reward-model objectives of "Secrets of RLHF in Large Language Models Part II: Reward Modeling" (Wang et al.
2024): preference strength (Eq. 4), label smoothing (Eq. 5), adaptive margin (Eq. 6), flipping (§2.4.1),
SimCSE (Eq. 9) and MetaRM (§3.2)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from align.objectives import (
    bradley_terry_loss,
    difference_views,
    flip_mask,
    metarm_difference,
    preference_strength,
    simcse_loss,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Bradley-Terry with label smoothing and margin (A8 items 1-3)


def test_bt_without_smoothing_or_margin_is_vanilla_bt_exactly():
    rc, rr = randn(50, seed=1) * 4, randn(50, seed=2) * 4
    vanilla = -F.logsigmoid(rc - rr)
    assert torch.equal(bradley_terry_loss(rc, rr), vanilla)
    assert torch.equal(bradley_terry_loss(rc, rr, label_smoothing=0.0), vanilla)
    assert torch.equal(bradley_terry_loss(rc, rr, margin=torch.zeros_like(rc)), vanilla)
    # Full smoothing is BT on the flipped pair.
    flipped = -F.logsigmoid(rr - rc)
    torch.testing.assert_close(bradley_terry_loss(rc, rr, label_smoothing=1.0), flipped)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3, 0.5])
def test_label_smoothing_gradient_and_optimum(alpha):
    d = torch.linspace(-6, 6, 41, dtype=torch.float64).requires_grad_()
    loss = bradley_terry_loss(d, torch.zeros_like(d), label_smoothing=alpha)
    (g,) = torch.autograd.grad(loss.sum(), d)
    torch.testing.assert_close(g, torch.sigmoid(d.detach()) - (1 - alpha))

    d_star = torch.tensor([math.log((1 - alpha) / alpha)], dtype=torch.float64, requires_grad=True)
    at_star = bradley_terry_loss(d_star, torch.zeros(1, dtype=torch.float64), label_smoothing=alpha)
    (g_star,) = torch.autograd.grad(at_star.sum(), d_star)
    assert g_star.item() == pytest.approx(0.0, abs=1e-12)
    assert (loss.detach() >= at_star.detach() - 1e-12).all()  # convex: d* is the minimum
    if alpha == 0.5:
        assert d_star.item() == 0.0 and at_star.item() == pytest.approx(math.log(2))


def test_margin_shifts_the_decision_boundary_by_exactly_the_margin():
    rc, rr = randn(30, seed=3) * 3, randn(30, seed=4) * 3
    margin = randn(30, seed=5).abs() * 2
    torch.testing.assert_close(
        bradley_terry_loss(rc, rr, margin=margin),
        bradley_terry_loss(rc - rr - margin, torch.zeros_like(rc)),
    )
    # At d = m the loss is ln 2 (P = 1/2) and the gradient is -(1 - σ(0)) = -1/2.
    d = margin.clone().requires_grad_()
    at_boundary = bradley_terry_loss(d, torch.zeros_like(d), margin=margin)
    (g,) = torch.autograd.grad(at_boundary.sum(), d)
    torch.testing.assert_close(at_boundary.detach(), torch.full_like(margin, math.log(2)))
    torch.testing.assert_close(g, torch.full_like(margin, -0.5))
    # With smoothing, the optimum moves from log((1-α)/α) to m + log((1-α)/α).
    alpha = 0.2
    d = (margin + math.log((1 - alpha) / alpha)).requires_grad_()
    loss = bradley_terry_loss(d, torch.zeros_like(d), margin=margin, label_smoothing=alpha)
    (g,) = torch.autograd.grad(loss.sum(), d)
    torch.testing.assert_close(g, torch.zeros_like(g))


def test_margin_loss_strictly_increases_with_the_margin():
    d = torch.full((9,), 0.7, dtype=torch.float64)
    margins = torch.linspace(-3, 3, 9, dtype=torch.float64)
    losses = bradley_terry_loss(d, torch.zeros_like(d), margin=margins)
    assert (losses.diff() > 0).all()


def test_per_example_smoothing_and_margin_tensors():
    rc, rr = randn(6, seed=6), randn(6, seed=7)
    eps = torch.tensor([0.0, 0.0, 0.1, 0.1, 0.0, 0.3], dtype=torch.float64)  # smooth a slice only
    margin = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    got = bradley_terry_loss(rc, rr, margin=margin, label_smoothing=eps)
    for i in range(6):
        one = bradley_terry_loss(rc[i : i + 1], rr[i : i + 1], margin=margin[i : i + 1],
                                 label_smoothing=float(eps[i]))
        torch.testing.assert_close(got[i : i + 1], one)


def test_bt_gradcheck():
    rc = randn(5, seed=8).requires_grad_()
    rr = randn(5, seed=9).requires_grad_()
    margin = randn(5, seed=10).abs().requires_grad_()
    eps = torch.tensor([0.0, 0.1, 0.2, 0.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, m: bradley_terry_loss(a, b, margin=m, label_smoothing=eps), (rc, rr, margin)
    )


def test_bt_is_finite_for_extreme_rewards():
    rc = torch.tensor([1e4, -1e4], requires_grad=True)
    loss = bradley_terry_loss(rc, torch.zeros(2), label_smoothing=0.1)
    (g,) = torch.autograd.grad(loss.sum(), rc)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()


# ----------------------------------------------------------------------------------------------
# Preference strength and flipping (A8 item 5, §2.4.1)


def test_preference_strength_uses_population_std():
    diffs = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    mean, std = preference_strength(diffs)
    torch.testing.assert_close(mean, torch.tensor([2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(std, torch.tensor([1.0, 0.0], dtype=torch.float64))  # ddof=1: √2

    m, n = 10, 40
    diffs = randn(m, n, seed=11) * 3
    mean, std = preference_strength(diffs)
    by_hand = [math.sqrt(sum((diffs[i, j].item() - mean[j].item()) ** 2 for i in range(m)) / m)
               for j in range(n)]
    torch.testing.assert_close(std, torch.tensor(by_hand, dtype=torch.float64))
    flipped_mean, flipped_std = preference_strength(-diffs)  # swap chosen and rejected
    torch.testing.assert_close(flipped_mean, -mean)
    torch.testing.assert_close(flipped_std, std)
    _, same = preference_strength(diffs[:1].expand(m, n))  # identical models
    assert (same == 0).all()


def test_flip_mask_flips_only_pairs_the_ensemble_disagrees_with():
    """§2.4.1: the lowest pairs with μ̂ < 0, at most round(fraction·N); a pair with μ̂ ≥ 0 never flips."""
    strength = torch.tensor([-3.0, 2.0, -1.0, 0.5, 1.0, -0.2, 4.0, 0.0])
    by_fraction = {
        0.25: [True, False, True, False, False, False, False, False],  # 2 of the 3 negative pairs
        0.5: [True, False, True, False, False, True, False, False],  # capped at the 3 negative pairs
        1.0: [True, False, True, False, False, True, False, False],
        0.0: [False] * 8,
    }
    for fraction, expected in by_fraction.items():
        assert flip_mask(strength, fraction).tolist() == expected, fraction
    assert not flip_mask(torch.tensor([0.0, 0.3, 2.0]), 1.0).any()  # μ̂ = 0 is no disagreement
    # another threshold: the candidates are μ̂ < 0.5
    assert flip_mask(strength, 0.5, threshold=0.5).tolist() == [True, False, True, False, False, True, False, True]


def test_flip_mask_selects_exactly_the_lowest_pairs():
    strength = randn(100, seed=12) * 5
    negative = int((strength < 0).sum())
    assert 30 < negative < 70
    for fraction in (0.0, 0.1, 0.2, 0.37, 0.6, 1.0):
        for threshold, n in ((None, round(fraction * 100)), (0.0, min(round(fraction * 100), negative))):
            mask = flip_mask(strength, fraction, threshold=threshold)
            assert mask.dtype == torch.bool and int(mask.sum()) == n
            if 0 < n < 100:
                assert strength[mask].max() < strength[~mask].min()


def test_flip_mask_breaks_ties_by_index():
    for strength, threshold in ((torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0]), None),
                                (torch.tensor([1.0, -1.0, -1.0, -1.0, 2.0, -1.0]), 0.0)):
        torch.testing.assert_close(
            flip_mask(strength, 0.5, threshold=threshold), torch.tensor([False, True, True, True, False, False])
        )
        torch.testing.assert_close(
            flip_mask(strength, 2 / 6, threshold=threshold), torch.tensor([False, True, True, False, False, False])
        )


# ----------------------------------------------------------------------------------------------
# SimCSE and the "-diff" instance set (A8 item 6)


def test_simcse_single_instance_is_zero():
    a, b = randn(1, 8, seed=13), randn(1, 8, seed=14)
    assert simcse_loss(a, b).item() == 0.0


def test_simcse_is_invariant_to_rescaling():
    a, b = randn(6, 16, seed=15), randn(6, 16, seed=16)
    scale_a = randn(6, 1, seed=17).abs() + 0.1
    scale_b = randn(6, 1, seed=18).abs() * 100 + 0.1
    torch.testing.assert_close(simcse_loss(a * scale_a, b * scale_b), simcse_loss(a, b))


def test_simcse_identical_views_by_hand():
    feats = randn(4, 5, seed=19)
    rows = feats.tolist()

    def cos(u, v):
        norms = math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))
        return sum(x * y for x, y in zip(u, v)) / norms

    expected = [
        -math.log(
            math.exp(cos(rows[i], rows[i]))
            / sum(math.exp(cos(rows[i], rows[j])) for j in range(4))
        )
        for i in range(4)
    ]
    got = simcse_loss(feats, feats.clone(), temperature=1.0)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0])
def test_simcse_orthogonal_instances(tau):
    n = 5
    views = torch.eye(n, dtype=torch.float64) * 3.0
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + n - 1))
    torch.testing.assert_close(
        simcse_loss(views, views, temperature=tau), torch.full((n,), expected, dtype=torch.float64)
    )


def test_simcse_gradcheck():
    a = randn(4, 3, seed=20).requires_grad_()
    b = randn(4, 3, seed=21).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: simcse_loss(x, y, temperature=0.5), (a, b))


def test_difference_views_are_antisymmetric():
    fc, fr = randn(7, 6, seed=22), randn(7, 6, seed=23)
    views = difference_views(fc, fr)
    assert views.shape == (14, 6)
    torch.testing.assert_close(views[:7], fc - fr, rtol=0, atol=0)
    torch.testing.assert_close(views[7:], -views[:7], rtol=0, atol=0)
    # Each diff is its own negation's in-batch negative: cos = -1 with the partner.
    loss = simcse_loss(views, views, temperature=1.0)
    assert torch.isfinite(loss).all() and loss.shape == (14,)


# ----------------------------------------------------------------------------------------------
# MetaRM difference J (A8 item 7)


def test_metarm_difference_by_hand():
    r = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float64)
    s = torch.sigmoid(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)).sum()
    torch.testing.assert_close(metarm_difference(r), (2 / 9 * s).reshape(1))


@pytest.mark.parametrize("k", [2, 3, 8])
def test_metarm_difference_bounds_and_invariances(k):
    equal = torch.full((3, k), 1.7, dtype=torch.float64)
    lower = torch.full((3,), (k - 1) / (2 * k), dtype=torch.float64)
    torch.testing.assert_close(metarm_difference(equal), lower)

    r = randn(20, k, seed=24) * 5
    j = metarm_difference(r)
    assert (j >= (k - 1) / (2 * k)).all() and (j < (k - 1) / k).all()
    torch.testing.assert_close(metarm_difference(r + randn(20, 1, seed=25) * 10), j)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(metarm_difference(r[:, perm]), j)

    brute = [
        2 / k**2 * sum(
            torch.sigmoid((r[b, i] - r[b, jj]).abs())
            for i, jj in itertools.combinations(range(k), 2)
        )
        for b in range(20)
    ]
    torch.testing.assert_close(j, torch.stack(brute))


def test_metarm_difference_gradcheck():
    r = torch.tensor([[0.0, 1.0, 2.5], [-1.0, 0.3, 4.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(metarm_difference, (r,))


# ----------------------------------------------------------------------------------------------
# Bad arguments


def test_bad_arguments_raise():
    x = torch.zeros(4)
    with pytest.raises(ValueError):
        bradley_terry_loss(x, torch.zeros(4, 1))
    with pytest.raises(ValueError):
        bradley_terry_loss(x, x, margin=torch.zeros(3))
    with pytest.raises(ValueError):
        bradley_terry_loss(x, x, label_smoothing=1.5)
    with pytest.raises(ValueError):
        bradley_terry_loss(x, x, label_smoothing=torch.tensor([0.0, 0.1, -0.1, 0.0]))
    with pytest.raises(ValueError):
        bradley_terry_loss(x, x, label_smoothing=torch.zeros(3))
    with pytest.raises(ValueError):
        preference_strength(torch.zeros(4))
    with pytest.raises(ValueError):
        flip_mask(x, 1.2)
    with pytest.raises(ValueError):
        flip_mask(torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError):
        simcse_loss(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        simcse_loss(torch.ones(3, 4), torch.ones(3, 4), temperature=0.0)
    with pytest.raises(ValueError):
        difference_views(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        metarm_difference(torch.zeros(3, 1))
