"""All the statistics math, to be checked against ../shared/DESIGN.md ("Definitions") in one file.

The keys of a protected layer are the rows of its input; its covariance is the uncentred mean second moment
`C = (1/n)·Σ x xᵀ`, summed in float64 over the n rows. Per timestep for image-side layers, once for the text side;
the global covariance of an image-side layer is the mean of its per-timestep covariances over the sampler's UNet
calls.

Repeated timesteps. Some samplers call the UNet more than once at the same integer timestep: `dpm++2m-karras` plans
`[..., 2, 1, 1, 0]` at 50 steps, because neighbouring Karras sigmas round to one timestep. Such a timestep t is ONE
key: `C[layer, t]` holds the rows of every call at t (its n counts them all), and it has one covariance file and one
basis. The global covariance weights each distinct timestep by its number of calls c_t:

    C[layer] = Σ_t c_t · C[layer, t] / Σ_t c_t          (Σ_t c_t = the length of the plan)

Every call sees the same number of rows r (batch × guidance branches × image tokens), so n_t = c_t · r and this is
exactly `Σ xxᵀ / n` over every key the layer received along the whole trajectory: the covariance's own definition,
whatever integer labels the calls happen to round to. A mean over distinct timesteps would instead halve the weight
of the keys of a repeated call, which the sampler really ran, because of a rounding artefact. For a plan without
repeats (every c_t = 1) the rule is the plain mean over timesteps, computed with the same operations as before.

Packed sums. Σ xxᵀ is symmetric, so every sum is kept as its upper triangle only: the d(d+1)/2 entries
`S[i, j]`, i ≤ j, row by row (`triu_index`), a 1-D float64 array — in the actors, in the object store and through
the reduction. A batch's product XᵀX is formed whole (one matmul, as fast as the layer's own), its triangle picked
out in the product's dtype (`packed_gram`, one gather) and added into the float64 sum with on-the-fly promotion,
so no float64 copy of the product is ever made and no Python loop runs over rows. The triangle's entries are added
by the same float operations, in the same order, as they were in a full d×d sum, so where the matmul's product is
exactly symmetric (the CPU's is: tests/test_stats_math.py checks it) the unpacked sum equals a full sum bit for bit;
where a kernel's product is not (some GPU kernels), the packed sum keeps its upper triangle, which differs from
the mirror by the product's own rounding. `unpack` makes the full matrix only where one is needed: the covariance
files (whose format is unchanged) and eigh.

The sums travel as a reduction state: `{"sums": {key: packed Σ xxᵀ (1-D float64 numpy array)}, "rows": {key: n}}`,
numpy so that Ray moves them through its object store without copies (stats/reduce.py adds them in a tree).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

# A reduction state: the packed float64 sums Σ xxᵀ per key and the number of rows n per key.
State = dict[str, dict]


# -- rows ------------------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """X: the rows of `x` (any leading shape, features last) as an (n, d) matrix in `product_dtype`."""
    return x.detach().reshape(-1, x.shape[-1]).to(product_dtype)


def image_row_count(x: torch.Tensor) -> int:
    """n of a layer input `x` (any leading shape, features last): every leading index is a row, n = numel / d."""
    return x.numel() // x.shape[-1]


def text_row_count(embeddings: torch.Tensor) -> int:
    """n of text embeddings (prompts × tokens × width): n = prompts · tokens, padding tokens included."""
    return embeddings.shape[0] * embeddings.shape[1]


def total_rows(counts: dict[int, dict[str, int]]) -> int:
    """Σ n over every timestep and layer of per-timestep row counts (timestep -> layer -> n)."""
    return sum(sum(rows.values()) for rows in counts.values())


# -- XᵀX, packed ------------------------------------------------------------------------------------------------------
def packed_size(d: int) -> int:
    """Entries of the upper triangle of a d×d matrix, diagonal included: d(d+1)/2."""
    return d * (d + 1) // 2


def packed_width(size: int) -> int:
    """d of a packed triangle of `size` entries (the inverse of `packed_size`)."""
    d = (math.isqrt(8 * size + 1) - 1) // 2
    if packed_size(d) != size:
        raise ValueError(f"{size} entries are not the upper triangle of a square matrix")
    return d


_TRIU: dict[tuple[int, torch.device], torch.Tensor] = {}


def triu_index(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat (row-major) positions i·d + j of the upper triangle i ≤ j, row by row: the packed order. Cached per width
    and device (int64, 6.6 MB for d = 1280); looked up on every hook call, so the lookup is one dict access."""
    key = (d, device if isinstance(device, torch.device) else torch.device(device))
    index = _TRIU.get(key)
    if index is None:
        rows, cols = torch.triu_indices(d, d, device=key[1])
        index = _TRIU[key] = rows * d + cols
    return index


