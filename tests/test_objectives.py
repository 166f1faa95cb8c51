"""Numeric properties of the preference objectives: CPL (Hejna et al. 2023), CoPG (Flet-Berliac et al.
2024), DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023), and the implicit rewards they return."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from align.objectives import (
    GroupLossOutput,
    PairLossOutput,
    copg_loss,
    cpl_loss,
    cpl_ranked_loss,
    dpo_loss,
    ipo_loss,
)

LN2 = math.log(2.0)


def leaf(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def grads(loss, *inputs):
    # retain_graph: several losses in one test share the graph of their inputs.
    return torch.autograd.grad(loss.sum(), inputs, retain_graph=True)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# CPL


@pytest.mark.parametrize("lp", [-10.0, -123.4, 0.0])
def test_cpl_is_ln2_when_logps_are_equal(lp):
    loss = cpl_loss(torch.tensor([lp]), torch.tensor([lp]), alpha=0.37, lam=1.0)
    assert loss.item() == pytest.approx(LN2, abs=1e-7)


def test_cpl_conservative_value_at_equal_logps():
    loss = cpl_loss(torch.tensor([-10.0]), torch.tensor([-10.0]), alpha=0.1, lam=0.5)
    assert loss.item() == pytest.approx(0.974077, abs=1e-6)  # softplus(0.5)


def test_cpl_vector_case_values_and_gradients():
    w, l = leaf(-12.0), leaf(-15.0)
    assert cpl_loss(w, l, alpha=0.1, lam=1.0).item() == pytest.approx(0.554355, abs=1e-6)
    loss = cpl_loss(w, l, alpha=0.1, lam=0.5)
    assert loss.item() == pytest.approx(0.943249, abs=1e-6)
    gw, gl = grads(loss, w, l)
    assert gw.item() == pytest.approx(-0.061064, abs=1e-6)
    assert gl.item() == pytest.approx(0.030532, abs=1e-6)


@pytest.mark.parametrize("lam", [1.0, 0.75, 0.5, 0.1])
def test_cpl_gradients_match_closed_form_and_ratio_is_minus_lambda(lam):
    alpha = 0.2
    w = (randn(16, seed=1) * 20 - 50).requires_grad_()
    l = (randn(16, seed=2) * 20 - 50).requires_grad_()
    gw, gl = grads(cpl_loss(w, l, alpha=alpha, lam=lam), w, l)
    z = alpha * (w - lam * l).detach()
    torch.testing.assert_close(gw, -alpha * torch.sigmoid(-z))
    torch.testing.assert_close(gl, lam * alpha * torch.sigmoid(-z))
    assert (gw < 0).all() and (gl > 0).all()
    torch.testing.assert_close(gl / gw, torch.full_like(gw, -lam))


def test_cpl_shift_invariant_only_at_lambda_one():
    w, l = randn(8, seed=3) - 30, randn(8, seed=4) - 30
    c = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        cpl_loss(w + 7.5, l + 7.5, alpha=0.3, lam=1.0), cpl_loss(w, l, alpha=0.3, lam=1.0)
    )
    (gc,) = grads(cpl_loss(w + c, l + c, alpha=0.3, lam=1.0), c)
    torch.testing.assert_close(gc, torch.zeros_like(gc))

    alpha, lam = 0.3, 0.6
    (gc,) = grads(cpl_loss(w + c, l + c, alpha=alpha, lam=lam), c)
    z = alpha * (w - lam * l)
    torch.testing.assert_close(gc, -alpha * (1 - lam) * torch.sigmoid(-z))
    assert (gc < 0).all()  # raising the likelihood of both dataset segments lowers the loss


def test_cpl_kl_equals_dpo_with_beta_alpha():
    w, l, rw, rl = (randn(64, seed=s) * 30 - 80 for s in range(4))
    cpl = cpl_loss(w, l, alpha=0.13, lam=1.0, ref_chosen_logps=rw, ref_rejected_logps=rl)
    torch.testing.assert_close(cpl, dpo_loss(w, l, rw, rl, beta=0.13), rtol=1e-12, atol=1e-12)


def test_cpl_soft_tie_label_is_at_least_ln2():
    a, b = randn(32, seed=5) * 10, randn(32, seed=6) * 10
    both = 0.5 * (cpl_loss(a, b, alpha=0.5) + cpl_loss(b, a, alpha=0.5))
    assert (both >= LN2 - 1e-12).all()


def test_cpl_is_finite_for_huge_logits():
    for sign in (1.0, -1.0):
        w = leaf(sign * 1e4, dtype=torch.float32)
        l = leaf(0.0, dtype=torch.float32)
        loss = cpl_loss(w, l, alpha=0.1)  # z = ±1e3
        gw, gl = grads(loss, w, l)
        assert torch.isfinite(loss).all() and torch.isfinite(gw).all() and torch.isfinite(gl).all()
        expected = 0.0 if sign > 0 else 1e3
        assert loss.item() == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# CPL, ranked (K > 2) form


def test_cpl_ranked_with_two_responses_equals_pairwise():
    w, l = randn(10, seed=7) - 20, randn(10, seed=8) - 20
    for lam in (1.0, 0.5):
        pairwise = cpl_loss(w, l, alpha=0.1, lam=lam)
        scores = torch.tensor([[1.0, 0.0]]).expand(10, 2)
        ranked = cpl_ranked_loss(torch.stack([w, l], 1), scores, alpha=0.1, lam=lam)
        torch.testing.assert_close(ranked, pairwise)
        # Swapping the scores is the same as swapping chosen and rejected.
        swapped = cpl_ranked_loss(torch.stack([w, l], 1), scores.flip(1), alpha=0.1, lam=lam)
        torch.testing.assert_close(swapped, cpl_loss(l, w, alpha=0.1, lam=lam))


def brute_force_ranked(logps, scores, alpha, lam, ref=None, mask=None):
    out = []
    for b in range(logps.shape[0]):
        a = alpha * (logps[b] - (0 if ref is None else ref[b]))
        terms = [
            F.softplus(-(a[j] - lam * a[i]))
            for i, j in itertools.permutations(range(logps.shape[1]), 2)
            if scores[b, j] > scores[b, i] and (mask is None or (mask[b, i] and mask[b, j]))
        ]
        out.append(torch.stack(terms).mean() if terms else torch.zeros((), dtype=logps.dtype))
    return torch.stack(out)


def test_cpl_ranked_matches_brute_force_over_pairs():
    logps, ref = randn(5, 4, seed=9) * 5 - 20, randn(5, 4, seed=10) * 5 - 20
    scores = torch.tensor(
        [[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0],
         [0.5, -1.0, 4.0, 1.0]],
        dtype=torch.float64,
    )  # row 2 has a tie (no pair), row 3 has only ties (loss 0)
    mask = torch.tensor(
        [[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool
    )
    for kwargs in ({}, {"ref": ref}, {"mask": mask}):
        expected = brute_force_ranked(logps, scores, 0.1, 0.7, **kwargs)
        got = cpl_ranked_loss(
            logps, scores, alpha=0.1, lam=0.7, ref_logps=kwargs.get("ref"), mask=kwargs.get("mask")
        )
        torch.testing.assert_close(got, expected)
    assert cpl_ranked_loss(logps, scores, alpha=0.1)[3].item() == 0.0


def test_cpl_ranked_ignores_non_finite_padding():
    logps = torch.tensor([[-3.0, -5.0, -float("inf")]], dtype=torch.float64, requires_grad=True)
    scores = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    loss = cpl_ranked_loss(logps, scores, alpha=0.1, lam=0.5, mask=mask)
    (g,) = grads(loss, logps)
    torch.testing.assert_close(loss, cpl_loss(logps[:, 0].detach(), logps[:, 1].detach(), lam=0.5))
    assert torch.isfinite(g).all() and g[0, 2].item() == 0.0


# ----------------------------------------------------------------------------------------------
# CoPG


def copg(pol, ref, rewards, beta, mask=None):
    return copg_loss(pol, ref, rewards, beta=beta, mask=mask)


def test_copg_is_zero_at_init_with_reward_difference_gradient():
    ref = randn(6, 2, seed=11) * 10 - 40
    pol = ref.clone().requires_grad_()
    rewards = randn(6, 2, seed=12)
    loss = copg(pol, ref, rewards, beta=0.3)
    torch.testing.assert_close(loss, torch.zeros(6, dtype=torch.float64))
    (g,) = grads(loss, pol)
    d = rewards[:, 0] - rewards[:, 1]
    # Loss = -ℓ, so ∂loss/∂lp(y) = -d and ∂loss/∂lp(y') = +d.
    torch.testing.assert_close(g, torch.stack([-d, d], 1))


def test_copg_vector_case():
    pol = leaf([-12.0, -15.0])
    ref = torch.tensor([[-13.0, -14.0]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    loss = copg(pol, ref, rewards, beta=0.1)
    assert loss.item() == pytest.approx(-2.8, abs=1e-12)
    (g,) = grads(loss, pol)
    torch.testing.assert_close(g, torch.tensor([[-1.3, 1.3]], dtype=torch.float64))


def test_copg_gradient_is_eq_18_19_and_stationary_at_d_over_beta():
    beta = 0.25
    ref = randn(20, 2, seed=13) * 5 - 30
    pol = (randn(20, 2, seed=14) * 5 - 30).requires_grad_()
    rewards = randn(20, 2, seed=15) * 2
    (g,) = grads(copg(pol, ref, rewards, beta), pol)
    reg = rewards - beta * (pol.detach() - ref)  # R^π_β
    gap = reg[:, 0] - reg[:, 1]
    torch.testing.assert_close(g, torch.stack([-gap, gap], 1))

    d = rewards[:, 0] - rewards[:, 1]
    at_optimum = ref.clone()
    at_optimum[:, 0] += d / beta  # h = lr(y) - lr(y') = d / β
    at_optimum.requires_grad_()
    (g,) = grads(copg(at_optimum, ref, rewards, beta), at_optimum)
    torch.testing.assert_close(g, torch.zeros_like(g))


def test_copg_symmetric_and_invariant_to_reward_and_reference_shifts():
    ref = randn(12, 2, seed=16) * 5 - 30
    pol = randn(12, 2, seed=17) * 5 - 30
    rewards = randn(12, 2, seed=18)
    base = copg(pol, ref, rewards, 0.2)
    torch.testing.assert_close(copg(pol.flip(1), ref.flip(1), rewards.flip(1), 0.2), base)
    c = randn(12, 1, seed=19) * 10  # one constant per prompt
    torch.testing.assert_close(copg(pol, ref, rewards + c, 0.2), base)
    torch.testing.assert_close(copg(pol, ref + c, rewards, 0.2), base)


def token_logps(seed):
    """Two completions per prompt as token log-probs (B, 2, T) with padding masks."""
    logps = -torch.rand(4, 2, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lengths = torch.tensor([[7, 3], [5, 6], [1, 7], [4, 4]])
    mask = torch.arange(7) < lengths.unsqueeze(-1)
    return logps * 3, mask, lengths


@pytest.mark.parametrize("normalise", [False, True])
def test_copg_with_binary_rewards_is_scaled_ipo(normalise):
    beta = 0.2
    tok_pol, mask, lengths = token_logps(20)
    tok_ref, _, _ = token_logps(21)
    tok_pol.requires_grad_()

    def sequence(tok):  # summed, or length-normalised like TRL's IPO; the same on both sides
        total = (tok * mask).sum(-1)
        return total / lengths if normalise else total

    pol, ref = sequence(tok_pol), sequence(tok_ref)
    rewards = torch.tensor([0.25, -0.25], dtype=torch.float64).expand(4, 2)
    neg_ell = copg(pol, ref, rewards, beta)
    ipo = ipo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta)
    torch.testing.assert_close(neg_ell, beta / 2 * ipo - 1 / (8 * beta))
    (g_copg,) = grads(neg_ell, tok_pol)
    (g_ipo,) = grads(ipo, tok_pol)
    torch.testing.assert_close(g_copg, beta / 2 * g_ipo)


def test_copg_on_policy_expectation_is_twice_the_policy_gradient():
    """Prop. 1: Σ_{y,y'} π(y)π(y') ∇ℓ(y, y') = 2∇J(π), J = E_π[R] - β KL(π‖π_ref)."""
    n, beta = 5, 0.7
    theta = randn(n, seed=22).requires_grad_()
    ref = torch.log_softmax(randn(n, seed=23), 0)
    reward = randn(n, seed=24)
    logp = torch.log_softmax(theta, 0)
    pairs = torch.tensor(list(itertools.product(range(n), repeat=2)))
    weights = (logp[pairs[:, 0]] + logp[pairs[:, 1]]).exp().detach()  # sampling distribution
    neg_ell = copg(logp[pairs], ref[pairs], reward[pairs], beta)
    (g_copg,) = grads(-(weights * neg_ell), theta)

    probs = logp.exp()
    objective = (probs * reward).sum() - beta * (probs * (logp - ref)).sum()
    (g_j,) = grads(objective, theta)
    torch.testing.assert_close(g_copg, 2 * g_j)


def test_copg_k_samples_is_rloo_on_regularised_reward():
    k, beta = 5, 0.3
    ref = randn(3, k, seed=25) * 5 - 30
    pol = (randn(3, k, seed=26) * 5 - 30).requires_grad_()
    rewards = randn(3, k, seed=27)
    loss = copg(pol, ref, rewards, beta)
    (g,) = grads(loss, pol)
    reg = (rewards - beta * (pol - ref)).detach().tolist()  # R^π_β
    rloo = [[reg[b][i] - sum(reg[b][j] for j in range(k) if j != i) / (k - 1) for i in range(k)]
            for b in range(3)]
    torch.testing.assert_close(g, -torch.tensor(rloo, dtype=torch.float64))

    # Value: 1/(k-1) Σ_{i<j} of the pair loss.
    pair_sum = sum(
        copg(pol[:, [i, j]], ref[:, [i, j]], rewards[:, [i, j]], beta)
        for i, j in itertools.combinations(range(k), 2)
    )
    torch.testing.assert_close(loss, pair_sum / (k - 1))

    # Command A's squared form: same gradient up to the factor 2β, same value up to a constant.
    reg_t = rewards - beta * (pol - ref)
    squared = sum(
        (reg_t[:, i] - reg_t[:, j]) ** 2 for i, j in itertools.combinations(range(k), 2)
    ) / (k - 1)
    (g_sq,) = grads(squared, pol)
    torch.testing.assert_close(g_sq, 2 * beta * g)
    const = sum(
        (rewards[:, i] - rewards[:, j]) ** 2 for i, j in itertools.combinations(range(k), 2)
    ) / (2 * beta * (k - 1))
    torch.testing.assert_close(loss.detach(), squared.detach() / (2 * beta) - const)


def test_copg_two_samples_is_the_pair_formula():
    beta = 0.4
    ref = randn(9, 2, seed=28)
    pol = randn(9, 2, seed=29)
    rewards = randn(9, 2, seed=30)
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    d = rewards[:, 0] - rewards[:, 1]
    torch.testing.assert_close(copg(pol, ref, rewards, beta), -(d * h - beta / 2 * h**2))


def test_copg_mask_drops_completions():
    beta = 0.3
    ref = randn(3, 4, seed=31) * 5 - 30
    pol = (randn(3, 4, seed=32) * 5 - 30).requires_grad_()
    rewards = randn(3, 4, seed=33)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0]]).bool()
    garbage = pol.masked_fill(~mask, float("nan"))  # padded slots must not matter
    loss = copg(garbage, ref.masked_fill(~mask, -float("inf")), rewards, beta, mask=mask)
    (g,) = grads(loss, pol)
    keep = [0, 1, 3]
    fewer = copg(pol[:1, keep], ref[:1, keep], rewards[:1, keep], beta)
    torch.testing.assert_close(loss[:1], fewer)
    torch.testing.assert_close(loss[1], copg(pol[1:2], ref[1:2], rewards[1:2], beta)[0])
    assert loss[2].item() == 0.0  # a single valid completion carries no signal
    assert torch.isfinite(g).all()
    assert (g[~mask] == 0).all() and (g[2] == 0).all()


