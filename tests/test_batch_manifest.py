"""Manifests: parsing (YAML, JSON, dict), validation messages, expansion and stable job ids."""

import shutil

import numpy as np
import pytest

import lipbound
from lipbound.batch import Manifest
from lipbound.batch.worker import execute_job
from lipbound.errors import ManifestError
from tests.batch_fixtures import write_net, write_points


@pytest.fixture
def folder(tmp_path):
    write_net(tmp_path / "a.npz", [3, 6, 2], seed=0)
    write_net(tmp_path / "b.npz", [3, 5, 5, 2], seed=1)
    write_points(tmp_path / "points.npy", 4, 3)
    return tmp_path


def test_issue_form_in_yaml_expands_to_the_product(folder):
    (folder / "m.yaml").write_text(
        "models: [a.npz, b.npz]\n"
        "methods: [lipsdp-neuron, mp]\n"
        "norms: [l2]\n"
        "domains: {points: points.npy, radii: [0.01, 0.1], ball_norm: l2}\n"
        "solver: native\n")
    manifest = Manifest.from_file(folder / "m.yaml")
    jobs = list(manifest.jobs())
    assert len(jobs) == 2 * 2 * 1 * 4 * 2 == manifest.count()
    assert len({j.id for j in jobs}) == len(jobs)
    assert {j.model.path for j in jobs} == {folder / "a.npz", folder / "b.npz"}
    assert {(j.domain.point, j.domain.radius) for j in jobs} == {(p, r) for p in range(4) for r in (0.01, 0.1)}
    first = jobs[0]
    np.testing.assert_array_equal(first.domain.center, np.load(folder / "points.npy")[first.domain.point])
    assert first.solver == "native" and first.domain.norm == "l2"


def test_python_dict_and_json_file_give_the_same_jobs(folder):
    data = {"models": ["a.npz"], "methods": ["mp"], "norms": ["l2", "linf"], "outputs": [0, 1]}
    (folder / "m.json").write_text(__import__("json").dumps(data))
    from_file = [j.id for j in Manifest.from_file(folder / "m.json").jobs()]
    from_dict = [j.id for j in Manifest.from_dict(data, base_dir=folder).jobs()]
    assert from_file == from_dict and len(from_file) == 4


def test_ids_hash_contents_not_paths(folder, tmp_path_factory):
    data = {"models": ["a.npz"], "domains": ["global", {"points": "points.npy", "radii": [0.5]}]}
    ids = [j.id for j in Manifest.from_dict(data, base_dir=folder).jobs()]
    moved = tmp_path_factory.mktemp("moved")
    for name in ("a.npz", "points.npy"):
        shutil.copy(folder / name, moved / name)
    assert [j.id for j in Manifest.from_dict(data, base_dir=moved).jobs()] == ids
    write_net(moved / "a.npz", [3, 6, 2], seed=7)  # "retrained": new weights
    assert set(j.id for j in Manifest.from_dict(data, base_dir=moved).jobs()).isdisjoint(ids)


def test_ids_change_with_every_input(folder):
    base = {"models": ["a.npz"], "methods": ["lipsdp-neuron"],
            "domains": [{"points": "points.npy", "radii": [0.1], "indices": None}]}
    base["domains"][0].pop("indices")

    def first_id(**changes):
        data = {**base, **changes}
        return next(Manifest.from_dict(data, base_dir=folder).jobs()).id

    reference = first_id()
    variants = [first_id(methods=["lipsdp-layer"]), first_id(norms=["linf"]), first_id(outputs=[1]),
                first_id(solver="clarabel"), first_id(options={"coupled": True}), first_id(lower_bound=True),
                first_id(domains=[{"points": "points.npy", "radii": [0.2]}]),
                first_id(domains=[{"points": "points.npy", "radii": [0.1], "ball_norm": "linf"}]),
                first_id(domains=[{"points": {"file": "points.npy", "scale": 2.0}, "radii": [0.1]}]),
                first_id(models=[{"path": "a.npz", "activation": "tanh"}])]
    assert reference not in variants and len(set(variants)) == len(variants)
    # Neither expectations nor the device change what is computed: same id.
    assert first_id(expect={"max_upper_bound": 3.0}) == reference
    assert first_id(device="cpu") == reference


def test_all_methods_and_outputs_come_from_the_model(folder):
    data = {"models": ["b.npz"], "methods": "all", "norms": ["linf"], "outputs": "all"}
    jobs = list(Manifest.from_dict(data, base_dir=folder).jobs())
    assert sorted({j.method for j in jobs}) == ["lipsdp-layer", "lipsdp-neuron", "lipsdp-nsr", "lipsdp-rr", "mp"]
    assert sorted({j.output_index for j in jobs}) == [0, 1]


def test_points_from_a_dataset_slice(folder):
    x = np.arange(40.0).reshape(10, 2, 2)
    np.savez(folder / "data.npz", images=x, labels=np.arange(10))
    data = {"models": ["a.npz"], "methods": ["mp"],
            "domains": {"points": {"file": "data.npz", "key": "images", "rows": [2, 5], "scale": 0.5},
                        "radii": [1], "ball_norm": ["l2", "linf"]}}
    jobs = list(Manifest.from_dict(data, base_dir=folder).jobs())
    assert [(j.domain.point, j.domain.norm) for j in jobs] == [(p, n) for p in (2, 3, 4) for n in ("l2", "linf")]
    np.testing.assert_array_equal(jobs[0].domain.center, x[2].reshape(-1) * 0.5)
    assert jobs[0].domain.source == "data.npz:images" and jobs[0].domain.radius == 1.0
    picked = {**data, "domains": {"points": {"file": "data.npz", "key": "images", "indices": [9, -10]},
                                  "radii": [1]}}
    assert [j.domain.point for j in Manifest.from_dict(picked, base_dir=folder).jobs()] == [9, 0]


