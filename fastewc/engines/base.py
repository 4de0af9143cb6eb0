"""What every Fisher engine shares: the accumulation state, the fold, the compiled call.

An engine is built with a block plan (:class:`fastewc.blocks.BlockPlan`: which block
covers which variables) and turns one fixed-size batch into each block's sums, e.g. a
diagonal block's

    S_i = Σ_n mask_n Σ_k W_kn (J_nᵀ U_kn)_i²         (U, W: the likelihood's cotangents)

(:meth:`Engine.batch_sums`, traceable).  A call of one batch divides them by its examples
in the same compiled function (:func:`mean`, float32): one dispatch; a call of several
folds each batch's into float64 totals (:func:`fold`) and forms the mean once
(:func:`finish`); either way a whole call has one host sync.  Engines differ only in how they get the sums (see
:mod:`fastewc.fisher` for the table); the interface is

* ``rows_per_call(batch_size, num_cotangents, probe_floats, budget)``: examples per
  compiled call, what ``budget`` bytes hold of the per-example gradients or deltas the
  engine keeps at once (:mod:`fastewc._memory`), capped by ``batch_size`` unless None;
* ``default_jit_compile(model, blocks)``: the XLA setting ``jit_compile=None`` means;
* ``batch_sums(x, y, mask, noise)``: a :class:`BatchSums` (traced once per plan): the
  sums by block, one count per Embedding layer (``id_layers``) of the ids outside its
  table, the output's (min, max); an engine with ``scales_sums`` also takes ``scale=``
  (a one-batch call's 1/N, passed to the kinds that scale their sums); ``noise``: the
  sampled kind's noise, or, where the engine :attr:`Engine.draws_noise`, the int32 seed
  [seed, batch index] it is drawn from in the same function (:func:`drawn_noise`);
* ``run(batch, noise, state, alone=...)``: one batch through the compiled function, the
  new state (``alone``: the call's only batch, whose state is final);
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
from fastewc.contract import static_or_dynamic_shape
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
    """A call's accumulation: the float64 running totals of the plan's sums (:func:`fold`'s
    layout: the small sums' flat vector, then each large sum in the order of
    :attr:`fastewc.blocks.BlockPlan.shapes`; ``()`` before the first fold, in a one-batch
    call and once finished), the examples seen (float64), the float32 means (aligned the same
    way; ``()`` until the call's last step forms them) and the :class:`Checks`, packed.

    Nothing in it is the size of the sums until a batch has run: the initial state is a
    few scalars, so holding it costs no memory (GPT-2 base: no 1 GB of float64 zeros)."""
    totals: tuple
    examples: tf.Tensor
    means: tuple
    checks: tf.Tensor         # Checks.pack()


def initial_state(num_id_layers=0):
    """The state before a call's first batch (``num_id_layers``: the Embedding layers
    whose ids are counted, :class:`IdGuard`)."""
    return FisherState((), tf.constant(0.0, tf.float64), (),
                       tf.constant([np.inf, -np.inf, 1.0] + [0.0] * num_id_layers, tf.float32))


def _checks(batch, state, finite=None):
    """``state``'s packed checks with ``batch``'s output range and id counts added
    (``finite``, when given, replaces the flag)."""
    checks, batch_range = Checks.unpack(state.checks), batch.output_range
    out_range = tf.stack([tf.minimum(checks.output_range[0], batch_range[0]),
                          tf.maximum(checks.output_range[1], batch_range[1])])
    bad_ids = checks.bad_ids + tf.stack(batch.bad_ids) if batch.bad_ids else checks.bad_ids
    return Checks(out_range, checks.finite if finite is None else finite, bad_ids).pack()


# Sums of at most this many floats are checked for finiteness together (:func:`all_finite`),
# and folded into float64 together (:func:`fold`).
FINITE_TOGETHER_FLOATS = 2**16


def all_finite(means, gram=()):
    """Whether every mean is finite, a Gram matrix's (``gram[i]``, e.g. a Kronecker factor
    A = Σ_r c_r x_r x_rᵀ with c_r ≥ 0) checked on its diagonal alone: a pass over d'
    floats, not d'² (the reference CNN's 9217² A: 85M).  Sound: a non-finite x_ri makes
    A_ii = Σ_r c_r x_ri² non-finite (inf or NaN, and no later term brings it back); with
    every x finite, |x_ri x_rj| ≤ max(x_ri², x_rj²), so a product that overflows makes a
    diagonal entry overflow too, and |A_ij| ≤ √(A_ii A_jj) (Cauchy–Schwarz, also for each
    partial sum of the matmul) bounds the off-diagonal sums by the diagonal's.  The one
    gap is rounding: an off-diagonal entry could round past float32's maximum (3.4e38)
    only where a diagonal entry lies within a factor 1 + rows · 2⁻²⁴ of it.  The same holds
    for a float64 total cast to float32 (:func:`finish`).  Other means are checked whole.

    What is checked (each mean, or its diagonal) is, when small (at most
    ``FINITE_TOGETHER_FLOATS`` floats), concatenated with the other small ones and checked
    in ONE reduction; a large one alone (concatenating it would copy it).  Compiled with
    XLA every reduction is kernels of its own (is-finite, reduce), and kernels are what
    XLA's CPU code generation spends a first call on (GPT-2's 199 sums: README, "First
    call ÷ floor's first call on GPT-2")."""
    flags = tuple(gram) + (False,) * (len(means) - len(gram))
    checked = [tf.linalg.diag_part(m) if g else m for m, g in zip(means, flags)]

    def small(m):
        return m.shape.num_elements() is not None and m.shape.num_elements() <= FINITE_TOGETHER_FLOATS
    together = [tf.reshape(m, [-1]) for m in checked if small(m)]
    parts = ([tf.concat(together, 0)] if together else []) + [m for m in checked if not small(m)]
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(p)) for p in parts]))


