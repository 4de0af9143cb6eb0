"""The Fisher estimator: one object that owns everything a diagonal Fisher needs.

    estimator = fastewc.FisherEstimator(model, loss=..., kind="exact")
    fisher = estimator(data)            # list of float32 tensors, one per trainable variable
    fisher = estimator(other_data)      # same shapes: no planning, no tracing, one dispatch/batch

    F_i = (1/N) Σ_n E_{y ~ q_n} [ (∂ℓ(y, x_n; θ)/∂θ_i)² ]     (see :mod:`fastewc.fisher`)

What it owns (Keras' ``model.train_function`` is the precedent: compiled state lives as
long as its owner, no longer):

* the resolved likelihood of ``loss`` (:mod:`fastewc.likelihood`);
* one :class:`Plan` per input signature, made by ONE eager planning pass before the
  stream starts: the engine (``method="auto"`` walks factored → vmap once, warning once
  and naming the layers when it steps down; nothing falls back mid-stream), the probe
  sizes that bound the factored engine's rows per call, the input cast, the output shape;
* each plan's engine with its compiled and concrete functions
  (:mod:`fastewc.engines`);
* its warn-once state and :meth:`tracing_count`.

A plan is keyed by the input signature (structure, per-example shapes and dtypes) and
is valid for one rule registry and one list of trainable variables: a new registry
(``rules=None`` follows :func:`fastewc.default_rules`, so :func:`fastewc.register_rule`
counts) or a grown model drops the plans and plans again.

Scaling: a repeated call on the same signature costs the compiled work plus a fixed host
overhead (argument checks, one tensor conversion per array, one dispatch per batch, one
host sync at the end); memory is O(P) plus one batch's engine temporaries, whatever N.
"""
import typing
import warnings

import keras
import numpy as np
import tensorflow as tf

from fastewc import capture as capture_lib
from fastewc import data as data_lib
from fastewc import likelihood as likelihood_lib
from fastewc import registry
from fastewc._checks import (check_jit_compile, check_model, check_one_of, check_positive_int,
                             check_seed)
from fastewc.engines import ENGINES, initial_state
from fastewc.engines.base import is_distributed

METHODS = ("auto",) + tuple(ENGINES)


class Plan(typing.NamedTuple):
    """What one eager planning pass decided for one input signature."""
    method: str                  # the engine's name ("auto" resolved)
    engine: object               # a fastewc.engines.Engine
    rows: int                    # examples per compiled call (before small-n bucketing)
    out_tail: tuple              # model output shape without the batch dimension
    num_cotangents: int          # K
    cast: typing.Callable        # the input cast (Keras' fit/predict rules)


class Config(typing.NamedTuple):
    """An estimator's checked, hashable configuration."""
    likelihood: object
    kind: str
    method: str
    rules: object                # a fastewc.Rules, or None: follow the default registry
    batch_size: int
    num_samples: int
    jit_compile: object          # None, True or False


def make_config(*, loss, kind, method, rules, batch_size, num_samples, jit_compile):
    """Check the arguments of an estimator (Keras style errors) into a :class:`Config`."""
    likelihood = likelihood_lib.resolve_loss(loss)
    check_one_of("kind", kind, likelihood_lib.KINDS)
    check_one_of("method", method, METHODS)
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_samples", num_samples)
    check_jit_compile(jit_compile)
    rules = None if rules is None else registry.check_rules(rules)
    return Config(likelihood, kind, method, rules, batch_size,
                  num_samples if kind == "sampled" else 1, jit_compile)


