"""Progress of long loops: the library calls a :class:`Progress` callback, the caller renders it.

The library never prints. Long loops (the methods of :func:`~lipbound.certify_all`, the steps of
:func:`~lipbound.lower_bound`) accept ``progress=``, a callable ``progress(done, total, label)``; stage changes
that are single long calls (a solve, the rigorous check) are logged at INFO on ``logging.getLogger("lipbound")``.
The command line renders both: a tqdm bar for the callbacks and time-stamped lines for the log.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """``progress(done, total, label)``: ``done`` of ``total`` units finished; ``label`` says what runs now.

    Examples
    --------
    >>> seen = []
    >>> def record(done: int, total: int, label: str) -> None:
    ...     seen.append((done, total, label))
    >>> import numpy as np, lipbound
    >>> _ = lipbound.lower_bound(lipbound.from_weights([np.eye(2)]), n_starts=2, steps=1, progress=record)
    >>> seen[-1][:2]
    (2, 2)
    """

    def __call__(self, done: int, total: int, label: str) -> None: ...
