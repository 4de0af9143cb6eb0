"""The Fisher estimator: one object that owns everything a diagonal Fisher needs.

    estimator = fastewc.FisherEstimator(model, loss=..., kind="exact")
    fisher = estimator(data)            # list of float32 tensors, one per trainable variable
    fisher = estimator(other_data)      # same shapes: no planning, no tracing, one dispatch/batch

    F_i = (1/N) Σ_n E_{y ~ q_n} [ (∂ℓ(y, x_n; θ)/∂θ_i)² ]     (see :mod:`fastewc.fisher`)

What it owns (Keras' ``model.train_function`` is the precedent: compiled state lives as
long as its owner, no longer):

* the resolved likelihood of ``loss`` (:mod:`fastewc.likelihood`);
* one :class:`Plan` per input signature, made by ONE eager planning pass before the
  stream starts: the engine (``method="auto"`` picks factored, a weighted layer without a
  rule taking the per-layer path of :mod:`fastewc.generic_rule`, else vmap where a rule
  refuses its layer; a plan whose function cannot be traced steps down
  factored → vmap → jacobian → loop at its first batch, before anything is accumulated,
  warning once per step and naming the layers; nothing falls back mid-stream), the probe
  sizes that bound the factored engine's rows per call, the input cast, the output shape
  (one output: the likelihood's parameters), and the likelihood itself: a loss with
  ``from_logits=True`` on outputs a softmax or sigmoid produced is read as probabilities,
  as Keras' own losses read them, with a warning once per estimator;
* each plan's block plan (:class:`fastewc.blocks.BlockPlan`: which block covers which
  variables, from the planning pass's rule outputs and ``curvature``) and its engine, built
  with it, with its compiled and concrete functions (:mod:`fastewc.engines`);
* its warn-once state and :meth:`tracing_count`.

A plan is keyed by the input signature (structure, per-example shapes and dtypes) and
is valid for one rule registry and one list of trainable variables: a new registry
(``rules=None`` follows :func:`fastewc.default_rules`, so :func:`fastewc.register_rule`
counts) or a grown model drops the plans and plans again.

Scaling: a repeated call on the same signature costs the compiled work plus a fixed host
overhead (argument checks, one tensor conversion per array, one dispatch per batch, one
host sync at the end); memory is O(P) plus one batch's engine temporaries, whatever N.

That one host sync reads ``FisherState.checks`` (:class:`fastewc.engines.base.Checks`); it is where the call's data checks that
need the compiled pass are judged, in this order: Embedding ids outside their table
(counted by :class:`fastewc.engines.base.IdGuard`), a non-finite Fisher (with its cause:
weights, inputs, a forward or backward overflow in the dtype where it happened), outputs
outside [0, 1] for a loss that reads probabilities.
"""
import contextlib
import dataclasses
import logging
import re
import traceback
import typing
import warnings

import keras
import numpy as np
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import _memory
from fastewc import blocks as blocks_lib
from fastewc import capture as capture_lib
from fastewc import data as data_lib
from fastewc import generic_rule
from fastewc import likelihood as likelihood_lib
from fastewc import registry
from fastewc._checks import (check_jit_compile, check_model, check_one_of, check_positive_int,
                             check_seed)
from fastewc.engines import ENGINES
from fastewc.engines.base import Checks, IdGuard, is_distributed, mask_sources

METHODS = ("auto",) + tuple(ENGINES)
# What ``method="auto"`` tries, in order.  Factored takes every weighted layer (a rule, or
# the per-layer path for a layer without one; a rule that refuses its layer starts the plan
# at vmap); an engine whose function cannot be traced for the model
# (``tf.vectorized_map``'s pfor has no converter for an op; an op with no graph form) hands
# over to the next, at the plan's first batch, down to the eager loop, which runs whatever
# runs eagerly.  ``jacobian`` vectorizes with pfor's while-loop fallback.
LADDER = ("factored", "vmap", "jacobian", "loop")


