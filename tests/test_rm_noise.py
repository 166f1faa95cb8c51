"""scripts/rm_noise.py: the noise model, and a small end-to-end run on a tiny base (the full run is in the
script's docstring and takes minutes)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rm_noise.py"
spec = importlib.util.spec_from_file_location("rm_noise", SCRIPT)
rm_noise = importlib.util.module_from_spec(spec)
sys.modules["rm_noise"] = rm_noise  # its worker processes find their functions by module name
spec.loader.exec_module(rm_noise)


def rows_with_rewards(gaps: list[float]) -> list[dict]:
    return [{"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}", "chosen_reward": 0.0, "rejected_reward": -g}
            for i, g in enumerate(gaps)]


def test_noisy_labels_flip_an_exact_fraction_of_the_decided_pairs():
    gaps = [0.5, -0.3, 0.01, 0.2, -0.02, 0.0, 0.4, -0.6, 0.3, 0.7, -0.1, 0.9]  # ΔR = R(a) - R(b)
    noisy, clean, masks = rm_noise.noisy_labels(rows_with_rewards(gaps), noise=0.25, tie_band=0.05, seed=0)
    near_tie = [abs(g) < 0.05 for g in gaps]
    assert masks["near_tie"].tolist() == near_tie
    for row, tie in zip(clean, near_tie):  # the true order, except near-ties (random)
        assert tie or row["chosen_reward"] > row["rejected_reward"]
    assert int(masks["flipped"].sum()) == round(0.25 * 9) == 2
    assert not (masks["flipped"] & masks["near_tie"]).any()
    for n, c, flipped in zip(noisy, clean, masks["flipped"].tolist()):
        expected = (c["rejected"], c["chosen"]) if flipped else (c["chosen"], c["rejected"])
        assert (n["chosen"], n["rejected"]) == expected


def test_accuracies_leave_out_true_ties():
    diff = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.1])
    true = torch.tensor([0.3, 0.2, 0.0, 0.01, -0.02])
    acc = rm_noise.accuracies(diff, true, tie_band=0.05)
    assert acc["accuracy"] == pytest.approx(3 / 4)
    assert acc["accuracy_clear"] == pytest.approx(1 / 2)
    assert acc["accuracy_near_tie"] == pytest.approx(1.0)


def test_small_run_writes_table_json_and_plot(tmp_path, tiny_lm_dir):
    out = tmp_path / "out"
    result = rm_noise.main(["--base", str(tiny_lm_dir), "--train-pairs", "48", "--test-pairs", "24", "--models", "2",
                            "--epochs", "1", "--seeds", "0", "--methods", "bt", "flip", "metarm", "--flip-fraction",
                            "0.25", "--meta-prompts", "8", "--meta-k", "3", "--meta-batch-size", "2", "--workers", "2",
                            "--out", str(out), "--json", str(tmp_path / "r.json")])
    written = json.loads((tmp_path / "r.json").read_text())
    assert set(written["methods"]) == {"bt", "flip", "metarm"}
    assert all(0 <= m["accuracy"] <= 1 for m in written["methods"].values())
    # flip swaps only pairs with μ̂ < 0, at most a quarter of them
    n_pairs, negative = written["data"]["train_pairs"], written["strength_negative_fraction"]
    assert written["strength_flipped"] == min(round(0.25 * n_pairs), round(negative * n_pairs))
    # precision·|selected| = recall·|mislabelled| = the mislabelled pairs found, for both selections
    for selected, prefix in ((written["strength_flipped"], "strength"), (round(negative * n_pairs), "negative")):
        found_p = written[f"{prefix}_precision"] * selected
        found_r = written[f"{prefix}_recall"] * written["data"]["flipped"]
        assert found_p == pytest.approx(found_r) and found_p == pytest.approx(round(found_p))
    # MetaRM's inner step is the size of an AdamW step of the learning rate: RMS lr per parameter
    metarm = written["methods"]["metarm"]
    assert metarm["metarm/inner_step_norm"] > 0 and metarm["metarm/outer_step_norm"] > 0
    assert "metarm/inner_step_norm" not in written["methods"]["bt"]
    assert written["methods"] == json.loads(json.dumps(result["methods"]))
    assert "| bt |" in (out / "rm_noise.md").read_text() and (out / "rm_noise.png").stat().st_size > 0
