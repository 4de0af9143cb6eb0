"""Diagonal Fisher information of a Keras model, per example and exact.

    F_i = (1/N) Σ_n E_{y ~ q_n} [ (∂ℓ(y, x_n; θ)/∂θ_i)² ]

the MEAN over the N examples of per-example squared gradients — never the square of a
mini-batch mean gradient (that "batched" shortcut underestimates F by up to a factor N).
ℓ is the negative log-likelihood of the loss's model (see :mod:`fastewc.likelihood`) and
q_n is the true label (``empirical``), ``num_samples`` draws from p(·|x_n) (``sampled``) or
the full predictive distribution (``exact``).  The model runs with ``training=False``
(BatchNormalization and Dropout in inference mode): batch-dependent layers would make
per-example gradients meaningless.

All methods compute the same quantity from the same output cotangents ``(U, W)``; they
differ in how they get J_nᵀ U_kn squared and summed (P = parameters, N = examples,
K = cotangents per example):

| method     | how                                                        | cost               |
|------------|------------------------------------------------------------|--------------------|
| loop       | eager, one GradientTape per example (baseline and oracle)  | N·K eager passes   |
| vmap       | ``tf.vectorized_map`` over (example, cotangent) pairs,     | N·K passes, vector-|
|            | ``fallback_to_while_loop=False``, chunked to ≤ 2²⁶ floats  | ized; chunk·P mem  |
| jacobian   | ``GradientTape.jacobian`` of N·K linearised losses, chunked| as vmap, slower    |
| factored   | per-layer rules (:mod:`fastewc.registry`) on the δ from ONE| 1 forward + K      |
|            | forward pass and K back-propagated cotangents              | backward, no N·P   |
| auto       | factored when every weighted layer has a rule, else vmap   |                    |

Streaming: examples go through in fixed-size batches (:mod:`fastewc.data`); per-batch
sums are accumulated in float64, so memory is O(P) whatever N, and no float32 drift
builds up over many batches.  Each batch runs one compiled function, traced once for a
given model, loss, kind, method and batch shape, and reused across calls.

Mixed precision: the model may compute in float16 or bfloat16; the Fisher is float32.
Cotangents are multiplied by 2⁸ before a float16 backward pass and the gradients divided
by it in float32 before squaring (a static loss scale against underflow).
"""
import weakref
import warnings

import keras
import numpy as np
import tensorflow as tf

from fastewc import capture as capture_lib
from fastewc import data as data_lib
from fastewc import likelihood as likelihood_lib
from fastewc import pooling
from fastewc._checks import check_one_of, check_positive_int, check_seed
from fastewc._layers import has_convolution

METHODS = ("auto", "loop", "vmap", "jacobian", "factored")
VMAP_CHUNK_FLOATS = 2**26          # per-example gradients held at once by vmap/jacobian
FACTORED_MAX_ROWS = 4096           # float32 sums over one call drift like rows·2⁻²⁴: ≤ 5e-7 here
FACTORED_CHUNK_FLOATS = 2**24      # K · rows · probe size: the factored deltas of one call
FLOAT16_COTANGENT_SCALE = 2.0**8

_ENGINES = weakref.WeakKeyDictionary()   # model -> {key: compiled batch function}
_CONCRETE = weakref.WeakKeyDictionary()   # compiled function -> {arg shapes: concrete function}
_PROBE_FLOATS = weakref.WeakKeyDictionary()   # model -> {input signature: probe floats}
_WARNED = set()


