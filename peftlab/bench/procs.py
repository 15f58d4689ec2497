"""Worker subprocesses that never outlive the sweep that started them.

A worker stays in its parent's process group (a Ctrl-C in the terminal reaches both), and:

* the parent ends its live workers when it gets SIGTERM or SIGINT (:func:`guard`, used by
  :func:`run`), when it raises, and at interpreter exit;
* the worker ends itself when the sweep dies without warning (``kill -9``): it checks every second
  that the sweep's pid (in ``PEFTLAB_PARENT_PID``) is still among its ancestors (:func:`exit_with_parent`,
  called first thing by the worker). An ancestor, not only the parent: under ``torchrun`` or
  ``accelerate launch`` the sweep is the worker's grandparent.

So killing the parent never orphans a worker that would go on training beside the rerun.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

PARENT_ENV = "PEFTLAB_PARENT_PID"
#: seconds a worker gets to exit after SIGTERM before it is killed
GRACE_S = 5.0

_live: set[subprocess.Popen] = set()
_lock = threading.Lock()


def start(cmd: list[str], env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in the caller's process group, registered so it is ended with the parent."""
    env = {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, **popen_kwargs)
    with _lock:
        _live.add(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaps the process.

    It stays registered until it is gone, so an interrupted stop is finished by :func:`stop_all`.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with _lock:
        _live.discard(proc)


def stop_all() -> None:
    """End every live worker started by :func:`start`."""
    with _lock:
        procs = list(_live)
    for proc in procs:
        stop(proc)


atexit.register(stop_all)


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so the stack unwinds and live workers are stopped.

    A ``SystemExit`` (exit status 128 + 15, as a process killed by SIGTERM reports to a shell), so
    ``except Exception`` blocks do not swallow it.
    """


def _on_sigterm(signum, frame):
    raise Terminated(128 + signum)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` (SIGINT raises ``KeyboardInterrupt`` as always);
    on leaving by any exception, every live worker is stopped.

    Signal handlers can only be installed from the main thread; elsewhere only the cleanup applies
    (plus the ``atexit`` hook and the workers' own parent check).
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGTERM)
        if current in (signal.SIG_DFL, None):  # leave a handler someone else installed alone
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except BaseException:
        stop_all()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run(cmd: list[str], timeout: float | None = None, **popen_kwargs) -> subprocess.CompletedProcess:
    """Like ``subprocess.run`` (raises ``TimeoutExpired``), but the child is ended with the parent."""
    with guard():
        proc = start(cmd, **popen_kwargs)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:  # timeout, SIGTERM, Ctrl-C: the worker goes too
            stop(proc)
            raise
        with _lock:
            _live.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _ancestors() -> list[int]:
    """Pids from this process's parent up to (not including) init, read from /proc."""
    pids, pid = [], os.getppid()
    while pid > 1 and len(pids) < 64:
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker: exit as soon as the sweep that started it is gone (checked every ``poll_s`` s).

    Uses the pid the sweep put in ``PEFTLAB_PARENT_PID``, so a sweep that died before this check
    started is caught too. When the sweep dies its children are re-parented at once, so it drops out
    of the worker's ancestry even before it is reaped. Without /proc (not Linux) the check is that
    this process's own parent is unchanged. Does nothing when the variable is not set (worker
    started by hand).
    """
    expected = os.environ.get(PARENT_ENV)
    if not expected:
        return
    first_parent = os.getppid()
    has_proc = os.path.isdir(f"/proc/{os.getpid()}")

    def parent_gone() -> bool:
        if has_proc:
            return int(expected) not in _ancestors()
        return os.getppid() != first_parent

    def watch() -> None:
        while not parent_gone():
            time.sleep(poll_s)
        print(
            f"peftlab worker {os.getpid()}: its sweep (pid {expected}) is gone; exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    if parent_gone():
        watch()
    threading.Thread(target=watch, name="peftlab-parent-watch", daemon=True).start()
