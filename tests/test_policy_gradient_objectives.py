"""RLOO, GRPO and the KL estimators: hand-computed values, gradients, and their relations to CoPG."""

import itertools
import math

import pytest
import torch

from align.objectives import (
    constant_reward_groups,
    copg_loss,
    grpo_advantages,
    grpo_loss,
    kl_estimates,
    rloo_loss,
)

NAN = float("nan")


def t(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def grads(loss, *inputs):
    return torch.autograd.grad(loss.sum(), inputs, retain_graph=True)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def k3(d):
    """GRPO's per-token KL at log(π_ref/π) = d."""
    return math.exp(d) - d - 1


# ----------------------------------------------------------------------------------------------
# RLOO


def test_rloo_hand_computed_value_and_gradient():
    # rewards (1, 2, 6): leave-one-out means (4, 3.5, 1.5), advantages (-3, -1.5, 4.5)
    logps = t([[-2.0, -3.0, -1.0]], requires_grad=True)
    rewards = t([[1.0, 2.0, 6.0]])
    loss = rloo_loss(logps, rewards)
    # -(1/3)·((-3)(-2) + (-1.5)(-3) + (4.5)(-1)) = -(1/3)·6 = -2
    assert loss.item() == pytest.approx(-2.0, abs=1e-12)
    (g,) = grads(loss, logps)
    torch.testing.assert_close(g, t([[1.0, 0.5, -1.5]]))  # -A_i / K


def test_rloo_kl_shaped_reward_is_detached():
    logps = t([[-2.0, -3.0, -1.0]], requires_grad=True)
    ref = t([[-3.0, -3.0, -3.0]], requires_grad=True)
    rewards = t([[1.0, 2.0, 6.0]])
    out = rloo_loss(logps, rewards, ref_logps=ref, beta=0.5, return_rewards=True)
    # log-ratios (1, 0, 2): shaped rewards (0.5, 2, 5), advantages (-3, -0.75, 3.75)
    torch.testing.assert_close(out.rewards, t([[0.5, 2.0, 5.0]]))
    assert not out.rewards.requires_grad
    assert out.losses.item() == pytest.approx(-(6.0 + 2.25 - 3.75) / 3, abs=1e-12)
    g_logps, g_ref = torch.autograd.grad(out.losses.sum(), (logps, ref), allow_unused=True)
    # Only the REINFORCE term carries gradient: nothing through the shaped reward or the reference.
    torch.testing.assert_close(g_logps, t([[1.0, 0.25, -1.25]]))
    assert g_ref is None or (g_ref == 0).all()


@pytest.mark.parametrize("k", [2, 3, 6])
def test_rloo_gradient_is_minus_leave_one_out_advantage_over_k(k):
    logps = (randn(4, k, seed=1) * 5 - 20).requires_grad_()
    ref = randn(4, k, seed=2) * 5 - 20
    rewards = randn(4, k, seed=3)
    (g,) = grads(rloo_loss(logps, rewards, ref_logps=ref, beta=0.2), logps)
    shaped = (rewards - 0.2 * (logps - ref)).detach().tolist()
    expected = [[-(row[i] - sum(row[j] for j in range(k) if j != i) / (k - 1)) / k for i in range(k)]
                for row in shaped]
    torch.testing.assert_close(g, t(expected))


def test_rloo_with_two_samples_uses_the_other_reward_as_baseline():
    logps = (randn(5, 2, seed=4) - 10).requires_grad_()
    rewards = randn(5, 2, seed=5)
    (g,) = grads(rloo_loss(logps, rewards), logps)
    d = rewards[:, 0] - rewards[:, 1]
    torch.testing.assert_close(g, torch.stack([-d / 2, d / 2], 1))


@pytest.mark.parametrize("k", [2, 5])
def test_copg_gradient_is_k_times_rloo_on_the_same_beta(k):
    """CoPG's gradient = RLOO's on R_β = r - β·lr: copg_loss (β/2 inside, not detached) vs rloo_loss (β, detached)."""
    beta = 0.3
    ref = randn(3, k, seed=6) * 5 - 30
    logps = (randn(3, k, seed=7) * 5 - 30).requires_grad_()
    rewards = randn(3, k, seed=8)
    (g_copg,) = grads(copg_loss(logps, ref, rewards, beta=beta), logps)
    (g_rloo,) = grads(rloo_loss(logps, rewards, ref_logps=ref, beta=beta), logps)
    torch.testing.assert_close(g_copg, k * g_rloo)


def test_rloo_on_policy_expectation_is_the_regularised_policy_gradient():
    """Σ over all K-tuples drawn from π of π(tuple)·∇rloo = -∇J, J = E_π[r] - β KL(π‖π_ref): unbiased."""
    n, k, beta = 3, 3, 0.4
    theta = randn(n, seed=9).requires_grad_()
    ref = torch.log_softmax(randn(n, seed=10), 0)
    reward = randn(n, seed=11)
    logp = torch.log_softmax(theta, 0)
    tuples = torch.tensor(list(itertools.product(range(n), repeat=k)))
    weights = logp[tuples].sum(1).exp().detach()
    losses = rloo_loss(logp[tuples], reward[tuples], ref_logps=ref[tuples], beta=beta)
    (g_rloo,) = grads(weights * losses, theta)
    probs = logp.exp()
    objective = (probs * reward).sum() - beta * (probs * (logp - ref)).sum()
    (g_j,) = grads(objective, theta)
    torch.testing.assert_close(g_rloo, -g_j)


def test_rloo_bad_arguments():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logps"):
        rloo_loss(x, x, beta=0.1)
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="share one shape"):
        rloo_loss(x, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="2-d"):
        rloo_loss(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        rloo_loss(x, x, ref_logps=x, beta=-1.0)


# ----------------------------------------------------------------------------------------------
# GRPO advantages


def test_grpo_advantages_use_the_sample_std_plus_eps():
    rewards = t([[1.0, 0.0, 0.5], [2.0, 2.0, 5.0]])
    adv = grpo_advantages(rewards)
    # row 0: mean 0.5, sample std sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    a = 0.5 / (0.5 + 1e-4)
    # row 1: mean 3, deviations (-1, -1, 2), sample std sqrt(6 / 2)
    s = math.sqrt(3.0) + 1e-4
    torch.testing.assert_close(adv, t([[a, -a, 0.0], [-1 / s, -1 / s, 2 / s]]))
    torch.testing.assert_close(grpo_advantages(rewards, scale_rewards=False), t([[0.5, -0.5, 0.0], [-1, -1, 2]]))


def test_constant_reward_groups_have_exactly_zero_advantage_and_are_counted():
    rewards = t([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [0.7, 0.7, 0.7], [-3.0, -3.0, -3.0 + 1e-9]])
    constant = constant_reward_groups(rewards)
    assert constant.tolist() == [True, False, True, False]
    assert int(constant.sum()) == 2  # what a trainer logs
    for scale in (True, False):
        adv = grpo_advantages(rewards, scale_rewards=scale)
        assert (adv[constant] == 0).all() and (adv[~constant] != 0).any(dim=1).all()


# ----------------------------------------------------------------------------------------------
# GRPO loss: one hand-computed group (B = 1, K = 3, T = 3)

# rewards (1, 0, 0.5): Â = (a, -a, 0), a = 0.5 / (0.5 + 1e-4)
A = 0.5 / (0.5 + 1e-4)
LENGTHS = [2, 3, 1]
# ratio π/π_old per token; o_1 has Â > 0, o_2 has Â < 0
RATIOS = [[1.5, 0.9], [0.5, 1.1, 1.3], [1.0]]
# d = log π_ref - log π per token
DS = [[0.2, -0.1], [0.0, 0.3, -0.2], [0.5]]
LOGPS = [[-1.0, -2.0], [-0.5, -1.5, -0.7], [-0.3]]


def hand_case(requires_grad=True):
    lp = torch.full((1, 3, 3), NAN, dtype=torch.float64)  # padding holds garbage: it must not matter
    old, ref = lp.clone(), lp.clone()
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        for j in range(n):
            lp[0, i, j] = LOGPS[i][j]
            old[0, i, j] = LOGPS[i][j] - math.log(RATIOS[i][j])
            ref[0, i, j] = LOGPS[i][j] + DS[i][j]
            mask[0, i, j] = True
    return lp.requires_grad_(requires_grad), old, ref, t([[1.0, 0.0, 0.5]]), mask


# Clipped surrogate min(ρÂ, clip(ρ, 0.8, 1.2)Â) per token, worked out by hand:
# o_1 (Â = a > 0): ρ = 1.5 -> clipped 1.2a; ρ = 0.9 -> 0.9a
# o_2 (Â = -a < 0): ρ = 0.5 -> clipped -0.8a; ρ = 1.1 -> -1.1a; ρ = 1.3 -> unclipped -1.3a
# o_3 (Â = 0): 0
SURROGATE = [[1.2 * A, 0.9 * A], [-0.8 * A, -1.1 * A, -1.3 * A], [0.0]]


def token_losses(beta):
    return [[-s + beta * k3(d) for s, d in zip(srow, drow)] for srow, drow in zip(SURROGATE, DS)]


def test_grpo_hand_computed_value_grpo_dapo_dr_grpo():
    lp, old, ref, rewards, mask = hand_case()
    beta = 0.1
    per_token = token_losses(beta)
    expected = {
        "grpo": sum(sum(row) / len(row) for row in per_token) / 3,
        "dapo": sum(map(sum, per_token)) / 6,
        "dr_grpo": sum(map(sum, per_token)) / (3 * 4),  # K · max_completion_length
    }
    for loss_type, value in expected.items():
        loss = grpo_loss(lp, old, ref, rewards, mask, beta=beta, loss_type=loss_type, max_completion_length=4)
        assert loss.shape == (1,)
        assert loss.item() == pytest.approx(value, abs=1e-12), loss_type
    # dr_grpo's constant defaults to the padded width T = 3
    loss = grpo_loss(lp, old, ref, rewards, mask, beta=beta, loss_type="dr_grpo")
    assert loss.item() == pytest.approx(sum(map(sum, per_token)) / 9, abs=1e-12)


def test_grpo_hand_computed_gradient_clipping_and_kl():
    lp, old, ref, rewards, mask = hand_case()
    beta = 0.1
    (g,) = grads(grpo_loss(lp, old, ref, rewards, mask, beta=beta), lp)

    def kl_grad(d):  # ∂k3/∂log π = 1 - π_ref/π
        return beta * (1 - math.exp(d))

    expected = torch.zeros(1, 3, 3, dtype=torch.float64)
    # o_1, 1/(K|o|) = 1/6: token 1 clipped (no surrogate gradient), token 2 gives -ρÂ
    expected[0, 0, 0] = kl_grad(0.2) / 6
    expected[0, 0, 1] = (-0.9 * A + kl_grad(-0.1)) / 6
    # o_2, 1/9: token 1 clipped, tokens 2-3 unclipped: -ρÂ = +ρa
    expected[0, 1, 0] = kl_grad(0.0) / 9
    expected[0, 1, 1] = (1.1 * A + kl_grad(0.3)) / 9
    expected[0, 1, 2] = (1.3 * A + kl_grad(-0.2)) / 9
    # o_3, 1/3: zero advantage, KL only
    expected[0, 2, 0] = kl_grad(0.5) / 3
    torch.testing.assert_close(g, expected)  # padded slots: exactly 0, and finite despite NaN inputs


def test_grpo_epsilon_high_widens_the_upper_clip_only():
    lp, old, ref, rewards, mask = hand_case()
    # DAPO's clip-higher: ε_high = 0.6 lets o_1's ρ = 1.5 through; o_2's lower clip at 0.8 is unchanged.
    loss = grpo_loss(lp, old, ref, rewards, mask, beta=0.0, epsilon=0.2, epsilon_high=0.6)
    surrogate = [[1.5 * A, 0.9 * A], [-0.8 * A, -1.1 * A, -1.3 * A], [0.0]]
    expected = sum(-sum(row) / len(row) for row in surrogate) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_grpo_on_policy_gradient_is_minus_advantage_over_length_plus_kl():
    """ρ = 1 (old = current): ∂loss/∂log π_{i,t} = (-Â_i + β(1 - π_ref/π)) / (K |o_i|)."""
    b, k, length, beta = 2, 4, 5, 0.04
    lp = (-randn(b, k, length, seed=12).abs()).requires_grad_()
    ref = -randn(b, k, length, seed=13).abs()
    rewards = randn(b, k, seed=14)
    lengths = torch.tensor([[5, 3, 1, 4], [2, 5, 5, 3]])
    mask = torch.arange(length) < lengths.unsqueeze(-1)
    for old in (None, lp.detach().clone()):
        (g,) = grads(grpo_loss(lp, old, ref, rewards, mask, beta=beta), lp)
        adv = grpo_advantages(rewards).unsqueeze(-1)
        expected = (-adv + beta * (1 - (ref - lp.detach()).exp())) / (k * lengths.unsqueeze(-1))
        torch.testing.assert_close(g, torch.where(mask, expected, torch.zeros_like(expected)))


def test_grpo_sampler_and_reference_log_probs_carry_no_gradient():
    """Given live tensors (the caller forgot .detach()), π_old and π_ref still act as constants."""
    lp, old, ref, rewards, mask = hand_case()
    shift_old = torch.where(mask, old - lp.detach(), torch.zeros_like(old))
    shift_ref = torch.where(mask, ref - lp.detach(), torch.zeros_like(ref))
    live = grpo_loss(lp, lp + shift_old, lp + shift_ref, rewards, mask, beta=0.1)
    (g_live,) = grads(live, lp)
    (g_const,) = grads(grpo_loss(lp, old, ref, rewards, mask, beta=0.1), lp)
    torch.testing.assert_close(g_live, g_const)


@pytest.mark.parametrize("advantage_sign", [1.0, -1.0])
def test_grpo_clipping_zeroes_the_gradient_only_beyond_the_trust_region(advantage_sign):
    """Â > 0: no gradient once ρ > 1 + ε (pushing up further); Â < 0: none once ρ < 1 - ε."""
    ratios = [0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0]
    n = len(ratios)
    lp = torch.zeros(n, 2, 1, dtype=torch.float64, requires_grad=True)
    old = -torch.log(t(ratios)).view(n, 1, 1).expand(n, 2, 1).clone()
    rewards = t([[1.0, 0.0]] * n) * advantage_sign  # sample 0 gets Â = ±a
    mask = torch.ones(n, 2, 1, dtype=torch.bool)
    (g,) = grads(grpo_loss(lp, old, None, rewards, mask, beta=0.0), lp)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    for row, ratio in enumerate(ratios):
        clipped = ratio > 1.2 if advantage_sign > 0 else ratio < 0.8
        expected = 0.0 if clipped else -ratio * advantage_sign * a / 2
        assert g[row, 0, 0].item() == pytest.approx(expected, abs=1e-12), ratio
        # The direction: raise log π of a positive-advantage sample, lower a negative one's.
        if not clipped:
            assert math.copysign(1.0, -g[row, 0, 0].item()) == advantage_sign


def test_grpo_constant_rewards_leave_only_the_kl_term():
    lp, old, ref, _, mask = hand_case()
    rewards = t([[0.3, 0.3, 0.3]])
    assert grpo_loss(lp, old, ref, rewards, mask, beta=0.0).item() == 0.0
    (g,) = grads(grpo_loss(lp, old, ref, rewards, mask, beta=0.0), lp)
    assert (g == 0).all()
    loss = grpo_loss(lp, old, ref, rewards, mask, beta=0.1)
    kl_only = sum(sum(0.1 * k3(d) for d in row) / len(row) for row in DS) / 3
    assert loss.item() == pytest.approx(kl_only, abs=1e-12)


def test_grpo_beta_zero_drops_the_kl_term_and_the_reference():
    lp, old, ref, rewards, mask = hand_case()
    without = grpo_loss(lp, old, None, rewards, mask, beta=0.0)
    torch.testing.assert_close(without, grpo_loss(lp, old, ref + 100.0, rewards, mask, beta=0.0))
    expected = sum(-sum(row) / len(row) for row in SURROGATE) / 3
    assert without.item() == pytest.approx(expected, abs=1e-12)


def brute_force_grpo(lp, old, ref, rewards, mask, eps_low, eps_high, beta, loss_type, max_len):
    """Loop over prompts, samples and tokens with Python floats."""
    out = []
    for b in range(lp.shape[0]):
        r = rewards[b].tolist()
        k = len(r)
        mean = sum(r) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (k - 1))
        adv = [(x - mean) / (std + 1e-4) for x in r]
        seq_losses, token_sum, n_tokens = [], 0.0, 0
        for i in range(k):
            terms = []
            for j in range(lp.shape[2]):
                if not mask[b, i, j]:
                    continue
                ratio = math.exp(lp[b, i, j].item() - old[b, i, j].item())
                clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
                d = ref[b, i, j].item() - lp[b, i, j].item()
                terms.append(-min(ratio * adv[i], clipped * adv[i]) + beta * k3(d))
            seq_losses.append(sum(terms) / max(len(terms), 1))
            token_sum += sum(terms)
            n_tokens += len(terms)
        out.append({"grpo": sum(seq_losses) / k, "dapo": token_sum / max(n_tokens, 1),
                    "dr_grpo": token_sum / (k * max_len)}[loss_type])
    return t(out)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_matches_a_token_loop_on_random_inputs(loss_type):
    b, k, length = 3, 4, 6
    lp = -randn(b, k, length, seed=15).abs()
    old = lp + 0.3 * randn(b, k, length, seed=16)  # ratios on both sides of the clip range
    ref = lp + 0.5 * randn(b, k, length, seed=17)
    rewards = randn(b, k, seed=18).round()  # integer rewards: some ties
    lengths = torch.randint(0, length + 1, (b, k), generator=torch.Generator().manual_seed(19))
    lengths[0, 0] = 0  # an empty completion contributes nothing
    mask = torch.arange(length) < lengths.unsqueeze(-1)
    got = grpo_loss(lp, old, ref, rewards, mask, epsilon=0.2, epsilon_high=0.28, beta=0.05,
                    loss_type=loss_type, max_completion_length=8)
    expected = brute_force_grpo(lp, old, ref, rewards, mask, 0.2, 0.28, 0.05, loss_type, 8)
    torch.testing.assert_close(got, expected)


