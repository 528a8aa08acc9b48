"""Certificates: JSON round trip, re-verification from scratch, tampering, infeasible multipliers."""

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

import lipbound
from lipbound.certificate import Certificate, check_program
from lipbound.formulations import lipsdp
from tests.conftest import exact_norm_at_most, exact_product, random_net


@pytest.fixture(scope="module")
def net_and_cert():
    net = random_net([5, 8, 8, 3], seed=4)
    return net, lipbound.certify(net, method="lipsdp-neuron", solver="clarabel")


def tampered(cert: Certificate, **changes) -> Certificate:
    return dataclasses.replace(cert, **changes)


def test_json_round_trip_and_reverify(net_and_cert):
    net, cert = net_and_cert
    again = Certificate.from_json(cert.to_json())
    assert again == cert
    check = lipbound.verify_certificate(again, net)
    assert check.valid and check.recomputed_bound == cert.upper_bound


def test_scaled_multipliers_rejected(net_and_cert):
    net, cert = net_and_cert
    y = np.array(cert.multipliers)
    y[1:] *= 3.0
    assert not lipbound.verify_certificate(tampered(cert, multipliers=list(y)), net).valid


def test_lowered_rho_rejected(net_and_cert):
    net, cert = net_and_cert
    y = np.array(cert.multipliers)
    y[0] *= 0.9
    bad = tampered(cert, multipliers=list(y), upper_bound=cert.upper_bound * np.sqrt(0.9))
    result = lipbound.verify_certificate(bad, net)
    assert not result.valid and result.recomputed_bound > bad.upper_bound


def test_negative_multiplier_rejected(net_and_cert):
    net, cert = net_and_cert
    y = np.array(cert.multipliers)
    y[3] = -abs(y[3]) - 1e-3
    result = lipbound.verify_certificate(tampered(cert, multipliers=list(y)), net)
    assert not result.valid and "must be >= 0" in result.reason


def test_claimed_bound_lowered_rejected(net_and_cert):
    net, cert = net_and_cert
    assert not lipbound.verify_certificate(tampered(cert, upper_bound=cert.upper_bound * 0.999), net).valid


def test_certificate_against_another_network_rejected(net_and_cert):
    _, cert = net_and_cert
    other = random_net([5, 8, 8, 3], seed=5, scale=3.0)
    assert not lipbound.verify_certificate(cert, other).valid


def test_infeasible_multipliers_inflate_the_bound():
    net = random_net([4, 6, 6, 2], seed=8)
    problem = lipsdp(net)
    cert = lipbound.certify(net)
    y = np.array(cert.multipliers)
    y[0] *= 0.5  # rho far too small: the LMI is violated
    report = check_program(problem.program, y)
    lb = lipbound.lower_bound(net, n_starts=16, steps=10)
    assert report.certified and report.deltas[0] > 0
    assert report.bound >= lb.value
    assert report.bound >= cert.upper_bound * (1 - 1e-9)


def test_random_multipliers_are_never_below_the_lower_bound():
    net = random_net([3, 5, 4, 2], seed=9)
    program = lipsdp(net).program
    lb = lipbound.lower_bound(net, n_starts=16, steps=10).value
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = np.abs(rng.standard_normal(program.n_vars)) * 10.0 ** rng.uniform(-3, 2)
        report = check_program(program, y)
        assert report.certified and report.bound >= lb


def test_uncertified_and_mp_certificates():
    net = random_net([3, 4, 2])
    mp = lipbound.certify(net, method="mp")
    assert lipbound.verify_certificate(mp, net).valid
    fake = tampered(mp, certified=False, upper_bound=None)
    assert not lipbound.verify_certificate(fake, net).valid


def _tiny_tanh_net(scale: float, seed: int, rng_kind: str):
    if rng_kind == "legacy":
        np.random.seed(seed)
        w0, w1 = scale * np.random.randn(3, 2), scale * np.random.randn(2, 3)
    else:
        rng = np.random.default_rng(seed)
        w0, w1 = scale * rng.standard_normal((3, 2)), scale * rng.standard_normal((2, 3))
    return lipbound.from_weights([w0, w1], "tanh"), [w0, w1]


@pytest.mark.parametrize("scale, seed", [(1e-158, 0), (1e-162, 10), (1e-160, 3), (1e-155, 7)])
@pytest.mark.parametrize("rng_kind", ["legacy", "default_rng"])
@pytest.mark.parametrize("method", ["lipsdp-neuron", "lipsdp-layer", "mp"])
def test_subnormal_bounds_round_up(scale, seed, rng_kind, method):
    # The Jacobian at 0 (tanh'(0) = 1, zero biases) is W1 W0, so L >= ||W1 W0||, here in the subnormal range.
    # Before: lipsdp-neuron certified 1.33e-316 below an exact 1.3313690866e-316; lipsdp-layer certified 0.0.
    net, weights = _tiny_tanh_net(scale, seed, rng_kind)
    cert = lipbound.certify(net, method=method, solver="clarabel")
    assert cert.certified and cert.upper_bound > 0.0
    assert exact_norm_at_most(exact_product(weights), cert.upper_bound)
    assert lipbound.verify_certificate(Certificate.from_json(cert.to_json()), net).valid


