"""What every Fisher engine shares: the accumulation state, the fold, the compiled call.

An engine is built with a block plan (:class:`fastewc.blocks.BlockPlan`: which block
covers which variables) and turns one fixed-size batch into each block's sums, e.g. a
diagonal block's

    S_i = Σ_n mask_n Σ_k W_kn (J_nᵀ U_kn)_i²         (U, W: the likelihood's cotangents)

(:meth:`Engine.batch_sums`, traceable) and folds them into a float64 running total
(:func:`fold`) inside the same compiled function, so a batch costs one dispatch and a
whole call one host sync.  Engines differ only in how they get the sums (see
:mod:`fastewc.fisher` for the table); the interface is

* ``rows_per_call(batch_size, num_cotangents, probe_floats, budget)``: examples per
  compiled call, what ``budget`` bytes hold of the per-example gradients or deltas the
  engine keeps at once (:mod:`fastewc._memory`), capped by ``batch_size`` unless None;
* ``default_jit_compile(model, blocks)``: the XLA setting ``jit_compile=None`` means;
* ``batch_sums(x, y, mask, noise)``: a :class:`BatchSums` (traced once per plan): the
  sums by block, one count per Embedding layer (``id_layers``) of the ids outside its
  table, the output's (min, max);
* ``run(batch, noise, state)``: one batch through the compiled function, the new state;
* ``finish(state)``: the call's final state, its means and :class:`Checks` complete.

Embedding ids are checked where they are used, on the compiled side (:class:`IdGuard`):
every engine's forward pass clamps them to the table, as XLA's gather would silently do,
and counts those outside it; the counts ride in ``FisherState.checks``, read once at the
end of a call, so the check costs no host sync per batch and covers every Embedding,
wherever it sits in the model and whatever feeds it.

An engine belongs to one :class:`fastewc.FisherEstimator` plan (one model, variable list,
input signature and registry) and owns its compiled and concrete functions: they live as
long as the estimator.
"""
import contextlib
import functools
import typing

import keras
import numpy as np
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import _policy
from fastewc import capture as capture_lib
from fastewc.likelihood import broadcast_weights

FLOAT16_COTANGENT_SCALE = 2.0**8
# Up to this many cotangents per example an engine unrolls the K backward passes in the
# graph (factored: K passes over the batch; vmap: K passes inside the per-example
# function); above it, the K are vectorized too.
UNROLL_COTANGENTS = 16
# Rows per batch of an engine that holds nothing per row (the eager loop).
DEFAULT_ROWS = 256


class BatchSums(typing.NamedTuple):
    """What :meth:`Engine.batch_sums` returns for one batch (traceable)."""
    sums: tuple          # by block of the plan: each block's tuple of sums (Block.sum_shapes)
    bad_ids: list        # one float32 count per Embedding layer (id_layers): ids outside its table
    output_range: tf.Tensor   # (min, max) of the model output, float32


class Checks(typing.NamedTuple):
    """What the end of a call checks on the host.  In a :class:`FisherState` they travel
    packed in ONE float32 vector (:meth:`pack`; :meth:`unpack` in a traced function,
    :meth:`read` on the host), so that a call reads one tensor back and its compiled
    function has one input and one output for them."""
    output_range: typing.Any  # (min, max) of the model outputs so far, float32
    finite: typing.Any        # whether the whole mean is finite (set by :func:`finish`)
    bad_ids: typing.Any       # (E,) float32: the ids seen outside each Embedding's table

    def pack(self):
        return tf.concat([self.output_range, tf.reshape(tf.cast(self.finite, tf.float32), [1]), self.bad_ids], 0)

    @classmethod
    def unpack(cls, vector):
        return cls(vector[:2], vector[2], vector[3:])

    @classmethod
    def read(cls, vector):
        """The host's view of a packed vector: the one host sync of a call."""
        values = vector.numpy()
        return cls(values[:2], bool(values[2]), values[3:])


