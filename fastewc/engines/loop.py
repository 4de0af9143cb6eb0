"""The loop engine: the eager per-example loop people write, one GradientTape per
example and K backward passes from it.  The baseline of the benchmarks and the slow
reference twin of every other engine (float32, like them); N·K eager passes."""
import numpy as np
import tensorflow as tf

from fastewc.engines.base import (BatchSums, Engine, IdGuard, cotangent_scale, dense_gradients, fold,
                                  mean, weighted_cotangents)


class LoopEngine(Engine):
    name = "loop"
    xla_capable = False

    def batch_sums(self, x, y, mask, noise):
        model, variables, lik, kind = self.model, self.variables, self.likelihood, self.kind
        count = int(np.sum(mask.numpy()))      # the real rows come first
        sums = [np.zeros(v.shape, np.float32) for v in variables]
        low, high = np.inf, -np.inf
        ids = IdGuard(model, self.id_layers)
        for n in range(count):
            xn = tf.nest.map_structure(lambda t: t[n:n + 1], x)
            with ids, tf.GradientTape(persistent=True) as tape:
                out = model(xn, training=False)
            low, high = min(low, float(tf.reduce_min(out))), max(high, float(tf.reduce_max(out)))
            u, w = weighted_cotangents(lik, kind, out, tf.nest.map_structure(lambda t: t[n:n + 1], y),
                                       tf.ones([1], tf.float32), noise[:, n:n + 1] if kind == "sampled" else noise, xn,
                                       self.out_tail)
            scale = cotangent_scale(out.dtype)
            for k in range(u.shape[0]):
                grads = tape.gradient(out, variables, output_gradients=tf.cast(u[k] * scale, out.dtype))
                for i, g in enumerate(dense_gradients(grads, variables)):
                    sums[i] += float(w[k, 0]) * np.square(tf.cast(g, tf.float32).numpy() / scale)
            del tape
        return BatchSums(self.blocks.from_gradients([tf.constant(s) for s in sums]), ids.counts(),
                         tf.constant([low, high], tf.float32))

    def trace(self, batch, noise, state, *, alone=False):
        """Nothing to trace: the loop runs eagerly."""

    def run(self, batch, noise, state, *, alone=False, distributed=False):
        return self._step(mean if alone else fold, self.batch_sums(batch.x, batch.y, batch.mask, noise),
                          tf.constant(batch.count, tf.int32), state)