def fisher_diagonal(model, data, *, loss, kind="empirical", method="auto", batch_size=256,
                    num_samples=1, seed=None, jit_compile=None, verbose=0):
    """Diagonal Fisher of ``model`` over ``data``: a list of float32 tensors, one per
    ``model.trainable_variables`` entry, with the same shapes.

    Args:
      model: a built Keras 3 model (Sequential, functional or subclassed).
      data: ``(x, y)`` arrays/tensors, or a ``tf.data.Dataset`` yielding ``(x, y)`` batches.
      loss: Keras loss name or object: sparse/categorical/binary cross-entropy
        (``from_logits`` honoured) or ``"mse"`` (unit-variance Gaussian).
      kind: ``"empirical"`` (true labels), ``"sampled"`` (``num_samples`` labels drawn from
        the model per example) or ``"exact"`` (full expectation over the outcomes).
      method: ``"auto"``, ``"factored"``, ``"vmap"``, ``"jacobian"`` or ``"loop"``.
      batch_size: examples per compiled step (memory, not result: the result is the mean
        over all examples whatever the batching).
      num_samples: draws per example for ``kind="sampled"``.
      seed: int for reproducible sampled labels (same seed and batch_size, same result).
      jit_compile: XLA on/off; None picks the faster measured default for the device.
      verbose: 0 silent, 1 a progress bar and the method chosen.

    Returns:
      list of float32 ``tf.Tensor``: F = (1/N) Σ_n E_y[g_n(y)²] for each variable.
    """
    check_one_of("kind", kind, likelihood_lib.KINDS)
    check_one_of("method", method, METHODS)
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_samples", num_samples)
    seed = check_seed(seed)
    if jit_compile not in (None, True, False):
        raise ValueError(f"`jit_compile` must be None, True or False. Received: jit_compile={jit_compile!r}")
    if verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 0, 1 or 2. Received: verbose={verbose!r}")
    lik = likelihood_lib.resolve_loss(loss)
    variables = _trainable_variables(model)
    if kind != "sampled":
        num_samples = 1
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))

    chosen = _choose_method(model, method)
    if verbose:
        print(f"fastewc.fisher_diagonal: kind={kind!r}, method={method!r} -> {chosen!r}")
    jit_arg = jit_compile
    if jit_compile is None:
        jit_compile = default_jit_compile(model, chosen)

    first_x = _first_x(data)
    cast_inputs = _input_caster(model, first_x, isinstance(data, tf.data.Dataset))
    x1 = cast_inputs(first_x)
    out_tail = _output_tail(model, x1)
    out_dim = out_tail[-1]
    probe_floats = _probe_floats(model, x1) if chosen == "factored" else None
    batch_size = rows_per_call(chosen, variables, lik.num_cotangents(kind, num_samples, out_tail),
                               batch_size, probe_floats=probe_floats)
    n_known = data_lib.num_examples(data)
    state = _initial_state(variables)
    count = 0
    progbar = None
    if verbose:
        steps = None if n_known is None else -(-n_known // data_lib.rows_per_batch(batch_size, n_known))
        progbar = keras.utils.Progbar(steps, verbose=verbose, unit_name="batch")

    for batch in data_lib.iterate(data, batch_size):
        y = tf.convert_to_tensor(lik.check_labels(batch.y.numpy(), out_dim, out_tail=out_tail))
        x = cast_inputs(batch.x)
        seed_t = tf.constant([seed, batch.index], tf.int32)
        # Noise is drawn here, eagerly: XLA's stateless RNG gives other numbers than the
        # eager one, and every method must see the same draws.
        noise = (_noise(lik, seed_t, num_samples, tuple([int(batch.mask.shape[0])] + out_tail))
                 if kind == "sampled" else _no_noise())
        try:
            state = _run_batch(model, lik, kind, chosen, num_samples, jit_compile, x, y,
                               batch.mask, noise, batch.count, state)
        except capture_lib.SharedLayerError as err:
            if method != "auto":
                raise
            _warn_once(("auto-shared", model.name), f"fastewc: {err} method='auto' uses 'vmap'.")
            chosen = "vmap"
            jit_compile = default_jit_compile(model, chosen) if jit_arg is None else jit_arg
            state = _run_batch(model, lik, kind, chosen, num_samples, jit_compile, x, y,
                               batch.mask, noise, batch.count, state)
        except TypeError as err:
            dtypes = [t.dtype.name for t in tf.nest.flatten(x)]
            if all(tf.as_dtype(d).is_floating for d in dtypes) or getattr(model, "inputs", None):
                raise                       # not an undeclared integer input: not about `data`
            raise TypeError(
                f"`data` inputs of dtype {dtypes} could not go through model '{model.name}' "
                f"with method={chosen!r}. A model without a declared Input gets integer and bool "
                f"inputs unchanged: cast x to float if its first layer expects floats. Error: {err}") from err
        if progbar is not None:
            progbar.add(1)
    _, out_range, _, fisher, finite = state
    lik.check_output_range(*out_range.numpy().tolist())     # the one host sync per call
    if not all(finite.numpy()):
        _raise_not_finite(model, variables, fisher, finite.numpy().tolist(), data)
    return fisher


# -- choosing -------------------------------------------------------------------------
def _trainable_variables(model):
    if not isinstance(model, keras.Model) and not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model. Received: model of type {type(model).__name__}")
    if not model.built:
        raise ValueError(
            f"`model` '{model.name}' is not built: call it on a batch or build it with an "
            "input shape first. Received: an unbuilt model")
    variables = model.trainable_variables
    if not variables:
        raise ValueError(f"`model` '{model.name}' has no trainable variables, so it has no Fisher. "
                         "Received: a model with 0 trainable variables")
    return variables


def _warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def _choose_method(model, method):
    if method != "auto":
        return method
    missing = capture_lib.layers_without_rule(model)
    if not missing:
        return "factored"
    names = ", ".join(f"'{layer.name}' ({type(layer).__name__})" for layer in missing)
    _warn_once(("auto-vmap", tuple(type(layer).__name__ for layer in missing)),
               f"fastewc: no factored Fisher rule for {names}; method='auto' uses 'vmap' "
               "(per-example vectorized gradients) for this model.")
    return "vmap"


def default_jit_compile(model, method):
    """The faster measured XLA setting (benchmarks/bench_fisher.py).

    On GPU: XLA.  On CPU: XLA for dense-only models with the factored and vmap methods;
    no XLA for convolutions (slower on CPU) nor for ``jacobian`` (open XLA bugs).
    """
    if method in ("loop", "jacobian"):
        return False
    if tf.config.list_physical_devices("GPU"):
        return True
    return not has_convolution(model)


def _first_x(data):
    """A one-example slice of ``data``'s inputs, for the output shape (validates ``data``)."""
    if isinstance(data, tf.data.Dataset):
        data_lib.check_dataset(data)
        for x, _ in data.take(1):
            return tf.nest.map_structure(lambda t: t[:1], x)
        raise ValueError("`data` is empty: expected at least one example. Received: a dataset with 0 examples")
    data_lib.num_examples(data)
    return tf.nest.map_structure(lambda t: tf.convert_to_tensor(t[:1]), data[0])


def _output_tail(model, x):
    """The model output's shape without the batch dimension, as a list of ints."""
    shape = getattr(model, "output_shape", None)
    if isinstance(shape, tuple) and shape and all(isinstance(d, int) for d in shape[1:]):
        return list(shape[1:])
    try:
        spec = model.compute_output_spec(tf.nest.map_structure(lambda t: keras.KerasTensor(t.shape, t.dtype), x))
    except (ValueError, TypeError) as err:
        shapes = [tuple(t.shape[1:]) for t in tf.nest.flatten(x)]
        raise ValueError(f"`data` inputs do not fit model '{model.name}'. Received: x with per-example "
                         f"shapes {shapes}. The model said: {err}") from err
    return list(spec.shape[1:])


def _input_caster(model, x, from_dataset):
    """Check the inputs ``x`` (a one-example slice) against ``model`` and return the cast
    applied to every batch, as Keras' ``fit``/``predict`` do: to the dtype of the model's
    declared ``Input`` (functional and Sequential models), else floating inputs of another
    precision (float64, float16) to ``keras.config.floatx()``; integers and bools pass
    unchanged.  Strings and complex numbers raise a TypeError; an input whose per-example
    shape does not match the declared one raises a ValueError, both naming ``data``."""
    leaves = tf.nest.flatten(x)
    for t in leaves:
        if not (t.dtype.is_floating or t.dtype.is_integer or t.dtype.is_bool):
            raise TypeError("`data` inputs must be real numbers (floating point, integer or bool). "
                            f"Received: x of dtype {t.dtype.name}")
    declared = list(getattr(model, "inputs", None) or []) if isinstance(model, keras.Model) else []
    if declared and len(declared) == len(leaves) and not isinstance(x, dict):
        targets = []
        for t, ref in zip(leaves, declared):
            shape, want = tuple(t.shape[1:]), tuple(ref.shape[1:])
            if len(shape) == len(want) + 1 and shape and shape[-1] == 1:
                shape = shape[:-1]                 # Keras squeezes a trailing 1 ...
            elif len(shape) == len(want) - 1 and want and want[-1] == 1:
                shape = shape + (1,)               # ... or adds one
            if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
                hint = (" A tf.data.Dataset must yield batches: call .batch(n) on a dataset of single "
                        "examples." if from_dataset and len(t.shape) < len(ref.shape) else "")
                raise ValueError(
                    f"`data` inputs do not fit model '{model.name}': expected x with per-example "
                    f"shape {want} (model input shape {tuple(ref.shape)}). Received: x with "
                    f"per-example shape {tuple(t.shape[1:])}.{hint}")
            targets.append(tf.as_dtype(ref.dtype))
    else:
        floatx = tf.as_dtype(keras.config.floatx())
        targets = [floatx if t.dtype.is_floating else None for t in leaves]

    def cast(x):
        flat = [t if d is None or t.dtype == d else tf.cast(t, d)
                for t, d in zip(tf.nest.flatten(x), targets)]
        return tf.nest.pack_sequence_as(x, flat)

    return cast


def _inputs_finite(data):
    """Whether every float input of ``data`` is finite (only asked once F is not)."""
    batches = data if isinstance(data, tf.data.Dataset) else [data]
    for x, _ in batches:
        for t in tf.nest.flatten(x):
            t = tf.convert_to_tensor(t)
            if t.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(t))):
                return False
    return True