def gram(x: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """XᵀX = Σ x xᵀ over the rows of `x` (any leading shape, features last), formed in `product_dtype`, returned
    float64 and full (d×d): the reference the packed sums are checked against."""
    rows = _rows(x, product_dtype)
    return (rows.T @ rows).to(torch.float64)


def packed_gram(x: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """The upper triangle of XᵀX, packed, in `product_dtype` and on `x`'s device: one matmul and one gather."""
    rows = _rows(x, product_dtype)
    product = rows.T @ rows
    return product.reshape(-1).index_select(0, triu_index(product.shape[0], product.device))


def add_packed(acc: torch.Tensor | None, tri: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """acc + tri in place (float64 += product dtype, promoted on the fly); a new float64 zero sum on `device` (default:
    tri's) when `acc` is None, so the first batch is added by the same operation as every later one."""
    if acc is None:
        acc = torch.zeros(tri.shape[0], dtype=torch.float64, device=tri.device if device is None else device)
    return acc.add_(tri)


def add_gram(acc: torch.Tensor | None, x: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """acc + XᵀX, packed (1-D float64, see `packed_gram`), in place when `acc` exists."""
    return add_packed(acc, packed_gram(x, product_dtype))


def pack(full: np.ndarray) -> np.ndarray:
    """The packed upper triangle of a square matrix (the inverse of `unpack` for a symmetric one)."""
    return full[np.triu_indices(full.shape[0])]


def unpack(packed: np.ndarray) -> np.ndarray:
    """The full symmetric d×d matrix of a packed upper triangle (float64, a new array)."""
    d = packed_width(packed.shape[0])
    full = np.empty((d, d), dtype=np.float64)
    upper = np.triu_indices(d)
    full[upper] = packed
    full[upper[1], upper[0]] = packed  # the mirror; the diagonal is written twice with the same value
    return full


# -- reduction states ------------------------------------------------------------------------------------------------
def empty_state() -> State:
    """The state of no rows: Σ = 0, n = 0 for every key (no key present)."""
    return {"sums": {}, "rows": {}}


def add_states(a: State, b: State, out: dict[str, np.ndarray] | None = None) -> State:
    """The state of the rows of both, in memory of its own: Σ_a + Σ_b and n_a + n_b per key; a key present in only
    one is carried over (copied: the result owns its memory, never the object store's). Arrays of `out` (sums of a
    state no longer needed) are written into where key and shape match, instead of new memory."""
    sums: dict[str, np.ndarray] = {}
    out = out or {}
    for key in a["sums"].keys() | b["sums"].keys():
        first = a["sums"].get(key, b["sums"].get(key))
        spare = out.get(key)
        into = spare if spare is not None and spare.shape == first.shape else None
        if key in a["sums"] and key in b["sums"]:
            sums[key] = np.add(a["sums"][key], b["sums"][key], out=into)
        elif into is not None:
            sums[key] = into
            np.copyto(into, first)
        else:
            sums[key] = np.array(first)
    rows = {key: a["rows"].get(key, 0) + b["rows"].get(key, 0) for key in a["rows"].keys() | b["rows"].keys()}
    return {"sums": dict(sorted(sums.items())), "rows": dict(sorted(rows.items()))}


def add_state_into(acc: State, other: State) -> State:
    """acc ← acc + other, in place: no array is allocated except for a key `acc` lacks (copied from `other`)."""
    for key, s in other["sums"].items():
        if key in acc["sums"]:
            np.add(acc["sums"][key], s, out=acc["sums"][key])
        else:
            acc["sums"][key] = np.array(s)
    for key, n in other["rows"].items():
        acc["rows"][key] = acc["rows"].get(key, 0) + n
    return acc


# -- covariances -----------------------------------------------------------------------------------------------------
def state_mean(state: State, key: str) -> np.ndarray:
    """C = Σ xxᵀ / n of one key of a reduced state (e.g. "text", the one text-side covariance), unpacked: d×d."""
    full = unpack(state["sums"][key])
    full /= state["rows"][key]
    return full


def state_means(state: State) -> dict[str, np.ndarray]:
    """C = Σ xxᵀ / n for every key of a reduced state."""
    return {key: state_mean(state, key) for key in state["sums"]}


def timestep_calls(plan: Iterable[int]) -> dict[int, int]:
    """c_t: the number of UNet calls at each distinct timestep t of a plan, in order of first use."""
    calls: dict[int, int] = {}
    for t in plan:
        calls[t] = calls.get(t, 0) + 1
    return calls


def add_to_timestep_sum(total: dict[str, np.ndarray], covs: dict[str, np.ndarray], keys: Iterable[str],
                        calls: int = 1) -> None:
    """total[k] ← total[k] + c_t · C[k, t] for each key k, one distinct timestep t at a time (c_t: its calls; the
    first C is copied, not kept)."""
    for key in keys:
        term = covs[key] if calls == 1 else calls * covs[key]
        total[key] = total[key] + term if key in total else np.array(term, copy=True)


def timestep_mean(total: dict[str, np.ndarray], n_calls: int) -> dict[str, np.ndarray]:
    """The global covariance C[k] = Σ_t c_t · C[k, t] / Σ_t c_t, from the sums of `add_to_timestep_sum`; `n_calls` =
    Σ_t c_t, the length of the plan (T when no timestep repeats)."""
    return {key: s / n_calls for key, s in total.items()}
