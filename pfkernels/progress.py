"""Progress of long solves: a tqdm bar of operator products, with the current top Ritz value and
its residual where there is one.

Off by default in library calls (``progress=False``); ``progress=True`` turns it on (the CLI
does). Under a process group only rank 0 draws, so ``R`` ranks do not print ``R`` bars.
"""

from __future__ import annotations

import math
from typing import Any

from . import distributed as _dist

__all__ = ["Progress", "check_progress"]


def check_progress(progress: Any) -> None:
    if not isinstance(progress, bool):
        raise TypeError(f"argument 'progress': must be a bool, got {type(progress).__name__}")


class Progress:
    """A tqdm bar counting products up to ``total`` (a budget: solves usually stop earlier),
    or nothing when ``enabled`` is False or this is not rank 0 of ``group``."""

    def __init__(self, enabled: bool, total: int | None, desc: str, group=None) -> None:
        self._bar = None
        self._done = 0
        if enabled and (group is None or _dist.rank(group) == 0):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="HVP", dynamic_ncols=True,
                             leave=True)

    def update(self, done: int, top: float | None = None, residual: float | None = None) -> None:
        """``done`` products so far; ``top`` and ``residual``: the most wanted Ritz value and
        its residual estimate at the last convergence check."""
        if self._bar is None:
            return
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done
        if top is not None and math.isfinite(top):
            post = {"top" if residual is not None else "estimate": f"{top:.6g}"}
            if residual is not None:
                post["res"] = f"{residual:.2e}"
            self._bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