@pytest.mark.parametrize("method, kwargs", [("mp", {}), ("lipsdp-neuron", {}), ("lipsdp-layer", {}),
                                            ("lipsdp-neuron", {"norm": "linf", "output_index": 0})])
def test_bounds_beyond_the_float_range_are_not_certified(method, kwargs):
    rng = np.random.default_rng(0)
    net = lipbound.from_weights([rng.standard_normal((4, 3)) * 1e200, rng.standard_normal((2, 4)) * 1e200], "relu")
    cert = lipbound.certify(net, method=method, solver="clarabel", **kwargs)  # before: OverflowError
    assert not cert.certified and cert.upper_bound is None and "overflow" in cert.reason


def test_check_program_rounds_the_scaled_result_up():
    # M(rho) = 1 - rho <= 0 and the bound 2^e sqrt(rho): below the normal range the old final product core * 2^e
    # rounded to nearest (to 0 for e = -1100); the exact evaluation rounds up, and overflow is not certified.
    import scipy.sparse as sp

    from lipbound.program import LMI, Program, Term

    lmi = LMI((1,), (Term(0, 0, None, None, sp.csr_matrix(np.array([[-1.0]]))),
                     Term(0, 0, None, None, sp.csr_matrix((1, 1)), const=np.array([1.0]))))
    for e, rho in [(-1100, 1.0 + 2.0**-40), (-1074, 2.0), (-1060, 3.0), (-1040, 3.0), (1030, 2.0)]:
        program = Program((lmi,), 1, np.array([1.0]), np.array([True]), (1.0,), scale_exponent=e)
        report = check_program(program, np.array([rho]))
        if e > 1000:
            assert not report.certified and "overflows" in report.reason
            continue
        assert report.certified and report.bound > 0.0
        assert Fraction(report.bound) ** 2 >= Fraction(4) ** e * Fraction(rho)


def test_rho_is_enlarged_rather_than_repaired():
    net = random_net([5, 8, 8, 3], seed=4)
    cert = lipbound.certify(net, method="lipsdp-neuron", solver="clarabel")
    assert cert.certified and all(d == 0.0 for d in cert.deltas)
    assert cert.upper_bound <= cert.solver_bound * (1 + 1e-7)


@pytest.mark.parametrize("needed", [30, 28, 12, 5, None])
def test_enlarged_rho_tries_the_finest_then_the_coarsest_then_bisects(monkeypatch, needed):
    # A stand-in check proves rho (1 + 2^-k) exactly for k <= needed: the search returns the smallest such
    # enlargement within a factor 2 (down to 2^-26), with one try when 2^-30 works, two when 2^-26 does and three
    # when nothing does.
    import lipbound.certificate as certificate

    problem = lipsdp(random_net([4, 5, 5, 2], seed=3))
    program = problem.program
    y = np.ones(program.n_vars)
    rho = 2.0
    tried = []

    def fake(program_, y2, device=None, **kwargs):
        k = -math.log2(Fraction(float(y2[program.rho_index])) / Fraction(rho) - 1)
        tried.append(float(k))
        ok = needed is not None and k <= needed + 1e-9
        return certificate.CheckReport(ok, 1.0 if ok else None, 0.0, (0.0,) if ok else (), (), ())

    monkeypatch.setattr(certificate, "check_program", fake)
    found = certificate._enlarged_rho(program, y, rho, None)
    if needed is None:
        assert found is None and len(tried) == 3
        return
    k = -math.log2(Fraction(float(found[1][program.rho_index])) / Fraction(rho) - 1)
    assert k == pytest.approx(needed if needed < 26 else 30 if needed >= 30 else 26, abs=1e-6)
    expected = {30: [30], 28: [30, 26], 12: [30, 26, 5, 15, 10, 12, 13], 5: [30, 26, 5, 15, 10, 7, 6]}[needed]
    assert tried == pytest.approx(expected)


