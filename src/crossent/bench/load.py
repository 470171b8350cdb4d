"""The "loaded" condition of ``crossent bench``: one other CPU-bound process running beside the benchmark.

A shared 2-core machine rarely runs one job alone; PyTorch's and crossent's OpenMP regions slow down
differently when a core is taken, so the bench reports both conditions.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Iterator

# The child spins until its deadline and exits on its own: even if the benchmark is killed (SIGKILL, no
# finally), the load ends after ``seconds``. It says "ready" once spinning, so no measurement starts early.
_BUSY_LOOP = (
    "import sys, time\n"
    "deadline = time.monotonic() + float(sys.argv[1])\n"
    "print('ready', flush=True)\n"
    "while time.monotonic() < deadline:\n"
    "    pass\n"
)


@contextlib.contextmanager
def busy_process(seconds: float) -> Iterator[subprocess.Popen]:
    """Run a busy loop in a second Python process for the duration of the ``with`` block (at most ``seconds``).

    The process is always stopped when the block ends, normally or by an exception (terminate, then kill
    after 5 s), and reaped, so no child outlives the call.

    >>> with busy_process(60) as proc:
    ...     proc.poll() is None
    True
    >>> proc.poll() is not None
    True
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUSY_LOOP, str(seconds)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the busy-loop process exited before starting (exit status {proc.wait()})")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# A bound on each busy process, far above one case's timing (the largest --full case takes about a minute).
MAX_LOAD_SECONDS = 900.0


def condition(load: str) -> contextlib.AbstractContextManager:
    """The context a case is timed in: ``"quiet"`` adds nothing, ``"loaded"`` runs :func:`busy_process`."""
    if load == "quiet":
        return contextlib.nullcontext()
    if load == "loaded":
        return busy_process(MAX_LOAD_SECONDS)
    raise ValueError(f"load must be 'quiet' or 'loaded', got {load!r}")
