"""The sampled kind against the empirical kind on one ViT, interleaved in ONE process.

    .venv/bin/python -m benchmarks.kinds_paired --hidden 768 --rounds 7      # ViT-B/16
    .venv/bin/python -m benchmarks.kinds_paired --hidden 64 --rounds 21      # 12 layers, hidden 64

keras_hub ``ViTBackbone`` at 224×224, patch 16, 12 layers (hidden 768: 12 heads, ViT-B/16,
run it under ``flock`` as :mod:`benchmarks.bench_large`; else 2 heads), MLP 4 × hidden,
Dense(1000) on the class token, 4 images, XLA (``--no-jit`` for without).  Members:
``sampled`` (seed 0), ``emp_y`` (the empirical kind at the true labels) and ``emp_ys``
(the empirical kind at the labels the sampled kind draws: the same Fisher, checked
bit-identical), rounds alternating in direction.  ``--empirical-first`` builds and compiles
the empirical estimator before the sampled one (which estimator is built first moved the
medians by 1–3 %).  Prints each member's median and minimum.
"""
import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

import fastewc
from fastewc import likelihood
from benchmarks import models


def vit(hidden):
    import keras_hub
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ViTBackbone(image_shape=(224, 224, 3), patch_size=16, num_layers=12,
                                            num_heads=12 if hidden == 768 else 2, hidden_dim=hidden,
                                            mlp_dim=4 * hidden)
    logits = keras.layers.Dense(1000)(backbone.output[:, 0, :])
    return keras.Model(backbone.input, logits)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--no-jit", action="store_true")
    parser.add_argument("--empirical-first", action="store_true")
    args = parser.parse_args(argv)
    model = vit(args.hidden)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(4, 224, 224, 3)).astype(np.float32)
    y = rng.integers(0, 1000, size=4).astype(np.int32)
    lik = likelihood.resolve_loss(models.LOSS)
    drawn = lik._sample(model(x), lik.noise(tf.constant([0, 0], tf.int32), 1, [4, 1000]))[0].numpy().astype(np.int32)
    make = lambda kind: fastewc.FisherEstimator(model, loss=models.LOSS, kind=kind,   # noqa: E731
                                                jit_compile=not args.no_jit)
    if args.empirical_first:
        empirical = make("empirical")
        empirical((x, drawn))
    sampled = make("sampled")
    if not args.empirical_first:
        empirical = make("empirical")
    difference = max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(sampled((x, y), seed=0),
                                                                           empirical((x, drawn))))
    print(f"labels {y.tolist()}, drawn {drawn.tolist()}; sampled vs empirical at the drawn labels: "
          f"max difference {difference}")
    members = {"emp_y": lambda: empirical((x, y))[-1].numpy(), "emp_ys": lambda: empirical((x, drawn))[-1].numpy(),
               "sampled": lambda: sampled((x, y), seed=0)[-1].numpy()}
    for fn in members.values():
        fn()
    times = {k: [] for k in members}
    for r in range(args.rounds):
        for k in (list(members) if r % 2 == 0 else list(members)[::-1]):
            start = time.perf_counter()
            members[k]()
            times[k].append(time.perf_counter() - start)
    for k, t in times.items():
        print(f"{k}: median {statistics.median(t):.4f} s, min {min(t):.4f} s")


if __name__ == "__main__":
    main()
