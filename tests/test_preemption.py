"""Preemptible jobs: one command for the first start and every restart, graceful SIGTERM/SIGINT, one writer.

A job script on a preemptible cluster runs ``align train --config X.yaml --resume`` every time. Here that
command is the quickstart (configs/quickstart.yaml, shortened to 12 steps on the command line), run in real
processes (the ``zygote`` fixture) and interrupted:

* SIGKILL before the first checkpoint, or at a random moment: the restart starts afresh (or resumes) and
  ends with the adapter, logs and evaluation of an uninterrupted run, bit for bit;
* SIGTERM or SIGINT at a random step: the step completes, its checkpoint is written, the run exits with
  ``PREEMPTED_EXIT_CODE``; the restart redoes no step and ends as the uninterrupted run;
* a second SIGTERM while that checkpoint is written: the process ends at once, the earlier checkpoints stay
  good, the restart ends as the uninterrupted run;
* a second run on the same output directory is refused, naming the first; a stale lock is taken over;
* under ``accelerate launch`` (2 processes), a signal to one rank stops both after the same step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_resume import assert_same, damaged_checkpoints, outcome

from align import api, checkpoints, cli
from align.errors import PREEMPTED_EXIT_CODE, OutputLockedError
from align.trainers import base

ROOT = Path(__file__).parents[1]
QUICKSTART = ["--config", str(ROOT / "configs" / "quickstart.yaml"),
              # 48 prompts / 8 = 6 steps an epoch, 2 epochs: 12 steps, checkpoints at 4, 8 and 12
              "--task_train_prompts", "48", "--per_device_train_batch_size", "8", "--save_steps", "4",
              "--logging_steps", "1", "--task_eval_prompts", "8", "--lora_r", "4", "--lora_alpha", "8",
              "--lora_dropout", "0.1", "--max_new_tokens", "8"]
STEPS = 12


def quickstart(out, *extra) -> list[str]:
    return ["train", *QUICKSTART, "--output_dir", str(out), *extra]


def steps_logged(stdout: Path) -> int:
    return stdout.read_text(errors="replace").count("{'loss'")


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory) -> dict:
    """The uninterrupted quickstart run."""
    root = tmp_path_factory.mktemp("reference")
    assert zygote.wait(zygote.start(quickstart(root / "out"), root / "run")) == 0, (root / "run.err").read_text()[-3000:]
    return outcome(root / "out")


def resume_all(zygote, runs: dict[str, Path], tmp_path, reference: dict, why: str) -> None:
    """Run the same command with ``--resume`` on every output directory: each ends as the reference."""
    pids = {label: zygote.start(quickstart(out, "--resume"), tmp_path / f"{label}-resumed") for label, out in runs.items()}
    for label, out in runs.items():
        assert zygote.wait(pids[label]) == 0, (tmp_path / f"{label}-resumed.err").read_text()[-3000:]
        assert not list(out.glob(checkpoints.TMP_PREFIX + "*")), "a crashed save's leftovers are removed"
        assert not (out / checkpoints.LOCK).exists(), "the lock is released"
        assert_same(outcome(out), reference, f"{why} ({label})")


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_or_at_any_moment_then_resume(zygote, reference, tmp_path,
                                                                          record_property):
    rng = random.SystemRandom()
    step, delay = rng.randint(1, 4), rng.uniform(0, 4)  # mid-step 1..4: checkpoint-4 is not written yet
    record_property("kill_step", step)
    record_property("kill_after_s", round(delay, 2))
    record_property("cases", 2)
    runs = {"before-first-checkpoint": tmp_path / "early", "random-moment": tmp_path / "moment"}
    early = zygote.start(quickstart(runs["before-first-checkpoint"]), tmp_path / "early",
                         signal_at_step=[step - 1, signal.SIGKILL])
    moment = zygote.start(quickstart(runs["random-moment"]), tmp_path / "moment")
    time.sleep(delay)  # from the start of the process: loading, sampling the task's data, training, saving
    os.kill(moment, signal.SIGKILL)
    assert zygote.wait(early) == -signal.SIGKILL
    assert zygote.wait(moment) in (-signal.SIGKILL, 0)  # 0: it finished first
    assert checkpoints.list_checkpoints(runs["before-first-checkpoint"]) == []
    assert (runs["before-first-checkpoint"] / checkpoints.LOCK).exists()  # the killed run's lock, now stale
    lost = sum(damaged_checkpoints(out) for out in runs.values())
    record_property("data_lost", lost)
    assert lost == 0
    resume_all(zygote, runs, tmp_path, reference, f"SIGKILL (step {step}, after {delay:.2f} s), then --resume")
    err = (tmp_path / "before-first-checkpoint-resumed.err").read_text()
    assert f"no checkpoint in {runs['before-first-checkpoint']} yet, starting a fresh run" in err
    assert f"taking over the stale lock of pid {early} on host {socket.gethostname()}" in err


@pytest.mark.slow
def test_sigterm_or_sigint_at_a_random_step_saves_it_and_resume_redoes_no_step(zygote, reference, tmp_path,
                                                                               record_property, snapshot):
    rng = random.SystemRandom()
    # steps completed when the signal comes; SIGINT's stop is inside the second epoch (steps 7-12), where the
    # restart must take the epoch's order from the checkpoint
    at = {"SIGTERM": rng.randint(0, STEPS - 1), "SIGINT": rng.randint(6, 9)}
    record_property("signal_steps", json.dumps(at))
    record_property("cases", 2)
    runs = {name: tmp_path / name for name in at}
    pids = {name: zygote.start(quickstart(runs[name]), tmp_path / name, signal_at_step=[k, getattr(signal, name)])
            for name, k in at.items()}
    for name, k in at.items():
        assert zygote.wait(pids[name]) == PREEMPTED_EXIT_CODE, (tmp_path / f"{name}.err").read_text()[-3000:]
        saved = runs[name] / f"checkpoint-{k + 1}"  # the step under way when the signal came completed
        err = (tmp_path / f"{name}.err").read_text()
        assert f"{name} received: finishing this optimizer step" in err
        assert f"align: stopped on a signal after step {k + 1} of {STEPS}, checkpoint saved in {saved}" in err
        assert checkpoints.newest_good_checkpoint(runs[name]) == saved
        assert steps_logged(tmp_path / f"{name}.out") == k + 1  # every completed step is in the checkpoint
        assert not (runs[name] / "summary.json").exists() and not (runs[name] / checkpoints.LOCK).exists()
    record_property("data_lost", sum(damaged_checkpoints(out) for out in runs.values()))
    resume_all(zygote, runs, tmp_path, reference, f"signal at steps {at}, then --resume")
    for name, k in at.items():  # the restart trained only the steps that were left
        assert steps_logged(tmp_path / f"{name}-resumed.out") == STEPS - (k + 1)

    before = snapshot(runs["SIGTERM"])  # and once more: the run has finished, nothing is trained again
    assert zygote.wait(zygote.start(quickstart(runs["SIGTERM"], "--resume"), tmp_path / "again")) == 0
    assert "holds a finished run (12 steps; summary.json): not training again" in (tmp_path / "again.err").read_text()
    assert snapshot(runs["SIGTERM"]) == before


@pytest.mark.slow
def test_second_signal_during_the_checkpoint_write_stops_at_once_and_keeps_the_last_good_one(
        zygote, reference, tmp_path, record_property):
    k = random.SystemRandom().randint(0, STEPS - 2)
    record_property("signal_step", k)
    out = tmp_path / "out"
    pid = zygote.start(quickstart(out), tmp_path / "run", signal_at_step=[k, signal.SIGTERM],
                       second_signal_writing=f"checkpoint-{k + 1}/optimizer.pt")
    assert zygote.wait(pid) == -signal.SIGTERM  # ended by the second signal, not a clean exit
    assert (out / f"{checkpoints.TMP_PREFIX}checkpoint-{k + 1}").is_dir()  # the save it interrupted
    assert not (out / f"checkpoint-{k + 1}").exists()
    expected = [f"checkpoint-{s}" for s in (4, 8) if s <= k][-2:]  # save_total_limit: 2
    assert [p.name for p in checkpoints.list_checkpoints(out)] == expected
    lost = damaged_checkpoints(out)
    record_property("data_lost", lost)
    assert lost == 0
    resume_all(zygote, {"double-signal": out}, tmp_path, reference, f"SIGTERM twice at step {k + 1}, then --resume")


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(zygote, reference, tmp_path,
                                                                         record_property):
    out = tmp_path / "out"
    first = zygote.start(quickstart(out), tmp_path / "first")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((out / checkpoints.LOCK).exists() and
                                               str(first) in (out / checkpoints.LOCK).read_text()):
        time.sleep(0.01)
    assert zygote.wait(zygote.start(quickstart(out, "--resume"), tmp_path / "second")) == 2
    err = (tmp_path / "second.err").read_text()
    assert f"align: error: {out} is in use by another align run (pid {first} on host {socket.gethostname()}" in err
    assert zygote.wait(first) == 0, (tmp_path / "first.err").read_text()[-3000:]
    same = outcome(out)
    assert_same(same, reference, "the run beside which a second one was refused")
    record_property("data_lost", 0)


# --- the lock, in this process --------------------------------------------------------------------------------

def test_lock_names_its_holder_and_is_released(tmp_path):
    out = tmp_path / "out"
    with checkpoints.OutputLock(out):
        holder = json.loads((out / checkpoints.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with pytest.raises(OutputLockedError, match=rf"in use by another align run \(pid {os.getpid()} on host "), \
                checkpoints.OutputLock(out):
            pass
        assert (out / checkpoints.LOCK).exists()  # the refused run left the holder's lock alone
    assert not out.exists()  # created for the lock alone, and nothing else was written: removed with it


def test_stale_lock_on_this_host_is_taken_over_and_another_hosts_is_refused(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    lock = tmp_path / checkpoints.LOCK
    lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    with caplog.at_level(logging.WARNING), checkpoints.OutputLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {dead} on host {socket.gethostname()}" in caplog.text
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(OutputLockedError, match=rf"locked by an align run on another host \(pid 1 on host elsewhere.*"
                                                rf"delete {lock}"), checkpoints.OutputLock(tmp_path):
        pass
    assert json.loads(lock.read_text())["host"] == "elsewhere"


def test_failed_run_releases_the_lock(trained_run, tmp_path):
    config, _ = trained_run
    out = tmp_path / "out"
    with pytest.raises(Exception, match="no usable|does not exist"):  # strict --resume DIR: the directory is missing
        api.train(api.load_config(str(config), {"output_dir": str(out)}), resume_from_checkpoint=str(out / "nope"))
    assert not out.exists()  # nothing was written but the lock, removed with the directory it created
    assert cli.main(["train", "--config", str(config), "--output_dir", str(out), "--max_steps", "1"]) == 0
    assert not (out / checkpoints.LOCK).exists() and (out / "summary.json").exists()


def test_a_new_run_in_a_finished_output_dir_is_unfinished_once_training_starts(trained_run, tmp_path, monkeypatch):
    """An earlier run's summary says "finished" to --resume: a new run (no --resume) in the same directory removes
    it when its training starts, so that a restart after a crash resumes the new run instead of skipping it."""
    config, out = trained_run
    shutil.copytree(out, tmp_path / "out")

    def crash(*args, **kwargs):
        raise RuntimeError("crash in step 1")

    monkeypatch.setattr(base.AlignTrainer, "compute_loss", crash)
    with pytest.raises(RuntimeError, match="crash in step 1"):
        api.train(api.load_config(str(config), {"output_dir": str(tmp_path / "out")}))
    assert not (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "out" / checkpoints.LOCK).exists()


# --- data parallel: 2 processes ---------------------------------------------------------------------------------

DDP_RUN = {"trainer": "cpl", "model": "builtin:demo", "dataset": "builtin:demo", "alpha": 0.1, "lam": 0.8,
           "lora_r": 4, "lora_alpha": 8, "learning_rate": 2.0e-3, "per_device_train_batch_size": 4,
           "max_new_tokens": 8, "task_train_prompts": 32, "task_eval_prompts": 4, "max_steps": 6, "save_steps": 3,
           "logging_steps": 1, "torch_threads": 1, "seed": 0}
DDP_SIGNAL_STEP = 1  # rank 1 alone is signalled during step 2


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank_after_the_same_step(demo_base_dir, tmp_path, record_property):
    """`accelerate launch`, 2 processes (this file is the program): rank 1 alone receives SIGTERM during step
    2; both ranks stop after step 2 with its checkpoint (both RNG states in it) and PREEMPTED_EXIT_CODE; the
    same command with --resume then ends with the adapter of an uninterrupted 2-process run."""
    from test_ddp import launch_prefix

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(DDP_RUN))
    prefix, env = launch_prefix()
    proc = subprocess.run([*prefix, __file__, str(tmp_path)], env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    codes = json.loads((tmp_path / "codes.json").read_text())
    assert codes == {"0": [PREEMPTED_EXIT_CODE, 0, 0], "1": [PREEMPTED_EXIT_CODE, 0, 0]}, proc.stderr[-4000:]
    stopped = tmp_path / "preempted" / f"checkpoint-{DDP_SIGNAL_STEP + 1}"
    assert json.loads((tmp_path / "steps.json").read_text()) == {"0": DDP_SIGNAL_STEP + 1, "1": DDP_SIGNAL_STEP + 1}
    checkpoints.verify(stopped)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in stopped.iterdir()}
    resumed, reference = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("preempted", "reference"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    record_property("data_lost", 0)


def _worker(root: Path) -> None:
    """One rank: the run preempted by a SIGTERM to rank 1 only, its --resume, and the uninterrupted run."""
    rank = os.environ["RANK"]
    seen = []  # global_step at each micro-batch: step k + 1 runs with global_step k
    real_loss = base.AlignTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            if rank == "1" and self.state.global_step == DDP_SIGNAL_STEP and DDP_SIGNAL_STEP not in seen:
                os.kill(os.getpid(), signal.SIGTERM)
            seen.append(self.state.global_step)
        return real_loss(self, model, inputs, *args, **kwargs)

    base.AlignTrainer.compute_loss = compute_loss
    argv = ["train", "--config", str(root / "run.yaml")]
    codes = [cli.main([*argv, "--output_dir", str(root / "preempted")])]
    stopped_at = max(seen) + 1  # the last step this rank trained
    base.AlignTrainer.compute_loss = real_loss
    codes.append(cli.main([*argv, "--output_dir", str(root / "preempted"), "--resume"]))
    codes.append(cli.main([*argv, "--output_dir", str(root / "reference")]))
    (root / f"rank{rank}.json").write_text(json.dumps({"codes": codes, "step": stopped_at}))
    if rank == "0":  # the two ranks' results in one file each, for the test to read
        deadline = time.monotonic() + 60
        while not (root / "rank1.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        results = {r: json.loads((root / f"rank{r}.json").read_text()) for r in ("0", "1")}
        (root / "codes.json").write_text(json.dumps({r: v["codes"] for r, v in results.items()}))
        (root / "steps.json").write_text(json.dumps({r: v["step"] for r, v in results.items()}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
