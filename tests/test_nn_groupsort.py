"""Tests of the GroupSort, MaxMin and Householder torch modules (lipbound.nn.groupsort)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lipbound.nn.groupsort import GroupSort, Householder, MaxMin

FINITE = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


def numpy_groupsort(x: np.ndarray, group_size: int | None) -> np.ndarray:
    """Reference: ascending sort of consecutive groups along axis 1."""
    if group_size is None:
        return np.sort(x, axis=1)
    moved = np.moveaxis(x, 1, -1)
    grouped = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // group_size, group_size))
    return np.moveaxis(np.sort(grouped, axis=-1).reshape(moved.shape), -1, 1)


def numpy_householder(x: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Reference for (batch, features) inputs, written as an explicit loop over samples and groups."""
    g = vectors.shape[1]
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for j, v in enumerate(vectors):
            z = x[b, j * g:(j + 1) * g]
            out[b, j * g:(j + 1) * g] = z if v @ z > 0 else z - 2.0 * (v @ z) * v
    return out


def random_unit_vectors(rng: np.random.Generator, num_groups: int, g: int) -> np.ndarray:
    v = rng.standard_normal((num_groups, g))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------------------
# GroupSort / MaxMin
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 12, None])
def test_groupsort_matches_numpy(group_size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 12))
    out = GroupSort(group_size)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(out, numpy_groupsort(x, group_size))


def test_groupsort_acts_on_dim1_of_conv_layout():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 3, 4))
    out = GroupSort(3)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(out, numpy_groupsort(x, 3))
    # Spatial positions are independent samples: sorting happens only across channels.
    np.testing.assert_array_equal(out[:, :, 1, 2], numpy_groupsort(x[:, :, 1, 2], 3))


def test_groupsort_unbatched_1d_input():
    out = GroupSort(2)(torch.tensor([4.0, -1.0, 0.5, 2.0]))
    assert out.tolist() == [-1.0, 4.0, 0.5, 2.0]


def test_maxmin_ordering_is_min_then_max():
    out = MaxMin()(torch.tensor([[3.0, 1.0, -2.0, 5.0], [0.0, 0.0, 7.0, -7.0]]))
    assert out.tolist() == [[1.0, 3.0, -2.0, 5.0], [0.0, 0.0, -7.0, 7.0]]
    assert MaxMin().group_size == 2
    assert GroupSort(None).group_size is None


def test_maxmin_equals_groupsort2():
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(MaxMin()(x), GroupSort(2)(x))


def test_fullsort_group_size_resolution():
    assert GroupSort(None).effective_group_size(8) == 8
    assert GroupSort(None).num_groups_for(8) == 1
    assert GroupSort(4).num_groups_for(12) == 3
    assert Householder([1.0, 0.0]).num_groups_for(6) == 3


@pytest.mark.parametrize("group_size", [2, 3, 6, None])
def test_groupsort_preserves_group_sums_and_norm(group_size):
    x = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = GroupSort(group_size)(x)
    g = 6 if group_size is None else group_size
    torch.testing.assert_close(out.reshape(50, -1, g).sum(-1), x.reshape(50, -1, g).sum(-1))
    torch.testing.assert_close(out.norm(dim=1), x.norm(dim=1))
    # Each output group is ascending.
    assert torch.all(out.reshape(50, -1, g).diff(dim=-1) >= 0)


def test_groupsort_gradient_is_the_sorting_permutation():
    x = torch.tensor([[3.0, 1.0, -2.0, 5.0]], requires_grad=True)
    weights = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    (MaxMin()(x) * weights).sum().backward()
    # Output (1, 3, -2, 5): input 0 went to slot 1, input 1 to slot 0; the second pair was already ordered.
    assert x.grad.tolist() == [[20.0, 10.0, 30.0, 40.0]]


@settings(max_examples=150, deadline=None)
@given(
    group_size=st.sampled_from([1, 2, 3, 4, 6, None]),
    x=arrays(np.float64, (12,), elements=FINITE),
    y=arrays(np.float64, (12,), elements=FINITE),
)
def test_groupsort_is_1_lipschitz(group_size, x, y):
    module = GroupSort(group_size)
    fx, fy = module(torch.from_numpy(x[None])), module(torch.from_numpy(y[None]))
    lhs = float((fx - fy).norm())
    rhs = float(np.linalg.norm(x - y))
    assert lhs <= rhs + 1e-12 * (1.0 + np.linalg.norm(x) + np.linalg.norm(y))


# ------------------------------------------------------------------------------------------------------------
# Householder
# ------------------------------------------------------------------------------------------------------------


def test_householder_matches_numpy_per_group_vectors():
    rng = np.random.default_rng(4)
    vectors = random_unit_vectors(rng, 4, 3)
    x = rng.standard_normal((64, 12))
    out = Householder(vectors)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, numpy_householder(x, vectors), rtol=0, atol=1e-14)


def test_householder_shared_vector_matches_per_group_copies():
    rng = np.random.default_rng(5)
    v = rng.standard_normal(2)
    x = torch.from_numpy(rng.standard_normal((9, 8)))
    shared = Householder(v)
    repeated = Householder(np.tile(v, (4, 1)))
    torch.testing.assert_close(shared(x), repeated(x), rtol=0, atol=0)
    assert shared.num_groups is None and shared.vectors.shape == (1, 2)
    assert shared.group_vectors(8).shape == (4, 2)
    assert Householder(v, num_features=8).vectors.shape == (4, 2)