class FisherState(typing.NamedTuple):
    """The streamed accumulation: the float64 totals of every block's sums in ONE flat
    vector (the plan's sums in order), the examples seen (float64), the running float32
    means (a list shaped like the plan's sums, :attr:`fastewc.blocks.BlockPlan.shapes`)
    and the :class:`Checks`, packed.

    Flat, because the per-batch fold then costs a handful of ops (concatenate, add,
    divide, cast, one finiteness check, split) instead of five per variable: on
    MobileNetV2 (158 variables, no XLA) those were ~8% of a Fisher call."""
    totals: tf.Tensor
    examples: tf.Tensor
    means: list
    checks: tf.Tensor         # Checks.pack()


def initial_state(shapes, num_id_layers=0):
    """The zero state for sums of ``shapes`` (a plan's, :class:`fastewc.blocks.BlockPlan`)."""
    shapes = [tuple(s) for s in shapes]
    size = sum(int(np.prod(s)) for s in shapes)
    return FisherState(
        tf.zeros([size], tf.float64), tf.constant(0.0, tf.float64), [tf.zeros(s, tf.float32) for s in shapes],
        tf.constant([np.inf, -np.inf, 1.0] + [0.0] * num_id_layers, tf.float32))


def fold(batch, count, state, *, with_mean=True):
    """Add a batch's float32 sums (:class:`BatchSums`) into the float64 state and,
    ``with_mean``, return it with its mean (:func:`finish`) formed in the same compiled
    function.  Without it the mean is left to one :func:`finish` per call (a plan whose
    sums are dense matrices: :attr:`fastewc.blocks.BlockPlan.mean_per_batch`): Kronecker
    factors are large, and a per-batch mean costs five passes over every quantity (the
    reference CNN's 85M-float A: 0.5 s a batch); for a diagonal the passes fuse into the
    batch's compiled function, where a separate call would cost more host time than they
    do (0.9 ms on the reference MLP)."""
    sums = [tf.reshape(s, [-1]) for s in tf.nest.flatten(batch.sums)]
    flat = tf.concat(sums, 0) if len(sums) > 1 else sums[0]
    totals = state.totals + tf.cast(flat, tf.float64)
    checks, batch_range = Checks.unpack(state.checks), batch.output_range
    out_range = tf.stack([tf.minimum(checks.output_range[0], batch_range[0]),
                          tf.maximum(checks.output_range[1], batch_range[1])])
    bad_ids = checks.bad_ids + tf.stack(batch.bad_ids) if batch.bad_ids else checks.bad_ids
    seen = state.examples + tf.cast(count, tf.float64)
    folded = FisherState(totals, seen, state.means, Checks(out_range, checks.finite, bad_ids).pack())
    return finish(folded) if with_mean else folded


def finish(state):
    """The state with its means = totals / examples (float32, shaped like ``state.means``)
    and ``checks.finite`` = whether all of them are finite (see :func:`fold` for when)."""
    num = len(state.means)
    mean = tf.cast(state.totals / state.examples, tf.float32)
    if all(f.shape.is_fully_defined() for f in state.means):
        sizes, shapes = [int(np.prod(f.shape)) for f in state.means], [f.shape for f in state.means]
    else:          # a shape-relaxed trace (reduce_retracing), for the loop engine
        sizes, shapes = tf.stack([tf.size(f) for f in state.means]), [tf.shape(f) for f in state.means]
    pieces = tf.split(mean, sizes, num=num) if num > 1 else [mean]
    means = [tf.reshape(p, shape) for p, shape in zip(pieces, shapes)]
    finite = tf.reduce_all(tf.math.is_finite(mean))
    checks = Checks.unpack(state.checks)._replace(finite=finite).pack()
    return FisherState(state.totals, state.examples, means, checks)


fold_compiled = tf.function(fold, autograph=False, reduce_retracing=True)


def cotangent_scale(dtype):
    """Static loss scale for a float16 backward pass (divided out in float32 before
    squaring): float16 squares of small gradients underflow."""
    return FLOAT16_COTANGENT_SCALE if dtype == tf.float16 else 1.0


