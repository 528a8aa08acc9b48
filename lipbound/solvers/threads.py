"""CPU thread policy of the native solver, from measurement (``lipbound bench threads`` writes the data).

The solver runs small operations (order below :data:`TUNE_FROM`), which dominate deep narrow nets, on one thread,
and operations from :data:`CROSSOVER` on all cores; in between, the thread count is measured on the run's own
iterations (:class:`ThreadPolicy`), since whether more threads pay there depends on the machine's load.

Measured on a 2-core machine shared with other jobs (``lipbound bench threads``, this table's source): a 64 x 64
float64 product takes 60 us on 1 thread and 1.9 ms on 2 (synchronisation stalls when the other core is busy); a
Cholesky factorisation of order 1000 takes 16 ms / 49 ms (1 / 2 threads), of order 2000 123 / 125 ms, of
order 4000 1.30 s / 0.69 s; products of order 4000 4.7 s / 4.4 s. Reported on a 16-core host: 784-100-100-10
(LMI 300) takes 7.5 s with 16 threads and 0.89 s with 1; 784-200-200-10 (LMI 600) 7.9 s and 4.9 s. So more
threads pay only from order ~3000 on here; :data:`CROSSOVER` holds that measured order, and ``lipbound bench
threads`` re-measures it on another machine (its JSON has the fitted value to put here).

The policy governs numpy's and scipy's own BLAS/LAPACK (OpenBLAS) as well as torch, through ``threadpoolctl``:
the solver's small LAPACK calls (the step lengths' pencil reductions and selected eigenvalues, order 150 on
784-50-50-10) took 1.3-1.7 ms each with OpenBLAS on 2 threads beside torch's idle OpenMP pool, 0.77 ms on one
(the whole solve: 0.21 s -> 0.16 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import os

import torch

_BLAS = None


def _blas():
    """The BLAS libraries loaded in this process other than torch's (numpy's and scipy's OpenBLAS), as one
    ``threadpoolctl`` controller, created on first use (after scipy.linalg has loaded its own copy)."""
    global _BLAS
    if _BLAS is None:
        import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, so that it is governed too)
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController().select(user_api="blas")
    return _BLAS


@contextlib.contextmanager
def limited(threads: int):
    """Run the enclosed code with ``threads`` threads in torch and in numpy's/scipy's BLAS (restored afterwards).

    >>> with limited(1):
    ...     torch.get_num_threads()
    1
    """
    saved = torch.get_num_threads()
    if threads != saved:
        torch.set_num_threads(threads)
    try:
        with _blas().limit(limits=threads):
            yield
    finally:
        if threads != saved:
            torch.set_num_threads(saved)

#: Smallest matrix order from which a dense factorisation/product runs faster on all cores than on one
#: (measured, see the module docstring).
CROSSOVER = 3000


def available_cores() -> int:
    """Cores this process may use (the affinity mask when the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity masks
        return os.cpu_count() or 1


_LAST_MEASURED: dict[int, int] = {}


def default_cores() -> int:
    """Threads a policy uses for large operations by default: the cores available to this process, at most
    torch's thread count (``OMP_NUM_THREADS=1`` or ``torch.set_num_threads(1)`` keeps every solve on one thread)."""
    return max(1, min(available_cores(), torch.get_num_threads()))


def last_measured(cores: int | None = None) -> int | None:
    """The middle orders' thread count the last solve in this process measured with ``cores`` cores (default:
    :func:`default_cores`; ``None`` before any)."""
    return _LAST_MEASURED.get(default_cores() if cores is None else cores)


#: Operations of orders from here up to :data:`CROSSOVER` run on the thread count the solver measures on its own
#: iterations (:meth:`ThreadPolicy.observe`): whether all cores pay there depends on the machine's load, not only
#: on the order (a quiet 2-core machine: a Cholesky factorisation of order 1000 takes 11.2 ms on one thread and
#: 6.4 ms on two, the chordal layout's batched products 37 vs 21 ms; glipsdp-64x32 solved in 47.7 s on one
#: thread and 30.5 s on two; on the busy machine of the table above two threads cost up to 30x).
TUNE_FROM = 256


#: One-thread iterations shorter than this are not measured on all cores (the probe iteration of glipsdp-16x16
#: took 0.61 s against 0.03 s on one thread, on 2 cores of a host running six more such jobs).
PROBE_FROM_S = 0.05


class ThreadPolicy:
    """How many CPU threads torch (and numpy's/scipy's BLAS) use for each operation of one solve.

    Orders below :data:`TUNE_FROM` run on one thread and orders from ``crossover`` on all cores. Orders in
    between run on one thread until the solver has timed iterations both ways: :meth:`observe` takes the
    iteration times, runs the second iteration that used such an operation on all cores, and keeps all cores
    from the third on only if that iteration was at least 15 % faster than the first (on one thread). A run is
    never slower with more cores by more than one iteration's difference. Runs whose first such iteration takes
    under :data:`PROBE_FROM_S` stay on one thread. (Over eleven measured runs, a third iteration on one thread
    took within 14 % of the first and never changed the choice: it is not taken.)

    Parameters
    ----------
    forced : int, optional
        Use exactly this many threads for every operation (the solver's ``threads=`` option).
    crossover : int
        Operations of at least this order (matrix dimension) use ``cores`` threads.
    cores : int, optional
        Threads for large operations (default: :func:`default_cores` when the policy is made).
    tune_from : int
        Smallest order whose thread count is measured (below it: one thread).
    middle : int, optional
        Threads for the measured orders, when already measured (no measurement then): the rigorous check after
        a native solve uses the solve's (:func:`last_measured`).

    Examples
    --------
    >>> policy = ThreadPolicy(crossover=1000, cores=4)
    >>> policy.threads_for(100), policy.threads_for(500), policy.threads_for(2000)
    (1, 1, 4)
    >>> for seconds in (1.0, 0.5):  # iterations: one thread, all cores
    ...     with policy.scope(500):
    ...         pass
    ...     policy.observe(seconds)
    >>> policy.threads_for(500), policy.tuned, ThreadPolicy(forced=3).threads_for(10)
    (4, [1.0, 0.5], 3)
    """

    def __init__(self, forced: int | None = None, crossover: int = CROSSOVER, cores: int | None = None,
                 tune_from: int = TUNE_FROM, middle: int | None = None):
        self.forced = None if forced is None else max(1, int(forced))
        self.crossover = int(crossover)
        self.cores = max(1, int(cores if cores is not None else default_cores()))
        self.tune_from = int(tune_from)
        # Threads for orders in [tune_from, crossover): one until measured, or the measured count passed in.
        self.middle = 1 if middle is None else max(1, int(middle))
        self.tuned: list[float] = []  # times of the iterations measured so far (one thread, all cores)
        self.decided = (self.forced is not None or self.cores == 1 or self.tune_from >= self.crossover
                        or middle is not None)
        self._touched = False  # an operation of a measured order ran since the last observe()

    def threads_for(self, order: int) -> int:
        if self.forced is not None:
            return self.forced
        if order >= self.crossover:
            return self.cores
        if order >= self.tune_from:
            self._touched = True
            return self.middle
        return 1

    def observe(self, seconds: float) -> None:
        """Time of the iteration that just ended: drives the measurement of the middle orders' thread count."""
        if self.decided or not self._touched:
            return
        self._touched = False
        self.tuned.append(float(seconds))
        if len(self.tuned) == 1 and seconds < PROBE_FROM_S:
            self.decided = True  # little to gain, and a probe on all cores can cost 20 such iterations
        elif len(self.tuned) == 1:
            self.middle = self.cores
        else:
            self.middle = self.cores if self.tuned[1] <= 0.85 * self.tuned[0] else 1
            self.decided = True
            _LAST_MEASURED[self.cores] = self.middle

    def scope(self, order: int):
        """Run the enclosed operations with :meth:`threads_for` ``(order)`` threads, in torch and in numpy's and
        scipy's BLAS (restored afterwards)."""
        return limited(self.threads_for(order))