def _raise_not_finite(model, variables, fisher, finite, data):
    """A non-finite Fisher raises, naming the variable and the likely cause."""
    i = finite.index(False)
    bad = int(tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(fisher[i])), tf.int32)))
    weights = [getattr(v, "path", v.name) for v in model.variables
               if tf.as_dtype(v.dtype).is_floating and not bool(tf.reduce_all(tf.math.is_finite(v)))] \
        if hasattr(model, "variables") else []
    if weights:
        cause = f"the `model` weights {weights} contain NaN or Inf"
    elif not _inputs_finite(data):
        cause = "the `data` inputs (x) contain NaN or Inf"
    else:
        cause = "the per-example gradients overflowed float32: check the scale of `data` and of the `model` weights"
    raise ValueError(
        f"The Fisher of variable '{getattr(variables[i], 'path', variables[i].name)}' is not finite "
        f"({bad} of {int(np.prod(fisher[i].shape))} entries are NaN or Inf): {cause}.")


# -- per-batch computation --------------------------------------------------------------
def _run_batch(model, lik, kind, method, num_samples, jit, x, y, mask, noise, count, state):
    """One batch through the compiled function of (model, loss, kind, method); returns the
    new accumulation state (see :func:`_fold`)."""
    count_t = tf.constant(count, tf.int32)
    if method == "loop":
        return _fold_compiled(_loop_batch(model, lik, kind, x, y, noise, count), count_t, state)
    engines = _ENGINES.setdefault(model, {})
    # The variable identities are part of the key: a model that gained a head since the
    # last call needs a new function (the traced one returns the old variable list).
    # Input ranks and dtypes too: one function per input signature, so that
    # reduce_retracing never relaxes x to an unknown rank (which Keras models reject).
    key = (lik.key, kind, method, num_samples, jit, tuple(id(v) for v in model.trainable_variables),
           tuple((t.shape.rank, t.dtype.name) for t in tf.nest.flatten(x)))
    distributed = tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1
    key = key + (distributed,)
    fn = engines.get(key)
    if fn is None:
        if method == "factored":
            batch_sums = _factored_body(model, lik, kind, num_samples, unroll=not jit)
        else:
            body = {"vmap": _vmap_body, "jacobian": _jacobian_body}[method]
            batch_sums = body(model, lik, kind, num_samples)
        if distributed:   # the per-replica sums are all-reduced outside, then folded
            fn = tf.function(batch_sums, jit_compile=jit, reduce_retracing=True, autograph=False)
        else:
            fn = tf.function(lambda x, y, mask, noise, count, state: _fold(batch_sums(x, y, mask, noise), count, state),
                             jit_compile=jit, reduce_retracing=True, autograph=False)
        engines[key] = fn
    if distributed:
        from fastewc import distribute  # rows split over replicas, sums all-reduced
        return _fold_compiled(distribute.run_fisher_batch(fn, x, y, mask, noise), count_t, state)
    # The concrete function of this exact signature, called directly: the polymorphic
    # dispatch (type canonicalisation and subtype lookup of ~20 arguments) cost 0.7 ms
    # of host time per call (measured: 3.4 -> 2.7 ms for the whole reference-MLP call on
    # 8 examples), a tenth of the reference MLP's whole Fisher.
    args = (x, y, mask, noise, count_t, state)
    signature = tuple((tuple(t.shape), t.dtype) for t in tf.nest.flatten(args))
    concretes = _CONCRETE.setdefault(fn, {})
    concrete = concretes.get(signature)
    if concrete is None:
        concrete = concretes[signature] = fn.get_concrete_function(*args)
    return concrete(*args)