# How a call turns batches' float32 sums (:class:`BatchSums`) into its means.  Measured
# (float32 sums of 256 squared normal gradients per batch, entries spread over e^±9, max
# relative error of the mean against a float64 NumPy reference): one batch 1.0e-6, the
# float32 sum's own rounding; accumulated over B batches in float64 the error stays there
# or below (B = 1024: 7.6e-8); accumulated in float32 it is 2x float64's from B = 16 and
# grows as B * 2^-24 past B ~ 256 (B = 1024: 2.1e-6).  Hence: a one-batch call never
# touches float64 (:func:`mean`: sums / count, in the batch's compiled function); a call of
# several batches folds each into float64 totals (:func:`fold`: the small sums in one flat
# vector, each large sum alone, so no large sum is copied)
# and forms the mean once (:func:`finish`).  Either way the mean is within the float32
# rounding of ONE batch's sums (rows * 2^-24 at worst, ~1e-6 measured) of the exact mean,
# whatever the number of batches.
def mean(batch, count, state, *, scaled=(), gram=()):
    """A one-batch call's final state: the means sums / count in float32 (no float64: one
    rounding of the division on top of the sums' own) and ``checks.finite``
    (:func:`all_finite`, ``gram`` per sum).  ``scaled`` (per sum, aligned with the
    flattened sums; missing entries False): the sums that came already times 1/count
    (:attr:`fastewc.blocks.base.Block.scales_sums`), the means as they are: no pass."""
    n = tf.cast(count, tf.float32)
    flags = tuple(scaled) + (False,) * len(tf.nest.flatten(batch.sums))
    means = tuple(s if done else s / n for s, done in zip(tf.nest.flatten(batch.sums), flags))
    return FisherState((), state.examples + tf.cast(count, tf.float64), means,
                       _checks(batch, state, all_finite(means, gram)))


def _together(shape):
    """Whether a sum of ``shape`` is small enough (at most ``FINITE_TOGETHER_FLOATS``
    floats) to be folded, and checked, with the other small ones in one flat vector."""
    size = tf.TensorShape(shape).num_elements()
    return size is not None and size <= FINITE_TOGETHER_FLOATS


def fold_zeros(shapes):
    """The totals before a call's first :func:`fold` for a plan of sums of ``shapes``: one
    float64 scalar zero per total (the small sums' flat vector, each large sum), which the
    fold's additions broadcast: nothing the size of the sums is allocated."""
    small = any(_together(shape) for shape in shapes)
    return (tf.constant(0.0, tf.float64),) * (int(small) + sum(not _together(shape) for shape in shapes))


