"""The circulant (torus) restriction of per-channel LipSDP and its solver."""

import numpy as np
import pytest
import torch

import lipbound
from lipbound.errors import FormulationError, OptionError, SolverError
from lipbound.formulations.circulant import block_exponents, circulant_chain
from lipbound.formulations.lipsdp import lipsdp
from lipbound.solvers import get_solver
from lipbound.solvers.circulant import _Arrow, conjugate_pairs, solve_circulant


def _cnn(channels, depth, image, outputs=3, seed=0, act=torch.nn.ReLU, kernel=3, padding=1, dilation=1, groups=1):
    torch.manual_seed(seed)
    layers = []
    for i in range(depth):
        layers += [torch.nn.Conv2d(1 if i == 0 else channels, channels, kernel, padding=padding, dilation=dilation,
                                   groups=1 if i == 0 else groups), act()]
    model = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(channels * image[0] * image[1], outputs))
    return lipbound.from_torch(model.double(), (1,) + tuple(image)), model.double()


def _problem(net):
    default = lipsdp(net, "channel", reduce_input=False)
    return lipsdp(net, "channel", exponents=block_exponents(default.exponents), reduce_input=False)


def _torus_matrix(chain, y):
    """``M_T(y)`` in real space (torus positions, blocks and channels in the program's order), from the chain's
    Fourier data: ``F^* blockdiag(M_w) F + U U^T``; the solver keeps one frequency of each conjugate pair, the
    other's block is its conjugate."""
    arrow = _Arrow(chain, torch.device("cpu"))
    n, t = arrow.n, chain.torus
    kept = arrow.slack_y(torch.tensor(y, dtype=torch.float64))[:, :n, :n].numpy()
    size = int(np.prod(t))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in t], indexing="ij"), -1).reshape(-1, len(t))
    keep, mult = conjugate_pairs(t)
    partner = np.ravel_multi_index(tuple(((-grid) % np.array(t)).T), t)
    where = {int(w): i for i, w in enumerate(keep)}
    blocks = np.stack([kept[where[w]] if w in where else kept[where[int(partner[w])]].conj() for w in range(size)])
    assert keep.size == arrow.nf and sum(mult) == size
    phase = np.exp(-2j * np.pi * (grid[:, None, :] * grid[None, :, :] / np.array(t)).sum(-1)) / np.sqrt(size)
    full = np.einsum("wp,wab,wq->apbq", phase.conj(), blocks, phase).reshape(n * size, n * size)
    head = np.einsum("wp,wcr->cpr", phase.conj(), chain.head).reshape(chain.channels[-1] * size, -1)
    u = np.zeros((n * size, head.shape[1]), dtype=complex)
    u[(n - chain.channels[-1]) * size:] = head
    full = full + u @ u.conj().T
    assert np.abs(full.imag).max() < 1e-10 * np.abs(full).max()
    return full.real


def _image_rows(chain):
    """Rows of the torus matrix that are the image's positions, in the program's order."""
    t, image = chain.torus, chain.image
    pos = np.ravel_multi_index(np.meshgrid(*[np.arange(s) for s in image], indexing="ij"), t).reshape(-1)
    size = int(np.prod(t))
    return np.concatenate([c * size + pos for c in range(sum(chain.channels))])


@pytest.mark.parametrize("kwargs", [
    {"channels": 2, "depth": 2, "image": (4, 5)},
    {"channels": 2, "depth": 1, "image": (5, 4), "kernel": 5, "padding": 2},
    {"channels": 2, "depth": 2, "image": (5, 5), "dilation": 2, "padding": 2},
    {"channels": 4, "depth": 2, "image": (4, 4), "groups": 2},
])
def test_torus_quadratic_form_equals_the_programs_on_the_image(kwargs):
    """E^T M_T(y) E = M(y) exactly for ReLU (alpha = 0): the symbols, the head's transform and the multipliers'
    placement agree with the program the certificate checks."""
    net, _ = _cnn(**kwargs)
    problem = _problem(net)
    chain = circulant_chain(net, problem)
    rng = np.random.default_rng(1)
    for _ in range(2):
        y = rng.uniform(0.1, 2.0, problem.program.n_vars)
        torus = _torus_matrix(chain, y)
        rows = _image_rows(chain)
        real = problem.program.lmis[0].assemble(y)
        np.testing.assert_allclose(torus[np.ix_(rows, rows)], real, atol=1e-11 * np.abs(real).max())