def tracing_count(model):
    """Total traces of the compiled Fisher functions cached for ``model`` (for tests)."""
    return sum(fn.experimental_get_tracing_count() for fn in _ENGINES.get(model, {}).values())


def _scale_for(dtype):
    return FLOAT16_COTANGENT_SCALE if dtype == tf.float16 else 1.0


def _weighted_cotangents(lik, kind, out, y, mask, noise):
    u, w = lik.cotangents(out, y, kind, noise if kind == "sampled" else None)
    return u, w * mask[None]


def _output_range(out):
    """(min, max) of the model output, checked once at the end (no per-batch sync)."""
    out = tf.cast(out, tf.float32)
    return tf.stack([tf.reduce_min(out), tf.reduce_max(out)])


_NOISE_FUNCTIONS = {}


def _no_noise():
    """The empty noise tensor, made on first use: a tensor made at import time would
    initialize the TF runtime and forbid users to configure devices after importing us."""
    if "none" not in _NOISE_FUNCTIONS:
        _NOISE_FUNCTIONS["none"] = tf.zeros([0])
    return _NOISE_FUNCTIONS["none"]


def _noise(lik, seed_t, num_samples, shape):
    """``lik.noise`` in one dispatch: a tf.function WITHOUT XLA runs the same kernels as
    eager mode, so the draws are identical to the documented eager ones."""
    key = (lik.key, num_samples, shape)
    fn = _NOISE_FUNCTIONS.get(key)
    if fn is None:
        fn = _NOISE_FUNCTIONS[key] = tf.function(
            lambda seed: lik.noise(seed, num_samples, list(shape)), jit_compile=False, autograph=False)
    return fn(seed_t)


