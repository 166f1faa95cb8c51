"""One reward interface: ``reward(prompts, completions) -> list[float]``, and safe scoring around it."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Protocol

from align.errors import RewardError

logger = logging.getLogger(__name__)


class RewardFunction(Protocol):
    """``reward(prompts, completions) -> list[float]``: one number per completion. A reward that also takes
    the keyword ``finished`` (or ``**kwargs``) is told which completions ended by themselves (EOS) rather
    than at the token limit, e.g. to fail a cut completion on a constraint about its end."""

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]: ...


def _takes_finished(reward: RewardFunction) -> bool:
    try:
        parameters = inspect.signature(reward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: no keywords
        return False
    return any(p.name == "finished" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def import_function(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (the module must be importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {module_name} has no callable {attr!r}")
    return fn


@contextmanager
def time_limit(seconds: float | None):
    """Raise ``TimeoutError`` in the running code after ``seconds`` (None: no limit).

    SIGALRM interrupts Python code and blocking system calls (sockets, sleeps) but not a long C call,
    and only works in the main thread; code that must be stopped whatever it does belongs in a
    subprocess (``align.rewards.sandbox``).
    """
    if seconds is None:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise RewardError("a reward timeout needs the main thread (it uses SIGALRM); score without a timeout")

    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call(reward: RewardFunction, prompts: list[str], completions: list[str], finished: list[bool] | None,
          timeout: float | None) -> list:
    extra = {"finished": finished} if finished is not None and _takes_finished(reward) else {}
    with time_limit(timeout):
        return list(reward(prompts, completions, **extra))


def _failed(error: BaseException) -> str:
    return f"timed out ({error})" if isinstance(error, TimeoutError) else f"raised {type(error).__name__}: {error}"


def score(
    reward: RewardFunction,
    prompts: list[str],
    completions: list[str],
    *,
    finished: list[bool] | None = None,
    on_error: str = "stop",
    retries: int = 0,
    timeout: float | None = None,
) -> list[float]:
    """Call ``reward`` and check its answer: one finite number per completion. ``finished`` (which
    completions ended with EOS) is passed on to rewards that take it.

    A call that raises, or runs longer than ``timeout`` seconds, is retried ``retries`` times. If it
    still fails, the prompts are scored one by one to find the failing ones (after an exception only:
    after a time-out that could cost a time-out per prompt, so the whole batch fails). Then
    ``on_error="stop"`` raises ``RewardError`` naming the prompt; ``"skip"`` gives NaN to the failed
    completions (the trainer drops NaN-scored groups and counts them).
    """
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    for attempt in range(retries + 1):
        try:
            return _check(_call(reward, prompts, completions, finished, timeout), prompts, completions, on_error)
        except RewardError:
            raise
        except Exception as err:  # any user code may fail; we report which prompt it was given
            error = err
            if attempt < retries:
                logger.warning("reward %s on a batch of %d; retrying (%d/%d)", _failed(err), len(prompts), attempt + 1, retries)
    if isinstance(error, TimeoutError) or len(prompts) < 2:
        where = f"a batch of {len(prompts)} starting at prompt 0 {_short(prompts[0])!r}" if prompts else "an empty batch"
        if on_error == "stop":
            raise RewardError(f"reward {_failed(error)} on {where}") from error
        logger.warning("reward %s on %s; skipping the batch", _failed(error), where)
        return [math.nan] * len(completions)
    values, failures = [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        try:
            one = None if finished is None else [finished[i]]
            values += _check(_call(reward, [prompt], [completion], one, timeout), [prompt], [completion], on_error)
        except RewardError:
            raise
        except Exception as err:
            failures.append((i, err))
            values.append(math.nan)
    for i, err in failures:
        problem = f"reward {_failed(err)} on prompt {i} {_short(prompts[i])!r}"
        if on_error == "stop":
            raise RewardError(problem + f" ({len(failures)} of {len(prompts)} prompts failed)") from err
        logger.warning("%s; skipping it", problem)
    return values


def _check(values: list, prompts: list[str], completions: list[str], on_error: str) -> list[float]:
    if len(values) != len(completions):
        raise RewardError(f"reward returned {len(values)} values for {len(completions)} completions")
    out = []
    for i, v in enumerate(values):
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):
            problem = f"reward returned {values[i]!r} for prompt {i} {_short(prompts[i])!r}"
            if on_error == "stop":
                raise RewardError(problem + "; rewards must be finite numbers")
            logger.warning("%s; skipping it", problem)
            v = math.nan
        out.append(v)
    return out
