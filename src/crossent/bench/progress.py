"""A dependency-free progress bar on stderr, shown only when the work takes more than a moment."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "bench") as bar: ...; bar.step("label")`` — redraws one stderr line.

    Nothing is drawn during the first ``delay`` seconds, so quick runs stay quiet; when stderr is not
    a terminal, a line is printed every ``log_every`` seconds instead of redrawing.
    """

    def __init__(self, total: int, title: str, stream=None, delay: float = 1.0, log_every: float = 10.0):
        self.total, self.title, self.done = max(total, 1), title, 0
        self.stream = stream if stream is not None else sys.stderr
        self.delay, self.log_every = delay, log_every
        self.start = self.last_log = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def step(self, label: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.start < self.delay:
            return
        if not self.tty and now - self.last_log < self.log_every and self.done < self.total:
            return
        self.last_log = now
        self.stream.write(("\r" if self.tty else "") + self.render(label, now - self.start) + ("" if self.tty else "\n"))
        self.stream.flush()
        self.drawn = True

    def render(self, label: str, elapsed: float) -> str:
        """``title [#####.....] 5/10  12s  label``.

        >>> Progress(10, "bench").render("x", 12.0)
        'bench [..............................] 0/10  12s  x'
        """
        width = 30
        filled = width * self.done // self.total
        return f"{self.title} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}  {elapsed:.0f}s  {label}"
