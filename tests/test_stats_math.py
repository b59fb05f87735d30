"""The statistics math (stats/moments.py) against independent computations, packed sums against full ones, the
tree reduction among actors against a plain sum (and what an actor lost half-way leaves), the eigendecomposition
tasks' bases for every threshold kind, and the hooks' bookkeeping on a toy UNet (device and host accumulation)."""

import numpy as np
import pytest
import ray
import torch

from nullbooth.nullspace import threshold_tau
from nullbooth.stats.hooks import KeyStatistics
from nullbooth.stats.manifest import split_layers
from nullbooth.stats.moments import (
    add_gram,
    add_state_into,
    add_states,
    add_to_timestep_sum,
    empty_state,
    gram,
    image_row_count,
    pack,
    packed_size,
    packed_width,
    state_mean,
    state_means,
    text_row_count,
    timestep_calls,
    timestep_mean,
    total_rows,
    unpack,
)
from nullbooth.stats.reduce import (
    Partials,
    levels_for,
    reduce_state,
    tree_levels,
    tree_reduce,
)
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


def full_sum(xs, product_dtype: torch.dtype) -> torch.Tensor:
    """The full float64 d×d sum as the hooks kept it before packing: the first product converted, every later one
    added in place (addmm_ for float64 products, add_ with promotion for float32)."""
    acc = None
    for x in xs:
        rows = x.reshape(-1, x.shape[-1]).to(product_dtype)
        if acc is None:
            acc = (rows.T @ rows).to(torch.float64)
        elif product_dtype == torch.float64:
            acc.addmm_(rows.T, rows)
        else:
            acc.add_(rows.T @ rows)
    return acc


