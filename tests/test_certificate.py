"""Certificates: JSON round trip, re-verification from scratch, tampering, infeasible multipliers."""

import dataclasses

import numpy as np
import pytest

import lipbound
from lipbound.certificate import Certificate, check_program
from lipbound.formulations import lipsdp
from tests.conftest import random_net


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