_INITIAL_STATES = {}


def _initial_state(variables):
    """(float64 totals, output (min, max), examples so far, Fisher, finite flags).

    Cached per list of shapes (tensors are immutable): making 2·len(variables) eager
    zeros per call cost 2.3 ms on the reference MLP, a quarter of the whole Fisher.
    """
    key = tuple(tuple(v.shape) for v in variables)
    state = _INITIAL_STATES.get(key)
    if state is None:
        state = _INITIAL_STATES[key] = (
            [tf.zeros(shape, tf.float64) for shape in key], tf.constant([np.inf, -np.inf], tf.float32),
            tf.constant(0.0, tf.float64), [tf.zeros(shape, tf.float32) for shape in key],
            tf.ones([len(key)], tf.bool))
    return state


def _fold(batch, count, state):
    """Add a batch's float32 sums (and output range) into the float64 state and return the
    running mean: done inside the batch's compiled function, so a call costs one dispatch
    per batch and one host sync in all (no eager op per variable)."""
    total, out_range, seen, _, _ = state
    *sums, batch_range = batch
    total = [t + tf.cast(s, tf.float64) for t, s in zip(total, sums)]
    out_range = tf.stack([tf.minimum(out_range[0], batch_range[0]), tf.maximum(out_range[1], batch_range[1])])
    seen = seen + tf.cast(count, tf.float64)
    fisher = [tf.cast(t / seen, tf.float32) for t in total]
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(f)) for f in fisher])
    return total, out_range, seen, fisher, finite