# ----------------------------------------------------------------------------------------------
# DPO and IPO


def test_dpo_values_and_gradient():
    w, l = leaf(-12.0), leaf(-15.0)
    rw, rl = torch.tensor([-13.0], dtype=torch.float64), torch.tensor([-14.0], dtype=torch.float64)
    loss = dpo_loss(w, l, rw, rl, beta=0.1)  # h = 2
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    gw, gl = grads(loss, w, l)
    assert gw.item() == pytest.approx(-0.045017, abs=1e-6)
    assert gl.item() == pytest.approx(0.045017, abs=1e-6)
    assert dpo_loss(rw, rl, rw, rl, beta=0.1).item() == pytest.approx(LN2)


def test_ipo_values_init_and_minimiser():
    w, l = torch.tensor([-12.0]), torch.tensor([-15.0])
    rw, rl = torch.tensor([-13.0]), torch.tensor([-14.0])
    assert ipo_loss(w, l, rw, rl, beta=0.1).item() == pytest.approx(9.0)
    for tau in (0.1, 0.5, 2.0):
        assert ipo_loss(rw, rl, rw, rl, beta=tau).item() == pytest.approx(1 / (4 * tau**2))
    at_min = leaf(1 / (2 * 0.1))  # h = 1/(2τ)
    (g,) = grads(ipo_loss(at_min, torch.zeros(1, dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                          beta=0.1), at_min)
    assert g.item() == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Implicit rewards (return_rewards=True); the default return stays the (B,) loss tensor


def assert_same_losses_and_detached(default, out):
    assert isinstance(default, torch.Tensor) and not isinstance(default, tuple)
    assert torch.equal(out.losses, default)
    assert all(not r.requires_grad for r in out[1:])


def test_dpo_and_ipo_return_beta_log_ratio_rewards():
    w, l = leaf(-12.0, -20.0), leaf(-15.0, -19.0)
    rw, rl = torch.tensor([-13.0, -18.0], dtype=torch.float64), torch.tensor([-14.0, -21.0], dtype=torch.float64)
    for fn in (dpo_loss, ipo_loss):
        out = fn(w, l, rw, rl, beta=0.1, return_rewards=True)
        assert isinstance(out, PairLossOutput)
        assert_same_losses_and_detached(fn(w, l, rw, rl, beta=0.1), out)
        # β·(lp - ref): chosen (0.1·1, 0.1·(-2)), rejected (0.1·(-1), 0.1·2)
        torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, -0.2], dtype=torch.float64))
        torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.1, 0.2], dtype=torch.float64))
    # DPO's loss is -log σ of the reward margin
    out = dpo_loss(w, l, rw, rl, beta=0.1, return_rewards=True)
    torch.testing.assert_close(out.losses, F.softplus(-(out.chosen_rewards - out.rejected_rewards)))


