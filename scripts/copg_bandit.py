"""The toy bandit of the CoPG paper (Flet-Berliac et al. 2024, §5, Fig. 1), with align's losses.

Three arms with rewards R = (2.5, 2, 1), a uniform reference policy and β = 0.5, so the target is
π* ∝ π_ref·exp(R/β) and J(π) = E_π[R] - β·KL(π‖π_ref). The data are 10^4 pairs (y ~ μ1, y' ~ μ2)
with μ1 = (0.1, 0.2, 0.7), μ2 = (0.05, 0.05, 0.9). A tabular softmax policy (logits initialised
at 0) is trained with Adam (lr 1e-3, batch 512, 100 epochs) by

* ``copg``: ``align.objectives.copg_loss`` on the scored pairs (unbiased: converges to π*);
* ``ipo``: ``align.objectives.ipo_loss`` (τ = β) on preferences drawn from Bradley-Terry,
  P(y ≻ y') = σ(R(y) - R(y')) (biased);
* ``pg``: naive off-policy policy gradient on both samples of each pair with the regularised
  reward R_β(y) = R(y) - β·ln(π(y)/π_ref(y)) and baseline 0 (ends worse than the initial policy);
* ``pg_value``: the same with the exact value baseline b = E_{y~π}[R(y)] (biased).

``population_optimum`` minimises the CoPG and IPO objectives over the exact pair distribution
μ1 ⊗ μ2 (nine pairs, two preference outcomes each) with full-batch L-BFGS: CoPG's optimum is π*.

Run ``python scripts/copg_bandit.py [--epochs 1000] [--seeds 0 1 2] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from align.objectives import copg_loss, ipo_loss

REWARDS = torch.tensor([2.5, 2.0, 1.0], dtype=torch.float64)
MU1 = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
MU2 = torch.tensor([0.05, 0.05, 0.9], dtype=torch.float64)
REF_LOGPS = torch.full((3,), -math.log(3.0), dtype=torch.float64)
BETA = 0.5
N_PAIRS = 10_000
BATCH_SIZE = 512
LR = 1e-3
METHODS = ("copg", "ipo", "pg", "pg_value")


def regularised_value(probs: torch.Tensor) -> float:
    """J(π) = E_π[R] - β KL(π‖π_ref) (CoPG Eq. 1)."""
    return float((probs * REWARDS).sum() - BETA * (probs * (probs.log() - REF_LOGPS)).sum())


def optimal_policy() -> torch.Tensor:
    return torch.softmax(REF_LOGPS + REWARDS / BETA, dim=0)


def regret(probs: torch.Tensor) -> float:
    return regularised_value(optimal_policy()) - regularised_value(probs)


def sample_pairs(n_pairs: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Pairs y ~ μ1, y' ~ μ2 and a Bradley-Terry preference ``first_wins`` (used by IPO only)."""
    y = torch.multinomial(MU1, n_pairs, replacement=True, generator=generator)
    y_prime = torch.multinomial(MU2, n_pairs, replacement=True, generator=generator)
    p_first = torch.sigmoid(REWARDS[y] - REWARDS[y_prime])
    first_wins = torch.rand(n_pairs, generator=generator, dtype=torch.float64) < p_first
    return {"y": y, "y_prime": y_prime, "first_wins": first_wins}