def test_householder_vectors_are_unit_and_normalised_copies():
    raw = np.array([[3.0, 4.0], [0.0, -2.0]])
    module = Householder(raw)
    np.testing.assert_allclose(module.vectors, [[0.6, 0.8], [0.0, -1.0]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(module.vectors, axis=1), 1.0, rtol=0, atol=1e-15)
    assert module.group_size == 2 and module.num_groups == 2
    assert isinstance(np.asarray(module.vectors), np.ndarray)
    # The attribute is a copy: editing it must not change the module.
    module.vectors[0, 0] = 99.0
    assert module.vectors[0, 0] == pytest.approx(0.6)


def test_householder_branches_and_boundary():
    module = Householder([0.0, 1.0])
    # v^T z > 0: identity; v^T z < 0: reflection flips the v-component; v^T z = 0: both branches agree.
    out = module(torch.tensor([[1.0, 2.0, 1.0, -2.0, 5.0, 0.0]]))
    assert out.tolist() == [[1.0, 2.0, 1.0, 2.0, 5.0, 0.0]]


def test_householder_conv_layout_and_float32():
    rng = np.random.default_rng(6)
    vectors = random_unit_vectors(rng, 2, 2)
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    out = Householder(vectors)(torch.from_numpy(x))
    assert out.dtype == torch.float32 and out.shape == x.shape
    flat = np.moveaxis(x, 1, -1).reshape(-1, 4).astype(np.float64)
    expected = np.moveaxis(numpy_householder(flat, vectors).reshape(3, 5, 5, 4), -1, 1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def test_householder_preserves_norm_and_orthogonal_component():
    rng = np.random.default_rng(7)
    vectors = random_unit_vectors(rng, 3, 3)
    x = torch.from_numpy(rng.standard_normal((200, 9)))
    out = Householder(vectors)(x)
    torch.testing.assert_close(out.norm(dim=1), x.norm(dim=1))
    v = torch.from_numpy(vectors)
    projector = torch.eye(3, dtype=torch.float64) - v[:, :, None] * v[:, None, :]
    xg, og = x.reshape(200, 3, 3), out.reshape(200, 3, 3)
    torch.testing.assert_close(torch.einsum("jab,njb->nja", projector, og),
                               torch.einsum("jab,njb->nja", projector, xg))
    # The output always lies in the closed half-space v^T z >= 0.
    assert torch.all((og * v).sum(-1) >= -1e-12)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    x=arrays(np.float64, (6,), elements=FINITE),
    y=arrays(np.float64, (6,), elements=FINITE),
)
def test_householder_is_1_lipschitz(seed, x, y):
    vectors = random_unit_vectors(np.random.default_rng(seed), 2, 3)
    module = Householder(vectors)
    fx, fy = module(torch.from_numpy(x[None])), module(torch.from_numpy(y[None]))
    lhs = float((fx - fy).norm())
    rhs = float(np.linalg.norm(x - y))
    assert lhs <= rhs + 1e-12 * (1.0 + np.linalg.norm(x) + np.linalg.norm(y))


def test_householder_state_dict_and_dtype_cast():
    module = Householder([[1.0, 1.0]])
    assert "v" in module.state_dict()
    module = module.float()
    assert module.v.dtype == torch.float32
    np.testing.assert_allclose(np.linalg.norm(module.vectors, axis=1), 1.0, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def test_groupsort_indivisible_width_message_names_module_width_and_group_size():
    with pytest.raises(ValueError) as info:
        GroupSort(3)(torch.zeros(4, 10))
    message = str(info.value)
    assert "GroupSort(group_size=3)" in message
    assert "feature count 10" in message and "group size 3" in message


def test_maxmin_indivisible_width_message():
    with pytest.raises(ValueError) as info:
        MaxMin()(torch.zeros(2, 5))
    message = str(info.value)
    assert "MaxMin()" in message and "feature count 5" in message and "group size 2" in message


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "2"])
def test_groupsort_rejects_bad_group_size(bad):
    with pytest.raises(ValueError, match="group_size"):
        GroupSort(bad)


def test_groupsort_rejects_scalar_input():
    with pytest.raises(ValueError, match="0-d"):
        MaxMin()(torch.tensor(1.0))


@pytest.mark.parametrize("bad_v", [[0.0, 0.0], [[1.0, 0.0], [0.0, 0.0]]])
def test_householder_rejects_zero_vector(bad_v):
    with pytest.raises(ValueError, match="nonzero"):
        Householder(bad_v)


@pytest.mark.parametrize("bad_v", [[], [[[1.0]]], [float("nan"), 1.0]])
def test_householder_rejects_malformed_vectors(bad_v):
    with pytest.raises(ValueError, match="Householder"):
        Householder(bad_v)


def test_householder_width_errors():
    with pytest.raises(ValueError) as info:
        Householder([1.0, 0.0, 0.0])(torch.zeros(2, 7))
    message = str(info.value)
    assert "Householder" in message and "feature count 7" in message and "group size 3" in message
    with pytest.raises(ValueError) as info:
        Householder(np.eye(2))(torch.zeros(2, 6))
    assert "feature count 6" in str(info.value) and "2 groups" in str(info.value)
    with pytest.raises(ValueError, match="not divisible"):
        Householder([1.0, 0.0], num_features=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_modules_on_gpu_match_cpu():
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((32, 12)))
    for module in (MaxMin(), GroupSort(4), GroupSort(None), Householder(random_unit_vectors(rng, 4, 3))):
        cpu = module(x)
        gpu = module.to("cuda")(x.to("cuda")).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-12)
