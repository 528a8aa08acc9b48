"""The CPU thread policy: torch and numpy's/scipy's BLAS follow it, and middle orders are measured per run."""

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

import lipbound
import lipbound.api
from lipbound.solvers.threads import ThreadPolicy, available_cores, default_cores, last_measured, limited


def _blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_limited_governs_torch_and_numpy_blas_and_restores_both():
    torch_before, blas_before = torch.get_num_threads(), _blas_threads()
    with limited(1):
        assert torch.get_num_threads() == 1
        assert _blas_threads() == {1}
    assert torch.get_num_threads() == torch_before and _blas_threads() == blas_before


def _probe(policy: ThreadPolicy, times, order=500):
    for seconds in times:
        with policy.scope(order):
            pass
        policy.observe(seconds)


def test_middle_orders_take_all_cores_only_when_the_measured_iteration_was_faster():
    fast = ThreadPolicy(crossover=1000, cores=4)
    assert [fast.threads_for(n) for n in (100, 500, 2000)] == [1, 1, 4]
    _probe(fast, [1.0])
    assert fast.threads_for(500) == 4  # the second measured iteration runs on all cores
    _probe(fast, [0.5])
    assert fast.decided and fast.threads_for(500) == 4 and fast.tuned == [1.0, 0.5]

    slow = ThreadPolicy(crossover=1000, cores=4)
    _probe(slow, [1.0, 0.9])  # 10 % faster: not worth it
    assert slow.decided and slow.threads_for(500) == 1
    _probe(slow, [0.1, 0.1])  # decided once
    assert slow.tuned == [1.0, 0.9] and slow.threads_for(500) == 1


def test_torch_thread_count_caps_the_cores_used():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        policy = ThreadPolicy(crossover=1000)
    finally:
        torch.set_num_threads(saved)
    assert policy.cores == 1 and policy.decided and policy.threads_for(5000) == 1


def test_short_iterations_are_not_measured_on_all_cores():
    policy = ThreadPolicy(crossover=1000, cores=4)
    _probe(policy, [0.01])
    assert policy.decided and policy.threads_for(500) == 1 and policy.tuned == [0.01]


def test_iterations_without_middle_orders_are_not_measured():
    policy = ThreadPolicy(crossover=1000, cores=4)
    for order in (100, 5000):
        with policy.scope(order):
            pass
        policy.observe(1.0)
    assert policy.tuned == [] and not policy.decided


def test_forced_or_single_core_policies_never_measure():
    forced = ThreadPolicy(forced=3, crossover=1000, cores=4)
    _probe(forced, [1.0, 0.1, 1.0])
    assert forced.tuned == [] and forced.threads_for(500) == 3
    single = ThreadPolicy(crossover=1000, cores=1)
    _probe(single, [1.0, 0.1, 1.0])
    assert single.tuned == [] and single.threads_for(5000) == 1


@pytest.mark.skipif(min(available_cores(), torch.get_num_threads()) < 2, reason="one thread: nothing to measure")
def test_native_solve_measures_middle_orders_and_answers_as_with_forced_threads(monkeypatch):
    import lipbound.solvers.threads

    monkeypatch.setattr(lipbound.solvers.threads, "PROBE_FROM_S", 0.0)  # this net's iterations take ~40 ms
    rng = np.random.default_rng(3)
    net = lipbound.from_weights([rng.standard_normal(s) / 8 for s in ((48, 20),) + ((48, 48),) * 5 + ((3, 48),)])
    policy = lipbound.certify(net, solver="native-chordal")
    forced = lipbound.certify(net, solver="native-chordal", threads=1)
    info = policy.solver_info
    assert info["threads_middle_orders"] in (1, default_cores()) and len(info["threads_measured_iterations_s"]) == 2
    assert "threads_middle_orders" not in forced.solver_info
    assert policy.certified and forced.certified
    assert abs(policy.upper_bound - forced.upper_bound) <= 1e-8 * forced.upper_bound


def test_the_check_of_a_small_program_runs_on_one_blas_thread(monkeypatch):
    seen = []
    original = lipbound.api.certify_multipliers

    def recording(*args, **kwargs):
        seen.append((torch.get_num_threads(), _blas_threads()))
        return original(*args, **kwargs)

    monkeypatch.setattr(lipbound.api, "certify_multipliers", recording)
    rng = np.random.default_rng(4)
    cert = lipbound.certify(lipbound.from_weights([rng.standard_normal(s) / 4 for s in ((8, 6), (8, 8), (2, 8))]),
                            solver="native")
    assert cert.certified and seen and all(t == 1 and b == {1} for t, b in seen)


def test_a_measured_count_is_remembered_for_the_next_check_and_can_be_passed_in():
    policy = ThreadPolicy(crossover=1000, cores=7)
    _probe(policy, [1.0, 0.2])
    assert last_measured(7) == 7
    given = ThreadPolicy(crossover=1000, cores=7, middle=last_measured(7))
    assert given.decided and given.threads_for(500) == 7
    _probe(given, [1.0, 5.0])
    assert given.tuned == [] and given.threads_for(500) == 7
