"""ALL the feature-space evaluation math: distances between two sets of image features, and subject fidelity.

Every function takes float arrays (n, d) of features, one row per image, and works in float64. `x` is the
reference set (the base model's samples), `y` the set compared with it (a fine-tuned model's samples).

    frechet_distance   FID's formula on any features: |μx − μy|² + tr(Σx + Σy − 2 (Σx Σy)^½), Σ the unbiased
                       sample covariances; the trace of the square root is taken from the eigenvalues of the
                       symmetric PSD matrix Σx^½ Σy Σx^½ (same spectrum as Σx Σy), so no general sqrtm is needed
    mmd2_unbiased      the unbiased estimator of MMD² (Gretton et al. 2012) with KID's kernel
                       k(a, b) = (aᵀb / d + 1)³ by default (Bińkowski et al. 2018), or a linear kernel aᵀb
    knn_scores         precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020):
                       each point's k-NN radius within its own set decides what the other set covers
    one_nn_accuracy    leave-one-out 1-NN two-sample accuracy on x ∪ y (Lopez-Paz & Oquab 2017; Xu et al. 2018):
                       0.5 when the two sets are draws of one distribution, 1 when they are apart; with identical
                       sets every point's nearest neighbour is its twin in the other set, so it falls to 0
    mean_cosine        mean pairwise cosine similarity of two sets (DreamBooth's DINO / CLIP-I / CLIP-T scores)

All distances are Euclidean. Nothing here depends on how the features were made (nullbooth/report/extractors.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

KERNELS = ("cubic", "linear")
KERNEL_DEFINITIONS = {"cubic": "k(a, b) = (a·b / d + 1)^3 (KID's polynomial kernel)", "linear": "k(a, b) = a·b"}


def _as64(a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features: expected a 2-D array (n, d), got shape {arr.shape}")
    return arr


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_from_moments(mu_x: np.ndarray, cov_x: np.ndarray, mu_y: np.ndarray, cov_y: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians N(μx, Σx), N(μy, Σy): |μx − μy|² + tr(Σx) + tr(Σy) − 2 tr((Σx Σy)^½)."""
    root = _psd_sqrt(cov_x)
    inner = np.linalg.eigvalsh(root @ cov_y @ root)
    trace_sqrt = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    diff = np.asarray(mu_x, dtype=np.float64) - np.asarray(mu_y, dtype=np.float64)
    value = float(diff @ diff + np.trace(cov_x) + np.trace(cov_y) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # rounding can take an exact 0 a hair below


def frechet_distance(x: Any, y: Any) -> float:
    """FID's formula on the features' sample means and unbiased covariances (needs ≥ 2 rows per set)."""
    x, y = _as64(x), _as64(y)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("frechet_distance: each set needs at least 2 rows")
    return frechet_from_moments(x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], -1), y.mean(0),
                                np.cov(y, rowvar=False).reshape(y.shape[1], -1))


def kernel_matrix(a: np.ndarray, b: np.ndarray, kernel: str = "cubic") -> np.ndarray:
    if kernel == "cubic":
        return (a @ b.T / a.shape[1] + 1.0) ** 3
    if kernel == "linear":
        return a @ b.T
    raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")


def mmd2_unbiased(x: Any, y: Any, kernel: str = "cubic") -> float:
    """Unbiased MMD²: mean of k over distinct pairs within x, the same within y, minus twice the mean across.
    Its expectation is the population MMD² (so it may come out slightly negative when the two agree)."""
    x, y = _as64(x), _as64(y)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("mmd2_unbiased: each set needs at least 2 rows")
    kxx, kyy, kxy = kernel_matrix(x, x, kernel), kernel_matrix(y, y, kernel), kernel_matrix(x, y, kernel)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b)), exact zeros where rows are equal."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None))


def knn_radii(a: np.ndarray, k: int) -> np.ndarray:
    """Distance from every row of `a` to its k-th nearest other row of `a`."""
    if not 1 <= k < len(a):
        raise ValueError(f"k-NN radius: k must be in 1..{len(a) - 1} for {len(a)} rows, got {k}")
    d = pairwise_distances(a, a)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def knn_scores(x: Any, y: Any, k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage of `y` (generated) against `x` (reference), with k-NN radii.

    precision  share of y inside some x-ball (x_i's ball: radius to its k-th neighbour in x)
    recall     share of x inside some y-ball
    density    (1 / (k·|y|)) Σ_j #{i : y_j in x_i's ball}  (1 on average for one distribution, unbounded)
    coverage   share of x whose ball holds at least one y
    """
    x, y = _as64(x), _as64(y)
    rx, ry = knn_radii(x, k), knn_radii(y, k)
    d = pairwise_distances(x, y)  # (|x|, |y|)
    inside_x = d <= rx[:, None]  # y_j within x_i's ball
    return {"precision": float(inside_x.any(0).mean()), "recall": float((d <= ry[None, :]).any(1).mean()),
            "density": float(inside_x.sum() / (k * len(y))), "coverage": float(inside_x.any(1).mean())}


def one_nn_accuracy(x: Any, y: Any) -> float:
    """Leave-one-out 1-NN accuracy of telling x from y in x ∪ y; a tie goes to the first nearest row (x before
    y), which only matters for duplicated rows."""
    x, y = _as64(x), _as64(y)
    both = np.concatenate([x, y])
    labels = np.concatenate([np.zeros(len(x), dtype=bool), np.ones(len(y), dtype=bool)])
    d = pairwise_distances(both, both)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def mean_cosine(a: Any, b: Any) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j)."""
    a, b = _as64(a), _as64(b)
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return float((a @ b.T).mean())


def drift_scores(x: Any, y: Any, k: int = 5, kernel: str = "cubic") -> dict[str, float]:
    """Every distribution metric of `y` against the reference `x`, one dict (the eval's row)."""
    return {"fd": frechet_distance(x, y), "mmd2": mmd2_unbiased(x, y, kernel), **knn_scores(x, y, k),
            "one_nn_accuracy": one_nn_accuracy(x, y)}
