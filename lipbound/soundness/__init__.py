"""A repeatable soundness campaign: random networks of every formulation family, each certified bound judged
against an independent lower bound (``lipbound bench soundness``).

* :mod:`~lipbound.soundness.families`: what is drawn (networks, runs, domains, known constants);
* :mod:`~lipbound.soundness.graph_families`: graph networks (skip connections, CNNs from torch and ONNX),
  registered in :data:`FAMILIES` here;
* :mod:`~lipbound.soundness.search`: float64 search for input pairs with large difference quotients;
* :mod:`~lipbound.soundness.reference`: the judge, the network's function in 256-bit arithmetic;
* :mod:`~lipbound.soundness.campaign`: trials, verdicts, the per-family summary and its JSON.

Examples
--------
>>> from lipbound.soundness import run_trial
>>> record = run_trial("slope", 7)
>>> all(r["status"] in ("ok", "uncertified", "refused") for r in record["runs"])
True
"""

from lipbound.soundness.campaign import (
    DEFAULT_TRIALS,
    format_table,
    lower_bound_of,
    reproduce,
    run_campaign,
    run_trial,
    summarize,
    trial_seed,
)
from lipbound.soundness.description import network_from_dict, network_to_dict
from lipbound.soundness.families import FAMILIES, Case, Family, Run
from lipbound.soundness.graph_families import GRAPH_FAMILIES
from lipbound.soundness.reference import OnnxReference, Reference

FAMILIES.update({family.name: family for family in GRAPH_FAMILIES})

__all__ = ["DEFAULT_TRIALS", "FAMILIES", "Case", "Family", "OnnxReference", "Reference", "Run", "format_table",
           "lower_bound_of", "network_from_dict", "network_to_dict", "reproduce", "run_campaign", "run_trial",
           "summarize", "trial_seed"]