def fold(batch, count, state):
    """Add a batch's float32 sums into the state's float64 totals (starting from
    :func:`fold_zeros`): the small sums (:func:`_together`) concatenated into ONE flat
    total, each large sum into its own.  The traced step is then a few ops per sum (a
    reshape) rather than a cast and an addition per sum, and its trace and instantiation
    are what a call of several batches adds to its first call (ResNet50: 320 sums).  A
    fold allocates one float64 copy of each total (the cast, into which the addition
    writes) and, for the small sums, their float32 concatenation, while the previous
    totals are alive: about 8 bytes per float above the 8 of the totals."""
    sums, flat = tf.nest.flatten(batch.sums), tf.constant([-1])     # one shape for every reshape
    small = [tf.reshape(s, flat) for s in sums if _together(s.shape)]
    parts = ([tf.concat(small, 0)] if small else []) + [s for s in sums if not _together(s.shape)]
    totals = tuple(t + tf.cast(p, tf.float64) for t, p in zip(state.totals, parts))
    return FisherState(totals, state.examples + tf.cast(count, tf.float64), (), _checks(batch, state))


def finish(state, *, shapes, gram=()):
    """A folded state's means = totals / examples (float64 division, then float32), split
    back into the sums of ``shapes`` (the plan's, in :func:`fold`'s layout), and
    ``checks.finite`` (:func:`all_finite`: the small sums' flat vector whole, each large
    sum as ``gram`` says): once per call of several batches.  The totals are dropped."""
    flags = tuple(gram) + (False,) * len(shapes)
    parts = [tf.cast(t / state.examples, tf.float32) for t in state.totals]
    together = [shape for shape in shapes if _together(shape)]
    large = iter(parts[1:] if together else parts)
    if together:
        pieces = iter(tf.split(parts[0], [tf.TensorShape(shape).num_elements() for shape in together]))
    means = tuple(tf.reshape(next(pieces), shape) if _together(shape) else next(large) for shape in shapes)
    alone = [(m, g) for m, g, shape in zip(means, flags, shapes) if not _together(shape)]
    checked, checked_gram = ([parts[0]], [False]) if together else ([], [])
    finite = all_finite(checked + [m for m, _ in alone], checked_gram + [g for _, g in alone])
    checks = Checks.unpack(state.checks)._replace(finite=finite).pack()
    return FisherState((), state.examples, means, checks)


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


def drawn_noise(likelihood, noise, num_samples, rows, out_tail):
    """The sampled kind's noise for a batch of ``rows`` rows: ``noise`` itself, or where it
    is the int32 seed [seed, batch index] (an engine that :attr:`Engine.draws_noise`) the
    draw :meth:`fastewc.likelihood.Likelihood.noise` makes from it, of the shape the
    estimator draws outside (``num_samples``, rows, *out_tail) (a graph without XLA runs
    the eager kernels: the same numbers)."""
    if not noise.dtype.is_integer:
        return noise
    return likelihood.noise(noise, num_samples, [int(rows)] + list(out_tail))