def test_cpl_returns_its_segment_scores():
    w, l = leaf(-12.0), leaf(-15.0)
    out = cpl_loss(w, l, alpha=0.1, lam=0.5, return_rewards=True)
    assert_same_losses_and_detached(cpl_loss(w, l, alpha=0.1, lam=0.5), out)
    assert out.chosen_rewards.item() == pytest.approx(-1.2)  # α·lp; λ acts inside the loss only
    assert out.rejected_rewards.item() == pytest.approx(-1.5)
    rw, rl = torch.tensor([-13.0], dtype=torch.float64), torch.tensor([-14.0], dtype=torch.float64)
    out = cpl_loss(w, l, alpha=0.1, ref_chosen_logps=rw, ref_rejected_logps=rl, return_rewards=True)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.1, -0.1))


def test_cpl_ranked_returns_per_completion_scores():
    logps = leaf([-3.0, -5.0, -float("inf")])
    ref = torch.tensor([[-4.0, -4.0, -4.0]], dtype=torch.float64)
    scores = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    out = cpl_ranked_loss(logps, scores, alpha=0.2, ref_logps=ref, mask=mask, return_rewards=True)
    assert isinstance(out, GroupLossOutput)
    assert_same_losses_and_detached(cpl_ranked_loss(logps, scores, alpha=0.2, ref_logps=ref, mask=mask), out)
    torch.testing.assert_close(out.rewards, torch.tensor([[0.2, -0.2, 0.0]], dtype=torch.float64))


