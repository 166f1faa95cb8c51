"""The CoPG toy bandit (Flet-Berliac et al. 2024, §5.1) reproduced with align's losses.

The paper trains 100 epochs of mini-batches (batch 512, Adam lr 1e-3: 2000 steps, too slow for a
unit test). Here each method is instead optimised full-batch on the same 10^4 sampled pairs (Adam
lr 0.1, 100 steps). That reaches the fixed point of the empirical objective which the mini-batch
runs approach: CoPG's is π* for any sampling distributions (Theorem 1), IPO's is biased, and naive
PG without a baseline ends worse than the initial policy. ``scripts/copg_bandit.py`` runs the
paper settings.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "copg_bandit.py"
spec = importlib.util.spec_from_file_location("copg_bandit", SCRIPT)
bandit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bandit)

FULL_BATCH = {"batch_size": None, "lr": 0.1}
INITIAL_REGRET = 0.2919


def test_analytic_quantities():
    star = bandit.optimal_policy()
    torch.testing.assert_close(star, torch.tensor([0.7054, 0.2595, 0.0351], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    # J(π*) = β ln E_ref[exp(R/β)].
    j_star = 0.5 * math.log(sum(math.exp(r / 0.5) for r in (2.5, 2.0, 1.0)) / 3)
    assert bandit.regularised_value(star) == pytest.approx(j_star, abs=1e-12)
    assert bandit.regret(torch.full((3,), 1 / 3, dtype=torch.float64)) == pytest.approx(
        INITIAL_REGRET, abs=1e-4
    )


def test_population_optima():
    copg = bandit.population_optimum("copg")
    torch.testing.assert_close(
        torch.tensor(copg["policy"], dtype=torch.float64),
        bandit.optimal_policy(),
        atol=1e-6,
        rtol=0,
    )
    ipo = bandit.population_optimum("ipo")
    assert ipo["regret"] == pytest.approx(0.1525, abs=1e-3)
    assert ipo["policy"] == pytest.approx([0.4242, 0.3527, 0.2231], abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_copg_reaches_the_optimum_ipo_is_biased_and_naive_pg_diverges(seed):
    copg = bandit.run_bandit("copg", 100, seed, **FULL_BATCH)
    ipo = bandit.run_bandit("ipo", 100, seed, **FULL_BATCH)
    pg = bandit.run_bandit("pg", 100, seed, **FULL_BATCH)
    assert copg["regret"] < 0.03
    assert 0.12 <= ipo["regret"] <= 0.18
    assert pg["regret"] > INITIAL_REGRET
    assert copg["policy"] == pytest.approx([0.7054, 0.2595, 0.0351], abs=0.01)


def test_unknown_method_raises():
    with pytest.raises(ValueError):
        bandit.run_bandit("ppo", 1, 0)
