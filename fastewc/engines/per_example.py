"""Engines that form per-example gradients of the whole model: vmap and jacobian.

Both hold rows · (per-example floats) at once, so their rows per call are what the memory
budget holds per-example gradients for (:mod:`fastewc._memory`), at most ``MAX_ROWS``,
rounded down to a power of two; an explicit ``batch_size`` caps them.  The streaming loop
does the chunking.

* vmap: ``tf.vectorized_map`` with ``fallback_to_while_loop=False``.  Up to
  ``UNROLL_COTANGENTS`` cotangents, one vectorized function per example runs one forward
  and K backward passes and returns Σ_k W_k g_k² (P floats per example); above, the
  (example, cotangent) pairs are vectorized, each with its own forward pass (K·P floats).
* jacobian: ``GradientTape.jacobian`` of the N·K linearised losses s_m = ⟨o_m, U_m⟩: row m
  of the Jacobian is J_mᵀ U_m, the per-(example, cotangent) gradient.  Never XLA by
  default (open XLA bugs with ``jacobian`` under ``jit_compile``).
"""
import numpy as np
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import _memory
from fastewc.engines.base import (UNROLL_COTANGENTS, BatchSums, Engine, IdGuard, cotangent_scale,
                                  dense_gradients, output_range, weighted_cotangents)

MAX_ROWS = 4096


def _forward_and_cotangents(engine, x, y, mask, noise):
    """One batched forward pass, then the weighted cotangents with the float16 scale
    applied: (out, scale·U, W, scale)."""
    out = engine.model(x, training=False)
    u, w = weighted_cotangents(engine.likelihood, engine.kind, out, y, mask, noise, x, engine.out_tail)
    scale = cotangent_scale(out.dtype)
    return out, u * scale, w, scale


def _batch_rows(x):
    """The batch dimension of ``x``: a Python int when static, else a scalar tensor (a
    concrete function relaxed by ``reduce_retracing`` to any number of rows)."""
    first = tf.nest.flatten(x)[0]
    return first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]


def _tile_pairs(x, k):
    return tf.nest.map_structure(
        lambda t: tf.tile(t, tf.concat([[k], tf.ones([tf.rank(t) - 1], tf.int32)], 0)), x)


class _PerExampleEngine(Engine):
    def _pairs(self, num_cotangents):
        raise NotImplementedError

    def rows_per_call(self, batch_size, num_cotangents, probe_floats, budget):
        num_params = sum(int(np.prod(v.shape)) for v in self.variables)
        per_example = num_params * (num_cotangents if self._pairs(num_cotangents) else 1)
        cap = MAX_ROWS if batch_size is None else min(batch_size, MAX_ROWS)
        return _memory.rows_within(budget, 4 * per_example, cap)


class UnsafeKernelError(RuntimeError):
    """The traced function would run a TensorFlow kernel known to crash or to corrupt
    memory on these shapes."""


def onednn_broadcast_matmuls(graph):
    """The ``BatchMatMul`` ops of ``graph`` that oneDNN's brgemm kernel (TensorFlow 2.21,
    x86 CPU) gets wrong: a first operand of rank ≥ 4 with a size-1 (or unknown) batch
    dimension against a broadcast second operand, e.g. (8, 1, 10, 64) × (64, 64).  It
    returns garbage or kills the process (SIGSEGV, heap corruption) from inside the
    runtime; TF_ENABLE_ONEDNN_OPTS=0 or one intra-op thread avoid it.  vmap produces
    exactly these shapes from Keras' EinsumDense ("abc,cde->abde" becomes a matmul of
    (1, T, d) by (d, u), vectorized to (N, 1, T, d)), so a keras_hub transformer under
    ``method="vmap"`` without XLA crashed.  Empty when oneDNN is off."""
    if not compat.onednn_enabled():
        return []
    risky = []
    for op in compat.graph_operations(graph):
        if not op.type.startswith("BatchMatMul") or len(op.inputs) < 2:
            continue
        a, b = op.inputs[0].shape, op.inputs[1].shape
        if a.rank is None or b.rank is None or a.rank < 4:
            continue
        batch_a = a.as_list()[:-2]
        batch_b = b.as_list()[:-2] if b.rank > 2 else []
        broadcast = not batch_b or all(d == 1 for d in batch_b)
        if broadcast and any(d in (1, None) for d in batch_a[1:]):
            risky.append(op)
    return risky