class FisherEstimator:
    """Diagonal Fisher of ``model`` for one loss, kind and method, reusable across data.

    Args:
      model: a Keras 3 model (built by the first call at the latest).
      loss: Keras loss name or object: sparse/categorical/binary cross-entropy
        (``from_logits`` honoured) or ``"mse"`` (unit-variance Gaussian).
      kind: ``"empirical"`` (true labels), ``"sampled"`` (``num_samples`` labels drawn from
        the model per example) or ``"exact"`` (full expectation over the outcomes).
      method: ``"auto"``, ``"factored"``, ``"vmap"``, ``"jacobian"`` or ``"loop"``.
      rules: a :class:`fastewc.Rules` registry for the factored engine; None follows
        :func:`fastewc.default_rules` (re-planning when it changes).
      batch_size: the most examples per compiled call (a memory cap: engines may take
        fewer, the result is the mean over all examples whatever the batching).
      num_samples: draws per example for ``kind="sampled"``.
      jit_compile: XLA on/off; None: the engine's default for the model and device.
    """

    def __init__(self, model, *, loss, kind="empirical", method="auto", rules=None, batch_size=256,
                 num_samples=1, jit_compile=None):
        check_model(model, built=False)
        config = make_config(loss=loss, kind=kind, method=method, rules=rules, batch_size=batch_size,
                             num_samples=num_samples, jit_compile=jit_compile)
        self.model = model
        self.config = config
        self.likelihood, self.kind, self.method = config.likelihood, config.kind, config.method
        self.batch_size, self.num_samples, self.jit_compile = config.batch_size, config.num_samples, config.jit_compile
        self._rules = config.rules
        self._plans = {}
        self._plans_valid_for = None     # (rules, trainable variable ids) of self._plans
        self._initial_states = {}
        self._warned = set()
        self._noise_functions = {}
        self._retired_traces = 0

    @property
    def rules(self):
        """The registry in force: the one given, else the current default."""
        return self._rules if self._rules is not None else registry.default_rules()

    def __repr__(self):
        return (f"<fastewc.FisherEstimator model='{self.model.name}' kind={self.kind!r} "
                f"method={self.method!r} plans={len(self._plans)}>")

    # -- the call -----------------------------------------------------------------------
    def __call__(self, data, *, seed=None, verbose=0):
        """F = (1/N) Σ_n E_y[g_n(y)²] over ``data``: a list of float32 tensors, one per
        ``model.trainable_variables`` entry, with the same shapes.

        ``data`` is ``(x, y)`` arrays/tensors or a ``tf.data.Dataset`` of ``(x, y)`` batches;
        ``seed`` makes ``kind="sampled"`` reproducible (same seed and batching, same draws);
        ``verbose`` 0 is silent, 1 or 2 a Keras progress bar and the method chosen.
        """
        seed = check_seed(seed)
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2. Received: verbose={verbose!r}")
        model = check_model(self.model, purpose="Fisher")
        source = data_lib.Source(data)
        distributed = is_distributed()
        plan = self._plan_for(source, distributed)
        if verbose:
            print(f"fastewc.fisher_diagonal: kind={self.kind!r}, method={self.method!r} -> {plan.method!r}")
        if self.kind == "sampled" and seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        lik, out_dim = self.likelihood, plan.out_tail[-1]
        progbar = keras.utils.Progbar(source.steps(plan.rows), verbose=verbose, unit_name="batch") \
            if verbose else None
        state = self._initial_state(plan.engine)
        check_labels = lambda y: lik.check_labels(y, out_dim, out_tail=list(plan.out_tail))  # noqa: E731
        for batch in source.batches(plan.rows, plan.cast, check_labels):
            noise = self._noise(seed, batch, plan)
            with _explained_input_errors(model, source, plan.method):
                state = plan.engine.run(batch, noise, state, distributed=distributed)
            if progbar is not None:
                progbar.add(1)
        checks = state.checks.numpy()                          # the one host sync
        lik.check_output_range(float(checks[0]), float(checks[1]))
        if not checks[2:].all():
            _raise_not_finite(model, plan.engine.variables, state.fisher, checks[2:].tolist(), source)
        return state.fisher

    def plan(self, data):
        """The :class:`Plan` this estimator uses for ``data`` (made now if needed)."""
        check_model(self.model, purpose="Fisher")
        return self._plan_for(data_lib.Source(data), is_distributed())

    def tracing_count(self):
        """Traces of every compiled function this estimator made (a no-retrace check)."""
        return self._retired_traces + sum(p.engine.tracing_count() for p in self._plans.values())

    # -- planning -------------------------------------------------------------------------
    def _plan_for(self, source, distributed):
        rules = self.rules
        valid_for = (rules, tuple(id(v) for v in self.model.trainable_variables))
        if valid_for != self._plans_valid_for:
            self._retired_traces = self.tracing_count()
            self._plans, self._initial_states = {}, {}
            self._plans_valid_for = valid_for
        key = (source.signature, distributed)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(source, rules)
        return plan

    def _make_plan(self, source, rules):
        """The one eager planning pass: cast, output shape, engine, probe sizes."""
        model = self.model
        first_x = source.first_x
        cast = data_lib.input_caster(model, first_x, source.is_dataset)
        x1 = cast(first_x)
        out_tail = _output_tail(model, x1)
        with _explained_input_errors(model, source, self.method):
            method, probe_floats = self._choose_method(x1, rules)
        engine_cls = ENGINES[method]
        jit = engine_cls.default_jit_compile(model) if self.jit_compile is None else self.jit_compile
        engine = engine_cls(model, self.likelihood, self.kind, self.num_samples, jit_compile=jit, rules=rules)
        k = self.likelihood.num_cotangents(self.kind, self.num_samples, out_tail)
        rows = engine.rows_per_call(self.batch_size, k, probe_floats)
        return Plan(method, engine, rows, tuple(out_tail), k, cast)

    def _choose_method(self, x1, rules):
        """(engine name, probe floats per example or None).  ``auto``: factored when every
        weighted layer has a rule and one eager pass under the rules succeeds, else vmap,
        with one warning naming the layers."""
        if self.method not in ("auto", "factored"):
            return self.method, None
        if self.method == "auto":
            missing = capture_lib.layers_without_rule(self.model, rules)
            if missing:
                self._warn_once(("no-rule", tuple(type(layer).__name__ for layer in missing)),
                                f"fastewc: no factored Fisher rule for {capture_lib.describe(missing)}; "
                                "method='auto' uses 'vmap' (per-example vectorized gradients) for this model.")
                return "vmap", None
        try:
            return "factored", capture_lib.survey(self.model, x1, rules) or None
        except registry.UnsupportedLayerError as err:
            if self.method == "factored":
                raise
            self._warn_once(("unsupported", str(err)), f"fastewc: {err} method='auto' uses 'vmap'.")
            return "vmap", None

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    # -- per-call tensors -----------------------------------------------------------------
    def _initial_state(self, engine):
        """The zero state, made once per plan (tensors are immutable)."""
        key = id(engine)
        state = self._initial_states.get(key)
        if state is None:
            state = self._initial_states[key] = initial_state(engine.variables)
        return state

    def _noise(self, seed, batch, plan):
        """The sampled kind's noise for ``batch``, drawn eagerly-equivalent: a tf.function
        WITHOUT XLA runs the same kernels as eager mode, so every engine and the float64
        reference see the same draws.  The empty tensor for the other kinds."""
        if self.kind != "sampled":
            fn = self._noise_functions.get("none")
            if fn is None:
                fn = self._noise_functions["none"] = tf.zeros([0])
            return fn
        shape = (int(batch.mask.shape[0]),) + plan.out_tail
        fn = self._noise_functions.get(shape)
        if fn is None:
            lik, k = self.likelihood, self.num_samples
            fn = self._noise_functions[shape] = tf.function(
                lambda seed: lik.noise(seed, k, list(shape)), jit_compile=False, autograph=False)
        return fn(tf.constant([seed, batch.index], tf.int32))


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


