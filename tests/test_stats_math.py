"""The statistics math (stats/moments.py) against independent computations, the tree reduction against a plain sum,
the eigendecomposition tasks' bases for every threshold kind, and the hooks' bookkeeping on a toy UNet."""

import numpy as np
import pytest
import ray
import torch

from nullbooth.nullspace import threshold_tau
from nullbooth.stats.hooks import KeyStatistics
from nullbooth.stats.manifest import split_layers
from nullbooth.stats.moments import (
    add_gram,
    add_states,
    add_to_timestep_sum,
    empty_state,
    gram,
    image_row_count,
    state_mean,
    state_means,
    text_row_count,
    timestep_calls,
    timestep_mean,
    total_rows,
)
from nullbooth.stats.reduce import tree_levels, tree_reduce
from nullbooth.stats.spectrum import decompose, submit_groups


# -- stats/moments.py against independent computations ---------------------------------------------------------------
def einsum_gram(*xs: torch.Tensor) -> np.ndarray:
    """Σ x xᵀ over every row of every x, by numpy einsum in float64."""
    flats = [x.double().reshape(-1, x.shape[-1]).numpy() for x in xs]
    return sum(np.einsum("ni,nj->ij", flat, flat) for flat in flats)


def test_gram_is_the_sum_of_row_outer_products():
    x = torch.randn(2, 5, 7, 4, generator=torch.Generator().manual_seed(0))
    g64 = gram(x, torch.float64)
    assert g64.dtype == torch.float64 and g64.shape == (4, 4)
    np.testing.assert_allclose(g64.numpy(), einsum_gram(x), rtol=1e-13, atol=1e-12)
    g32 = gram(x, torch.float32)
    assert g32.dtype == torch.float64  # formed in float32, returned float64
    np.testing.assert_allclose(g32.numpy(), einsum_gram(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("product_dtype", [torch.float32, torch.float64])
def test_add_gram_accumulates_in_place(product_dtype):
    rng = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(3, 6, 5, generator=rng), torch.randn(11, 5, generator=rng)
    acc = add_gram(None, x1, product_dtype)
    np.testing.assert_allclose(acc.numpy(), gram(x1, product_dtype).numpy(), rtol=0, atol=0)
    same = add_gram(acc, x2, product_dtype)
    assert same is acc and same.dtype == torch.float64  # in place, still float64
    tol = 1e-13 if product_dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(same.numpy(), einsum_gram(x1, x2), rtol=tol, atol=tol * 10)


def test_row_counts():
    assert image_row_count(torch.zeros(2, 3, 5, 7)) == 2 * 3 * 5  # every leading index is a row
    assert image_row_count(torch.zeros(9, 7)) == 9
    assert text_row_count(torch.zeros(4, 77, 8)) == 4 * 77  # prompts × tokens, padding included
    assert total_rows({901: {"a": 3, "b": 4}, 1: {"a": 5}}) == 12 and total_rows({}) == 0


def state_of(**rows: torch.Tensor) -> dict:
    """A reduction state built from raw rows, independently of the hooks."""
    return {"sums": {k: einsum_gram(x) for k, x in rows.items()},
            "rows": {k: int(np.prod(x.shape[:-1])) for k, x in rows.items()}}


def test_sum_of_states_is_the_state_of_the_concatenated_rows():
    rng = torch.Generator().manual_seed(2)
    a1, a2, b2 = torch.randn(13, 6, generator=rng), torch.randn(8, 6, generator=rng), torch.randn(5, 3, generator=rng)
    total = add_states(state_of(a=a1), state_of(a=a2, b=b2))
    expected = state_of(a=torch.cat([a1, a2]), b=b2)
    assert total["rows"] == expected["rows"] == {"a": 21, "b": 5}
    for key in ("a", "b"):
        np.testing.assert_allclose(total["sums"][key], expected["sums"][key], rtol=1e-13, atol=1e-12)
    assert add_states(empty_state(), total)["rows"] == total["rows"]
    np.testing.assert_array_equal(add_states(total, empty_state())["sums"]["a"], total["sums"]["a"])


def test_covariance_is_the_mean_second_moment():
    x = torch.randn(4, 77, 6, generator=torch.Generator().manual_seed(3)).double()
    state = state_of(text=x)
    flat = x.reshape(-1, 6).numpy()
    explicit = np.mean([np.outer(r, r) for r in flat], axis=0)  # C = (1/n) Σ x xᵀ
    np.testing.assert_allclose(state_mean(state, "text"), explicit, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state_means(state)["text"], explicit, rtol=1e-12, atol=1e-14)


def test_global_covariance_is_the_mean_over_timesteps():
    rng = np.random.default_rng(4)
    per_t = [{"a": rng.standard_normal((3, 3)), "b": rng.standard_normal((2, 2))} for _ in range(5)]
    first = {k: v.copy() for k, v in per_t[0].items()}
    total: dict = {}
    for covs in per_t:
        add_to_timestep_sum(total, covs, ["a", "b"])
    for key, value in first.items():
        np.testing.assert_array_equal(per_t[0][key], value)  # the inputs are not modified
    means = timestep_mean(total, len(per_t))
    for key in ("a", "b"):
        np.testing.assert_allclose(means[key], np.mean([covs[key] for covs in per_t], axis=0), rtol=1e-14, atol=1e-15)


def test_a_repeated_timestep_weighs_by_its_calls_in_the_global_covariance():
    """Plan [9, 5, 1, 1, 0]: t=1 is one key holding both calls; global C = Σ_t c_t·C[t] / 5, which equals Σ xxᵀ / n
    over every call's rows (every call has the same number of rows)."""
    plan = [9, 5, 1, 1, 0]
    assert timestep_calls(plan) == {9: 1, 5: 1, 1: 2, 0: 1} and list(timestep_calls(plan)) == [9, 5, 1, 0]
    rng = np.random.default_rng(5)
    per_call = [rng.standard_normal((7, 3)) for _ in plan]  # the rows each UNet call sees
    sums: dict = {}
    for t, x in zip(plan, per_call):
        sums[t] = sums.get(t, 0) + x.T @ x
    total: dict = {}
    for t, c in timestep_calls(plan).items():
        add_to_timestep_sum(total, {"a": sums[t] / (7 * c)}, ["a"], calls=c)
    every_row = np.concatenate(per_call)
    np.testing.assert_allclose(timestep_mean(total, len(plan))["a"], every_row.T @ every_row / len(every_row),
                               rtol=1e-12)


def test_split_layers_keeps_table_order():
    layers = {"x.attn2.to_q": {"side": "image"}, "x.attn2.to_k": {"side": "text"},
              "y.attn2.to_out.0": {"side": "image"}, "y.attn2.to_v": {"side": "text"}}
    assert split_layers(layers) == (["x.attn2.to_k", "y.attn2.to_v"], ["x.attn2.to_q", "y.attn2.to_out.0"])


def random_state(seed: int, keys=("a", "b")) -> dict:
    rng = np.random.default_rng(seed)
    sums, rows = {}, {}
    for key in keys:
        x = rng.standard_normal((17, 6))
        sums[key], rows[key] = x.T @ x, 17 + seed
    return {"sums": sums, "rows": rows}


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_tree_reduction_equals_a_plain_sum(ray_local, n):
    states = [random_state(seed) for seed in range(n)]
    ref, levels = tree_reduce([ray.put(s) for s in states])
    total = ray.get(ref)
    assert levels == tree_levels(n) == int(np.ceil(np.log2(n)))
    for key in ("a", "b"):
        np.testing.assert_allclose(total["sums"][key], sum(s["sums"][key] for s in states), rtol=1e-14, atol=0)
        assert total["rows"][key] == sum(s["rows"][key] for s in states)


def test_tree_reduction_runs_one_addition_per_pair_per_level(ray_local):
    """N − 1 remote additions for N states, none in the driver."""
    calls = []

    class Counting:
        @staticmethod
        def remote(a, b):
            calls.append(1)
            return ray.put(add_states(ray.get(a), ray.get(b)))

    _, levels = tree_reduce([ray.put(random_state(s)) for s in range(5)], add=Counting)
    assert len(calls) == 4 and levels == 3


def test_add_states_carries_keys_present_on_one_side():
    a, b = random_state(0, keys=("a",)), random_state(1, keys=("b",))
    total = add_states(a, b)
    assert set(total["sums"]) == {"a", "b"} and total["rows"] == {"a": 17, "b": 18}
    np.testing.assert_array_equal(total["sums"]["b"], b["sums"]["b"])


def covariance_with_spectrum(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues)) @ q.T


@pytest.mark.parametrize("kind, value", [("relative", 1e-3), ("absolute", 0.05), ("energy", 1e-2),
                                         ("percentile", 40.0)])
def test_eigh_tasks_give_orthonormal_null_space_bases(ray_local, kind, value):
    eigenvalues = [0.0, 1e-6, 1e-4, 0.01, 0.04, 0.3, 1.0, 2.5, 4.0, 10.0]
    items = [(("cov", i), covariance_with_spectrum(eigenvalues, seed=i)) for i in range(3)]
    results = [r for group in ray.get(submit_groups(items, 2, kind, value, use_gpu=False)) for r in group]
    assert sorted(key for key, _ in results) == [key for key, _ in items]  # 2 tasks, every item exactly once
    covariances = dict(items)
    for key, spectrum in results:
        cov = covariances[key]
        u, lam = torch.tensor(spectrum.basis), torch.tensor(spectrum.eigenvalues)
        np.testing.assert_allclose(spectrum.eigenvalues, sorted(eigenvalues), atol=1e-12)
        assert spectrum.tau == pytest.approx(threshold_tau(lam, kind, value))
        selected = lam[lam <= spectrum.tau]
        assert u.shape == (10, len(selected)) and 0 < len(selected) < 10
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-12)
        assert float(selected.max()) <= spectrum.tau
        c = torch.from_numpy(cov)
        assert float(torch.trace(u.T @ c @ u)) == pytest.approx(float(selected.sum()), abs=1e-12)
    if kind == "energy":  # the null space holds at most `value` of the trace
        assert float(selected.sum()) <= value * sum(eigenvalues)


