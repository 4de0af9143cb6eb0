"""What every Fisher engine shares: the accumulation state, the fold, the compiled call.

An engine turns one fixed-size batch into per-variable sums

    S_i = Σ_n mask_n Σ_k W_kn (J_nᵀ U_kn)_i²         (U, W: the likelihood's cotangents)

(:meth:`Engine.batch_sums`, traceable) and folds them into a float64 running total
(:func:`fold`) inside the same compiled function, so a batch costs one dispatch and a
whole call one host sync.  Engines differ only in how they get the squares (see
:mod:`fastewc.fisher` for the table); the interface is

* ``rows_per_call(batch_size, num_cotangents, probe_floats)``: examples per compiled call
  (a memory bound: per-example gradients or deltas held at once);
* ``default_jit_compile(model)``: the XLA setting ``jit_compile=None`` means;
* ``batch_sums(x, y, mask, noise)``: the sums of one batch (traced once per plan);
* ``run(batch, noise, state)``: one batch through the compiled function, the new state.

An engine belongs to one :class:`fastewc.FisherEstimator` plan (one model, variable list,
input signature and registry) and owns its compiled and concrete functions: they live as
long as the estimator.
"""
import typing

import numpy as np
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import _policy

FLOAT16_COTANGENT_SCALE = 2.0**8
# Up to this many cotangents per example an engine unrolls the K backward passes in the
# graph (factored: K passes over the batch; vmap: K passes inside the per-example
# function); above it, the K are vectorized too.
UNROLL_COTANGENTS = 16


class FisherState(typing.NamedTuple):
    """The streamed accumulation: float64 totals, the output (min, max), the examples seen
    (float64), the running float32 mean, and ``checks`` = [min, max, finite_1, ...,
    finite_V] (float32) so that the end of a call reads ONE tensor back to the host."""
    totals: list
    output_range: tf.Tensor
    examples: tf.Tensor
    fisher: list
    checks: tf.Tensor


def initial_state(variables):
    shapes = [tuple(v.shape) for v in variables]
    return FisherState(
        [tf.zeros(s, tf.float64) for s in shapes], tf.constant([np.inf, -np.inf], tf.float32),
        tf.constant(0.0, tf.float64), [tf.zeros(s, tf.float32) for s in shapes],
        tf.constant([np.inf, -np.inf] + [1.0] * len(shapes), tf.float32))


def fold(batch, count, state):
    """Add a batch's float32 sums (and output range) into the float64 state and return the
    new state with the running mean F = total / examples."""
    *sums, batch_range = batch
    totals = [t + tf.cast(s, tf.float64) for t, s in zip(state.totals, sums)]
    out_range = tf.stack([tf.minimum(state.output_range[0], batch_range[0]),
                          tf.maximum(state.output_range[1], batch_range[1])])
    seen = state.examples + tf.cast(count, tf.float64)
    fisher = [tf.cast(t / seen, tf.float32) for t in totals]
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(f)) for f in fisher])
    return FisherState(totals, out_range, seen, fisher, tf.concat([out_range, tf.cast(finite, tf.float32)], 0))


fold_compiled = tf.function(fold, autograph=False, reduce_retracing=True)


def cotangent_scale(dtype):
    """Static loss scale for a float16 backward pass (divided out in float32 before
    squaring): float16 squares of small gradients underflow."""
    return FLOAT16_COTANGENT_SCALE if dtype == tf.float16 else 1.0


def output_range(out):
    """(min, max) of the model output, checked once at the end (no per-batch sync)."""
    out = tf.cast(out, tf.float32)
    return tf.stack([tf.reduce_min(out), tf.reduce_max(out)])


def weighted_cotangents(likelihood, kind, out, y, mask, noise):
    """The likelihood's (U, W) with the padding rows' weights zeroed."""
    u, w = likelihood.cotangents(out, y, kind, noise if kind == "sampled" else None)
    return u, w * mask[None]


def dense_gradients(grads, variables):
    """Gradients with None as zeros and IndexedSlices (Embedding) densified."""
    return [tf.zeros(v.shape, tf.float32) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, variables)]


def is_distributed():
    return tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1


class Engine:
    """Base class: subclasses set ``name`` and implement :meth:`batch_sums`."""

    name = None
    xla_capable = True          # False: jit_compile=None never means XLA for this engine

    def __init__(self, model, likelihood, kind, num_samples, *, jit_compile, rules=None):
        self.model = model
        self.likelihood = likelihood
        self.kind = kind
        self.num_samples = num_samples
        self.rules = rules
        self.variables = list(model.trainable_variables)
        self.jit_compile = jit_compile
        self._function = None       # fold(batch_sums(...)): one dispatch per batch
        self._concrete = {}         # rows per batch -> its concrete function
        self._counts = {}           # real rows -> an int32 scalar tensor
        self._sums_function = None  # batch_sums alone: the per-replica function
        self._replicated = {}       # strategy id -> (strategy, replicated function)

    @classmethod
    def default_jit_compile(cls, model):
        return _policy.default_jit_compile(model, xla_capable=cls.xla_capable)

    def rows_per_call(self, batch_size, num_cotangents, probe_floats):
        return batch_size

    def batch_sums(self, x, y, mask, noise):
        raise NotImplementedError

    # -- running ----------------------------------------------------------------------
    def run(self, batch, noise, state, *, distributed=False):
        """``batch`` (a :class:`fastewc.data.Batch`) through the compiled function;
        ``distributed``: a strategy with more than one replica is in scope."""
        count = self._counts.get(batch.count)
        if count is None:
            count = self._counts[batch.count] = tf.constant(batch.count, tf.int32)
        if distributed:
            from fastewc import distribute   # rows split over replicas, sums all-reduced
            sums = distribute.run_fisher_batch(self._replicated, self._traced_sums(),
                                               batch.x, batch.y, batch.mask, noise)
            return fold_compiled(sums, count, state)
        args = (batch.x, batch.y, batch.mask, noise, count, state)
        # The concrete function of this batch size, called directly with its flat inputs:
        # the polymorphic dispatch and the argument binding are host time on every call.
        # Within a plan only the rows vary (inputs, labels, noise and state are fixed by it).
        rows = int(batch.mask.shape[0])
        concrete = self._concrete.get(rows)
        if concrete is None:
            with compat.release_custom_gradients_with(self) as graphs:
                concrete = self._compiled().get_concrete_function(*args)
                graphs.append(concrete.graph)
            self._concrete[rows] = concrete
        return FisherState(*compat.call_concrete(concrete, args))

    def _compiled(self):
        if self._function is None:
            sums = self.batch_sums
            self._function = tf.function(
                lambda x, y, mask, noise, count, state: fold(sums(x, y, mask, noise), count, state),
                jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)
        return self._function

    def _traced_sums(self):
        """The batch sums alone, compiled (the per-replica function under a strategy)."""
        if self._sums_function is None:
            self._sums_function = tf.function(
                self.batch_sums, jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)
        return self._sums_function

    def tracing_count(self):
        """Traces of this engine's compiled functions (a no-retrace check for tests)."""
        fns = (self._function, self._sums_function)
        return sum(fn.experimental_get_tracing_count() for fn in fns if fn is not None)