def folded_weights(u, w):
    """(U·√W, 1) for the cotangents U (K, N, *out) and their weights W (K, N) ≥ 0 (the
    likelihood's p, 1/num_samples or 1, times the 0/1 row mask).  Every sum a factored
    rule forms is Σ_kn w_kn q(δ_kn) for a quadratic q of the deltas (a diagonal's
    g_kn², a Kronecker factor's δ δᵀ; g_kn is linear in δ_kn), and δ_kn is linear in
    U_kn, so w q(δ(U)) = q(δ(√w U)): with √W folded into the cotangents the rules
    receive unit weights, statically 1 (:func:`fastewc.contract.unit_weights`), and
    the weighting is one pass over U (K·N·out floats) instead of one over each
    layer's deltas (K·N·probe floats: the reference CNN's second convolution, exact,
    9 · 256 · 36 864)."""
    root = tf.reshape(tf.sqrt(w), static_or_dynamic_shape(w) + [1] * (u.shape.rank - 2))
    ones = tf.ones(w.shape if w.shape.is_fully_defined() else tf.shape(w), tf.float32)
    return u * root, ones


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
    scales_sums = False         # True: batch_sums takes scale= (its kinds' sums times it)
    in_graph_noise = False      # True: draws_noise where the function is not compiled by XLA

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
        self._function = None       # mean(batch_sums(...)): a one-batch call in one dispatch
        self._steps = {}            # mean/fold/finish -> concrete function
        self._concrete = {}         # (rows per batch, alone) -> its concrete function
        self._unoptimized = {}      # id(concrete function) -> called without Grappler
        self._counts = {}           # real rows -> an int32 scalar tensor
        self._sums_function = None  # batch_sums alone: a longer call's, the per-replica function
        self._replicated = {}       # strategy id -> (strategy, replicated function)
        self._start = None          # the state before a call's first batch (start_state)

    @property
    def draws_noise(self):
        """Whether the sampled kind's noise is drawn inside this engine's compiled function,
        from the seed [seed, batch index] (:func:`drawn_noise`), rather than passed in:
        one dispatch per batch fewer.  Only without XLA, whose philox draws are not the
        eager kernels' (the same seed gives other numbers), so that every engine and the
        float64 reference keep seeing the same draws."""
        return self.in_graph_noise and not self.jit_compile and self.kind == "sampled"

    @classmethod
    def default_jit_compile(cls, model, blocks):
        """What ``jit_compile=None`` means for this engine on ``model`` with the plan ``blocks``."""
        return _policy.default_jit_compile(model, xla_capable=cls.xla_capable, xla_on_cpu=blocks.xla_on_cpu)

    def rows_per_call(self, batch_size, num_cotangents, probe_floats, budget):
        return DEFAULT_ROWS if batch_size is None else batch_size

    def batch_sums(self, x, y, mask, noise):
        raise NotImplementedError

    # -- running ----------------------------------------------------------------------
    def start_state(self):
        """The state before a call's first batch (:func:`initial_state`), made once: a few
        immutable scalars, so a call reuses them rather than making two tensors."""
        if self._start is None:
            self._start = initial_state(len(self.id_layers))
        return self._start

    def run(self, batch, noise, state, *, alone=False, distributed=False):
        """``batch`` (a :class:`fastewc.data.Batch`) through the compiled function.
        ``alone``: it is the call's only batch, and the state returned is final (:func:`mean`
        in the same compiled function: no float64, no second dispatch); else its sums are
        folded into the state's float64 totals (:func:`fold`) and :meth:`finish` forms the
        means.  ``distributed``: a strategy with more than one replica is in scope."""
        count = self._counts.get(batch.count)
        if count is None:
            count = self._counts[batch.count] = tf.constant(batch.count, tf.int32)
        if distributed:
            from fastewc import distribute   # rows split over replicas, sums all-reduced
            sums = distribute.run_fisher_batch(self._replicated, self._traced_sums(),
                                               batch.x, batch.y, batch.mask, noise)
            return self._step(mean if alone else fold, sums, count, state)
        if alone:
            args = (batch.x, batch.y, batch.mask, noise, count, state)
            concrete = self._concrete_for(args, alone=True)
            with self._call_options(concrete):
                return FisherState(*compat.call_concrete(concrete, args))
        args = (batch.x, batch.y, batch.mask, noise)
        concrete = self._concrete_for(args, alone=False)
        with self._call_options(concrete):
            sums = BatchSums(*compat.call_concrete(concrete, args))
        return self._step(fold, sums, count, state)

    def finish(self, state):
        """The final state of a call: ``state`` itself where its means are formed (a
        one-batch call), else :func:`finish`'s."""
        return state if state.means or not state.totals else self._step(finish, state)

    def _step(self, fn, *args):
        """``fn(*args)`` for :func:`mean`, :func:`fold` or :func:`finish` on batch sums
        that another function formed: one concrete function per engine and step, called
        with its flat inputs like :meth:`run` (no XLA: a few passes over the sums, not worth
        a compile; no Grappler: casts, reshapes and additions leave it nothing to do, and
        its pass was a third of the fold's first call).  A call's first fold passes float64
        scalar zeros as its totals (:func:`fold_zeros`: nothing the size of the sums), so
        that every fold runs one function, traced with the totals' shapes left open."""
        if fn is fold and not args[-1].totals:
            args = args[:-1] + (args[-1]._replace(totals=fold_zeros(self.blocks.shapes)),)
        concrete = self._step_function(fn, args)
        with compat.without_graph_optimizer():
            return FisherState(*compat.call_concrete(concrete, args))

    def _step_function(self, fn, args):
        """The concrete function :meth:`_step` calls for ``fn`` on ``args`` (traced once)."""
        concrete = self._steps.get(fn.__name__)
        if concrete is None:
            if fn is fold:       # the totals' shapes left open: the first fold's are scalars
                state = args[-1]
                args = args[:-1] + (state._replace(totals=tuple(
                    tf.TensorSpec(None, tf.float64) for _ in state.totals)),)
                step = fold
            elif fn is finish:
                step = functools.partial(finish, shapes=self.blocks.shapes, gram=self.blocks.gram)
            else:
                step = functools.partial(fn, gram=self.blocks.gram)
            concrete = self._steps[fn.__name__] = tf.function(step, autograph=False, jit_compile=False) \
                .get_concrete_function(*args)
        return concrete

    def _call_options(self, concrete):
        """The call options of a compiled function, the same on every call of it: Grappler
        off where :func:`fastewc._policy.skip_graph_optimizer` says for its graph."""
        key = id(concrete)
        if key not in self._unoptimized:
            self._unoptimized[key] = _policy.skip_graph_optimizer(concrete.graph)
        if self._unoptimized[key]:
            return compat.without_graph_optimizer()
        return contextlib.nullcontext()

    def trace(self, batch, noise, state, *, alone=False):
        """Trace (without running) the compiled function ``run`` would call for ``batch``:
        where a model the engine cannot take fails (pfor without a converter, an op that
        has no graph form).  A no-op for engines that run eagerly."""
        if alone:
            self._concrete_for((batch.x, batch.y, batch.mask, noise, tf.constant(batch.count, tf.int32), state),
                               alone=True)
        else:
            self._concrete_for((batch.x, batch.y, batch.mask, noise), alone=False)

    def _concrete_for(self, args, *, alone):
        # The concrete function of this batch size, called directly with its flat inputs:
        # the polymorphic dispatch and the argument binding are host time on every call.
        # Within a plan only the rows vary (inputs, labels, noise and state are fixed by
        # it); a one-batch call runs sums and mean in one function, a longer one the sums.
        key = (int(args[2].shape[0]), alone)
        concrete = self._concrete.get(key)
        if concrete is None:
            with compat.release_custom_gradients_with(self) as graphs:
                function = self._compiled() if alone else self._traced_sums()
                concrete = function.get_concrete_function(*args)
                graphs.append(concrete.graph)
            self._concrete[key] = concrete
        return concrete

    def _compiled(self):
        """sums and :func:`mean` in one function: a one-batch call's.  An engine that
        ``scales_sums`` asks its sums times 1/count (``batch_sums(..., scale=)``): the
        blocks whose kind scales them (:attr:`fastewc.blocks.BlockPlan.scaled`) return
        their means, and no pass divides them."""
        if self._function is None:
            sums, gram = self.batch_sums, self.blocks.gram
            scaled = self.blocks.scaled if self.scales_sums else ()

            def call(x, y, mask, noise, count, state):
                if not any(scaled):
                    return mean(sums(x, y, mask, noise), count, state, gram=gram)
                scale = 1.0 / tf.cast(count, tf.float32)
                return mean(sums(x, y, mask, noise, scale=scale), count, state, scaled=scaled, gram=gram)
            self._function = tf.function(call, jit_compile=self.jit_compile, reduce_retracing=True,
                                         autograph=False)
        return self._function

    def _traced_sums(self):
        """The batch sums alone, compiled: each batch of a longer call, and the per-replica
        function under a strategy."""
        if self._sums_function is None:
            self._sums_function = tf.function(
                self.batch_sums, jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)
        return self._sums_function

    def tracing_count(self):
        """Traces of this engine's per-batch compiled functions (a no-retrace check for
        tests); the small :meth:`_step` functions are traced once per engine and not counted."""
        fns = (self._function, self._sums_function)
        return sum(fn.experimental_get_tracing_count() for fn in fns if fn is not None)