class Plan(typing.NamedTuple):
    """What one eager planning pass decided for one input signature."""
    method: str                  # the engine's name ("auto" resolved)
    engine: object               # a fastewc.engines.Engine
    rows: int                    # examples per compiled call (before small-n bucketing)
    out_tail: tuple              # model output shape without the batch dimension
    num_cotangents: int          # K
    cast: typing.Callable        # the input cast (Keras' fit/predict rules)
    likelihood: object           # the configured one, or read as probabilities (see above)
    blocks: object               # a fastewc.blocks.BlockPlan: which block covers which variables


class Config(typing.NamedTuple):
    """An estimator's checked, hashable configuration."""
    likelihood: object
    kind: str
    method: str
    rules: object                # a fastewc.Rules, or None: follow the default registry
    batch_size: typing.Optional[int]
    num_samples: int
    jit_compile: object          # None, True or False
    curvature: str = "diagonal"


def make_config(*, loss, kind, method, rules, batch_size, num_samples, jit_compile,
                curvature="diagonal", positions="sum"):
    """Check the arguments of an estimator (Keras style errors) into a :class:`Config`.
    ``positions`` is part of the likelihood (:attr:`Config.likelihood`)."""
    likelihood = likelihood_lib.resolve_loss(loss)
    check_one_of("positions", positions, likelihood_lib.POSITIONS)
    likelihood = dataclasses.replace(likelihood, positions=positions)
    check_one_of("kind", kind, likelihood_lib.KINDS)
    check_one_of("method", method, METHODS)
    check_one_of("curvature", curvature, tuple(blocks_lib.KINDS))
    rules_only = blocks_lib.KINDS[curvature].rules_only
    if rules_only and method not in ("auto", "factored"):
        raise ValueError(f"`method` must be 'auto' or 'factored' with curvature={curvature!r}: "
                         f"{rules_only}. Received: method={method!r}")
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    check_positive_int("num_samples", num_samples)
    check_jit_compile(jit_compile)
    rules = None if rules is None else registry.check_rules(rules)
    return Config(likelihood, kind, method, rules, batch_size,
                  num_samples if kind == "sampled" else 1, jit_compile, curvature)


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
      batch_size: None: as many examples per compiled call as the engine's memory budget
        holds (:mod:`fastewc._memory`, read when a plan is made); n: at most n (a memory
        cap: engines may take fewer; the result is the mean over all examples whatever the
        batching).
      num_samples: draws per example for ``kind="sampled"``.
      jit_compile: XLA on/off; None: the engine's default for the model and device.
      curvature: ``"diagonal"`` (a list like the variables) or ``"kfac"``: Kronecker factors
        per Dense and convolution layer and the diagonal of the rest, a
        :class:`fastewc.KroneckerFisher` (:mod:`fastewc.curvature`); factored engine only
        (``method`` "auto" or "factored"), every weighted layer needs a rule.
      positions: for outputs with positions (batch, positions..., classes): ``"sum"`` (the
        default: an example's log-likelihood is the sum over its unmasked positions, the
        sequence's log-likelihood) or ``"mean"`` (divided by its number of unmasked
        positions T, as Keras' mean-over-tokens loss: the Fisher is then 1/T² of the sum's
        per example).  See :mod:`fastewc.likelihood`, "Per-position outputs".
    """

    def __init__(self, model, *, loss, kind="empirical", method="auto", rules=None, batch_size=None,
                 num_samples=1, jit_compile=None, curvature="diagonal", positions="sum"):
        check_model(model, built=False)
        config = make_config(loss=loss, kind=kind, method=method, rules=rules, batch_size=batch_size,
                             num_samples=num_samples, jit_compile=jit_compile, curvature=curvature,
                             positions=positions)
        self.model = model
        self.config = config
        self._loss_name = loss if isinstance(loss, str) else type(loss).__name__
        self.likelihood, self.kind, self.method = config.likelihood, config.kind, config.method
        self.batch_size, self.num_samples, self.jit_compile = config.batch_size, config.num_samples, config.jit_compile
        self._rules = config.rules
        self.curvature = config.curvature
        self._plans = {}
        self._plans_valid_for = None     # (rules, trainable variable ids) of self._plans
        self._warned = set()
        self._confirmed = set()      # id(engine) of plans whose first batch ran
        self._noise_functions = {}
        self._retired_traces = 0
        self._second_plans = {}      # id(a plan's engine) -> the Plan of its second pass
        self._padding = data_lib.Padding()     # a short batch's mask and row index, per (n, b)

    @property
    def rules(self):
        """The registry in force: the one given, else the current default."""
        return self._rules if self._rules is not None else registry.default_rules()

    def __repr__(self):
        return (f"<fastewc.FisherEstimator model='{self.model.name}' kind={self.kind!r} "
                f"method={self.method!r} plans={len(self._plans)}>")

    # -- the call -----------------------------------------------------------------------
    def __call__(self, data, *, seed=None, verbose=0, max_examples=None):
        """F = (1/N) Σ_n E_y[g_n(y)²] over ``data``: a list of float32 tensors, one per
        ``model.trainable_variables`` entry, with the same shapes (``curvature="kfac"``: a
        :class:`fastewc.KroneckerFisher`).

        ``data`` is ``(x, y)`` arrays/tensors or a ``tf.data.Dataset`` of ``(x, y)`` batches;
        ``seed`` makes ``kind="sampled"`` reproducible (same seed and batching, same draws);
        ``verbose`` 0 is silent, 1 or 2 a Keras progress bar and the method chosen;
        ``max_examples``: None reads all of ``data`` (a dataset of unknown cardinality up
        to ``fastewc.data.UNKNOWN_CARDINALITY_MAX_EXAMPLES`` examples, warning if it had
        more), n its first n examples (required for an infinite dataset).
        """
        seed = check_seed(seed)
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2. Received: verbose={verbose!r}")
        model, variables = self._checked_model()
        source = data_lib.Source(data, max_examples)
        distributed = is_distributed()
        plan = self._plan_for(source, distributed, variables)
        if self.kind == "sampled" and seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        while True:
            try:
                state = self._stream(plan, source, seed, verbose, distributed)
                break
            except _CannotTrace as failure:      # the first batch of an `auto` plan only
                plan = self._step_down(source, distributed, plan, failure.error)
        state = plan.engine.finish(state)
        checks = Checks.read(state.checks)                     # the one host sync
        if checks.bad_ids.any():
            _raise_bad_ids(model, plan, source,
                           [layer for layer, bad in zip(plan.engine.id_layers, checks.bad_ids) if bad])
        if not checks.finite:
            _raise_not_finite(model, plan, state.means, source, checks.output_range)
        plan.likelihood.check_output_range(float(checks.output_range[0]), float(checks.output_range[1]))
        if plan.blocks.passes == 1:
            return plan.blocks.assemble(state.means)
        parts = self._second_pass(plan, source, seed, verbose, distributed, plan.blocks.finish(state.means))
        return plan.blocks.assemble_parts(parts)

    def _second_pass(self, plan, source, seed, verbose, distributed, parts):
        """A kind with two passes (:mod:`fastewc.blocks.plan`): ``source`` again, with the
        same seed (the same sampled labels), through an engine of the plan's second-pass
        blocks (made once per plan), each given its first-pass part; ``parts`` with theirs
        finished."""
        second = self._second_plans.get(id(plan.engine))
        if second is None:
            blocks = plan.blocks.second_plan()
            engine = type(plan.engine)(self.model, plan.likelihood, self.kind, self.num_samples,
                                       jit_compile=plan.engine.jit_compile, rules=plan.engine.rules,
                                       blocks=blocks, out_tail=plan.out_tail)
            second = self._second_plans[id(plan.engine)] = plan._replace(engine=engine, blocks=blocks)
        second.blocks.prepare(parts)
        announce = f"fastewc.fisher_diagonal: second pass of curvature={plan.blocks.kind.kind!r}"
        state = second.engine.finish(self._stream(second, source, seed, verbose, distributed, announce))
        checks = Checks.read(state.checks)
        if not checks.finite:
            _raise_not_finite(self.model, second, state.means, source, checks.output_range)
        return second.blocks.finish_second(state.means, parts)

    def _stream(self, plan, source, seed, verbose, distributed, announce=None):
        """Every batch of ``source`` through ``plan``'s engine: the final FisherState (with
        ``verbose``, ``announce`` or the method chosen printed, then a progress bar).
        Raises :class:`_CannotTrace` from the first batch of an unconfirmed plan that
        ``method="auto"`` chose, when its engine cannot trace the model (before anything
        was accumulated)."""
        if verbose:
            print(announce or f"fastewc.fisher_diagonal: kind={self.kind!r}, method={self.method!r} -> {plan.method!r}")
        lik, out_dim = plan.likelihood, plan.out_tail[-1]
        progbar = keras.utils.Progbar(source.steps(plan.rows), verbose=verbose, unit_name="batch") \
            if verbose else None
        state = self._initial_state(plan.engine)
        check_labels = lambda y: lik.check_labels(y, out_dim, out_tail=list(plan.out_tail))  # noqa: E731
        check_weights = lambda w: likelihood_lib.check_sample_weight(lik, w, plan.out_tail)  # noqa: E731
        model = self.model
        # One batch read ahead: a call whose first batch is also its last runs it `alone`
        # (its mean in float32 in the batch's function, no float64: engines.base.mean).
        upcoming = source.batches(plan.rows, plan.cast, check_labels, check_weights, padding=self._padding)
        batch, first = next(upcoming), True
        while batch is not None:
            following = next(upcoming, None)
            alone, first = first and following is None, False
            noise = self._noise(seed, batch, plan, distributed)
            with _explained_input_errors(model, source, plan.method):
                if id(plan.engine) in self._confirmed:
                    state = plan.engine.run(batch, noise, state, alone=alone, distributed=distributed)
                else:
                    state = self._first_run(plan, batch, noise, state, distributed, alone)
            if progbar is not None:
                progbar.add(1)
            batch = following
        return state

    def _first_run(self, plan, batch, noise, state, distributed, alone):
        """A plan's first batch.  For a plan ``method="auto"`` chose, its function is traced
        first, and a failure there (pfor without a converter for an op, an op with no graph
        form) becomes :class:`_CannotTrace`: the step down the :data:`LADDER`."""
        if self.method == "auto" and not plan.blocks.kind.rules_only and plan.method != LADDER[-1] \
                and not distributed:
            try:
                # pfor logs the op it could not convert at ERROR level before raising; the
                # step down warns with the error instead.
                with _tf_logs_silenced():
                    plan.engine.trace(batch, noise, state, alone=alone)
            except Exception as err:           # noqa: BLE001 -- every rung below takes the model
                raise _CannotTrace(err) from err
        state = plan.engine.run(batch, noise, state, alone=alone, distributed=distributed)
        self._confirmed.add(id(plan.engine))
        return state

    def _step_down(self, source, distributed, plan, error):
        """Replace ``plan`` by one with the next rung of :data:`LADDER`, warning once with
        the error, the layers without a rule and the method chosen."""
        method = LADDER[LADDER.index(plan.method) + 1]
        key = (source.signature, distributed)
        self._retired_traces += plan.engine.tracing_count()
        new = self._plans[key] = self._make_plan(source, self.rules, method=method)
        suspects = capture_lib.layers_without_rule(self.model, self.rules)
        where = f" (layers without a factored rule: {capture_lib.describe(suspects, self.model)})" if suspects else ""
        what = "cannot vectorize" if _is_vectorization_failure(error) else "could not trace"
        self._warn_once(("step-down", plan.method), (
            f"fastewc: method={plan.method!r} {what} model '{self.model.name}'{where}: "
            f"{_error_line(error)} method='auto' uses {method!r} for it."))
        return new

    def plan(self, data):
        """The :class:`Plan` this estimator uses for ``data`` (made now if needed)."""
        _, variables = self._checked_model()
        return self._plan_for(data_lib.Source(data), is_distributed(), variables)

    def tracing_count(self):
        """Traces of every compiled function this estimator made (a no-retrace check)."""
        plans = list(self._plans.values()) + list(self._second_plans.values())
        return self._retired_traces + sum(p.engine.tracing_count() for p in plans)

    # -- planning -------------------------------------------------------------------------
    def _checked_model(self):
        """(model, its trainable variables) after :func:`check_model`'s checks, the
        variables read once: reading them walks every layer, and a call needs them for its
        check (none: an error) and for its plans' validity (:meth:`_plan_for`)."""
        model = check_model(self.model, trainable=False)
        variables = model.trainable_variables
        if not variables:
            check_model(model, purpose="Fisher")        # raises: no trainable variables
        return model, variables

    def _plan_for(self, source, distributed, variables):
        rules = self.rules
        valid_for = (rules, tuple(id(v) for v in variables))
        if valid_for != self._plans_valid_for:
            self._retired_traces = self.tracing_count()
            self._plans, self._confirmed = {}, set()
            self._second_plans = {}
            self._plans_valid_for = valid_for
        key = (source.signature, distributed)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(source, rules)
        return plan

    def _make_plan(self, source, rules, method=None):
        """The one eager planning pass: cast, output shape, the block plan, engine, probe sizes.
        ``method``: an engine name that overrides the choice (a step down the ladder)."""
        model = self.model
        first_x = source.first_x
        cast = data_lib.input_caster(model, first_x, source.is_dataset)
        x1 = cast(first_x)
        out_tail = _output_tail(model, x1)
        self.likelihood.check_exact_cost(self.kind, out_tail)
        if source.weight_tail is not None:
            self.likelihood.weight_rank(source.weight_tail, out_tail, what="`data` sample_weight")
        # Eager passes on one example: Embedding ids outside a table are clamped here and
        # reported by the compiled pass, with the layer and the range.
        kind = blocks_lib.KINDS[self.curvature]
        with _explained_input_errors(model, source, self.method), IdGuard(model):
            if kind.rules_only:
                method, survey = "factored", self._rule_records(x1, rules)
            elif method is None:
                method, survey = self._choose_method(x1, rules)
            else:
                survey = None
            likelihood = self._read_likelihood(x1)
            self._check_masks(x1, out_tail)
        records, probe_floats = survey or ((), None)
        blocks = blocks_lib.BlockPlan(kind, model.trainable_variables, records)
        blocks.check_memory(_memory.device_bytes())
        probe_floats = probe_floats or None
        engine_cls = ENGINES[method]
        jit = engine_cls.default_jit_compile(model, blocks) if self.jit_compile is None else self.jit_compile
        engine = engine_cls(model, likelihood, self.kind, self.num_samples, jit_compile=jit, rules=rules,
                            blocks=blocks, out_tail=out_tail)
        k = likelihood.num_cotangents(self.kind, self.num_samples, out_tail)
        rows = engine.rows_per_call(self.batch_size, k, probe_floats, _memory.budget_bytes())
        return Plan(method, engine, rows, tuple(out_tail), k, cast, likelihood, blocks)

    def _read_likelihood(self, x1):
        """The likelihood the Fisher uses: the configured one, except that a loss with
        ``from_logits=True`` on outputs produced by a softmax or sigmoid reads them as
        probabilities, as Keras' losses do (they find the logits the activation recorded,
        ``_keras_logits``, and warn); the Fisher warns once per estimator, naming the loss
        and the layer.  Costs one eager forward pass of one example, for such losses only."""
        lik = self.likelihood
        if not lik.from_logits:
            return lik
        out = self.model(x1, training=False)
        activation = likelihood_lib.probability_activation(tf.nest.flatten(out)[0])
        if activation is None:
            return lik
        where = likelihood_lib.describe_output(self.model)
        self._warn_once(("probabilities", where), (
            f"fastewc: `loss` {self._loss_name} has from_logits=True, but {where} comes from a "
            f"{activation} activation, so it holds probabilities, not logits. Keras' loss would "
            "warn about this and read the logits before the activation; the Fisher reads the "
            "outputs as probabilities (from_logits=False) likewise. Pass from_logits=False, or "
            "remove the activation, if you meant it."))
        return dataclasses.replace(lik, from_logits=False)

    def _check_masks(self, x1, out_tail):
        """The per-position masks (:func:`fastewc.engines.base.mask_sources`: the Keras
        mask on the output, keras_hub's ``x["padding_mask"]``) must fit the output's
        positions: checked here, on one example, before the stream (one eager forward
        pass; none for a (batch, classes) output, where masks do not apply)."""
        if len(out_tail) < 2 and self.likelihood.family == "categorical":
            return
        out = self.model(x1, training=False)
        out = tf.nest.flatten(out)[0] if not hasattr(out, "shape") else out
        for what, mask in mask_sources(self.likelihood, out, x1):
            self.likelihood.weight_rank(mask.shape[1:], out_tail, what=what)

    def _rule_records(self, x1, rules):
        """A curvature whose sums come only from rules (``rules_only``): (records, probe
        floats) of one eager pass under the rules (:func:`fastewc.capture.survey`), from
        which the block plan is made; every weighted layer needs a rule."""
        curvature = self.curvature
        missing = capture_lib.layers_without_rule(self.model, rules)
        if missing:
            raise registry.UnsupportedLayerError(
                f"curvature={curvature!r} needs a factored Fisher rule for every weighted layer; "
                f"{capture_lib.describe(missing, self.model)} {'has' if len(missing) == 1 else 'have'} none. "
                + registry.registration_hint(type(missing[0]).__name__).replace(
                    ", or use method='vmap'", ", or use curvature='diagonal'"))
        try:
            return capture_lib.survey(self.model, x1, rules)
        except capture_lib.SharedLayerError as err:
            raise capture_lib.shared_layer_error(
                err.layers, refusal=blocks_lib.KINDS[curvature].shared_layer_refusal) from None

    def _choose_method(self, x1, rules):
        """(engine name, (records, probe floats per example) of the rules' eager pass or
        None).  ``auto``: factored when one eager pass under the rules succeeds, else vmap,
        with one warning.  A weighted layer without a rule takes the per-layer path
        (:mod:`fastewc.generic_rule`), with one warning naming it."""
        if self.method not in ("auto", "factored"):
            return self.method, None
        missing = [layer for layer in capture_lib.layers_without_rule(self.model, rules) if layer is not self.model]
        if missing:
            self._warn_once(("no-rule", tuple(type(layer).__name__ for layer in missing)), (
                f"fastewc: no factored Fisher rule for {capture_lib.describe(missing, self.model)}; the "
                f"factored engine takes {'its' if len(missing) == 1 else 'their'} per-example gradients "
                f"through {generic_rule.METHOD}, for {'that layer' if len(missing) == 1 else 'those layers'} "
                "alone (the rest of the model keeps its rules). A rule is cheaper: "
                + registry.registration_hint(type(missing[0]).__name__)))
        try:
            return "factored", capture_lib.survey(self.model, x1, rules)
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
        """The state before a call's first batch: a few scalars, nothing the size of the
        sums (so an estimator an EWC keeps for its next task holds none), made once per
        engine (:meth:`fastewc.engines.base.Engine.start_state`)."""
        return engine.start_state()

    def _noise(self, seed, batch, plan, distributed=False):
        """The sampled kind's noise for ``batch``, drawn eagerly-equivalent: a tf.function
        WITHOUT XLA runs the same kernels as eager mode, so every engine and the float64
        reference see the same draws.  Where the engine draws it itself
        (:attr:`fastewc.engines.base.Engine.draws_noise`: its function runs without XLA),
        the int32 seed [seed, batch index] it draws from, one dispatch fewer per batch;
        not under a strategy, whose replicas each see a slice of the rows.  The empty
        tensor for the other kinds.  The seed is made from a fresh NumPy array by
        :func:`fastewc._keras_compat.call_tensor` (TensorFlow's conversion alone, as a
        batch's tensors are): ``tf.constant``'s eager conversion path is host time on
        every call."""
        if self.kind != "sampled":
            fn = self._noise_functions.get("none")
            if fn is None:
                fn = self._noise_functions["none"] = tf.zeros([0])
            return fn
        key = compat.call_tensor(np.array([seed, batch.index], np.int32))
        if plan.engine.draws_noise and not distributed:
            return key
        shape = (int(batch.mask.shape[0]),) + plan.out_tail
        fn = self._noise_functions.get((plan.likelihood.key, shape))
        if fn is None:      # its concrete function, called flat (no dispatch or binding per call)
            lik, k = plan.likelihood, self.num_samples
            fn = self._noise_functions[(plan.likelihood.key, shape)] = tf.function(
                lambda seed: lik.noise(seed, k, list(shape)), jit_compile=False, autograph=False
            ).get_concrete_function(tf.TensorSpec([2], tf.int32))
        return compat.call_concrete(fn, (key,))