class _explained_input_errors:
    """Re-raise a dtype error (TypeError when traced, InvalidArgumentError when eager) from
    integer inputs fed to a model without a declared Input (Keras passes them unchanged)
    as a TypeError that names ``data`` and the fix."""

    def __init__(self, model, source, method):
        self.model, self.source, self.method = model, source, method

    def __enter__(self):
        return self

    def __exit__(self, exc_type, err, tb):
        if exc_type is None or not issubclass(exc_type, (TypeError, tf.errors.InvalidArgumentError)):
            return False
        dtypes = [dtype for _, dtype in self.source.signature[1]]
        if all(tf.as_dtype(d).is_floating for d in dtypes) or getattr(self.model, "inputs", None):
            return False                    # not an undeclared integer input: not about `data`
        raise TypeError(
            f"`data` inputs of dtype {dtypes} could not go through model '{self.model.name}' "
            f"with method={self.method!r}. A model without a declared Input gets integer and bool "
            f"inputs unchanged: cast x to float if its first layer expects floats. Error: {err}") from err


def _raise_not_finite(model, variables, fisher, finite, source):
    """A non-finite Fisher raises, naming the variable and the likely cause."""
    i = finite.index(False)
    bad = int(tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(fisher[i])), tf.int32)))
    weights = [getattr(v, "path", v.name) for v in model.variables
               if tf.as_dtype(v.dtype).is_floating and not bool(tf.reduce_all(tf.math.is_finite(v)))]
    if weights:
        cause = f"the `model` weights {weights} contain NaN or Inf"
    elif not source.inputs_finite():
        cause = "the `data` inputs (x) contain NaN or Inf"
    else:
        cause = "the per-example gradients overflowed float32: check the scale of `data` and of the `model` weights"
    raise ValueError(
        f"The Fisher of variable '{getattr(variables[i], 'path', variables[i].name)}' is not finite "
        f"({bad} of {int(np.prod(fisher[i].shape))} entries are NaN or Inf): {cause}.")