def test_pack_and_unpack_are_inverse_on_symmetric_matrices():
    rng = np.random.default_rng(0)
    for d in (1, 2, 5, 8, 33):
        a = rng.standard_normal((d, d))
        sym = a + a.T
        packed = pack(sym)
        assert packed.shape == (packed_size(d),) == (d * (d + 1) // 2,) and packed_width(packed.shape[0]) == d
        np.testing.assert_array_equal(unpack(packed), sym)
        assert [packed[k] for k in range(min(d, 3))] == [sym[0, j] for j in range(min(d, 3))]  # row 0 first
    with pytest.raises(ValueError, match="7 entries are not the upper triangle of a square matrix"):
        packed_width(7)


@pytest.mark.parametrize("product_dtype", [torch.float32, torch.float64])
def test_packed_sums_equal_the_full_sums(product_dtype):
    """Covariances from packed sums equal the full (pre-packing) computation to 1e-12 relative — in fact bit for bit
    here: the CPU's matmul gives an exactly symmetric product, and each kept entry sees the same additions."""
    rng = torch.Generator().manual_seed(1)
    for d in (1, 7, 64, 129):
        xs = [torch.randn(*shape, d, generator=rng) for shape in ((3, 6), (11,), (2, 2, 5), (1,))]
        for x in xs:
            product = x.reshape(-1, d).to(product_dtype)
            product = product.T @ product
            assert torch.equal(product, product.T)  # what makes the packed sum exact
        acc = None
        for x in xs:
            acc = add_gram(acc, x, product_dtype)
        assert acc.dtype == torch.float64 and acc.shape == (packed_size(d),)
        full = full_sum(xs, product_dtype)
        rel = np.linalg.norm(unpack(acc.numpy()) - full.numpy()) / np.linalg.norm(full.numpy())
        assert rel <= 1e-12
        if product_dtype == torch.float32:
            np.testing.assert_array_equal(unpack(acc.numpy()), full.numpy())
        tol = 1e-13 if product_dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(unpack(acc.numpy()), einsum_gram(*xs), rtol=tol, atol=tol * 10)


def test_adding_a_float32_product_makes_no_float64_copy_and_no_row_loop():
    """Every tensor operation of one addition, recorded below Python (TorchDispatchMode): the only float64 result is
    the sum itself, updated in place, and the number of operations does not grow with the rows or the width."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.append((str(func.overloadpacket), out))
            return out

    counts = set()
    for rows, d in ((4, 8), (300, 8), (4, 96), (300, 96)):
        x = torch.randn(rows, d)
        acc = add_gram(None, x, torch.float32)
        address = acc.data_ptr()
        with Record() as record:
            same = add_gram(acc, x, torch.float32)
        assert same is acc and same.data_ptr() == address
        float64 = [(name, out) for name, out in record.ops if isinstance(out, torch.Tensor)
                   and out.dtype == torch.float64]
        assert [name for name, _ in float64] == ["aten.add_"] and float64[0][1].data_ptr() == address
        made = [out for _, out in record.ops if isinstance(out, torch.Tensor)
                and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]  # not views of the rows
        assert max(out.numel() for out in made) == d * d  # the float32 product is the largest thing made
        counts.add(len(record.ops))
    assert len(counts) == 1, counts


def test_add_state_into_adds_in_place():
    a, b = random_state(0), random_state(1, keys=("a", "c"))
    expected = add_states(a, b)
    arrays = {key: a["sums"][key] for key in a["sums"]}
    total = add_state_into(a, b)
    assert total is a and all(total["sums"][key] is arrays[key] for key in arrays)  # the same memory, added into
    assert total["rows"] == expected["rows"] == {"a": 35, "b": 17, "c": 18}
    for key in ("a", "b", "c"):
        np.testing.assert_array_equal(total["sums"][key], expected["sums"][key])
    b["sums"]["c"][0] = 99.0
    assert total["sums"]["c"][0] != 99.0  # a key only the other had was copied, not shared


def test_row_counts():
    assert image_row_count(torch.zeros(2, 3, 5, 7)) == 2 * 3 * 5  # every leading index is a row
    assert image_row_count(torch.zeros(9, 7)) == 9
    assert text_row_count(torch.zeros(4, 77, 8)) == 4 * 77  # prompts × tokens, padding included
    assert total_rows({901: {"a": 3, "b": 4}, 1: {"a": 5}}) == 12 and total_rows({}) == 0


def test_add_states_writes_into_spare_arrays_of_matching_shape():
    a, b = random_state(0, keys=("a", "b")), random_state(1, keys=("a", "c"))
    expected = add_states(a, b)
    spare = {"a": np.full_like(a["sums"]["a"], 7.0), "b": np.zeros(3), "c": np.zeros_like(b["sums"]["c"])}
    total = add_states(a, b, out=spare)
    assert total["sums"]["a"] is spare["a"] and total["sums"]["c"] is spare["c"]  # reused, not new memory
    assert total["sums"]["b"] is not spare["b"] and total["sums"]["b"] is not a["sums"]["b"]  # shape differs: new
    assert total["rows"] == expected["rows"]
    for key in ("a", "b", "c"):
        np.testing.assert_array_equal(total["sums"][key], expected["sums"][key])


def state_of(**rows: torch.Tensor) -> dict:
    """A reduction state built from raw rows, independently of the hooks (packed)."""
    return {"sums": {k: pack(einsum_gram(x)) for k, x in rows.items()},
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
        sums[key], rows[key] = pack(x.T @ x), 17 + seed
    return {"sums": sums, "rows": rows}


@ray.remote(num_cpus=0)
class Holder:
    """A stand-in for a collector actor in the reduction: own sums it is given, the real `Partials`."""

    def load(self, state: dict, die_on_fold: bool = False) -> None:
        self.own = {"t": state}
        self.partials = Partials(lambda which: self.own[which])
        self.die_on_fold = die_on_fold
        self.folds = 0

    def partial(self, which):
        return self.partials.partial(which)

    def fold(self, which, peer):
        self.folds += 1
        rows = self.partials.fold(which, peer)
        if self.die_on_fold:
            import os
            os._exit(1)
        return rows

    def discard(self, which):
        self.partials.discard(which)

    def report(self):
        return self.folds, self.own["t"]


@pytest.fixture(scope="module")
def holders(ray_local):
    """Five holder actors for the module (starting an actor process takes seconds here)."""
    pool = [Holder.remote() for _ in range(5)]
    yield pool
    for h in pool:
        ray.kill(h)


def loaded(pool: list, states: list[dict], dying: int | None = None) -> list:
    ray.get([h.load.remote(s, i == dying) for i, (h, s) in enumerate(zip(pool, states))])
    return pool[:len(states)]


def test_tree_levels_are_fewer_within_a_node_and_pairs_across():
    assert levels_for(1, 4) == 0 and levels_for(4, 4) == 1 and levels_for(5, 4) == 2 and levels_for(16, 4) == 2
    assert levels_for(5, 2) == 3 == int(np.ceil(np.log2(5)))
    assert tree_levels([16]) == (2, 0) and tree_levels([1] * 8) == (0, 3) and tree_levels([3, 2]) == (1, 1)


@pytest.mark.parametrize("nodes", [[1], [2], [3], [5], [3, 2], [1, 1, 1]])
def test_tree_reduction_among_actors_equals_a_plain_sum(holders, nodes):
    """N − 1 additions, each into an actor's own buffer, whatever the grouping by node; the actors' own sums are
    left as they were (a redone reduction starts from them), and after the buffers are discarded a second reduction
    (into the reused buffers) gives the same total."""
    n = sum(nodes)
    states = [random_state(seed) for seed in range(n)]
    actors = loaded(holders, states)
    groups = [actors[sum(nodes[:i]):sum(nodes[:i + 1])] for i in range(len(nodes))]
    total = reduce_state(groups, "t")
    for key in ("a", "b"):
        np.testing.assert_allclose(total["sums"][key], sum(s["sums"][key] for s in states), rtol=1e-14, atol=0)
        assert total["rows"][key] == sum(s["rows"][key] for s in states)
    reports = ray.get([h.report.remote() for h in actors])
    assert sum(folds for folds, _ in reports) == n - 1
    for (_, own), state in zip(reports, states):
        assert own["rows"] == state["rows"]
        assert all(np.array_equal(own["sums"][k], state["sums"][k]) for k in own["sums"])
    ray.get([h.discard.remote("t") for h in actors])
    again_ref, folds, levels = tree_reduce(groups, "t")
    assert len(ray.get(folds)) == n - 1 and levels == tree_levels(nodes)
    again = ray.get(again_ref)
    assert all(np.array_equal(again["sums"][k], total["sums"][k]) for k in ("a", "b"))


def test_an_actor_lost_during_the_reduction_gives_an_error_never_a_partial_total(holders):
    """Actor 2 dies right after adding actor 3's sums into its buffer: those sums are gone from the tree, and
    reduce_state must raise rather than hand over actor 0's total of the other three."""
    from ray.exceptions import RayActorError

    states = [random_state(seed) for seed in range(4)]
    actors = loaded(holders[:2] + [Holder.remote()] + holders[3:], states, dying=2)
    with pytest.raises(RayActorError):
        reduce_state([actors[:2], actors[2:]], "t")  # two "nodes": actor 2 adds actor 3, then actor 0 adds actor 2
    folds, own = ray.get(actors[3].report.remote())
    assert folds == 0 and np.array_equal(own["sums"]["a"], states[3]["sums"]["a"])  # still there for a redo


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
    np.testing.assert_allclose(unpack(stats.image_state(901)["sums"]["blk.attn2.to_q"]), 2 * (q_in.T @ q_in).numpy(),
                               rtol=1e-14)
    assert stats.image_rows == {901: {"blk.attn2.to_q": 16, "blk.attn2.to_out.0": 8},
                                1: {"blk.attn2.to_q": 8, "blk.attn2.to_out.0": 4}}
    out_in = unet.q(x2)[:, ::2].reshape(-1, 3).double()
    np.testing.assert_allclose(unpack(stats.image_state(1)["sums"]["blk.attn2.to_out.0"]),
                               (out_in.T @ out_in).detach(), rtol=1e-12)
    with pytest.raises(Exception, match="timestep 5, which is not in its timestep plan"), stats.attached():
        unet(x1, torch.tensor(5))


def run_toy(accumulate_on: str, released=()) -> KeyStatistics:
    """The toy UNet over a fixed trajectory (3 calls, one timestep repeated) plus two text batches."""
    torch.manual_seed(7)
    unet = ToyUNet()
    layers = {"blk.attn2.to_q": unet.q, "blk.attn2.to_out.0": unet.out}
    stats = KeyStatistics(unet, layers, [901, 1], "float32", accumulate_on=accumulate_on, released=released)
    rng = torch.Generator().manual_seed(8)
    with torch.no_grad(), stats.attached():
        for t in (901, 1, 1):
            unet(torch.randn(4, 6, 3, generator=rng), torch.tensor(float(t)))
    for _ in range(2):
        stats.add_text(torch.randn(2, 5, 4, generator=rng))
    return stats


def test_host_and_device_accumulation_give_identical_sums():
    """On a CPU actor `accumulate_on: host` goes through its own path (a worker thread adds each triangle); the sums
    must be bit for bit those of `device`."""
    device, host = run_toy("device"), run_toy("host")
    assert host.accumulate_on == "host" and type(host.accumulation).__name__ == "HostAccumulation"
    for which in ("text", 901, 1):
        a = device.text_state() if which == "text" else device.image_state(which)
        b = host.text_state() if which == "text" else host.image_state(which)
        assert a["rows"] == b["rows"] and a["sums"].keys() == b["sums"].keys() and a["sums"]
        for key in a["sums"]:
            np.testing.assert_array_equal(a["sums"][key], b["sums"][key])
    assert device.nbytes() == host.nbytes() == 8 * (packed_size(4) + 4 * packed_size(3))
    host.accumulation.close()


def test_released_keys_are_dropped_and_not_added_again():
    whole = run_toy("device")
    stats = run_toy("device", released=("text", 1))  # as a replacement started after those were reduced
    assert stats.text_state() == {"sums": {}, "rows": {}} and stats.image_state(1) == {"sums": {}, "rows": {}}
    np.testing.assert_array_equal(stats.image_state(901)["sums"]["blk.attn2.to_q"],
                                  whole.image_state(901)["sums"]["blk.attn2.to_q"])
    whole.release(901)
    assert whole.image_state(901) == {"sums": {}, "rows": {}} and whole.image_state(1)["rows"]
    assert whole.nbytes() == 8 * (packed_size(4) + 2 * packed_size(3))