@pytest.mark.parametrize("image", [(3, 3), (4, 3)])
def test_solver_matches_clarabel_on_the_torus_program(image):
    """The interior-point method reaches the torus program's optimum (Clarabel on its dense real LMI over every
    frequency; the solver keeps one per conjugate pair: tori 4x4, with four self-conjugate frequencies, and 5x4)."""
    import cvxpy as cp

    net, _ = _cnn(2, 2, image, outputs=2, seed=3)
    chain = circulant_chain(net, _problem(net))
    m = chain.n_vars
    base = _torus_matrix(chain, np.zeros(m))
    basis = [_torus_matrix(chain, np.eye(m)[i]) - base for i in range(m)]
    y = cp.Variable(m)
    lmi = base + sum(y[i] * basis[i] for i in range(m))
    prob = cp.Problem(cp.Minimize(y[0]), [0.5 * (lmi + lmi.T) << 0, y[1:] >= 0])
    prob.solve(solver="CLARABEL")
    result = solve_circulant(chain)
    assert result.status in ("optimal", "optimal_inaccurate")
    assert result.y[0] == pytest.approx(prob.value, rel=1e-6)
    assert result.info["gap"] <= 1e-6


def test_certify_circulant_is_sound_and_close_to_the_channel_optimum():
    net, model = _cnn(2, 2, (6, 6), seed=2)
    cert = lipbound.certify(net, method="lipsdp-channel", solver="circulant")
    assert cert.certified and cert.solver == "circulant"
    # The same per-channel program (block scaling) solved by the dense method: the restriction is at or above its
    # optimum, and close (0.2540 against 0.2512 on this 6x6 image, where the torus adds a ring of 13 of 49 cells).
    program = _problem(net).program
    found = get_solver("native").solve(program, tol=1e-10)
    assert found.status == "optimal"
    optimum = program.value(found.y)
    assert cert.upper_bound >= optimum * (1 - 1e-7)
    assert cert.upper_bound <= 1.02 * optimum
    # A saved circulant certificate is re-checked from the network, its block exponents and multipliers alone.
    verdict = lipbound.verify_certificate(cert.to_json(), net)
    assert verdict.valid, verdict.reason
    x = torch.randn(400, 1, 6, 6, dtype=torch.float64)
    dx = 1e-3 * torch.randn_like(x)
    with torch.no_grad():
        ratio = (model(x + dx) - model(x)).norm(dim=1) / dx.flatten(1).norm(dim=1)
    assert float(ratio.max()) <= cert.upper_bound


@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.Sigmoid])
def test_smooth_activations_with_zero_lower_slope(act):
    net, _ = _cnn(2, 2, (5, 5), act=act, seed=4)
    cert = lipbound.certify(net, method="lipsdp-channel", solver="circulant")
    mp = lipbound.certify(net, method="mp")
    assert cert.certified and cert.upper_bound <= mp.upper_bound


