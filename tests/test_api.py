"""lipbound.api: option validation before any work, ``method="all"`` planning, and verify_certificate never raising
(mismatched networks, domains, input sizes; corrupted or tampered certificates)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipbound
from lipbound import Affine, Ball, Box, Network
from lipbound.api import _FAR_LEVELS, _scaling_distance, build_problem, domain_from_dict, plan_methods
from lipbound.errors import FormulationError, OptionError, SolverError
from lipbound.network import GroupSortLayer, HouseholderLayer
from tests.conftest import implicit_net, random_net

# ------------------------------------------------------------------------------------------------
# Option validation
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    return random_net([3, 5, 2], seed=11)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"tol": "abc"}, OptionError, "solver option 'tol' must be a real number, got 'abc'"),
    ({"tol": -1e-9}, OptionError, "'tol' must be > 0"),
    ({"tol": math.nan}, OptionError, "'tol' must be finite"),
    ({"max_iter": 2.5}, OptionError, "'max_iter' must be an integer"),
    ({"max_iter": True}, OptionError, "'max_iter' must be an integer"),
    ({"step_fraction": 1.0}, OptionError, "'step_fraction' must lie in"),
    ({"threads": 0}, OptionError, "'threads' must be >= 1"),
    ({"device": "gpu"}, OptionError, "device='gpu' is not a torch device"),
    ({"tolerance": 1e-9}, OptionError, r"unknown option\(s\) for solver 'native': tolerance; accepted: device"),
    ({"output_idx": 1}, OptionError, r"output_idx.*Options of certify\(\) itself"),
    ({"solver": "clarabel", "max_iters": 10}, OptionError, "unknown option.*'clarabel': max_iters"),
    ({"solver": "clarabel", "max_iter": "x"}, OptionError, "'max_iter' must be an integer, got 'x'"),
    ({"solver": "clarabel", "tol_gap_rel": 0.0}, OptionError, "'tol_gap_rel' must be > 0"),
    ({"solver": "clarabel", "verbose_solver": True}, OptionError, "verbose_solver"),
    ({"solver": "scs", "eps_abs": "abc"}, OptionError, "'eps_abs' must be a real number"),
    ({"solver": "scs", "max_iter": 100}, OptionError, "unknown option.*'scs': max_iter; accepted: .*max_iters"),
    ({"solver": "scs", "normalize": 1}, OptionError, "'normalize' must be True or False"),
    ({"solver": "gurobi"}, SolverError, "unknown solver 'gurobi'"),
    ({"solver": 3}, SolverError, "unknown solver 3"),
    ({"output_index": 1}, OptionError, "output_index=1 applies to norm='linf' only"),
    ({"output_index": "1", "norm": "linf"}, OptionError, "output_index must be an integer"),
    ({"coupled": True}, OptionError, "coupled=True applies to method='lipsdp-nsr' only"),
    ({"coupled": "yes", "method": "lipsdp-nsr"}, OptionError, "coupled must be True or False"),
    ({"polish": "no"}, OptionError, "polish must be True or False"),
    ({"reduce_input": 0}, OptionError, "reduce_input must be True or False"),
    ({"bounds_method": "lp"}, OptionError, "unknown bounds_method 'lp'"),
    ({"domain": (np.zeros(3), 1.0)}, OptionError, "domain must be a lipbound.Box or lipbound.Ball, got tuple"),
    ({"method": "lipsdp"}, FormulationError, "unknown method 'lipsdp'"),
    ({"norm": "l1"}, FormulationError, "unknown norm 'l1'"),
])
def test_bad_options_are_named_before_any_work(net, monkeypatch, kwargs, error, match):
    def no_work(*args, **kw):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr("lipbound.api.as_network", no_work)
    with pytest.raises(error, match=match):
        lipbound.certify(net, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_without_cuda_is_an_option_error(net):
    with pytest.raises(OptionError, match="device='cuda' but CUDA is not available"):
        lipbound.certify(net, device="cuda")


def test_solver_not_installed_is_named(net):
    from lipbound.solvers import available_solvers

    missing = [s for s in ("mosek", "sdpa") if s not in available_solvers()]
    if not missing:
        pytest.skip("MOSEK and SDPA are both installed here")
    with pytest.raises(SolverError, match=f"solver '{missing[0]}' is not installed"):
        lipbound.certify(net, solver=missing[0])
    with pytest.raises(SolverError, match="not installed"):  # before any method runs, not one entry per method
        lipbound.certify_all(net, solver=missing[0])


@pytest.mark.parametrize(("solver", "options"), [
    ("native", {"tol": 1e-10, "max_iter": 80, "threads": 1, "step_fraction": 0.95, "lanczos_steps": 20}),
    ("native", {"device": "cpu", "tol": 1e-8}),
    ("clarabel", {"max_iter": 100, "tol_gap_rel": 1e-9, "time_limit": math.inf}),
    ("scs", {"eps_abs": 1e-8, "eps_rel": 1e-8, "max_iters": 50_000, "normalize": True}),
])
def test_valid_solver_options_reach_the_solver(net, solver, options):
    cert = lipbound.certify(net, solver=solver, **options)
    ref = lipbound.certify(net, solver="clarabel")
    assert cert.certified and cert.upper_bound == pytest.approx(ref.upper_bound, rel=1e-4)


def test_certify_all_checks_options_once_before_running(net):
    with pytest.raises(SolverError, match="unknown solver"):
        lipbound.certify_all(net, solver="bogus")
    with pytest.raises(OptionError, match="'tol'"):
        lipbound.certify_all(net, tol="x")
    with pytest.raises(OptionError, match="coupled=True applies to lipsdp-nsr only, which does not run here"):
        lipbound.certify_all(net, methods=["mp", "lipsdp-neuron"], coupled=True)
    with pytest.raises(FormulationError, match="unknown method"):
        lipbound.certify_all(net, methods=["mp", "lipsdp-nueron"])


# ------------------------------------------------------------------------------------------------
# method="all"
# ------------------------------------------------------------------------------------------------


def _net(*middle, dims=(2, 2)) -> Network:
    rng = np.random.default_rng(0)
    return Network.from_layers([Affine(rng.standard_normal((dims[0], 3))), *middle,
                                Affine(rng.standard_normal((2, dims[-1])))])


def test_plan_methods():
    relu = plan_methods(random_net([3, 4, 2]))
    assert relu.run == ("mp", "lipsdp-layer", "lipsdp-neuron", "lipsdp-nsr", "lipsdp-rr")
    assert set(relu.skipped) == {"lipsdp-channel"}
    assert all("same program as lipsdp-neuron" in r for r in relu.skipped.values())
    cnn = plan_methods(lipbound.from_torch(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
                                                               torch.nn.Flatten(), torch.nn.Linear(8, 2)),
                                           input_shape=(1, 4, 4)))
    assert cnn.run == ("mp", "lipsdp-layer", "lipsdp-channel", "lipsdp-neuron", "lipsdp-nsr", "lipsdp-rr")

    maxmin = plan_methods(lipbound.from_weights([np.eye(2), np.eye(2)], "maxmin"))
    assert maxmin.run == ("mp", "lipsdp-nsr", "lipsdp-rr")
    assert "needs slope-restricted activations" in maxmin.skipped["lipsdp-neuron"]

    sort4 = plan_methods(_net(GroupSortLayer(4, 4, name="gs"), dims=(4, 4)))
    assert sort4.run == ("mp", "lipsdp-nsr")
    assert "rewrites MaxMin" in sort4.skipped["lipsdp-rr"] and "gs (GroupSortLayer)" in sort4.skipped["lipsdp-rr"]

    house = plan_methods(_net(HouseholderLayer(np.ones((1, 2)), name="hh")))
    assert house.run == ("mp", "lipsdp-nsr") and "hh (HouseholderLayer)" in house.skipped["lipsdp-rr"]
    assert lipbound.api.applicable_methods(random_net([3, 4, 2])) == list(relu.run)


def test_skipped_methods_would_repeat_lipsdp_neuron():
    """On slope-restricted nets NSR, RR and per-channel multipliers give exactly LipSDP-Neuron's bound."""
    net = random_net([4, 6, 6, 2], seed=3)
    neuron = lipbound.certify(net, method="lipsdp-neuron")
    for method in ("lipsdp-nsr", "lipsdp-rr", "lipsdp-channel"):
        assert lipbound.certify(net, method=method).upper_bound == neuron.upper_bound


