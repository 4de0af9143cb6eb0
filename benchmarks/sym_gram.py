"""A = XᵀX by its symmetry (:func:`fastewc.contract.symmetric_gram`) against one matmul
(:func:`fastewc.contract.plain_gram`), for the Kronecker factors' shapes: the numbers
behind :func:`fastewc.contract.gram_blocks`'s limits.

Each member a ``tf.function`` (no XLA), all interleaved in one process (the order reversed
each round), warmed up; medians and each member's first call (trace + run):

* ``plain``: ``tf.matmul(x, x, transpose_a=True)``;
* ``b<b>``: the b(b + 1)/2 upper blocks, the lower ones their transposes;
* ``assembly b<b>``: the assembly alone (:func:`fastewc.contract.from_upper_blocks`) from
  the upper blocks given;
* ``gram``: what :func:`fastewc.contract.gram` does for the shape (the rule's choice).

    .venv/bin/python -m benchmarks.sym_gram [rounds] [--shapes 512x785 147456x288 ...]
        [--blocks 2 3 4]
"""
import argparse
import statistics
import time

import numpy as np
import tensorflow as tf

from fastewc import contract

SHAPES = {   # rows × d of the reference models' Gram products (A's without the bias
    # column where the rows outnumber d: it comes from the rows' sums)
    "512x785": "MLP Dense(784 → 256) A, rows form (row_gram)",
    "512x256": "MLP Dense(256 → 256), Dense(256 → 10) A",
    "4608x256": "MLP exact G of Dense(784 → 256): 9 · 512 rows",
    "256x9217": "CNN Dense(9216 → 128) A, rows form (row_gram)",
    "147456x288": "CNN Conv(32 → 64) 3×3 patches A: 256 · 24² rows",
    "16384x289": "a convolution's patches at 64 examples of 16²",
    "4096x785": "MLP Dense(784 → 256) A at 4096 rows a batch (60 000 examples)",
}


def members_for(x, blocks):
    d = x.shape[-1]
    members = {"plain": (contract.plain_gram, x)}
    for b in blocks:
        members[f"b{b}"] = (lambda x, b=b: contract.symmetric_gram(x, b), x)
    for b in blocks:
        a = contract.plain_gram(x)
        edges = [i * d // b for i in range(b + 1)]
        upper = {(i, j): a[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] for i in range(b) for j in range(i, b)}
        members[f"assembly b{b}"] = (lambda upper, b=b: contract.from_upper_blocks(upper, b), upper)
    members["gram"] = (contract.gram, x)
    return {label: (tf.function(fn, autograph=False), arg) for label, (fn, arg) in members.items()}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("rounds", type=int, nargs="?", default=15)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--blocks", nargs="*", type=int, default=[2, 3, 4])
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        rows, d = (int(s) for s in shape.split("x"))
        x = tf.constant(rng.normal(size=(rows, d)).astype(np.float32))
        x64 = tf.cast(x, tf.float64)
        reference = np.asarray(tf.matmul(x64, x64, transpose_a=True))
        members = members_for(x, args.blocks)
        first = {}
        for label, (fn, arg) in members.items():
            start = time.perf_counter()
            out = np.asarray(fn(arg), np.float64)
            first[label] = time.perf_counter() - start
            error = np.abs(out - reference).max() / np.abs(reference).max()
            assert error < 1e-4, (shape, label, error)
            fn(arg)
        times = {label: [] for label in members}
        order = list(members)
        for r in range(args.rounds):
            for label in (order if r % 2 else order[::-1]):
                fn, arg = members[label]
                start = time.perf_counter()
                fn(arg)
                times[label].append(time.perf_counter() - start)
        med = {label: statistics.median(t) for label, t in times.items()}
        rule = contract.gram_blocks(rows, d)
        print(f"{shape} ({SHAPES.get(shape, '')}; gram: b = {rule}), {args.rounds} rounds, medians:")
        for label in members:
            print(f"  {label:16s} {med[label] * 1e3:9.3f} ms  ÷ plain {med[label] / med['plain']:.3f}"
                  f"   (first call {first[label] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
