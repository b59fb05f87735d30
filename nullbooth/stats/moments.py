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

The sums travel as a reduction state: `{"sums": {key: Σ xxᵀ (float64 numpy array)}, "rows": {key: n}}`, numpy so
that Ray moves them through its object store without copies (stats/reduce.py adds them pairwise in a tree).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

# A reduction state: the float64 sums Σ xxᵀ per key and the number of rows n per key.
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


# -- XᵀX -------------------------------------------------------------------------------------------------------------
def gram(x: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """XᵀX = Σ x xᵀ over the rows of `x` (any leading shape, features last), formed in `product_dtype`, returned
    float64."""
    rows = _rows(x, product_dtype)
    return (rows.T @ rows).to(torch.float64)


def add_gram(acc: torch.Tensor | None, x: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """acc + XᵀX, in place when `acc` exists: a float64 product goes straight into it (addmm_), a float32 one is
    added with on-the-fly promotion (add_), so no float64 copy of the product is ever materialised — for wide
    layers that see few rows (low resolution) that d×d pass, not the product, is the hook's main cost."""
    if acc is None:
        return gram(x, product_dtype)
    rows = _rows(x, product_dtype)
    if product_dtype == torch.float64:
        return acc.addmm_(rows.T, rows)
    return acc.add_(rows.T @ rows)


# -- reduction states ------------------------------------------------------------------------------------------------
def empty_state() -> State:
    """The state of no rows: Σ = 0, n = 0 for every key (no key present)."""
    return {"sums": {}, "rows": {}}


def add_states(a: State, b: State) -> State:
    """The state of the rows of both: Σ_a + Σ_b and n_a + n_b per key; a key present in only one is carried over."""
    sums: dict[str, np.ndarray] = {}
    for key in a["sums"].keys() | b["sums"].keys():
        if key in a["sums"] and key in b["sums"]:
            sums[key] = a["sums"][key] + b["sums"][key]
        else:
            sums[key] = np.array(a["sums"].get(key, b["sums"].get(key)))  # own the memory, not the store's
    rows = {key: a["rows"].get(key, 0) + b["rows"].get(key, 0) for key in a["rows"].keys() | b["rows"].keys()}
    return {"sums": dict(sorted(sums.items())), "rows": dict(sorted(rows.items()))}


# -- covariances -----------------------------------------------------------------------------------------------------
def state_mean(state: State, key: str) -> np.ndarray:
    """C = Σ xxᵀ / n of one key of a reduced state (e.g. "text", the one text-side covariance)."""
    return state["sums"][key] / state["rows"][key]


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