def test_certify_all_reports_skipped_methods_and_progress():
    seen = []
    certs = lipbound.certify_all(random_net([3, 4, 2]), progress=lambda d, t, label: seen.append((d, t, label)))
    assert [c.method for c in certs] == list(lipbound.METHODS)
    status = {c.method: c.status for c in certs}
    assert [m for m, st in status.items() if st == "skipped"] == ["lipsdp-channel"]
    assert all(c.certified for c in certs if c.status != "skipped")
    assert seen == [(0, 5, "mp"), (1, 5, "lipsdp-layer"), (2, 5, "lipsdp-neuron"), (3, 5, "lipsdp-nsr"),
                    (4, 5, "lipsdp-rr"), (5, 5, "done")]


def test_method_that_turns_out_not_to_apply_is_skipped_with_the_reason():
    certs = {c.method: c for c in lipbound.certify_all(implicit_net(0, contraction=1.5))}
    assert certs["mp"].status == "skipped" and "not a contraction" in certs["mp"].reason
    assert certs["lipsdp-neuron"].certified
    with pytest.raises(FormulationError, match="not a contraction"):  # asked for explicitly: an error
        lipbound.certify_all(implicit_net(0, contraction=1.5), methods=["mp"])


# ------------------------------------------------------------------------------------------------
# verify_certificate: mismatches
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_and_net():
    net = random_net([3, 5, 2], seed=4)
    return lipbound.certify(net), net