def test_refusals_name_what_does_not_fit():
    mlp = lipbound.from_weights([np.eye(3), np.eye(3)], "relu")
    with pytest.raises(FormulationError, match="convolutional"):
        lipbound.certify(mlp, method="lipsdp-channel", solver="circulant")
    net, _ = _cnn(2, 1, (4, 4), act=lambda: torch.nn.LeakyReLU(0.1))
    with pytest.raises(FormulationError, match="alpha beta > 0"):
        lipbound.certify(net, method="lipsdp-channel", solver="circulant")
    torch.manual_seed(0)
    strided = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(8, 2))
    with pytest.raises(FormulationError, match="stride 1"):
        lipbound.certify(strided, method="lipsdp-channel", solver="circulant", input_shape=(1, 4, 4))
    pooled = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                                 torch.nn.Flatten(), torch.nn.Linear(8, 2))
    with pytest.raises(FormulationError, match="circulant"):
        lipbound.certify(pooled, method="lipsdp-channel", solver="circulant", input_shape=(1, 4, 4))
    net, _ = _cnn(2, 1, (4, 4))
    with pytest.raises(OptionError, match="lipsdp-channel"):
        lipbound.certify(net, method="lipsdp-neuron", solver="circulant")
    with pytest.raises(OptionError, match="domain"):
        lipbound.certify(net, method="lipsdp-channel", solver="circulant",
                         domain=lipbound.Box(np.zeros(16), np.ones(16)))
    with pytest.raises(SolverError, match="certify"):
        get_solver("circulant")


@pytest.mark.parametrize("case", ["zero head", "zero conv", "tiny", "huge", "overflow", "subnormal"])
def test_extreme_and_degenerate_weights(case):
    """No crash at any magnitude: zero maps certify 0 (the product bound), powers of two scale the bound exactly up
    to the solver's tolerance, an overflowing bound is reported as such."""
    net, model = _cnn(2, 2, (4, 4), seed=5)
    plain = lipbound.certify(net, method="lipsdp-channel", solver="circulant")
    with torch.no_grad():
        if case == "zero head":
            model[-1].weight.zero_()
        elif case == "zero conv":
            model[2].weight.zero_()
        else:
            factor = {"tiny": 2.0 ** -500, "huge": 2.0 ** 500, "overflow": 1e300, "subnormal": 5e-324}[case]
            model[0].weight.mul_(factor)
            model[2].weight.mul_(factor)
    cert = lipbound.certify(model, method="lipsdp-channel", solver="circulant", input_shape=(1, 4, 4))
    if case == "overflow":
        assert not cert.certified and "overflows" in cert.reason
    elif case in ("tiny", "huge"):
        scale = 2.0 ** (-1000 if case == "tiny" else 1000)
        assert cert.certified and cert.upper_bound == pytest.approx(plain.upper_bound * scale, rel=1e-5)
    else:
        assert cert.certified and cert.upper_bound == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_step_length_by_bisection_matches_the_eigenvalue_step(seed):
    # CUDA runs the bisection (batched eigenvalue solves took 95 % of an H200 iteration); forced here on the CPU.
    from lipbound.solvers.circulant import _STEP_RTOL, _max_step

    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(7, 9, 9, dtype=torch.complex128, generator=gen)
    x = b @ b.mH + 0.1 * torch.eye(9, dtype=torch.complex128)
    lo = torch.linalg.cholesky(x)
    d = torch.randn(7, 9, 9, dtype=torch.complex128, generator=gen)
    d = 0.5 * (d + d.mH) * [0.05, 1.0, 30.0, 1e4][seed]
    exact = _max_step(lo, d, exact=True)
    bisected = _max_step(lo, d, exact=False)
    assert exact * (1 - 2 * _STEP_RTOL) <= bisected <= exact * (1 + 1e-9)
    assert bool((torch.linalg.eigvalsh(x + bisected * d) > -1e-9).all())
    assert _max_step(lo, torch.eye(9, dtype=d.dtype).expand(7, -1, -1), exact=False) == 1.0  # every step feasible


def test_conjugate_pairs_cover_the_torus_once():
    for torus in [(5,), (4,), (5, 4), (4, 4), (3, 3, 2)]:
        keep, mult = conjugate_pairs(torus)
        grid = np.indices(torus).reshape(len(torus), -1)
        partner = np.ravel_multi_index(tuple((-grid) % np.array(torus)[:, None]), torus)
        covered = np.concatenate([keep, partner[keep][mult == 2]])
        assert np.array_equal(np.sort(covered), np.arange(int(np.prod(torus))))
        assert np.array_equal(mult == 1, partner[keep] == keep)