def test_copg_returns_the_regularised_reward():
    pol = leaf([-12.0, -15.0])
    ref = torch.tensor([[-13.0, -14.0]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    out = copg_loss(pol, ref, rewards, beta=0.1, return_rewards=True)
    assert_same_losses_and_detached(copg_loss(pol, ref, rewards, beta=0.1), out)
    # R_β = R - β·lr with lr = (1, -1)
    torch.testing.assert_close(out.rewards, torch.tensor([[0.9, -0.4]], dtype=torch.float64))
    # Its gap is the gradient's weight (Eq. 18-19): ∂loss/∂lp = -(R_β(y) - R_β(y')) = -1.3
    (g,) = grads(out.losses, pol)
    torch.testing.assert_close(g[:, 0], -(out.rewards[:, 0] - out.rewards[:, 1]))
    mask = torch.tensor([[True, False]])
    masked = copg_loss(pol, ref, rewards, beta=0.1, mask=mask, return_rewards=True)
    torch.testing.assert_close(masked.rewards, torch.tensor([[0.9, 0.0]], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Bad arguments


def test_bad_arguments_raise():
    x, y = torch.zeros(3), torch.zeros(3)
    col = torch.zeros(3, 1)
    with pytest.raises(ValueError):
        cpl_loss(x, y, lam=0.0)
    with pytest.raises(ValueError):
        cpl_loss(x, y, lam=1.5)
    with pytest.raises(ValueError):
        cpl_loss(x, y, alpha=0.0)
    with pytest.raises(ValueError):
        cpl_loss(x, col)
    with pytest.raises(ValueError):
        cpl_loss(x, y, ref_chosen_logps=col, ref_rejected_logps=y)
    with pytest.raises(ValueError):
        cpl_ranked_loss(torch.zeros(2, 3), torch.zeros(2, 3), lam=-0.5)
    with pytest.raises(ValueError):
        cpl_ranked_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    for fn in (dpo_loss, ipo_loss):
        with pytest.raises(ValueError):
            fn(x, y, x, y, beta=0.0)
        with pytest.raises(ValueError):
            fn(x, y, x, y, beta=-1.0)
        with pytest.raises(ValueError):
            fn(x, y, col, y)
    pair = torch.zeros(3, 2)
    with pytest.raises(ValueError):
        copg_loss(pair, pair, pair, beta=0.0)
    with pytest.raises(ValueError):
        copg_loss(pair, pair, torch.zeros(3, 3), beta=0.1)
    with pytest.raises(ValueError):
        copg_loss(pair, pair, pair, beta=0.1, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        copg_loss(x, x, x, beta=0.1)