def test_verify_accepts_dicts_and_json(cert_and_net):
    cert, net = cert_and_net
    assert lipbound.verify_certificate(cert.to_dict(), net).valid
    assert lipbound.verify_certificate(cert.to_json(), net).valid


@pytest.mark.parametrize(("model", "kwargs", "reason"), [
    (lambda: random_net([4, 5, 2]), {}, "layer sizes [3, 5, 2], this network has [4, 5, 2]"),
    (lambda: random_net([3, 5, 2], seed=9, scale=3.0), {}, "exceeds the claimed"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)), {"input_shape": 4},
     "could not build the network"),
    (lambda: torch.nn.Linear(3, 2), {"input_shape": 3}, ""),
    (lambda: "/no/such/file.mat", {}, "could not build the network"),
    (lambda: 42, {}, "could not build the network to check against (TypeError: cannot certify a int"),
])
def test_verify_never_raises_on_mismatched_models(cert_and_net, model, kwargs, reason):
    cert, _ = cert_and_net
    result = lipbound.verify_certificate(cert, model(), **kwargs)
    assert not result.valid and reason in result.reason


def test_verify_never_raises_on_a_domain_of_another_size(cert_and_net):
    cert, net = cert_and_net
    local = lipbound.certify(net, domain=Ball(np.zeros(3), 0.5))
    assert lipbound.verify_certificate(local, net).valid
    data = local.to_dict()
    data["options"]["domain"]["center"] = [0.0, 0.0]
    result = lipbound.verify_certificate(data, net)
    assert not result.valid and "dimension 2" in result.reason
    data["options"]["domain"] = {"type": "ball"}
    assert not lipbound.verify_certificate(data, net).valid


