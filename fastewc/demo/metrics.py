"""Continual-learning metrics on an accuracy matrix.

``acc[t, k]`` is the test accuracy (a fraction in [0, 1]) on task k after training on
tasks 0..t, for T tasks (row: after task t; column: task k).

* average accuracy (Lopez-Paz & Ranzato 2017):  ACC = (1/T) Σ_k acc[T−1, k]
* average forgetting (Chaudhry et al. 2018):
      F = 1/(T−1) · Σ_{k<T−1} ( max_{t<T−1} acc[t, k] − acc[T−1, k] )
  the drop from the best accuracy a task ever had before the last task to its accuracy
  at the end, averaged over all tasks but the last (rows t < k hold a task's accuracy
  before it was trained, which is lower in practice; the max is taken over t < T−1 as
  stated).  Lower is better; it can be negative (backward transfer).
* learning accuracy:  (1/T) Σ_k acc[k, k], how well each task was learnt when it was
  the current one (the price a too-stiff penalty pays).
"""
import numpy as np

DEFINITIONS = {
    "accuracy_matrix": "acc[t][k]: test accuracy on task k after training on tasks 1..t+1 "
                       "(row: after task t; column: task k), fraction in [0, 1]",
    "average_accuracy": "mean over k of acc[T-1][k] (after the last task), fraction in [0, 1]",
    "average_forgetting": "mean over tasks k < T-1 of (max over t < T-1 of acc[t][k]) - "
                          "acc[T-1][k] (Chaudhry et al. 2018), fraction; lower is better",
    "learning_accuracy": "mean over k of acc[k][k] (accuracy on each task right after "
                         "learning it), fraction in [0, 1]",
}


def _check(acc):
    acc = np.asarray(acc, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] < 1:
        raise ValueError(f"`acc` must be a square (T, T) matrix. Received: shape {acc.shape}")
    return acc


def average_accuracy(acc):
    acc = _check(acc)
    return float(acc[-1].mean())


def average_forgetting(acc):
    acc = _check(acc)
    T = acc.shape[0]
    if T < 2:
        return 0.0
    best = acc[:-1, :-1].max(axis=0)          # max over t < T-1, for each k < T-1
    return float(np.mean(best - acc[-1, :-1]))


def learning_accuracy(acc):
    acc = _check(acc)
    return float(np.mean(np.diag(acc)))