def output_range(out):
    """(min, max) of the model output, checked once at the end (no per-batch sync)."""
    out = tf.cast(out, tf.float32)
    return tf.stack([tf.reduce_min(out), tf.reduce_max(out)])


def weighted_cotangents(likelihood, kind, out, y, mask, noise, x=None, out_tail=None):
    """The likelihood's (U, W) with the padding rows' weights zeroed, and each position
    weighted by :func:`position_weights` (``y`` is the labels, or (labels, sample_weight)
    when the data carries a ``sample_weight``).  ``out_tail``: the output's per-example
    shape as planned, set as its static shape (a rule's loop, e.g. a recurrent layer's,
    may leave the positions unknown in the graph)."""
    y, sample_weight = y if isinstance(y, tuple) else (y, None)
    if out_tail is not None and not out.shape[1:].is_fully_defined():
        out.set_shape([out.shape[0]] + list(out_tail))
    weights = position_weights(likelihood, out, x, sample_weight)
    u, w = likelihood.cotangents(out, y, kind, noise if kind == "sampled" else None, weights)
    return u, w * mask[None]


PADDING_MASK = "padding_mask"      # keras_hub's input key for the unpadded tokens


def mask_sources(likelihood, out, x):
    """The per-position masks that apply to an output ``out`` (batch, *tail) with inputs
    ``x``: [(what, mask)] for the Keras mask propagated to the output
    (``out._keras_mask``) and keras_hub's ``x["padding_mask"]``.  They apply to outputs
    with positions (rank ≥ 3), and for binary/MSE to an output of the mask's own shape;
    on a (batch, classes) output they are ignored, as before positions existed."""
    tail = tuple(out.shape[1:])
    found = []
    keras_mask = getattr(out, "_keras_mask", None)
    if keras_mask is not None:
        found.append(("the Keras mask of the model output", keras_mask))
    if isinstance(x, dict) and PADDING_MASK in x:
        found.append((f"`data` x['{PADDING_MASK}']", x[PADDING_MASK]))
    elementwise = likelihood.family != "categorical" and len(tail) == 1
    return [(what, m) for what, m in found
            if len(tail) > 1 or (elementwise and tuple(m.shape[1:]) == tail)]


def position_weights(likelihood, out, x, sample_weight=None):
    """The weight of each output position (N, *positions) float32: the product of the
    masks of :func:`mask_sources` and the data's ``sample_weight``; None when there are
    none.  Shapes were checked by the plan (:meth:`fastewc.likelihood.Likelihood.weight_rank`)."""
    factors = [m for _, m in mask_sources(likelihood, out, x)]
    if sample_weight is not None:
        factors.append(sample_weight)
    if not factors:
        return None
    tail = out.shape.rank - 1
    elementwise = likelihood.family != "categorical"
    ranks = [tail if elementwise and f.shape.rank - 1 == tail else max(tail - 1, 0) for f in factors]
    rank = max(ranks)
    weights = None
    for f, r in zip(factors, ranks):
        f = broadcast_weights(f, r)
        f = tf.reshape(f, tf.concat([tf.shape(f), [1] * (rank - r)], 0))
        weights = f if weights is None else weights * f
    return tf.broadcast_to(weights, tf.shape(out)[:rank + 1])


def dense_gradients(grads, variables):
    """Gradients with None as zeros and IndexedSlices (Embedding) densified."""
    return [tf.zeros(v.shape, tf.float32) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, variables)]


def embedding_layers(model):
    """Every ``keras.layers.Embedding`` (subclasses included) nested in ``model``, once."""
    seen, out = set(), []
    for layer in compat.nested_layers(model):
        if isinstance(layer, keras.layers.Embedding) and id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