_fold_compiled = tf.function(_fold, autograph=False, reduce_retracing=True)


def _forward_and_cotangents(model, lik, kind, x, y, mask, noise):
    """One batched forward pass, then the weighted cotangents with the float16 scale
    applied: (out, scale·U, W, scale)."""
    out = model(x, training=False)
    u, w = _weighted_cotangents(lik, kind, out, y, mask, noise)
    scale = _scale_for(out.dtype)
    return out, u * scale, w, scale


def _zeros_if_none(grads, variables):
    # Embedding gradients are IndexedSlices: densify them (one row per id) before squaring.
    return [tf.zeros(v.shape, tf.float32) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, variables)]


# Up to this many cotangents per example the factored backward pass is unrolled in Python
# (K graph copies of the backward pass); above it, one ``tf.vectorized_map``.
_MAX_UNROLLED_COTANGENTS = 16


def _cotangent_deltas(tape, out, probes, u, *, unroll=True):
    """∂⟨u_k, out⟩/∂probe for each of the K cotangents ``u`` (K, *out.shape): for each
    probe a (K, *probe.shape) tensor, or None where the probe does not reach ``out``.

    Without XLA (``unroll``), K ≤ 16 (``exact`` up to 17 classes, ``sampled`` with few
    draws) is unrolled: K backward passes over the batch measured faster than one
    ``vectorized_map`` on the reference CNN (1.45 s vs 1.66 s, exact, 256 examples), and
    they need no pfor converter.  Under XLA one ``vectorized_map`` measured a little
    faster (reference MLP, exact: 13.3 vs 14.5 ms), so it is kept there."""
    k = u.shape[0]
    if k == 1 or (unroll and k is not None and k <= _MAX_UNROLLED_COTANGENTS):
        per_k = [tape.gradient(out, probes, output_gradients=u[i]) for i in range(k)]
        return [None if per_probe[0] is None else tf.stack(per_probe)
                for per_probe in zip(*per_k)]
    return tf.vectorized_map(lambda uk: tape.gradient(out, probes, output_gradients=uk), u,
                             fallback_to_while_loop=False)


