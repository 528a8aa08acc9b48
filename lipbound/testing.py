"""Assertions for users' test suites: keep a model within its certified Lipschitz budget."""

from __future__ import annotations

from lipbound.api import as_network, certify
from lipbound.certificate import Certificate
from lipbound.lower import lower_bound

#: The attack run on failure (a quick one: it only explains the failure).
ATTACK = {"n_starts": 16, "steps": 20, "seed": 0}


def assert_certified_below(model, L: float, *, input_shape=None, attack: dict | bool = True,
                           **certify_options) -> Certificate:
    """Assert that ``model`` has a certified Lipschitz bound ``<= L``; return the certificate.

    On failure the ``AssertionError`` says the certified bound, the method and solver, and (for the l2 norm) an
    attained lower bound and the gap between the two: a lower bound above ``L`` proves the model is over budget,
    one below it means a tighter method might still certify the budget.

    Parameters
    ----------
    model : Network, nn.Module or path
    L : float
        The budget.
    input_shape : int or tuple, optional
        For ``nn.Module`` models.
    attack : bool or dict
        On failure, run :func:`lipbound.lower_bound` (l2 norm) for the message: ``True`` uses :data:`ATTACK`, a
        dict overrides its keywords (``n_starts``, ``steps``, ``seed``), ``False`` skips it.
    **certify_options
        Passed to :func:`lipbound.certify` (``method``, ``norm``, ``solver``, ``domain``, ...).

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> from lipbound.testing import assert_certified_below
    >>> net = lipbound.from_weights([np.eye(2), 2 * np.eye(2)])
    >>> round(assert_certified_below(net, 2.5).upper_bound, 6)
    2.0
    >>> assert_certified_below(net, 1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: certified Lipschitz bound 2 exceeds the budget 1.5 (lipsdp-neuron, solver native, l2 norm); ...
    """
    network = as_network(model, input_shape, certify_options.pop("activation", "relu"))
    cert = certify(network, **certify_options)
    if cert.certified and cert.upper_bound is not None and cert.upper_bound <= L:
        return cert
    what = f"{cert.method}, solver {cert.solver}, {cert.norm} norm"
    if cert.options.get("output_index") is not None:
        what += f", output {cert.options['output_index']}"
    if cert.options.get("domain"):
        domain = cert.options["domain"]
        what += f", on a {domain.get('norm', '')} {domain['type']}".replace("  ", " ")
    if not cert.certified or cert.upper_bound is None:
        raise AssertionError(f"no certified Lipschitz bound ({what}): status {cert.status}; {cert.reason}. Try "
                             "another solver or method.")
    message = f"certified Lipschitz bound {cert.upper_bound:.8g} exceeds the budget {L:.8g} ({what})"
    if cert.norm == "l2" and attack is not False:
        from lipbound.api import domain_from_dict

        options = {**ATTACK, **(attack if isinstance(attack, dict) else {})}
        lb = lower_bound(network, domain=domain_from_dict(cert.options.get("domain")), **options)
        message += f"; attained lower bound {lb.value:.8g} ({lb.kind}), gap {cert.upper_bound - lb.value:.3g}"
        if lb.value > 0:
            message += f" (ratio {cert.upper_bound / lb.value:.4f})"
        if lb.value > L:
            message += ": the model's Lipschitz constant really exceeds the budget"
        else:
            message += ": the true constant may be within budget; a tighter method (e.g. lipsdp-neuron) or a " \
                       "smaller region might certify it"
    raise AssertionError(message)