class IdGuard:
    """Within this context each Embedding of ``model`` (or ``layers``) reads its ids clamped
    to its table, [-input_dim, input_dim) as ``keras.ops.take`` reads them (what XLA's
    gather does silently; TensorFlow's CPU kernel would raise mid-pass instead), and, until
    :meth:`freeze`, counts the ids outside it (:meth:`counts`, traced with the pass) or,
    with ``ranges=True`` (eager), records their (min, max) (:meth:`offending`).

    Only integer or floating dense ids are read (floats are cast to int32, as Embedding
    does); a call with other arguments (keras_hub's ``ReversibleEmbedding(reverse=True)``
    projects hidden states) or other inputs (ragged, sparse) passes through unchanged.
    The swap is :func:`fastewc.capture.swapped_calls` (the thread that opened the context
    only; restored on exit); it nests inside :func:`fastewc.capture.capture` (it then wraps
    the rule's call) and around it.  The context can be entered again (the counts add up).
    Without Embedding layers it does nothing."""

    def __init__(self, model, layers=None, *, ranges=False):
        self.model = model
        self.layers = embedding_layers(model) if layers is None else list(layers)
        self._counts = [[] for _ in self.layers]
        self._ranges = [[] for _ in self.layers] if ranges else None
        self._counting = True
        self._swap = None

    def __enter__(self):
        if self.layers:
            self._swap = capture_lib.swapped_calls(self.model, [
                (layer, functools.partial(self._wrap, i, layer)) for i, layer in enumerate(self.layers)])
            self._swap.__enter__()
        return self

    def __exit__(self, *exc_info):
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.__exit__(None, None, None)
        return False

    def freeze(self):
        """Stop counting (later passes, e.g. inside ``vectorized_map``, only clamp)."""
        self._counting = False

    def counts(self):
        """One float32 scalar per layer: the ids seen outside its table (0 if not called)."""
        return [tf.add_n(c) if c else tf.constant(0.0) for c in self._counts]

    def offending(self):
        """(layer, min id, max id) of the first layer that saw ids outside its table, else
        None (``ranges=True`` only)."""
        for layer, seen in zip(self.layers, self._ranges or []):
            if seen:
                low, high = min(lo for lo, _ in seen), max(hi for _, hi in seen)
                if low < -layer.input_dim or high >= layer.input_dim:
                    return layer, low, high
        return None

    def _wrap(self, i, layer, previous):
        def call(inputs, *args, **kwargs):
            ids = _dense_ids(inputs, args, kwargs)
            if ids is not None:
                n = int(layer.input_dim)
                if self._counting:
                    outside = tf.logical_or(ids < -n, ids >= n)
                    self._counts[i].append(tf.reduce_sum(tf.cast(outside, tf.float32)))
                    if self._ranges is not None and int(tf.size(ids)):
                        self._ranges[i].append((int(tf.reduce_min(ids)), int(tf.reduce_max(ids))))
                inputs = tf.clip_by_value(ids, tf.cast(-n, ids.dtype), tf.cast(n - 1, ids.dtype))
            return previous(inputs, *args, **kwargs)
        return call


def _dense_ids(inputs, args, kwargs):
    """The ids an Embedding call reads, or None (see :class:`IdGuard`)."""
    if args or kwargs.get("reverse"):
        return None
    if not isinstance(inputs, tf.Tensor):
        return None
    if inputs.dtype.is_integer:
        return inputs
    if inputs.dtype.is_floating:
        return tf.cast(inputs, tf.int32)
    return None


def is_distributed():
    return tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1


