"""Env calls with a deadline: an env whose reset() or step() hangs ends its episode as an error
(`env_step_timeout`, default 60 s) instead of hanging the run.

On the main thread (the CLI, training ranks) the call runs where it is and a SIGALRM timer
interrupts it: the env is called from the thread that made it (envs holding thread-bound handles,
such as sqlite connections, keep working), and the hung call itself is ended, not left behind. A
call that blocks inside C code which never returns to the interpreter cannot be interrupted this
way. EnvTimeout is a BaseException, so an env's own `except Exception` cannot swallow it; it is
raised once per call (a one-shot timer), and the handler and any earlier timer are always restored.
Off the main thread (signals go to the main thread only) the call runs on a daemon worker
thread, abandoned when the deadline passes. An earlier SIGALRM handler and timer are put back.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

#: default seconds an env call may take (EvalConfig.env_step_timeout, run_episodes)
ENV_STEP_TIMEOUT = 60.0


class EnvTimeout(BaseException):
    """An env call did not return within its deadline. A BaseException (like KeyboardInterrupt),
    so that the env's own `except Exception` does not swallow it; callers catch it by name."""


#: what an env call may raise that ends only its episode: the env's exceptions and the deadline
ENV_CALL_ERRORS = (Exception, EnvTimeout)


def call_with_deadline(fn: Callable[..., Any], *args: Any, timeout: float | None, what: str) -> Any:
    """fn(*args), or EnvTimeout when it takes longer than `timeout` seconds (None or 0: no limit).
    Exceptions from fn propagate unchanged."""
    if not timeout or timeout <= 0:
        return fn(*args)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _with_alarm(fn, args, timeout, what)
    return _in_thread(fn, args, timeout, what)


def _with_alarm(fn, args, timeout: float, what: str):
    state = {"armed": True}

    def expire(signum, frame):
        if state["armed"]:        # once: cleanup below can never be cut short by a second one
            state["armed"] = False
            raise EnvTimeout(f"{what} took longer than {timeout:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    earlier, interval = signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            return fn(*args)
        finally:
            state["armed"] = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if earlier:         # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(earlier - (time.monotonic() - started), 1e-3), interval)


def _in_thread(fn, args, timeout: float, what: str):
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box.append((False, e))

    worker = threading.Thread(target=run, name="atod-env-call", daemon=True)
    worker.start()
    worker.join(timeout)
    if not box:
        raise EnvTimeout(f"{what} took longer than {timeout:g} s")
    ok, value = box[0]
    if ok:
        return value
    raise value