def pair_losses(method: str, logits: torch.Tensor, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-pair losses (B,) of ``method`` for the tabular softmax policy with these logits."""
    logps = torch.log_softmax(logits, dim=0)
    y, y_prime = pairs["y"], pairs["y_prime"]
    if method == "copg":
        both = torch.stack([y, y_prime], dim=1)
        return copg_loss(logps[both], REF_LOGPS[both], REWARDS[both], beta=BETA)
    if method == "ipo":
        chosen = torch.where(pairs["first_wins"], y, y_prime)
        rejected = torch.where(pairs["first_wins"], y_prime, y)
        return ipo_loss(
            logps[chosen], logps[rejected], REF_LOGPS[chosen], REF_LOGPS[rejected], beta=BETA
        )
    if method in ("pg", "pg_value"):
        both = torch.stack([y, y_prime], dim=1)
        # REINFORCE surrogate: the weights are constants, only ln π(y) is differentiated.
        reg_reward = (REWARDS[both] - BETA * (logps[both] - REF_LOGPS[both])).detach()
        baseline = (logps.exp() * REWARDS).sum().detach() if method == "pg_value" else 0.0
        return -((reg_reward - baseline) * logps[both]).sum(dim=1)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def decode_triples(codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pairs from codes ``6·y + 2·y' + first_wins`` in [0, 18)."""
    return {"y": codes // 6, "y_prime": codes % 6 // 2, "first_wins": codes % 2 == 1}


def distinct_pairs(
    pairs: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The at most 18 distinct (y, y', first_wins) triples of ``pairs`` and their frequencies.

    The mean of ``pair_losses`` over all pairs equals the frequency-weighted sum over the distinct
    triples, so a full-batch step costs 18 loss terms instead of 10^4.
    """
    codes = pairs["y"] * 6 + pairs["y_prime"] * 2 + pairs["first_wins"].long()
    distinct, counts = torch.unique(codes, return_counts=True)
    return decode_triples(distinct), counts.double() / codes.numel()


def run_bandit(
    method: str,
    epochs: int = 100,
    seed: int = 0,
    *,
    batch_size: int | None = BATCH_SIZE,
    lr: float = LR,
    n_pairs: int = N_PAIRS,
) -> dict:
    """Train the tabular policy on freshly sampled pairs.

    ``batch_size=None`` takes one full-batch step per epoch (on the distinct pairs, weighted).
    """
    generator = torch.Generator().manual_seed(seed)
    data = sample_pairs(n_pairs, generator)  # the same pairs for every method with this seed
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    triples, weights = distinct_pairs(data)

    def descend(loss: torch.Tensor) -> None:
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    start = time.perf_counter()
    for _ in range(epochs):
        if batch_size is None:
            descend((weights * pair_losses(method, logits, triples)).sum())
            continue
        for index in torch.randperm(n_pairs, generator=generator).split(batch_size):
            batch = {key: v[index] for key, v in data.items()}
            descend(pair_losses(method, logits, batch).mean())
    probs = torch.softmax(logits.detach(), dim=0)
    return {
        "method": method,
        "epochs": epochs,
        "seed": seed,
        "policy": probs.tolist(),
        "J": regularised_value(probs),
        "regret": regret(probs),
        "seconds": time.perf_counter() - start,
    }


def population_optimum(method: str) -> dict:
    """Minimise the expected loss over μ1 ⊗ μ2 (and the BT outcome) exactly, by enumeration."""
    pairs = decode_triples(torch.arange(18))
    y, y_prime = pairs["y"], pairs["y_prime"]
    p_first = torch.sigmoid(REWARDS[y] - REWARDS[y_prime])
    weights = MU1[y] * MU2[y_prime] * torch.where(pairs["first_wins"], p_first, 1 - p_first)
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [logits], lr=1.0, max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimiser.zero_grad()
        loss = (weights * pair_losses(method, logits, pairs)).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    probs = torch.softmax(logits.detach(), dim=0)
    return {"method": method, "policy": probs.tolist(), "regret": regret(probs)}


def summarise(runs: list[dict]) -> dict:
    regrets = torch.tensor([r["regret"] for r in runs])
    return {
        "policy": torch.tensor([r["policy"] for r in runs]).mean(dim=0).tolist(),
        "regret_mean": float(regrets.mean()),
        "regret_std": float(regrets.std(correction=0)),
        "seconds": sum(r["seconds"] for r in runs),
    }


def fmt(probs: list[float]) -> str:
    return "(" + ", ".join(f"{p:.4f}" for p in probs) + ")"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--json", metavar="PATH", help="write all results to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    star = optimal_policy()
    print(f"pi*            = {fmt(star.tolist())}   J(pi*) = {regularised_value(star):.4f}")
    print(
        f"pi_ref         = {fmt(uniform.tolist())}   J(pi_ref) = {regularised_value(uniform):.4f}"
        f"   initial regret = {regret(uniform):.4f}"
    )

    population = {m: population_optimum(m) for m in ("copg", "ipo")}
    for m, res in population.items():
        print(f"population opt {m:<8} {fmt(res['policy'])}   regret = {res['regret']:.4f}")

    print(f"\n{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, seeds {args.seeds}")
    print(f"{'method':<10} {'final policy (mean over seeds)':<32} {'regret mean ± std':<20} time")
    runs, summary = [], {}
    for method in args.methods:
        method_runs = [
            run_bandit(method, args.epochs, seed, batch_size=args.batch_size, lr=args.lr)
            for seed in args.seeds
        ]
        runs += method_runs
        summary[method] = summarise(method_runs)
        s = summary[method]
        print(
            f"{method:<10} {fmt(s['policy']):<32} {s['regret_mean']:.4f} ± {s['regret_std']:.4f}"
            f"{'':<3} {s['seconds']:.1f}s"
        )

    result = {
        "settings": {
            "epochs": args.epochs,
            "seeds": args.seeds,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "beta": BETA,
            "n_pairs": N_PAIRS,
        },
        "optimal_policy": star.tolist(),
        "J_optimal": regularised_value(star),
        "J_reference": regularised_value(uniform),
        "initial_regret": regret(uniform),
        "population_optimum": population,
        "summary": summary,
        "runs": runs,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