@contextlib.contextmanager
def _tf_logs_silenced():
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class _CannotTrace(Exception):
    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _is_vectorization_failure(err):
    """Whether ``err`` comes from pfor (``tf.vectorized_map`` / ``jacobian``) failing to
    vectorize an op, as opposed to an error in the user's model or data."""
    frames = traceback.extract_tb(err.__traceback__)
    if any("parallel_for" in frame.filename for frame in frames):
        return True
    text = str(err)
    return "pfor" in text or "vectoriz" in text.lower()


def _error_line(err):
    """The message of ``err`` in one line (a traced error's text starts with "in user
    code:" and the frames; its last line is the message)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split("Arguments received by")[0]
    found = re.search(r"No (?:pfor vectorization|converter) defined for \w+", text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = found.group(0) if found else lines[-1] if lines else type(err).__name__
    if not re.match(r"\w+(Error|Exception):", line):
        line = f"{type(err).__name__}: {line}"
    return (line if len(line) <= 240 else line[:237] + "...").rstrip(".") + "."


def _output_tail(model, x):
    """The model output's shape without the batch dimension, as a list of ints.  A model
    with several outputs raises: the Fisher is that of ONE likelihood, p(y | x)."""
    outputs = getattr(model, "outputs", None) if isinstance(model, keras.Model) else None
    if outputs and len(outputs) > 1:
        _raise_several_outputs(model, [tuple(o.shape) for o in outputs])
    shape = getattr(model, "output_shape", None)
    if isinstance(shape, tuple) and shape and all(isinstance(d, int) for d in shape[1:]):
        return list(shape[1:])
    try:
        spec = model.compute_output_spec(tf.nest.map_structure(lambda t: keras.KerasTensor(t.shape, t.dtype), x))
    except (ValueError, TypeError) as err:
        shapes = [tuple(t.shape[1:]) for t in tf.nest.flatten(x)]
        raise ValueError(f"`data` inputs do not fit model '{model.name}'. Received: x with per-example "
                         f"shapes {shapes}. The model said: {err}") from err
    leaves = tf.nest.flatten(spec)
    if len(leaves) != 1:
        _raise_several_outputs(model, [tuple(getattr(o, "shape", ())) for o in leaves])
    return list(leaves[0].shape[1:])


def _raise_several_outputs(model, shapes):
    listed = ", ".join("(batch" + "".join(f", {d}" for d in shape[1:]) + ")" for shape in shapes)
    raise ValueError(
        f"`model` '{model.name}' must have one output for a Fisher: the `loss` is the likelihood "
        f"of that one output. Received: a model with {len(shapes)} outputs of shapes [{listed}]. "
        "Consolidate one head at a time into one EWC of this model, each with its "
        "single-output sub-model: ewc.consolidate(data, loss=..., model=keras.Model(model.inputs, "
        "model.outputs[i])) (or compute that sub-model's Fisher and pass it to "
        "ewc.add_task(fisher, model=sub_model)).")


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


def _raise_bad_ids(model, plan, source, layers):
    """Embedding ids outside a table raise, naming the layer, its input_dim and the range.
    The compiled pass only counted them; the range comes from an eager pass over the data
    up to the first batch that has them (the error path only)."""
    found = None
    with IdGuard(model, layers, ranges=True) as guard:
        for batch in source.batches(plan.rows, plan.cast, lambda y: y):
            model(batch.x, training=False)
            found = guard.offending()
            if found is not None:
                break
    layer, low, high = found if found is not None else (layers[0], None, None)
    raise data_lib.id_range_error(layer, low, high)


def _compute_dtype(model):
    """The narrowest floating compute dtype among the model's layers."""
    dtypes = {getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None)
              for layer in [model] + compat.nested_layers(model)}
    for name in ("float16", "bfloat16"):
        if name in dtypes:
            return name
    return "float32"