def test_check_program_on_torch_matrices_matches_numpy():
    """The enlarged-rho search hands the check torch tensors on CUDA (the rho-free sum assembled once, each try adding
    the rho terms there); on the CPU the same code path certifies the same bound."""
    import torch

    net = random_net([5, 8, 8, 3], seed=4)
    prob = lipsdp(net, "neuron")
    cert = lipbound.certify(net, method="lipsdp-neuron", solver="clarabel")
    program = prob.program
    y = np.asarray(cert.multipliers, dtype=float)
    lmi = program.lmis[program.rho_lmi]
    rho_terms = tuple(t for t in lmi.terms if t.coef.tocsc()[:, [program.rho_index]].count_nonzero())
    others = tuple(t for t in lmi.terms if t not in rho_terms)
    partial = torch.as_tensor(lmi.assemble(y, terms=others))

    def on_torch(t, y2):
        if t != program.rho_lmi:
            return torch.as_tensor(program.lmis[t].assemble(y2))
        return lmi.assemble(y2, terms=rho_terms, into=partial.clone())

    plain = check_program(program, y)
    torch_report = check_program(program, y, assemble=on_torch)
    assert plain.certified and torch_report.certified
    assert torch_report.bound == pytest.approx(plain.bound, rel=1e-12)
    assert torch_report.bound == pytest.approx(cert.upper_bound, rel=1e-12)


def test_optimal_rho_and_the_rho_assembly_on_torch_matrices():
    import torch

    from lipbound.certificate import _RhoAssembly, optimal_rho

    net = random_net([5, 8, 8, 3], seed=4)
    program = lipsdp(net, "neuron").program
    cert = lipbound.certify(net, method="lipsdp-neuron", solver="clarabel")
    y = np.asarray(cert.multipliers, dtype=float)
    split = _RhoAssembly(program, y, None)
    y2 = y.copy()
    y2[program.rho_index] *= 1.5
    lmi = program.lmis[program.rho_lmi]
    assert np.array_equal(split(program.rho_lmi, y2), lmi.assemble(y2, terms=split.with_rho,
                                                                   into=lmi.assemble(y2, terms=tuple(
                                                                       t for t in lmi.terms
                                                                       if t not in split.with_rho))))
    y3 = y.copy()
    y3[program.rho_index + 1] += 1.0
    with pytest.raises(ValueError, match="more than rho"):
        split(program.rho_lmi, y3)

    def on_torch(t, yy):
        return torch.as_tensor(split(t, yy))

    assert optimal_rho(program, y, assemble=on_torch) == pytest.approx(optimal_rho(program, y), rel=1e-12)


@pytest.mark.parametrize("dims, method", [([6, 8, 8, 8, 8, 3], "lipsdp-neuron"), ([5, 6, 7, 6, 2], "lipsdp-layer")])
def test_block_by_block_check_certifies_what_the_dense_check_certifies(monkeypatch, dims, method):
    """Chain LMIs above BANDED_MIN_ROWS are assembled and proved block by block; forced here on small chains, the
    certified bounds, the re-optimised rho and a saved certificate's re-check agree with the dense path."""
    import lipbound.certificate as certificate
    from lipbound.certificate import certify_multipliers, optimal_rho

    net = random_net(dims, seed=7)
    prob = lipsdp(net, method.split("-")[1])
    cert = lipbound.certify(net, method=method, solver="clarabel")
    y = np.asarray(cert.multipliers, dtype=float)
    program = prob.program
    dense_rho = optimal_rho(program, y)
    dense = certify_multipliers(program, y, solve_program=prob.solve_program)
    raw = check_program(program, y)
    monkeypatch.setattr(certificate, "BANDED_MIN_ROWS", 0)
    assert certificate.banded(program.lmis[0])
    assert isinstance(certificate.assemble_for_check(program.lmis[0], y), certificate.BlockTridiagonal)
    assert optimal_rho(program, y) == pytest.approx(dense_rho, rel=1e-10)
    banded = certify_multipliers(program, y, solve_program=prob.solve_program)
    assert banded[0].certified and dense[0].certified
    assert banded[0].bound == pytest.approx(dense[0].bound, rel=1e-9)
    assert banded[2].eigen_defects == pytest.approx(dense[2].eigen_defects, rel=1e-3, abs=1e-9)
    raw_banded = check_program(program, y)
    assert raw_banded.certified == raw.certified and raw_banded.bound == pytest.approx(raw.bound, rel=1e-9)
    assert lipbound.verify_certificate(net, cert)
    # An infeasible point needs a repair (delta > 0): the block-by-block search proves it as the dense one does.
    bad = y.copy()
    bad[program.rho_index] *= 0.5
    monkeypatch.setattr(certificate, "BANDED_MIN_ROWS", 10**9)
    dense_bad = check_program(program, bad)
    monkeypatch.setattr(certificate, "BANDED_MIN_ROWS", 0)
    banded_bad = check_program(program, bad)
    assert dense_bad.certified and banded_bad.certified and max(banded_bad.deltas) > 0
    assert banded_bad.bound == pytest.approx(dense_bad.bound, rel=1e-6)
