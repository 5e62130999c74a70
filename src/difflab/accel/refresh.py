"""When a cache recomputes: the network evaluations of one sampling run, counted from its start,
and which of them refresh (every ``interval``-th, or an explicit list).

A call back at (or above) the time the current run started, or with another batch shape, begins
a new run, so a cache used for consecutive runs gives the images fresh runs give. (Churn and
two-stage samplers step up a little within a run, but never back to its start; starting afresh
when unsure only costs a refresh.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


class RefreshClock:
    """Counts a run's evaluations; :meth:`tick` says whether the current one refreshes."""

    def __init__(self, refresh: int | Sequence[int]):
        if isinstance(refresh, bool) or not isinstance(refresh, int | Sequence):
            raise ValueError(f"refresh must be an interval (int) or a list of evaluations, got {refresh!r}")
        if isinstance(refresh, int):
            if refresh < 1:
                raise ValueError(f"a refresh interval must be >= 1, got {refresh}")
        elif not refresh or 0 not in refresh:
            raise ValueError("explicit refresh steps must include evaluation 0 (nothing is cached before it)")
        self.refresh = refresh if isinstance(refresh, int) else [int(r) for r in refresh]
        self.clear()

    def clear(self) -> None:
        self.calls, self._start_t, self._shape = 0, None, None

    def new_run(self, x: Tensor, t: Tensor) -> bool:
        """Whether this call starts a new run (then the count restarts at 0)."""
        top = float(t.max())  # one host sync per network evaluation
        fresh = self._start_t is None or top >= self._start_t - 1e-9 or self._shape != tuple(x.shape)
        if fresh:
            self._start_t, self._shape, self.calls = top, tuple(x.shape), 0
        return fresh

    def is_refresh(self, call: int) -> bool:
        return call % self.refresh == 0 if isinstance(self.refresh, int) else call in self.refresh

    def tick(self) -> tuple[int, bool]:
        """(this evaluation's index in the run, whether it refreshes); advances the count."""
        call = self.calls
        self.calls += 1
        return call, self.is_refresh(call)