_LARGEST = {"float16": "65504", "bfloat16": "3.4e38", "float32": "3.4e38"}


def _raise_not_finite(model, plan, means, source, out_range):
    """A non-finite Fisher raises, naming the variable and the likely cause, in the dtype
    where it happened: the model's weights, its inputs, its forward pass (outputs not
    finite), else the backward pass: for a float16 model that is float16 (the factored
    engine back-propagates the output gradients in float16 and forms the parameter
    gradients in float32; the per-example engines form those in float16 too), else
    float32."""
    names = plan.blocks.names
    i = next(j for j, f in enumerate(means) if not bool(tf.reduce_all(tf.math.is_finite(f))))
    bad = int(tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(means[i])), tf.int32)))
    weights = [getattr(v, "path", v.name) for v in model.variables
               if tf.as_dtype(v.dtype).is_floating and not bool(tf.reduce_all(tf.math.is_finite(v)))]
    dtype = _compute_dtype(model)
    fix = "check the scale of `data` and of the `model` weights"
    if weights:
        cause = f"the `model` weights {weights} contain NaN or Inf"
    elif not source.inputs_finite():
        cause = "the `data` inputs (x) contain NaN or Inf"
    elif not np.all(np.isfinite(out_range)):
        cause = (f"the forward pass overflowed {dtype} (largest value {_LARGEST[dtype]}): the `model` "
                 f"outputs reached [{out_range[0]:.4g}, {out_range[1]:.4g}]; {fix}")
    elif dtype == "float16" and plan.method == "factored":
        cause = ("the output gradients back-propagated through the model's float16 layers "
                 "overflowed float16 (largest value 65504; they are scaled by 2^8 against "
                 f"underflow, the parameter gradients are then formed in float32); {fix}")
    elif dtype == "float16":
        cause = (f"the per-example gradients overflowed float16 (largest value 65504): "
                 f"method={plan.method!r} forms them in the model's float16, scaled by 2^8 "
                 "against underflow. method='factored' forms the parameter gradients in "
                 f"float32; else {fix}")
    else:
        cause = f"the per-example gradients overflowed {dtype}: {fix}"
    raise ValueError(
        f"The Fisher of variable '{names[i]}' is not finite "
        f"({bad} of {int(np.prod(means[i].shape))} entries are NaN or Inf): {cause}.")