@pytest.mark.parametrize(("change", "reason"), [
    ({"certified": "yes"}, "does not claim a certified bound"),
    ({"upper_bound": math.nan}, "is not a finite number"),
    ({"upper_bound": "1.0"}, "is not a finite number"),
    ({"upper_bound": math.inf}, "is not a finite number"),
    ({"method": "lipsdp-magic"}, "unknown method 'lipsdp-magic'"),
    ({"method": ["mp"]}, "unknown method"),
    ({"norm": "l1"}, "unknown norm 'l1'"),
    ({"multipliers": "abc"}, "multipliers must be a list"),
    ({"multipliers": [1.0, math.nan]}, "multipliers[1] is not finite"),
    ({"multipliers": [1.0]}, "expected"),
    ({"exponents": [0.5, 1, 2]}, "exponents[0] must be an integer"),
    ({"exponents": [0]}, "scaling exponents"),
    ({"exponents": [2**80, 0, 0]}, "out of range"),
    ({"deltas": [-1.0]}, "deltas must be >= 0"),
    ({"options": "x"}, "options must be a dict"),
    ({"options": {"output_index": 1.5}}, "output_index must be an integer"),
    ({"options": {"output_index": 7}}, "output_index applies"),
    ({"options": {"coupled": 1}}, "coupled must be true or false"),
    ({"options": {"bounds_method": "lp"}}, "unknown bounds_method"),
    ({"sizes": {"dims": [3, 5, 3]}}, "layer sizes"),
    ({"sizes": {"dims": 5}}, "does not fit"),
    ({"bogus_field": 1}, "unknown certificate field(s): bogus_field"),
])
def test_verify_rejects_corrupted_certificates_with_the_reason(cert_and_net, change, reason):
    cert, net = cert_and_net
    data = cert.to_dict()
    data.update(copy.deepcopy(change))
    result = lipbound.verify_certificate(data, net)
    assert not result.valid and reason in result.reason, result


def test_verify_rejects_missing_fields_and_garbage(cert_and_net):
    cert, net = cert_and_net
    data = cert.to_dict()
    del data["method"]
    assert lipbound.verify_certificate(data, net).reason == "missing certificate field(s): method"
    assert "not valid JSON" in lipbound.verify_certificate("{oops", net).reason
    assert "got list" in lipbound.verify_certificate([cert], net).reason
    assert not lipbound.verify_certificate(None, net).valid


# ------------------------------------------------------------------------------------------------
# verify_certificate: random tampering (hypothesis)
# ------------------------------------------------------------------------------------------------

WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
    st.lists(st.integers(-5000, 5000), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@functools.cache
def _cases() -> dict:
    """Certificates of several kinds with their network and the norm/domain they are about."""
    relu = random_net([3, 6, 4, 2], seed=21)
    maxmin = lipbound.from_weights([np.random.default_rng(1).standard_normal((4, 3)),
                                    np.random.default_rng(2).standard_normal((4, 4)),
                                    np.random.default_rng(3).standard_normal((2, 4))], "maxmin")
    ball = Ball(np.array([0.3, -0.2, 0.1]), 0.4)
    return {
        "neuron": (relu, lipbound.certify(relu)),
        "layer": (relu, lipbound.certify(relu, method="lipsdp-layer")),
        "mp": (relu, lipbound.certify(relu, method="mp")),
        "local": (relu, lipbound.certify(relu, domain=ball)),
        "nsr-coupled": (maxmin, lipbound.certify(maxmin, method="lipsdp-nsr", coupled=True)),
        "rr-linf": (maxmin, lipbound.certify(maxmin, method="lipsdp-rr", norm="linf", output_index=1)),
    }


@functools.cache
def _global_lower(case: str) -> float:
    net, _ = _cases()[case]
    return lipbound.lower_bound(net, n_starts=16, steps=10).value


def _pair_ratio(net: Network, norm: str, index, domain, seed: int = 0) -> float:
    """Largest evaluated ``|f(x) - f(y)| / |x - y|`` over random pairs in the domain (or around 0), minus an
    allowance for rounding: an independent lower bound on the constant the certificate claims to bound."""
    rng = np.random.default_rng(seed)
    n = net.input_dim
    if domain is None:
        x, y = rng.standard_normal((2, 400, n))
    elif isinstance(domain, Box):
        x, y = rng.uniform(domain.lower, domain.upper, (2, 400, n))
    else:
        d = rng.standard_normal((2, 400, n))
        d /= np.linalg.norm(d, axis=2, keepdims=True) if domain.norm == "l2" else np.abs(d).max(axis=2, keepdims=True)
        x, y = domain.center + domain.radius * rng.uniform(0, 1, (2, 400, 1)) * d
    fx, fy = (net(torch.from_numpy(v)).numpy() for v in (x, y))
    if norm == "linf":
        rows = [index if index is not None else 0]
        num, den = np.abs(fx[:, rows] - fy[:, rows]).max(axis=1), np.abs(x - y).max(axis=1)
    else:
        num, den = np.linalg.norm(fx - fy, axis=1), np.linalg.norm(x - y, axis=1)
    num = np.maximum(num - 1e-12 * (1 + np.abs(fx).sum(axis=1) + np.abs(fy).sum(axis=1)), 0.0)
    apart = den > 0  # a domain of radius 0 has no pairs
    return float((num[apart] / den[apart]).max(initial=0.0))


@st.composite
def tampered(draw, case: str):
    """A certificate dict of ``case`` with one to three random changes."""
    data = copy.deepcopy(_cases()[case][1].to_dict())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "delete", "multiplier", "resize", "exponent", "option", "domain",
                                     "bound"]))
        if kind == "field":
            data[draw(st.sampled_from(sorted(data)))] = draw(WEIRD)
        elif kind == "delete" and data:
            del data[draw(st.sampled_from(sorted(data)))]
        elif kind == "multiplier" and isinstance(data.get("multipliers"), list) and data["multipliers"]:
            i = draw(st.integers(0, len(data["multipliers"]) - 1))
            old = data["multipliers"][i]
            half = [old * 0.5] if isinstance(old, float) else []
            data["multipliers"][i] = draw(st.one_of(WEIRD, st.floats(-1e3, 1e3), st.sampled_from(half or [0.0])))
        elif kind == "resize" and isinstance(data.get("multipliers"), list):
            k = draw(st.integers(0, len(data["multipliers"]) + 2))
            data["multipliers"] = (data["multipliers"] + [1.0, 1.0])[:k]
        elif kind == "exponent" and isinstance(data.get("exponents"), list) and data["exponents"]:
            i = draw(st.integers(0, len(data["exponents"]) - 1))
            old = data["exponents"][i]
            shifted = st.integers(-3, 3).map(lambda d, e=old: e + d) if isinstance(old, int) else WEIRD
            data["exponents"][i] = draw(st.one_of(WEIRD, shifted))
        elif kind == "option" and isinstance(data.get("options"), dict):
            key = draw(st.sampled_from(["output_index", "coupled", "bounds_method", "domain", "reduce_input"]))
            data["options"][key] = draw(st.one_of(WEIRD, st.sampled_from([0, 1, True, False, "ibp", "crown"])))
        elif kind == "domain" and isinstance(data.get("options"), dict):
            center = draw(st.lists(st.floats(-2, 2), min_size=1, max_size=4))
            data["options"]["domain"] = draw(st.sampled_from([
                {"type": "ball", "center": center, "radius": draw(st.floats(0, 3)), "norm": "l2"},
                {"type": "box", "lower": center, "upper": [c + draw(st.floats(0, 1)) for c in center]},
                {"type": "ball", "center": center, "radius": draw(WEIRD)},
                {"type": "box", "lower": center, "upper": center[:-1]},
            ]))
        elif kind == "bound" and isinstance(data.get("upper_bound"), float):
            data["upper_bound"] *= draw(st.sampled_from([0.5, 0.999, 0.999999, 1.000001, 2.0]))
    return data


