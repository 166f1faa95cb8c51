"""Data-parallel training through accelerate: 2 processes on a CPU (gloo).

For every trainer, 2 processes × batch b follow the same loss trajectory as 1 process × batch 2b: each
rank takes its own b examples of the same seeded order, DDP averages the gradients, and a per-example
mean loss makes that average the gradient of the 2b-example mean. SGD (not Adam, which would hide a
wrong gradient scale) and gradient clipping make the trajectories sensitive to both. The logged
metrics are those of the whole 2b batch too (every rank's values are gathered).

Only rank 0 writes: rank 1 runs with umask 027 (its files come out ``rw-r-----``; rank 0's, umask 022,
``rw-r--r--``) and an audit hook that records every file it opens for writing from Python. The one file
rank 1 may write is its own RNG state in each checkpoint (``rng_state_1.pth``, what transformers resumes
rank 1's random streams from).

This file is also the program the 2 processes run: ``accelerate launch tests/test_ddp.py ROOT`` trains
every trainer's config in ROOT with ``align train``'s code, the flags ``align train --num-processes 2``
launches with.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TRAINERS = {"cpl": {"alpha": 0.5}, "dpo": {"beta": 0.5}, "copg": {"beta": 0.5}, "reward": {},
            # reference log-probs computed by rank 0 before training, read from its cache by rank 1
            "dpo_precomputed": {"trainer": "dpo", "beta": 0.5, "precompute_ref_logps": True}}
BATCH, STEPS = 4, 3  # per process; 2 processes × 4 = 8 pairs a step
COMMON = {"lora_r": 4, "lora_alpha": 8, "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant",
          "max_grad_norm": 1.0, "max_steps": STEPS, "logging_steps": 1, "save_steps": STEPS, "torch_threads": 1,
          "seed": 0, "max_length": 32, "max_prompt_length": 8}


def write_configs(root: Path, model_dir: Path, words: list[str], batch: int) -> dict[str, Path]:
    """One config per trainer, on the same 32 scored pairs, writing to ROOT/<trainer>."""
    rng = random.Random(0)

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": text(2, 6), "chosen": text(2, 9), "rejected": text(2, 9),
                                        "chosen_reward": rng.random(), "rejected_reward": rng.random()}) + "\n"
                            for _ in range(32)))
    configs = {}
    for name, options in TRAINERS.items():
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({"trainer": name, "model": str(model_dir), "dataset": str(data),
                                                 "output_dir": str(root / name),
                                                 "per_device_train_batch_size": batch, **COMMON, **options}))
    return configs


def logged(output_dir: Path) -> list[dict[str, float]]:
    """What each step logged: loss, gradient norm and the trainer's metrics (standard deviations, which
    are per batch and not the mean of per-rank ones, left out)."""
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [{k: v for k, v in h.items() if "std" not in k} for h in state["log_history"] if "loss" in h]


def launch_prefix() -> tuple[list[str], dict[str, str]]:
    """`accelerate launch ...` exactly as `align train --num-processes 2` runs it, and its environment."""
    from align import cli

    args = cli.build_parser().parse_args(["train", "--config", "c.yaml", "--num-processes", "2"])
    command, env = cli._accelerate_command(args, [])
    return command[: command.index("align.cli") - 1], env


def test_num_processes_relaunches_under_accelerate(monkeypatch):
    from align import cli

    def relaunch(argv: list[str]) -> list[str]:
        calls = []
        monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "ALIGN_LAUNCHED"})
        monkeypatch.setattr(os, "execv", lambda exe, command: calls.append(command))
        cli.main(argv)  # then fails on the missing config: the real execv would not return
        assert os.environ["ALIGN_LAUNCHED"] == "1"  # the relaunched ranks train instead of relaunching
        return calls[0]

    command = relaunch(["train", "--config", "run.yaml", "--num-processes", "2", "--resume", "--lam", "0.5"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in command
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("align.cli") - 1 :] == ["-m", "align.cli", "train", "--config", "run.yaml",
                                                         "--resume", "--lam", "0.5"]
    command = relaunch(["train", "--config", "run.yaml", "--accelerate-config", "configs/accelerate/zero2.yaml"])
    assert command[command.index("--config_file") + 1] == "configs/accelerate/zero2.yaml"
    assert "--multi_gpu" not in command and "--num_processes" not in command  # the file says


def test_two_processes_equal_one_process_with_double_batch(tiny_lm_dir, tmp_path):
    from transformers import AutoTokenizer

    from align import api
    from align.models.tiny import CHAT_TOKENS, SPECIAL_TOKENS

    words = [w for w in AutoTokenizer.from_pretrained(tiny_lm_dir).get_vocab() if w not in SPECIAL_TOKENS + CHAT_TOKENS]
    (tmp_path / "ddp").mkdir()
    write_configs(tmp_path / "ddp", tiny_lm_dir, words, BATCH)
    prefix, env = launch_prefix()
    proc = subprocess.run([*prefix, __file__, str(tmp_path / "ddp")], env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count('"train_loss"') == len(TRAINERS)  # one summary per run: rank 0's
    assert json.loads((tmp_path / "ddp" / "rank1_writes.json").read_text()) == []

    for name in TRAINERS:
        one = {}
        for batch in (2 * BATCH, BATCH):  # the same run in this process: batch 2b, and b (what DDP must not be)
            (tmp_path / f"one_{batch}").mkdir(exist_ok=True)
            config = write_configs(tmp_path / f"one_{batch}", tiny_lm_dir, words, batch)[name]
            api.train(api.load_config(str(config)))
            one[batch] = logged(tmp_path / f"one_{batch}" / name)
        two = logged(tmp_path / "ddp" / name)
        loss = [h["loss"] for h in two]
        assert len(loss) == STEPS and max(loss) - min(loss) > 1e-3, (name, loss)  # the loss moves: the test can fail
        assert loss == pytest.approx([h["loss"] for h in one[2 * BATCH]], abs=2e-5), (name, two, one[2 * BATCH])
        assert max(abs(a - h["loss"]) for a, h in zip(loss, one[BATCH])) > 1e-3, name  # steps saw 2b pairs, not b
        for step_two, step_one in zip(two, one[2 * BATCH]):  # metrics of the whole batch, not rank 0's half
            if name == "dpo_precomputed":  # at step 1 the policy is the reference: the implicit rewards are
                # ~1e-7 of rounding (reference and policy ran in other batches), so their order is noise
                step_two, step_one = ({k: v for k, v in h.items() if k != "rewards/accuracies"}
                                      for h in (step_two, step_one))
            assert step_two == pytest.approx(step_one, rel=1e-4, abs=2e-5), name

        out = tmp_path / "ddp" / name
        modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
        assert {f for f, mode in modes.items() if mode & 0o077 == 0o040} == {f"checkpoint-{STEPS}/rng_state_1.pth"}
        assert {"adapter_model.safetensors", "summary.json", f"checkpoint-{STEPS}/rng_state_0.pth"} <= set(modes)


def _worker(root: Path) -> None:
    """One rank of the launched run: `align train --config ROOT/<trainer>.yaml` for every trainer."""
    from align import cli

    rank = int(os.environ["RANK"])
    os.umask(0o022 if rank == 0 else 0o027)
    outputs = tuple(str(root / name) + os.sep for name in TRAINERS)
    writes = []

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and os.fspath(args[0]).startswith(outputs):
            mode, flags = args[1], args[2]
            if any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR):
                writes.append(os.fspath(args[0]))

    if rank != 0:
        sys.addaudithook(audit)
    for name in TRAINERS:
        assert cli.main(["train", "--config", str(root / f"{name}.yaml")]) == 0
    if rank != 0:
        (root / f"rank{rank}_writes.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