def test_decompose_is_float64_even_from_float32_input():
    cov = covariance_with_spectrum([1e-9, 1.0, 2.0]).astype(np.float32)
    [(_, spectrum)] = decompose([("x", cov)], "absolute", 1e-6)
    assert spectrum.basis.dtype == spectrum.eigenvalues.dtype == np.float64 and spectrum.null_dim == 1


class ToyUNet(torch.nn.Module):
    """Two linears at different 'resolutions', called like a UNet: unet(sample, timestep, encoder_hidden_states)."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(3, 3)
        self.out = torch.nn.Linear(3, 3)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        return self.out(self.q(sample)[:, ::2])


def test_hooks_add_gram_per_timestep_and_count_rows():
    unet = ToyUNet()
    layers = {"blk.attn2.to_q": unet.q, "blk.attn2.to_out.0": unet.out}
    stats = KeyStatistics(unet, layers, [901, 1], product_dtype="float64")
    x1, x2 = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    with stats.attached():
        unet(x1, torch.tensor(901.0))
        unet(x2, timestep=torch.tensor([1, 1]))
        unet(x1, torch.tensor(901))
    assert not unet._forward_pre_hooks and not unet.q._forward_pre_hooks  # removed after use
    unet(x1, torch.tensor(5))  # outside `attached`: neither counted nor refused
    q_in = x1.reshape(-1, 3).double()
    np.testing.assert_allclose(stats.image_state(901)["sums"]["blk.attn2.to_q"], 2 * (q_in.T @ q_in).numpy(),
                               rtol=1e-14)
    assert stats.image_rows == {901: {"blk.attn2.to_q": 16, "blk.attn2.to_out.0": 8},
                                1: {"blk.attn2.to_q": 8, "blk.attn2.to_out.0": 4}}
    out_in = unet.q(x2)[:, ::2].reshape(-1, 3).double()
    np.testing.assert_allclose(stats.image_state(1)["sums"]["blk.attn2.to_out.0"], (out_in.T @ out_in).detach(),
                               rtol=1e-12)
    with pytest.raises(Exception, match="timestep 5, which is not in its timestep plan"), stats.attached():
        unet(x1, torch.tensor(5))