@pytest.mark.parametrize("case", ["neuron", "layer", "mp", "local", "nsr-coupled", "rr-linf"])
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_tampered_certificates_never_raise_and_never_validate_a_false_bound(case, data):
    net, _ = _cases()[case]
    cert = data.draw(tampered(case))
    result = lipbound.verify_certificate(cert, net)
    assert isinstance(result, lipbound.Verification) and isinstance(result.reason, str)
    if not result.valid:
        assert result.reason
        return
    claimed = float(cert["upper_bound"])
    assert result.recomputed_bound is not None and result.recomputed_bound <= claimed
    opts = cert.get("options") or {}
    domain = domain_from_dict(opts.get("domain"))
    lower = _pair_ratio(net, cert["norm"], opts.get("output_index"), domain)
    if domain is None and cert["norm"] == "l2":
        lower = max(lower, _global_lower(case))
    assert claimed >= lower * (1 - 1e-9), (claimed, lower, json.dumps(cert)[:300])


def test_stopped_solve_is_retried_in_the_other_native_layout(caplog):
    # A deep chain gets the chordal layout on CPU; a run stopped by max_iter is retried in the dense layout at the
    # same scaling; a forced layout (native-chordal) is never switched. Nonnegative weights cancel nothing, so the
    # norm-product levels are the searched ones and no rescaled retry runs (it would solve the same program). The
    # negative output weight keeps the closed form of nonnegative networks (no solve at all) out of the way.
    net = lipbound.from_weights([np.full((20, 4), 0.3)] + [np.full((20, 20), 0.06)] * 29 + [np.full((1, 20), -0.2)],
                                "relu")
    with caplog.at_level(logging.INFO, logger="lipbound"):
        cert = lipbound.certify(net, method="lipsdp-neuron", solver="native", max_iter=2)
    assert "retrying with the native solver's dense layout" in caplog.text
    assert "retrying with norm-product scaling" not in caplog.text
    assert "the norm-product scaling levels are the searched ones; no rescaled retry" in caplog.text
    assert cert.certified and lipbound.verify_certificate(cert.to_json(), net).valid
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lipbound"):
        lipbound.certify(net, method="lipsdp-neuron", solver="native-chordal", max_iter=2)
    assert "retrying with the native solver's" not in caplog.text


def test_rescaled_retry_comes_first_when_the_scalings_are_far_apart(caplog):
    # 24 signed 6 x 6 layers of spectral norm 1: the searched levels put the output 2^-15 below the norm-product
    # levels (cancellations), so a stopped solve is retried with norm-product levels before the other layout.
    rng = np.random.default_rng(4)
    weights = [w / np.linalg.norm(w, 2) for w in rng.standard_normal((24, 6, 6))]
    net = lipbound.from_weights(weights, "relu")
    searched = build_problem(net, "lipsdp-neuron").exponents
    rescaled = build_problem(net, "lipsdp-neuron", exponents="norm").exponents
    assert _scaling_distance(searched, rescaled) >= _FAR_LEVELS
    with caplog.at_level(logging.INFO, logger="lipbound"):
        cert = lipbound.certify(net, method="lipsdp-neuron", solver="native", max_iter=2)
    assert "retrying with norm-product scaling" in caplog.text
    if "retrying with the native solver's" in caplog.text:
        assert caplog.text.index("norm-product scaling") < caplog.text.index("retrying with the native solver's")
    assert cert.certified and lipbound.verify_certificate(cert.to_json(), net).valid


def test_scaling_distance_compares_levels_in_powers_of_two():
    assert _scaling_distance((0, 3, [1, 2], 5), (0, 3, [1, 2], 5)) == 0.0
    assert _scaling_distance((0, 3, [1, 2], 5), (0, 1, 2, -1)) == 6.0
    assert _scaling_distance((0, {"exponents": [1, 1], "factors": [1.0, 1.5]}, 0), (0, 1, 0)) == pytest.approx(
        np.log2(1.5))
    assert _scaling_distance((0, 1), (0, 1, 2)) == math.inf
    assert _scaling_distance((0, [1, 2], 0), (0, [1, 2, 3], 0)) == math.inf


