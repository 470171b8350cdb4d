"""Progress of ``crossent bench`` on stderr, drawn by tqdm.

Why tqdm rather than a hand-written bar: it is small, pure Python, has no dependencies of its own and is
maintained; it writes to stderr, so stdout carries only the table or the JSON; with ``disable=None`` it
switches itself off when stderr is not a terminal (CI logs, pipes, files), so no flag is needed for that.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from tqdm import tqdm


def progress_bar(total: int, desc: str) -> tqdm:
    """A bar of ``total`` steps, removed when done (the table follows), off when stderr is not a TTY."""
    return tqdm(total=total, desc=desc, unit="step", disable=None, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def step(bar: Optional[tqdm], label: str) -> Iterator[None]:
    """Show ``label`` as the step under way, count it done at the end of the ``with`` block; ``bar=None``
    (the library used without a bar) does nothing."""
    if bar is not None:
        bar.set_postfix_str(label)
    yield
    if bar is not None:
        bar.update()