def test_expectations_merge_manifest_model_and_method(folder):
    data = {"models": [{"path": "a.npz", "expect": {"mp": {"max_upper_bound": 9.0}, "lipsdp-neuron":
                                                    {"value": 1.5, "rtol": 0.01}}}, "b.npz"],
            "methods": ["mp", "lipsdp-neuron"], "expect": {"max_upper_bound": 10.0, "known_lower_bound": 0.1}}
    got = {(j.model.name, j.method): j.expect for j in Manifest.from_dict(data, base_dir=folder).jobs()}
    assert got[("a", "mp")] == {"max_upper_bound": 9.0, "known_lower_bound": 0.1}
    assert got[("a", "lipsdp-neuron")] == {"max_upper_bound": 10.0, "known_lower_bound": 0.1, "value": 1.5,
                                           "rtol": 0.01}
    assert got[("b", "mp")] == {"max_upper_bound": 10.0, "known_lower_bound": 0.1}


@pytest.mark.parametrize("data, words", [
    ({"models": ["a.npz"], "method": ["mp"]}, ["unknown key", "'method'", "methods"]),
    ({"models": ["a.npz"], "methods": ["lipsdp"]}, ["unknown method 'lipsdp'", "lipsdp-neuron"]),
    ({"models": ["a.npz"], "norms": ["l1"]}, ["unknown norm 'l1'"]),
    ({"models": ["a.npz"], "domains": {"points": "points.npy"}}, ["domains[0]", "missing 'radii'"]),
    ({"models": ["a.npz"], "domains": {"points": "points.npy", "radii": [-1]}}, ["radii", ">= 0"]),
    ({"models": ["a.npz"], "expect": {"max_bound": 3}}, ["expect", "unknown key", "max_upper_bound"]),
    ({"models": ["a.npz"], "expect": {"rtol": 0.1}}, ["published 'value'"]),
    ({"models": ["a.npz"], "options": {"norm": "linf"}}, ["options", "norm"]),
    ({"models": ["a.npz"], "solver": "clarabel", "device": "cuda"}, ["device", "native"]),
    ({"models": [{"path": "a.npz", "trust_code": "yes"}]}, ["trust_code", "true or false"]),
    ({"methods": ["mp"]}, ["missing 'models'"]),
    ({"models": ["a.npz"], "methods": []}, ["'methods' is empty"]),
    ({"models": ["a.npz"], "solver": "cvxopt"}, ["unknown solver 'cvxopt'", "clarabel"]),
])
def test_invalid_manifests_say_what_and_where(folder, data, words):
    with pytest.raises(ManifestError) as info:
        list(Manifest.from_dict(data, base_dir=folder).jobs())
    for word in words:
        assert word in str(info.value)


def test_missing_points_file_and_bad_rows(folder):
    with pytest.raises(ManifestError, match="points file not found"):
        list(Manifest.from_dict({"models": ["a.npz"], "domains": {"points": "nope.npy", "radii": [1]}},
                                base_dir=folder).jobs())
    with pytest.raises(ManifestError, match="select nothing"):
        list(Manifest.from_dict({"models": ["a.npz"], "domains": {"points": {"file": "points.npy",
                                                                             "rows": [10, 20]}, "radii": [1]}},
                                base_dir=folder).jobs())


def test_missing_model_still_expands(folder):
    jobs = list(Manifest.from_dict({"models": ["gone.npz"]}, base_dir=folder).jobs())
    assert len(jobs) == 1 and jobs[0].model_sha256 is None
    record = execute_job(jobs[0].payload())
    assert record["status"] == "failed" and "no such file" in record["error"]["message"]


def test_trust_code_reaches_load_only_when_true(folder, monkeypatch):
    seen = []
    real_load = lipbound.load

    def spy(path, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("trust_code", None)
        return real_load(path, **kwargs)

    monkeypatch.setattr(lipbound, "load", spy)
    for trust in (False, True):
        data = {"models": [{"path": "a.npz", "trust_code": trust, "activation": "leaky_relu",
                            "load_options": {"negative_slope": 0.25}}], "methods": ["mp"]}
        record = execute_job(next(Manifest.from_dict(data, base_dir=folder).jobs()).payload())
        assert record["status"] == "ok", record["error"]
    assert "trust_code" not in seen[0] and seen[1]["trust_code"] is True
    assert seen[0]["negative_slope"] == 0.25 and seen[0]["activation"] == "leaky_relu"


def test_model_file_changed_after_expansion_is_an_error(folder):
    job = next(Manifest.from_dict({"models": ["a.npz"], "methods": ["mp"]}, base_dir=folder).jobs())
    write_net(folder / "a.npz", [3, 6, 2], seed=5)
    record = execute_job(job.payload())
    assert record["status"] == "failed" and "changed since the batch was expanded" in record["error"]["message"]


def test_duplicate_entries_run_once(folder, caplog):
    jobs = list(Manifest.from_dict({"models": ["a.npz", "a.npz"], "methods": ["mp"]}, base_dir=folder).jobs())
    assert len(jobs) == 1 and "appears twice" in caplog.text