def test_grpo_masked_tokens_do_not_matter():
    lp, old, ref, rewards, mask = hand_case()
    base = grpo_loss(lp, old, ref, rewards, mask)
    other = [x.detach().masked_fill(~mask, v) for x, v in ((lp, -float("inf")), (old, 5.0), (ref, float("inf")))]
    torch.testing.assert_close(grpo_loss(*other, rewards, mask), base)
    # and truncating the padded width changes nothing either (for grpo and dapo)
    torch.testing.assert_close(grpo_loss(lp[..., :2], old[..., :2], ref[..., :2], rewards, mask[..., :2]),
                               grpo_loss(lp, old, ref, rewards, mask & (torch.arange(3) < 2)))


def test_grpo_bad_arguments():
    x = torch.zeros(2, 3, 4)
    r = torch.zeros(2, 3)
    m = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match="3-d"):
        grpo_loss(torch.zeros(6, 4), None, None, r, torch.ones(6, 4), beta=0.0)  # (B·K, T) is refused
    with pytest.raises(ValueError, match="rewards must be"):
        grpo_loss(x, None, x, torch.zeros(2, 3, 1), m)
    with pytest.raises(ValueError, match="share one shape"):
        grpo_loss(x, None, x, r, torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="needs ref_token_logps"):
        grpo_loss(x, None, None, r, m, beta=0.04)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(x, None, x, r, m, loss_type="bnpo")
    with pytest.raises(ValueError, match="K >= 2"):
        grpo_loss(torch.zeros(2, 1, 4), None, None, torch.zeros(2, 1), torch.ones(2, 1, 4), beta=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        grpo_loss(x, None, x, r, m, epsilon=1.5)


# ----------------------------------------------------------------------------------------------
# KL estimators


def categorical(seed, n=6, spread=1.0):
    return torch.log_softmax(randn(n, seed=seed) * spread, 0)


def test_kl_estimators_are_exactly_unbiased_on_a_categorical():
    logp, logq = categorical(20), categorical(21)
    kl = (logp.exp() * (logp - logq)).sum()
    est = kl_estimates(logp, logq, per_token=True)
    torch.testing.assert_close((logp.exp() * est.k1).sum(), kl)
    torch.testing.assert_close((logp.exp() * est.k3).sum(), kl)
    assert (est.k3 >= 0).all() and (est.k1 < 0).any()  # k1 can be negative, k3 cannot


def test_kl_estimators_unbiased_when_sampled_and_k3_has_lower_variance():
    logp, logq = categorical(22, spread=0.5), categorical(23, spread=0.5)
    kl = (logp.exp() * (logp - logq)).sum().item()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True,
                                generator=torch.Generator().manual_seed(24))
    est = kl_estimates(logp[samples], logq[samples], per_token=True)
    for values in est:
        se = values.std().item() / math.sqrt(len(values))
        assert abs(values.mean().item() - kl) < 4 * se
    assert (est.k3 >= 0).all()
    assert est.k3.var() < est.k1.var()