class Engine:
    """Base class: subclasses set ``name`` and implement :meth:`batch_sums`."""

    name = None
    xla_capable = True          # False: jit_compile=None never means XLA for this engine

    def __init__(self, model, likelihood, kind, num_samples, *, jit_compile, blocks, out_tail, rules=None):
        self.model = model
        self.likelihood = likelihood
        self.kind = kind
        self.num_samples = num_samples
        self.rules = rules
        self.blocks = blocks        # a fastewc.blocks.BlockPlan: what batch_sums returns, by block
        self.variables = blocks.variables
        self.id_layers = embedding_layers(model)      # checked by IdGuard in every pass
        self.out_tail = tuple(out_tail)               # the output's per-example shape
        self.jit_compile = jit_compile
        self._function = None       # fold(batch_sums(...)): one dispatch per batch
        self._finish = None         # finish(state): the mean, once per call
        self._concrete = {}         # rows per batch -> its concrete function
        self._unoptimized = {}      # id(concrete function) -> called without Grappler
        self._counts = {}           # real rows -> an int32 scalar tensor
        self._sums_function = None  # batch_sums alone: the per-replica function
        self._replicated = {}       # strategy id -> (strategy, replicated function)

    @classmethod
    def default_jit_compile(cls, model, blocks):
        """What ``jit_compile=None`` means for this engine on ``model`` with the plan ``blocks``."""
        return _policy.default_jit_compile(model, xla_capable=cls.xla_capable, xla_on_cpu=blocks.xla_on_cpu)

    def rows_per_call(self, batch_size, num_cotangents, probe_floats, budget):
        return DEFAULT_ROWS if batch_size is None else batch_size

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
            return fold_compiled(sums, count, state, with_mean=self.blocks.mean_per_batch)
        args = (batch.x, batch.y, batch.mask, noise, count, state)
        concrete = self._concrete_for(args)
        with self._call_options(concrete):
            return FisherState(*compat.call_concrete(concrete, args))

    def finish(self, state):
        """The final state of a call: ``state`` itself where each batch's fold formed the
        mean (:attr:`fastewc.blocks.BlockPlan.mean_per_batch`), else its mean and
        finiteness (:func:`finish`), one concrete function per engine (the state's shapes
        are the plan's) called with its flat inputs like :meth:`run` (no XLA: one pass, not
        worth a compile)."""
        if self.blocks.mean_per_batch:
            return state
        if self._finish is None:
            self._finish = tf.function(finish, autograph=False, jit_compile=False).get_concrete_function(state)
        with self._call_options(self._finish):
            return FisherState(*compat.call_concrete(self._finish, (state,)))

    def _call_options(self, concrete):
        """The call options of a compiled function, the same on every call of it: Grappler
        off where :func:`fastewc._policy.skip_graph_optimizer` says for its graph."""
        key = id(concrete)
        if key not in self._unoptimized:
            self._unoptimized[key] = _policy.skip_graph_optimizer(concrete.graph)
        if self._unoptimized[key]:
            return compat.without_graph_optimizer()
        return contextlib.nullcontext()

    def trace(self, batch, noise, state):
        """Trace (without running) the compiled function ``run`` would call for ``batch``:
        where a model the engine cannot take fails (pfor without a converter, an op that
        has no graph form).  A no-op for engines that run eagerly."""
        count = tf.constant(batch.count, tf.int32)
        self._concrete_for((batch.x, batch.y, batch.mask, noise, count, state))

    def _concrete_for(self, args):
        # The concrete function of this batch size, called directly with its flat inputs:
        # the polymorphic dispatch and the argument binding are host time on every call.
        # Within a plan only the rows vary (inputs, labels, noise and state are fixed by it).
        rows = int(args[2].shape[0])
        concrete = self._concrete.get(rows)
        if concrete is None:
            with compat.release_custom_gradients_with(self) as graphs:
                concrete = self._compiled().get_concrete_function(*args)
                graphs.append(concrete.graph)
            self._concrete[rows] = concrete
        return concrete

    def _compiled(self):
        if self._function is None:
            sums = self.batch_sums
            self._function = tf.function(
                lambda x, y, mask, noise, count, state: fold(sums(x, y, mask, noise), count, state,
                                                             with_mean=self.blocks.mean_per_batch),
                jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)
        return self._function

    def _traced_sums(self):
        """The batch sums alone, compiled (the per-replica function under a strategy)."""
        if self._sums_function is None:
            self._sums_function = tf.function(
                self.batch_sums, jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)
        return self._sums_function

    def tracing_count(self):
        """Traces of this engine's per-batch compiled functions (a no-retrace check for
        tests); :meth:`finish` is traced once per engine and not counted."""
        fns = (self._function, self._sums_function)
        return sum(fn.experimental_get_tracing_count() for fn in fns if fn is not None)
