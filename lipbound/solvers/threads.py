"""CPU thread policy of the native solver, from measurement (``lipbound bench threads`` writes the data).

The solver runs one thread by default and raises torch's thread count only around single dense operations large
enough to pay for OpenMP synchronisation (the Schur matrix's factorisation and products, the dense layout's
``N x N`` products). Small operations, which dominate deep narrow nets, stay on one thread.

Measured on a 2-core machine shared with other jobs (``lipbound bench threads``, this table's source): a 64 x 64
float64 product takes 60 us on 1 thread and 1.9 ms on 2 (synchronisation stalls when the other core is busy); a
Cholesky factorisation of order 1000 takes 16 ms / 49 ms (1 / 2 threads), of order 2000 123 / 125 ms, of
order 4000 1.30 s / 0.69 s; products of order 4000 4.7 s / 4.4 s. Reported on a 16-core host: 784-100-100-10
(LMI 300) takes 7.5 s with 16 threads and 0.89 s with 1; 784-200-200-10 (LMI 600) 7.9 s and 4.9 s. So more
threads pay only from order ~3000 on here; :data:`CROSSOVER` holds that measured order, and ``lipbound bench
threads`` re-measures it on another machine (its JSON has the fitted value to put here).
"""

from __future__ import annotations

import contextlib
import os

import torch

#: Smallest matrix order from which a dense factorisation/product runs faster on all cores than on one
#: (measured, see the module docstring).
CROSSOVER = 3000


def available_cores() -> int:
    """Cores this process may use (the affinity mask when the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity masks
        return os.cpu_count() or 1


class ThreadPolicy:
    """How many CPU threads torch uses for each operation of one solve.

    Parameters
    ----------
    forced : int, optional
        Use exactly this many threads for every operation (the solver's ``threads=`` option).
    crossover : int
        Operations of at least this order (matrix dimension) use ``cores`` threads; smaller ones one thread.
    cores : int, optional
        Threads for large operations (default: the cores available to this process).

    Examples
    --------
    >>> policy = ThreadPolicy(crossover=1000, cores=4)
    >>> policy.threads_for(500), policy.threads_for(2000), ThreadPolicy(forced=3).threads_for(10)
    (1, 4, 3)
    """

    def __init__(self, forced: int | None = None, crossover: int = CROSSOVER, cores: int | None = None):
        self.forced = None if forced is None else max(1, int(forced))
        self.crossover = int(crossover)
        self.cores = max(1, int(cores if cores is not None else available_cores()))

    def threads_for(self, order: int) -> int:
        if self.forced is not None:
            return self.forced
        return self.cores if order >= self.crossover else 1

    @contextlib.contextmanager
    def scope(self, order: int):
        """Run the enclosed operations with :meth:`threads_for` ``(order)`` threads (restored afterwards)."""
        saved = torch.get_num_threads()
        want = self.threads_for(order)
        if want != saved:
            torch.set_num_threads(want)
        try:
            yield
        finally:
            if want != saved:
                torch.set_num_threads(saved)