class VmapEngine(_PerExampleEngine):
    name = "vmap"

    def _concrete_for(self, args, *, alone):
        key = (int(args[2].shape[0]), alone)
        new = key not in self._concrete
        concrete = super()._concrete_for(args, alone=alone)
        if new and not self.jit_compile:
            risky = onednn_broadcast_matmuls(concrete.graph)
            if risky:
                del self._concrete[key]
                op = risky[0]
                raise UnsafeKernelError(
                    f"method='vmap' without XLA would run {len(risky)} batched matmuls that "
                    f"TensorFlow's oneDNN kernel computes wrongly or crashes on (e.g. "
                    f"{op.type} of shapes {op.inputs[0].shape} x {op.inputs[1].shape}, from "
                    f"'{op.name.split('/pfor')[0]}'), so it does not run them. Use method='auto' "
                    "or 'factored' (or 'jacobian'), or set TF_ENABLE_ONEDNN_OPTS=0 before "
                    "TensorFlow is imported.")
        return concrete

    def _pairs(self, num_cotangents):
        return num_cotangents > UNROLL_COTANGENTS

    def batch_sums(self, x, y, mask, noise):
        model, variables = self.model, self.variables

        def squared(grads, scale):
            return [tf.square(tf.cast(g, tf.float32) / scale) for g in dense_gradients(grads, variables)]

        with tf.name_scope("fastewc/fisher"), IdGuard(self.model, self.id_layers) as ids:
            out, u, w, scale = _forward_and_cotangents(self, x, y, mask, noise)
            ids.freeze()                 # the per-example passes below only clamp
            k, b = u.shape[0], _batch_rows(x)
            u = tf.cast(u, out.dtype)
            if not self._pairs(k):
                items = (x, tf.einsum("kn...->nk...", u), tf.transpose(w))      # per example

                def per_item(args):
                    xi, ui, wi = args
                    with tf.GradientTape(persistent=k > 1) as tape:
                        oi = model(tf.nest.map_structure(lambda t: t[None], xi), training=False)
                    acc = None
                    for j in range(k):
                        sq = squared(tape.gradient(oi, variables, output_gradients=ui[j][None]), scale)
                        acc = [wi[j] * q for q in sq] if acc is None else [a + wi[j] * q for a, q in zip(acc, sq)]
                    return acc
            else:
                items = (_tile_pairs(x, k), tf.reshape(u, tf.concat([[k * b], tf.shape(u)[2:]], 0)),
                         tf.reshape(w, [k * b]))

                def per_item(args):
                    xi, ui, wi = args
                    with tf.GradientTape() as tape:
                        oi = model(tf.nest.map_structure(lambda t: t[None], xi), training=False)
                    return [wi * q for q in squared(tape.gradient(oi, variables, output_gradients=ui[None]), scale)]

            sq = tf.vectorized_map(per_item, items, fallback_to_while_loop=False)
            squares = [tf.reduce_sum(q, axis=0) for q in sq]
            return BatchSums(self.blocks.from_gradients(squares), ids.counts(), output_range(out))


class JacobianEngine(_PerExampleEngine):
    name = "jacobian"
    xla_capable = False

    def _pairs(self, num_cotangents):
        return True

    def batch_sums(self, x, y, mask, noise):
        model, variables = self.model, self.variables
        with tf.name_scope("fastewc/fisher"), IdGuard(self.model, self.id_layers) as ids:
            out, u, w, scale = _forward_and_cotangents(self, x, y, mask, noise)
            ids.freeze()                 # the tiled pass below only clamps
            k, b = u.shape[0], _batch_rows(x)
            u_pairs = tf.reshape(u, tf.concat([[k * b], tf.shape(u)[2:]], 0))
            with tf.GradientTape() as tape:
                o = tf.cast(model(_tile_pairs(x, k), training=False), tf.float32)
                s = tf.reduce_sum(tf.reshape(o * u_pairs, [k * b, -1]), axis=1)
            jac = tape.jacobian(s, variables, experimental_use_pfor=True)
            w_pairs = tf.reshape(w, [k * b])
            jac = [tf.zeros(tf.concat([[k * b], v.shape], 0), tf.float32) if j is None else j
                   for j, v in zip(jac, variables)]
            squares = [tf.tensordot(w_pairs, tf.square(tf.cast(j, tf.float32) / scale), 1) for j in jac]
            return BatchSums(self.blocks.from_gradients(squares), ids.counts(), output_range(out))
