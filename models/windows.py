"""Tumbling panes of event time, the one scheme behind every windowed statistic.

A pane of ``step`` seconds starts at a multiple of ``step`` (epoch seconds), so every event time
falls in exactly one pane and panes need no coordination between workers. A window of ``window``
seconds ending at ``now`` is the merge of the ``window / step`` panes before it: a hopping window
updates one pane per event, not every overlapping window, and a tumbling window is the case
``window == step``. Metric panes, log statistics windows and trending items all use these pure
functions; the jobs choose only the step, the window and how a pane key is spelled in a table.
(It lives in ``models/``, not ``app/``: importing the ``app`` package builds the App and its agents.)
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional

KEY_DECIMALS = 3  # pane keys carry milliseconds: a step need not be a whole number of seconds


def pane_start(ts: float, step: float) -> float:
    """Start of the pane of ``step`` seconds that holds event time ``ts``."""
    start = math.floor(ts / step) * step
    return start - step if start > ts else start  # ts / step rounded up to 0 (ts a tiny negative)


def pane_starts(now: float, window: float, step: float) -> List[float]:
    """Starts of the panes that make up the window of ``window`` seconds ending at ``now``, newest first."""
    newest = pane_start(now, step)
    return [newest - index * step for index in range(round(window / step))]


def in_window(start: float, now: float, window: float) -> bool:
    """Whether the pane starting at ``start`` is one of the window of ``window`` seconds ending at ``now``."""
    return now - window < start <= now


def retained(start: float, newest: float, keep: float) -> bool:
    """Whether a pane is kept when the newest pane starts at ``newest`` and ``keep`` seconds are kept."""
    return start > newest - keep


def panes_to_close(
    starts: Iterable[float],
    *,
    now: float,
    step: float,
    grace: float,
    newest: Optional[float] = None,
    closed_through: float = float("-inf"),
) -> List[float]:
    """Starts of the panes past ``closed_through`` that have ended, oldest first.

    A pane ends when the wall clock ``now`` is ``grace`` seconds past its end or, for replayed or
    delayed data, when a pane more than one step later (``newest``) has data (event time)."""
    return [
        start
        for start in sorted(starts)
        if start > closed_through and ((newest is not None and start + step < newest) or start + step + grace <= now)
    ]


def pane_key(start: float, decimals: int = KEY_DECIMALS) -> str:
    """The text of a pane start in a table key or a JSON object key (``"600.000"``)."""
    return f"{start:.{decimals}f}"


def key_start(key: str) -> float:
    """The pane start a ``pane_key`` spells."""
    return float(key)
