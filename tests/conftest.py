"""Shared fixtures: offline hub, one torch thread (tiny models), a session-wide model cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the test models are tiny: threads cost more than they give


@pytest.fixture(scope="session", autouse=True)
def align_cache(tmp_path_factory):
    """The demo base model is built once per session (or reused from $ALIGN_CACHE, as CI sets it)."""
    if "ALIGN_CACHE" not in os.environ:
        os.environ["ALIGN_CACHE"] = str(tmp_path_factory.mktemp("align_cache"))
    return os.environ["ALIGN_CACHE"]


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A small word-level tokenizer + Llama saved as a local HF model directory."""
    from align.models.tiny import tiny_llama, word_tokenizer
    from align.rewards.tasks import BAD_WORDS, GOOD_WORDS, NEUTRAL_WORDS

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = word_tokenizer(GOOD_WORDS + BAD_WORDS + NEUTRAL_WORDS)
    model = tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_base_dir(align_cache):
    from align import demo

    return demo.base_model_path()


def _snapshot(directory) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``directory`` ({} if it does not exist)."""
    import hashlib
    from pathlib import Path

    root = Path(directory)
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot():
    """Fingerprint a directory, to show that a failed command left it exactly as it was."""
    return _snapshot


# A short CPL run on the demo model with checkpoints at steps 4 and 8 (two epochs of 4 steps).
TRAINED_RUN = {"trainer": "cpl", "model": "builtin:demo", "dataset": "builtin:demo", "alpha": 0.1, "lam": 0.8,
               "lora_r": 4, "lora_alpha": 8, "learning_rate": 2.0e-3, "per_device_train_batch_size": 8,
               "max_new_tokens": 8, "task_train_prompts": 32, "task_eval_prompts": 4, "max_steps": 8,
               "save_steps": 4, "logging_steps": 1, "torch_threads": 1, "seed": 0}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, demo_base_dir):
    """(config file, output dir) of ``TRAINED_RUN``, trained once per session. Copy the output dir
    before changing anything in it."""
    import yaml

    from align import cli

    root = tmp_path_factory.mktemp("trained_run")
    config = root / "cpl.yaml"
    config.write_text(yaml.safe_dump(TRAINED_RUN))
    assert cli.main(["train", "--config", str(config), "--output_dir", str(root / "out")]) == 0
    return config, root / "out"


# A process that imports align once, then forks a child per run: each run is a real process (that is what
# SIGKILL and SIGTERM hit) without paying the imports again. Commands, one JSON per line on stdin:
#   {"argv": [...], "out": file, "err": file, hooks...}  -> prints the child's pid
#   {"wait": pid}                                        -> prints its exit code (-N: killed by signal N)
# Hooks, each optional:
#   "dies_writing": suffix      the child writes half of the torch.save file ending in suffix, then SIGKILLs itself
#   "signal_at_step": [k, sig]  the child sends itself signal sig during optimizer step k + 1 (k steps completed)
#   "second_signal_writing": suffix  once a SIGTERM has asked the run to stop, the child writes half of the
#                               torch.save file ending in suffix and sends itself a second SIGTERM (after the
#                               repeat window, so that it counts as a second signal)
ZYGOTE = """
import io, json, os, signal, sys, time, traceback
import torch
from align import api, cli
from align.trainers import base, preemption

def half_write(obj, f, real_save):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    with open(f, "wb") as out:
        out.write(buffer.getvalue()[: buffer.tell() // 2])
        out.flush()
        os.fsync(out.fileno())

def dying_save(target, real_save):
    def save(obj, f, *args, **kwargs):
        if str(f).endswith(target):
            half_write(obj, f, real_save)
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, *args, **kwargs)
    return save

def second_signal_save(target, real_save):
    def save(obj, f, *args, **kwargs):
        callback = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if str(f).endswith(target) and getattr(callback, "signal", None) is not None:
            half_write(obj, f, real_save)
            time.sleep(max(0.0, callback.received_at + preemption.REPEAT_WINDOW + 0.05 - time.monotonic()))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # never reached: the second signal ends the process
        real_save(obj, f, *args, **kwargs)
    return save

def signalling_loss(step, signum, real_loss):
    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and self.state.global_step == step and not getattr(self, "_test_signalled", False):
            self._test_signalled = True
            os.kill(os.getpid(), signum)
        return real_loss(self, model, inputs, *args, **kwargs)
    return compute_loss

for line in sys.stdin:
    job = json.loads(line)
    if "wait" in job:
        print(os.waitstatus_to_exitcode(os.waitpid(job["wait"], 0)[1]), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    code = 1
    try:
        for fd, path in ((1, job["out"]), (2, job["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        if job.get("dies_writing"):
            torch.save = dying_save(job["dies_writing"], torch.save)
        if job.get("second_signal_writing"):
            torch.save = second_signal_save(job["second_signal_writing"], torch.save)
        if job.get("signal_at_step"):
            base.AlignTrainer.compute_loss = signalling_loss(*job["signal_at_step"], base.AlignTrainer.compute_loss)
        code = cli.main(job["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
"""


class Zygote:
    def __init__(self):
        import subprocess
        import sys

        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def _ask(self, job: dict) -> int:
        import json

        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv: list[str], log_prefix, **hooks) -> int:
        """Start ``align ARGV`` in a child (stdout and stderr in LOG_PREFIX.out/.err); returns its pid."""
        return self._ask({"argv": argv, "out": f"{log_prefix}.out", "err": f"{log_prefix}.err", **hooks})

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})

    def close(self):
        self.proc.kill()  # it holds nothing to flush; a clean interpreter exit only costs time
        self.proc.wait()


@pytest.fixture(scope="session")
def zygote(demo_base_dir):  # the demo base model exists before any child needs it
    z = Zygote()
    yield z
    z.close()