def _factored_body(model, lik, kind, num_samples, *, unroll=True):
    variables = model.trainable_variables

    def batch_sums(x, y, mask, noise):
        with tf.name_scope("fastewc/fisher"):
            with capture_lib.capture(model) as recorder:
                with tf.GradientTape(persistent=True) as tape:
                    out = model(x, training=False)
            u, w = _weighted_cotangents(lik, kind, out, y, mask, noise)
            scale = _scale_for(out.dtype)
            u = tf.cast(u * scale, out.dtype)
            probes = [probe for _, probe, _ in recorder.records]
            k = u.shape[0]
            recorder.mask_pooling = k is None or k >= pooling.MIN_COTANGENTS
            deltas = _cotangent_deltas(tape, out, probes, u, unroll=unroll)
            del tape
            sums = {}
            for (layer, probe, sum_sq), delta in zip(recorder.records, deltas):
                if delta is None:
                    delta = tf.zeros(tf.concat([[tf.shape(u)[0]], tf.shape(probe)], 0), tf.float32)
                delta = tf.cast(delta, tf.float32) / scale
                for var, value in sum_sq(delta, w):
                    sums[id(var)] = value
            missing = [v.path for v in variables if id(v) not in sums]
            if missing:
                raise ValueError(f"The factored rules returned no value for variables {missing}.")
            return [sums[id(v)] for v in variables] + [_output_range(out)]

    return batch_sums


def _tile_pairs(x, k):
    return tf.nest.map_structure(
        lambda t: tf.tile(t, tf.concat([[k], tf.ones([tf.rank(t) - 1], tf.int32)], 0)), x)


def _probe_floats(model, x):
    """Per-example size of every factored rule's probe (the layer outputs the K cotangents
    are back-propagated to), from one eager example; None if capture fails here (the
    compiled call then raises or falls back with its own, checked message).  Cached per
    model, input signature and variables: the eager forward is paid once."""
    key = (tuple((tuple(t.shape[1:]), t.dtype.name) for t in tf.nest.flatten(x)),
           tuple(id(v) for v in model.trainable_variables))
    cache = _PROBE_FLOATS.setdefault(model, {})
    if key not in cache:
        cache[key] = _measure_probe_floats(model, x)
    return cache[key]


def _measure_probe_floats(model, x):
    try:
        with capture_lib.capture(model) as recorder:
            model(x, training=False)
    except Exception:       # noqa: BLE001 -- an estimate only; errors are reported later
        return None
    return sum(int(np.prod(probe.shape[1:])) for _, probe, _ in recorder.records) or None


