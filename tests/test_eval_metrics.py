"""The feature-space metrics (nullbooth/report/distances.py) against independent computations with known answers."""

import itertools
import math

import numpy as np
import pytest

from nullbooth.report.distances import (
    drift_scores,
    frechet_distance,
    frechet_from_moments,
    knn_scores,
    mean_cosine,
    mmd2_unbiased,
    one_nn_accuracy,
)


def gaussian(rng, mean, cov, n):
    return rng.multivariate_normal(np.asarray(mean, float), np.asarray(cov, float), size=n)


def test_frechet_of_two_2d_gaussians_matches_the_closed_form():
    """In 2-D, tr((Σ1 Σ2)^½) = sqrt(tr(Σ1 Σ2) + 2 sqrt(det Σ1 det Σ2)) (Σ1 Σ2 has the eigenvalues of a PSD matrix),
    here with covariances that do not commute."""
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 3.0]])
    m1, m2 = np.array([1.0, -2.0]), np.array([0.0, 0.5])
    trace_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
    assert frechet_from_moments(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_from_moments(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-12)


def test_frechet_of_diagonal_gaussians_and_of_large_samples():
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    mu = np.array([0.0, 1.0, 2.0, 3.0])
    expected = 1.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # |Δμ|² = 1 (one coordinate moved by 1)
    shifted = mu + np.array([1.0, 0, 0, 0])
    assert frechet_from_moments(mu, np.diag(a), shifted, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    rng = np.random.default_rng(0)
    x, y = gaussian(rng, mu, np.diag(a), 40_000), gaussian(rng, shifted, np.diag(b), 40_000)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.03)  # sampling error at n = 40k
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_mmd_with_a_linear_kernel_has_its_analytic_value():
    """With k(a,b) = a·b the unbiased estimator equals |x̄ − ȳ|² − tr(Σx)/m − tr(Σy)/n exactly (Σ unbiased), and its
    expectation is |μx − μy|²."""
    rng = np.random.default_rng(1)
    delta = np.array([0.6, -0.3, 0.0, 0.2])
    x, y = gaussian(rng, np.zeros(4), np.eye(4), 3000), gaussian(rng, delta, np.eye(4), 2000)
    exact = float(((x.mean(0) - y.mean(0)) ** 2).sum() - np.trace(np.cov(x, rowvar=False)) / len(x)
                  - np.trace(np.cov(y, rowvar=False)) / len(y))
    assert mmd2_unbiased(x, y, "linear") == pytest.approx(exact, rel=1e-9)
    draws = [mmd2_unbiased(gaussian(rng, np.zeros(4), np.eye(4), 400), gaussian(rng, delta, np.eye(4), 300), "linear")
             for _ in range(60)]
    assert np.mean(draws) == pytest.approx(float(delta @ delta), abs=0.045)  # about 3 standard errors of the mean


def test_cubic_mmd_matches_a_loop_and_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    within_x = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(7), 2)) / (7 * 6)
    within_y = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(5), 2)) / (5 * 4)
    across = sum(k(a, b) for a in x for b in y) / 35
    assert mmd2_unbiased(x, y) == pytest.approx(within_x + within_y - 2 * across, rel=1e-12)
    same_a, same_b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    apart = rng.normal(size=(2000, 8)) + 1.0
    assert abs(mmd2_unbiased(same_a, same_b)) < 0.01 < mmd2_unbiased(same_a, apart)


def test_knn_scores_on_a_case_worked_by_hand():
    """x = {0, 1, 3}, y = {0.5, 10}, k = 1: x radii 1, 1, 2; y radii 9.5, 9.5. 0.5 lies in the balls of 0 and 1
    (not of 3: 2.5 > 2), 10 in none: precision 1/2, density 2 / (1·2) = 1, coverage 2/3; every x lies in 0.5's
    ball: recall 1."""
    x, y = np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [10.0]])
    assert knn_scores(x, y, k=1) == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": pytest.approx(2 / 3)}


def test_knn_scores_of_one_distribution_and_of_far_apart_ones():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(600, 4)), rng.normal(size=(600, 4))
    same = knn_scores(a, b, k=5)
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and same["coverage"] > 0.9
    assert same["density"] == pytest.approx(1.0, abs=0.15)  # 1 in expectation for one distribution
    apart = knn_scores(a, b + 20.0, k=5)
    assert apart == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_one_nn_accuracy_is_a_half_for_one_distribution_and_one_for_far_apart_ones():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    assert one_nn_accuracy(a, b) == pytest.approx(0.5, abs=0.05)
    assert one_nn_accuracy(a, b + 10.0) == 1.0
    assert one_nn_accuracy(a, a.copy()) == 0.0  # every point's nearest neighbour is its twin in the other set
    # A hand case: x = {0, 1}, y = {5, 6}: every point's neighbour is in its own set.
    assert one_nn_accuracy([[0.0], [1.0]], [[5.0], [6.0]]) == 1.0


def test_mean_cosine_and_the_combined_row():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0], [1.0, 1.0]])
    # pairs: (1,0)(1,0)=1, (1,0)(1,1)/√2, (0,1)(1,0)=0, (0,1)(1,1)/√2
    assert mean_cosine(a, b) == pytest.approx((1 + 2 / math.sqrt(2)) / 4, rel=1e-12)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(20, 3))
    row = drift_scores(x, y, k=3)
    assert row["fd"] == frechet_distance(x, y) and row["mmd2"] == mmd2_unbiased(x, y)
    assert row["one_nn_accuracy"] == one_nn_accuracy(x, y) and row["coverage"] == knn_scores(x, y, 3)["coverage"]
    with pytest.raises(ValueError, match="k must be in 1..19"):
        knn_scores(x, y, k=20)