def test_summed_per_token_estimates_are_unbiased_for_the_sequence_kl():
    """Two-token sequences y = (a, b) from autoregressive π and π_ref: E_π[Σ_t k] = KL(π(y)‖π_ref(y))."""
    n = 4
    p1, q1 = categorical(25, n), categorical(26, n)
    p2 = torch.log_softmax(randn(n, n, seed=27), 1)  # p2[a, b] = log π(b | a)
    q2 = torch.log_softmax(randn(n, n, seed=28), 1)
    seqs = torch.tensor(list(itertools.product(range(n), repeat=2)))
    lp = torch.stack([p1[seqs[:, 0]], p2[seqs[:, 0], seqs[:, 1]]], 1)  # (n², T = 2)
    lq = torch.stack([q1[seqs[:, 0]], q2[seqs[:, 0], seqs[:, 1]]], 1)
    prob = lp.sum(1).exp()
    kl = (prob * (lp.sum(1) - lq.sum(1))).sum()
    est = kl_estimates(lp, lq, torch.ones_like(lp, dtype=torch.bool))
    assert est.k1.shape == (n * n,)
    torch.testing.assert_close((prob * est.k1).sum(), kl)
    torch.testing.assert_close((prob * est.k3).sum(), kl)
    torch.testing.assert_close(est.k1, lp.sum(1) - lq.sum(1))  # summed k1 is the sequence log-ratio


def test_kl_estimates_hand_values_and_mask():
    logps = t([[-1.0, -2.0, NAN]], requires_grad=True)
    ref = t([[-1.5, -1.0, float("inf")]])
    mask = torch.tensor([[True, True, False]])
    per_token = kl_estimates(logps, ref, mask, per_token=True)
    torch.testing.assert_close(per_token.k1, t([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(per_token.k3, t([[k3(-0.5), k3(1.0), 0.0]]))
    summed = kl_estimates(logps, ref, mask)
    torch.testing.assert_close(summed.k1, t([-0.5]))
    torch.testing.assert_close(summed.k3, t([k3(-0.5) + k3(1.0)]))
    (g,) = grads(summed.k3, logps)
    torch.testing.assert_close(g, t([[1 - math.exp(-0.5), 1 - math.exp(1.0), 0.0]]))