@pytest.mark.parametrize("seed", range(6))
def test_product_estimate_is_below_the_product_bound(seed):
    # Ritz values never exceed the norms they estimate: the estimate may only be below the certified product (the
    # certificate skips the proofs when the estimate already exceeds its bound), and close to it.
    from lipbound.formulations.lipsdp import product_bound, product_estimate

    rng = np.random.default_rng(seed)
    dims = [int(rng.integers(2, 90)) for _ in range(int(rng.integers(2, 6)))]
    scales = np.exp2(rng.integers(-40, 40, size=len(dims) - 1))
    weights = [s * rng.standard_normal((b, a)) for a, b, s in zip(dims[:-1], dims[1:], scales, strict=True)]
    net = lipbound.from_weights(weights, "relu")
    estimate, (bound, _, _) = product_estimate(net), product_bound(net)
    assert estimate <= bound * (1 + 1e-12)
    assert estimate >= bound * (1 - 1e-6)


class _Skip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(5, 7), torch.nn.Linear(7, 5), torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.c(x + self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("kind", ["cnn", "skip"])
def test_product_estimate_of_a_graph_is_below_its_product_bound(kind):
    # Graph networks (convolutions, skips) get an estimate too: a stopped circulant solve of a 14x14 CNN with 32
    # channels spent 70 s of an H200 run proving 6272-wide norms for a fallback that could not win.
    from lipbound.formulations.lipsdp import product_bound, product_estimate
    from lipbound.graph import GraphNetwork

    torch.manual_seed(3)
    if kind == "cnn":
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(2 * 5 * 5, 3))
        net = lipbound.from_torch(model, input_shape=(1, 5, 5))
    else:
        net = lipbound.from_torch(_Skip(), input_shape=(5,))
    assert isinstance(net, GraphNetwork)
    estimate, (bound, _, _) = product_estimate(net), product_bound(net)
    assert estimate <= bound * (1 + 1e-12)
    assert estimate >= bound * (1 - 1e-6)


def test_stopped_solve_below_the_product_estimate_proves_no_product_bound(caplog, monkeypatch):
    # A solve stopped by max_iter close to the optimum: the product bound's estimate (4.76) is far above the
    # certificate (1.65), so no norm is proved for a fallback that could not win.
    import lipbound.api as api

    net = random_net([6, 12, 12, 2], seed=3)
    proved, original = [], api.product_bound
    monkeypatch.setattr(api, "product_bound", lambda *a, **k: proved.append(a) or original(*a, **k))
    with caplog.at_level(logging.INFO, logger="lipbound"):
        cert = lipbound.certify(net, method="lipsdp-neuron", solver="native", max_iter=12)
    assert cert.status != "optimal" and cert.certified and "product_fallback" not in cert.options
    assert "the product bound's estimate" in caplog.text and proved == []
    assert cert.upper_bound < lipbound.certify(net, method="mp").upper_bound


def test_stopped_solve_never_certifies_above_the_product_bound(caplog):
    # Two interior-point iterations leave the multipliers far from the optimum: certify retries once with
    # norm-product scaling levels, the repaired SDP bounds are above the product bound, which is then the
    # certificate (issue 12: LipSDP <= MP); verify_certificate re-checks it.
    rng = np.random.default_rng(3)
    net = lipbound.from_weights([rng.standard_normal((6, 4)), rng.standard_normal((6, 6)),
                                 rng.standard_normal((2, 6))], "relu")
    mp = lipbound.certify(net, method="mp")
    with caplog.at_level(logging.INFO, logger="lipbound"):
        cert = lipbound.certify(net, method="lipsdp-neuron", solver="native", max_iter=2)
    assert "retrying with norm-product scaling" in caplog.text
    assert cert.status != "optimal" and cert.certified
    assert cert.upper_bound <= mp.upper_bound
    assert "product_fallback" in cert.options  # seed 3: the repaired bound after two iterations is above MP
    assert cert.upper_bound == mp.upper_bound and "product bound" in cert.notes[-1]
    assert lipbound.verify_certificate(cert.to_json(), net).valid
    forged = lipbound.Certificate.from_dict({**cert.to_dict(), "upper_bound": cert.upper_bound * 0.9})
    assert not lipbound.verify_certificate(forged, net).valid