def rows_per_call(method, variables, num_cotangents, batch_size, *, probe_floats=None):
    """Examples per compiled call: ``batch_size``, capped for the per-example methods so
    that their per-example gradients stay under ``VMAP_CHUNK_FLOATS`` floats (the streaming
    loop then does the chunking: one vectorized_map or jacobian per call, no unrolling).

    Factored: at most ``FACTORED_MAX_ROWS``, since a rule's float32 contraction over the
    rows of one call is where the rounding error grows (the float64 accumulation takes
    over between calls); and at most ``FACTORED_CHUNK_FLOATS`` floats of deltas,
    K · rows · ``probe_floats``, rounded down to a power of two.  Measured, exact kind:
    the reference CNN (K = 9, 58k probe floats per example) at 16 rows per call took
    1.59 s against 1.88 s at 256, the Transformer block 0.23 s against 0.41 s at 128:
    the big per-call temporaries, not the arithmetic, set the pace there."""
    if method == "factored":
        rows = min(batch_size, FACTORED_MAX_ROWS)
        if probe_floats:
            cap = max(1, FACTORED_CHUNK_FLOATS // (num_cotangents * probe_floats))
            rows = min(rows, 1 << (cap.bit_length() - 1))
        return rows
    if method not in ("vmap", "jacobian"):
        return batch_size
    num_params = sum(int(np.prod(v.shape)) for v in variables)
    pairs = method == "jacobian" or num_cotangents > VMAP_UNROLL_COTANGENTS
    per_example = num_params * (num_cotangents if pairs else 1)
    cap = max(1, VMAP_CHUNK_FLOATS // per_example)
    return min(batch_size, 1 << (cap.bit_length() - 1))      # a power of two: 2^k examples split evenly


VMAP_UNROLL_COTANGENTS = 16        # up to this K, vmap does 1 forward + K backward per example


def _vmap_body(model, lik, kind, num_samples):
    """Per-example gradients with ``tf.vectorized_map`` (no while_loop fallback).

    K ≤ 16 cotangents: one vectorized function per example runs one forward pass and K
    backward passes and returns Σ_k w_k g_k² (P floats per example).  Larger K (many
    classes): (example, cotangent) pairs are vectorized, each with its own forward pass.
    The streaming loop keeps each call under 2²⁶ floats of per-example gradients
    (:func:`rows_per_call`).
    """
    variables = model.trainable_variables

    def squared(grads, scale):
        return [tf.square(tf.cast(g, tf.float32) / scale) for g in _zeros_if_none(grads, variables)]

    def batch_sums(x, y, mask, noise):
        with tf.name_scope("fastewc/fisher"):
            out, u, w, scale = _forward_and_cotangents(model, lik, kind, x, y, mask, noise)
            k, b = u.shape[0], tf.nest.flatten(x)[0].shape[0]
            u = tf.cast(u, out.dtype)

            if k <= VMAP_UNROLL_COTANGENTS:
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
            return [tf.reduce_sum(q, axis=0) for q in sq] + [_output_range(out)]

    return batch_sums


def _jacobian_body(model, lik, kind, num_samples):
    """``GradientTape.jacobian`` of the N·K linearised losses s_m = <o_m, U_m>: row m of the
    Jacobian is J_mᵀ U_m, the per-(example, cotangent) gradient."""
    variables = model.trainable_variables

    def batch_sums(x, y, mask, noise):
        with tf.name_scope("fastewc/fisher"):
            out, u, w, scale = _forward_and_cotangents(model, lik, kind, x, y, mask, noise)
            k, b = u.shape[0], tf.nest.flatten(x)[0].shape[0]
            u_pairs = tf.reshape(u, tf.concat([[k * b], tf.shape(u)[2:]], 0))
            with tf.GradientTape() as tape:
                o = tf.cast(model(_tile_pairs(x, k), training=False), tf.float32)
                s = tf.reduce_sum(tf.reshape(o * u_pairs, [k * b, -1]), axis=1)
            jac = tape.jacobian(s, variables, experimental_use_pfor=True)
            w_pairs = tf.reshape(w, [k * b])
            return [tf.tensordot(w_pairs, tf.square(tf.cast(j, tf.float32) / scale), 1)
                    for j in _zeros_if_none_batched(jac, variables, k * b)] + [_output_range(out)]

    return batch_sums


def _zeros_if_none_batched(jac, variables, m):
    return [tf.zeros([m] + list(v.shape), tf.float32) if j is None else j for j, v in zip(jac, variables)]


def _loop_batch(model, lik, kind, x, y, noise, count):
    """The eager per-example loop people write: one GradientTape per example."""
    variables = model.trainable_variables
    sums = [np.zeros(v.shape, np.float32) for v in variables]
    low, high = np.inf, -np.inf
    for n in range(count):
        xn = tf.nest.map_structure(lambda t: t[n:n + 1], x)
        with tf.GradientTape(persistent=True) as tape:
            out = model(xn, training=False)
        low, high = min(low, float(tf.reduce_min(out))), max(high, float(tf.reduce_max(out)))
        u, w = lik.cotangents(out, y[n:n + 1], kind, noise[:, n:n + 1] if kind == "sampled" else None)
        scale = _scale_for(out.dtype)
        for k in range(u.shape[0]):
            grads = tape.gradient(out, variables, output_gradients=tf.cast(u[k] * scale, out.dtype))
            for i, g in enumerate(_zeros_if_none(grads, variables)):
                sums[i] += float(w[k, 0]) * np.square(tf.cast(g, tf.float32).numpy() / scale)
        del tape
    return [tf.constant(s) for s in sums] + [tf.constant([low, high], tf.float32)]
