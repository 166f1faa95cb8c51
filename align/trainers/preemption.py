"""Graceful preemption: on SIGTERM or SIGINT, finish the optimizer step, save a checkpoint, stop.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some seconds before SIGKILL. The first SIGTERM or
SIGINT becomes a request: the optimizer step in progress completes, a checkpoint of it is written (the atomic,
verified save of every checkpoint) and ``AlignTrainer.train`` raises ``Preempted``, which the CLI turns into
``PREEMPTED_EXIT_CODE``. ``--resume`` then continues from that step, bit for bit. Under data parallelism the
requests of all ranks are combined at every step end, so every rank stops after the same step even when only
one was signalled.

A second signal ends the process at once, by that signal's default action: the checkpoint being written is
then a ``.tmp-`` directory (removed by the next save) and the earlier checkpoints are untouched. A repeat
within ``REPEAT_WINDOW`` seconds counts as the same request: a launcher (torchrun, ``accelerate launch``)
forwards to its workers the very signal that the scheduler or the terminal also sent them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW = 1.0  # seconds


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM/SIGINT into ``should_save`` + ``should_training_stop`` at the end of the current optimizer
    step, on every rank. Its handlers are installed while ``train`` runs (see ``AlignTrainer.train``)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.signal: int | None = None  # the signal that asked to stop
        self.received_at = 0.0
        self.stopped_at: int | None = None  # the step after which training stopped on request
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self.signal, self.stopped_at = None, None
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.received_at = signum, now
            logger.warning("%s received: finishing this optimizer step, saving a checkpoint, then stopping (a second "
                           "signal stops at once, without saving)", signal.Signals(signum).name)
        elif now - self.received_at >= REPEAT_WINDOW:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def requested(self) -> bool:
        """Whether any rank received a signal (all ranks call this together, at the end of each step)."""
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested():
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()
