"""Compiled train steps with the EWC gradient added analytically.

One optimizer step on a batch (x, y) minimises

    L(θ) = L_data(θ) + Σ model.losses + P(θ),      P(θ) = λ/2 · Σ_i A_i (θ_i − μ_i)²

where L_data is the Keras loss with its own reduction (the mean over the batch for
``"sum_over_batch_size"``) and P the EWC penalty (:mod:`fastewc.ewc`).  The gradient is

    ∇L = ∇(L_data + Σ model.losses)   (one GradientTape over the forward pass)
       + λ·A·(θ − μ)                   (``ewc.penalty_and_gradients()``: analytic, no tape)

so the penalty costs O(P) elementwise work over the parameters, traced into the step's
compiled function, not a second backward pass.  What a step needs from ``ewc`` is written
down once, in :class:`fastewc._penalty_term.PenaltySource`; the scaled sum below is
:func:`fastewc._penalty_term.add_penalty`, shared with :mod:`fastewc.keras_fit`.  The value returned by a step is ``L_data + Σ model.losses + P`` at the
weights *before* the update (what the gradient was taken at), as a float32 scalar; with
``steps_per_call=k`` it is the (k,) vector of those values, one per optimizer step.

Mixed precision (Micikevicius et al. 2018).  Under a ``mixed_float16`` model the optimizer
is wrapped in Keras' dynamic ``LossScaleOptimizer`` (unless it already is one): the tape
differentiates s·L_data, with s the current loss scale, so small float16 gradients do not
flush to zero; the penalty gradient (float32) is added as s·λA(θ−μ), and the optimizer
divides the sum by s.  s is a power of two, so multiplying and dividing by it is exact
and the update equals the unscaled gradient + λA(θ−μ) bit for bit (short of overflow or
float32 subnormals).  A step whose scaled gradients are not finite is skipped and s is
halved (the penalty, always finite, cannot hide an overflow).  ``mixed_bfloat16`` needs no
scaling: bfloat16 has float32's exponent range.  The penalty and its gradient stay float32.

``tf.distribute``.  When the model lives in a strategy's scope with R > 1 replicas,
``step(x, y)`` takes the *global* batch (the same on every worker) and gives replica r
the rows [r·N/R, (r+1)·N/R).  Each replica differentiates its share of the global mean,
(n_r / N)·mean_r(ℓ), plus (1/R)·(Σ model.losses + P) -- the optimizer sums replica
gradients (all-reduce), so the update is that of one device on the whole batch up to
float32 summation order.  Already distributed values (from
``strategy.experimental_distribute_dataset``) are accepted as they are.  Under a strategy
``jit_compile`` applies to each replica's forward/backward pass; the all-reduce and the
optimizer update run outside XLA.

Threads.  Each call holds the EWC's ``state_guard`` shared around the compiled function
(:func:`fastewc._penalty_term.reading_state`); :meth:`fastewc.EWC.add_task` (so
:meth:`fastewc.EWC.consolidate`) holds it exclusively while it assigns the new state.  A
consolidation in another thread therefore commits between steps: each step's penalty and
gradient come from the whole state before or the whole state after the task.  The Fisher
itself is computed while steps run (on the weights as they are then).

Tracing.  Every compiled function is traced once per input structure and dtype, with the
batch dimension left unknown: a final partial batch or a new batch size does not retrace
(XLA still compiles one executable per distinct shape, cached).  A step is traced again
when what it trains changed: the EWC started tracking new variables, or a layer's
``trainable`` flag was set (frozen variables are no longer updated; a variable that became
trainable needs a new step and optimizer, and the call says so).
"""
import contextlib
import warnings

import keras
import numpy as np
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import _policy
from fastewc import data as data_lib
from fastewc import distribute as distribute_lib
from fastewc import likelihood as likelihood_lib
from fastewc._checks import check_jit_compile, check_model, check_positive_int
from fastewc._penalty_term import (add_penalty, check_penalty_source, reading_state, tracking_token,
                                   uses_float16, variable_paths)
from fastewc.engines.base import IdGuard, embedding_layers

__all__ = ["make_train_step", "TrainStep", "default_jit_compile"]


def make_train_step(model, optimizer, loss, *, ewc=None, jit_compile=None, steps_per_call=1,
                    stop_on_nonfinite=False):
    """A compiled ``step(x, y, sample_weight=None) -> loss`` that trains ``model``.

    Args:
      model: a built Keras 3 model with one output (a model with several: train it with
        :class:`fastewc.EWCModel` and Keras' ``compile(loss=[...])``); ``y`` is one array.
      optimizer: a Keras 3 optimizer instance (or its name).  Under a ``mixed_float16``
        model it is wrapped in ``keras.optimizers.LossScaleOptimizer`` (``step.optimizer``
        is then the wrapper).  Create it in the same ``strategy.scope()`` as the model.
      loss: a Keras loss name, ``keras.losses.Loss`` or function ``f(y_true, y_pred)``
        returning per-example values (mean-reduced).  Its reduction must be a scalar one.
      ewc: ``None`` or a :class:`fastewc.EWC` built on ``model``; its gradient
        λ·A·(θ − μ) is added analytically to the data gradient.
      jit_compile: XLA on/off; ``None`` picks the device's default
        (:func:`default_jit_compile`).  Each XLA executable stays in TensorFlow's
        process-wide compilation cache after the step and its model are collected (no
        eviction, no API to remove one; :mod:`fastewc._policy`): a process that trains
        many models one after the other should pass ``jit_compile=False``.
      steps_per_call: k optimizer steps per call; then ``step(xs, ys)`` takes k stacked
        batches, ``xs`` of shape ``(k, batch, ...)``, and returns the k losses.
      stop_on_nonfinite: like Keras ``TerminateOnNaN``, but safer: a step whose loss is
        NaN or Inf is NOT applied (nor any later step of the same call), and ``step()``
        raises ``FloatingPointError`` naming it; weights, optimizer state and so any EWC
        consolidated afterwards stay as they were before that step.  Costs one
        device-to-host read of the loss per call.  Not supported under ``tf.distribute``.

    Embedding ids: on one device the compiled step clamps the ids of every Embedding to its
    table and counts those outside it; a step that saw any applies no update (nor any later
    step of the call), and ``step()`` raises a ValueError naming the layer and the range.
    The counts come back with the loss: one device-to-host read per call, after it (a
    model without Embedding layers has none).

    Threads: a call holds ``ewc.state_guard`` shared, so a consolidation in another thread
    commits before or after it, never during it (:mod:`fastewc.ewc`).

    Large models on CPU: each call takes its temporaries (activations, gradients, and with
    an EWC the summed gradient g + λ·A·(θ − μ), one more copy of the parameters) from
    TensorFlow's CPU allocator.  By default that is ``malloc``, which (glibc) maps blocks
    above its mmap threshold, at most 32 MiB, afresh on every call, so a step pays a page
    fault per 4 KiB of its large temporaries, every step: O(temporary bytes) per step, the
    EWC's copy included.  Starting the process with ``TF_CPU_ALLOCATOR_USE_BFC=true``
    makes TensorFlow pool and reuse them (it then keeps its peak).  fastewc does not set
    it: it is process-wide (README, "Real sizes: train steps").

    Returns:
      a :class:`TrainStep` (this is ``TrainStep(model, optimizer, loss, ...)``);
      ``step(x, y)`` returns L_data + Σ model.losses + P, float32 (shape ``()``, or
      ``(k,)`` when ``steps_per_call=k > 1``).
    """
    return TrainStep(model, optimizer, loss, ewc=ewc, jit_compile=jit_compile,
                     steps_per_call=steps_per_call, stop_on_nonfinite=stop_on_nonfinite)


def default_jit_compile(model):
    """The XLA setting ``jit_compile=None`` means for a train step of ``model``: XLA on GPU;
    on CPU XLA for models without convolutions, none with them (XLA's CPU convolutions
    are slower than TensorFlow's oneDNN kernels).  :func:`fastewc._policy.default_jit_compile`;
    figures in the README."""
    return _policy.default_jit_compile(model)


class TrainStep:
    """A compiled train step; call it as ``step(x, y, sample_weight=None)``.

    Args: as :func:`make_train_step`, plus
      strategy: None (the default) for the ``tf.distribute`` strategy ``model`` was built
        in (none on one device); otherwise it must be that strategy (the default strategy
        stands for none).

    Every argument is checked here: a combination that could not run raises at
    construction, naming the argument.

    Attributes: ``model``, ``optimizer`` (the one that applies the updates, possibly a
    ``LossScaleOptimizer`` wrapper), ``loss`` (a ``keras.losses.Loss``), ``ewc``,
    ``jit_compile`` (a bool), ``steps_per_call``, ``stop_on_nonfinite``, ``strategy``
    (None on one device).
    """

    def __init__(self, model, optimizer, loss, *, ewc=None, jit_compile=None, steps_per_call=1,
                 strategy=None, stop_on_nonfinite=False):
        check_model(model, layer_ok=False, purpose="parameters to train")
        _check_single_output(model)
        check_positive_int("steps_per_call", steps_per_call)
        check_jit_compile(jit_compile)
        self.loss = _resolve_loss(loss)
        self.ewc = check_penalty_source(ewc, model, optional=True)
        self.strategy = _resolve_strategy(strategy, model)
        if stop_on_nonfinite not in (True, False):
            raise ValueError("`stop_on_nonfinite` must be True or False. "
                             f"Received: stop_on_nonfinite={stop_on_nonfinite!r}")
        if stop_on_nonfinite and self.strategy is not None:
            raise ValueError(
                "`stop_on_nonfinite=True` is not supported under tf.distribute (replicas "
                "would have to agree to skip a step). Received: a model built in "
                f"{type(self.strategy).__name__}.scope()")
        self.optimizer = _resolve_optimizer(optimizer, model, self.strategy)
        if jit_compile is None:
            jit_compile = default_jit_compile(model)
        elif jit_compile and steps_per_call > 1 and not default_jit_compile(model):
            warnings.warn(
                f"fastewc.TrainStep: jit_compile=True with steps_per_call={steps_per_call} on "
                f"CPU for model '{model.name}', which has convolutions: XLA's CPU convolutions "
                "inside the step loop are far slower than TensorFlow's oneDNN kernels (README, "
                "train-step figures). jit_compile=None picks the faster setting.", stacklevel=2)
        self.model = model
        self.jit_compile = bool(jit_compile)
        self.steps_per_call = steps_per_call
        self.stop_on_nonfinite = bool(stop_on_nonfinite)
        self._variables = list(model.trainable_variables)
        # Embeddings whose ids the compiled step counts (one device; under a strategy the
        # replicas could not agree to skip an update: the host checks the global batch)
        self._id_layers = embedding_layers(model) if self.strategy is None else []
        self._optimizer_variables = {id(v) for v in self._variables}   # what it was built for
        self._signatures = set()
        self._retired_traces = 0
        self._dv_function = None
        self._ewc_token = tracking_token(self.ewc)
        self._function = self._compile()

    # -- public --------------------------------------------------------------------------
    def __call__(self, x, y, sample_weight=None):
        if isinstance(x, tf.distribute.DistributedValues) or _any_distributed(x):
            if self.strategy is None:
                raise ValueError("`x` is a distributed value but the model was not built in a "
                                 "tf.distribute strategy scope. Received: x of type "
                                 f"{type(x).__name__}")
            if self.steps_per_call != 1:
                raise ValueError("Distributed values are supported with steps_per_call=1 only. "
                                 f"Received: steps_per_call={self.steps_per_call}")
            self._refresh_if_ewc_grew()
            if self._dv_function is None:
                self._dv_function = self._compile(distributed_input=True)
            with reading_state(self.ewc):
                return self._dv_function(x, y, sample_weight)
        self._refresh_if_ewc_grew()
        x = tf.nest.map_structure(_to_tensor, x)
        y = tf.nest.map_structure(_to_tensor, y)
        if sample_weight is not None:
            sample_weight = tf.nest.map_structure(_to_tensor, sample_weight)
        self._check_inputs(x, y, sample_weight)
        concrete = self._ensure_traced(x, y, sample_weight)
        # The concrete function of this signature, called with its flat inputs: the
        # polymorphic dispatch would bind every argument again (host time on every step).
        with reading_state(self.ewc):       # a consolidation's commit waits for the step
            result = compat.call_concrete(concrete, (x, y) if sample_weight is None else (x, y, sample_weight))
        if self._id_layers:
            result, bad_ids = result
            self._raise_if_bad_ids(bad_ids, x)
        if self.stop_on_nonfinite:
            _raise_if_nonfinite(result, self.ewc)
        return result

    def tracing_count(self):
        """Number of traces of the compiled step (a no-retrace check for tests)."""
        count = self._retired_traces + self._function.experimental_get_tracing_count()
        if self._dv_function is not None:
            count += self._dv_function.experimental_get_tracing_count()
        return count

    def _refresh_if_ewc_grew(self):
        """Build the compiled step again (one new trace) when what it was traced for changed:
        the EWC started tracking new variables (a consolidation of a grown model), or the
        model's trainable variables changed (a layer's ``trainable`` flag was set).  A
        frozen variable is then no longer updated, as in Keras after ``compile()``; a
        variable that became trainable raises (:meth:`_check_trainable`)."""
        token = tracking_token(self.ewc)
        trainable = self.model.trainable_variables
        changed = len(trainable) != len(self._variables) or any(
            a is not b for a, b in zip(trainable, self._variables))
        if changed:
            self._check_trainable(trainable)
            self._variables = list(trainable)
        if changed or token != self._ewc_token:
            self._retired_traces = self.tracing_count()
            self._ewc_token = token
            self._signatures = set()
            self._dv_function = None
            self._function = self._compile()

    def _check_trainable(self, trainable):
        """The model's trainable variables changed since the step was made: fine while they
        are among those the optimizer was built for (layers frozen); otherwise a ValueError
        saying what changed and the fix (a new step with a new optimizer)."""
        ids = {id(v) for v in trainable}
        added = [v for v in trainable if id(v) not in self._optimizer_variables]
        if trainable and not added:
            return
        removed = [v for v in self._variables if id(v) not in ids]
        what = (f"now trainable: {variable_paths(added)}" if trainable
                else "no variable is trainable any more")
        raise ValueError(
            f"The trainable variables of `model` '{self.model.name}' changed since this step "
            f"was made ({what}; no longer trainable: {variable_paths(removed)}): a layer's "
            "`trainable` flag was set. The step's optimizer was built for the variables "
            "trainable when the step was made; make a new step for the new ones: "
            "fastewc.make_train_step(model, optimizer, loss, ewc=ewc) with a new optimizer.")

    def __repr__(self):
        return (f"<fastewc.TrainStep model='{self.model.name}' jit_compile={self.jit_compile} "
                f"steps_per_call={self.steps_per_call} ewc={self.ewc is not None} "
                f"replicas={self._num_replicas()}>")

    # -- checks --------------------------------------------------------------------------
    def _check_inputs(self, x, y, sample_weight):
        k = self.steps_per_call
        leaves = [("x", t) for t in tf.nest.flatten(x)] + [("y", t) for t in tf.nest.flatten(y)]
        if sample_weight is not None:
            leaves += [("sample_weight", t) for t in tf.nest.flatten(sample_weight)]
        if not leaves or not tf.nest.flatten(x) or not tf.nest.flatten(y):
            raise ValueError("`x` and `y` must be tensors or arrays (or nests of them). "
                             f"Received: x={x!r}, y={y!r}")
        if len(tf.nest.flatten(y)) > 1:
            raise ValueError(
                f"`y` must be one array or tensor: the step trains a single-output model with one "
                f"`loss`. Received: y as a {type(y).__name__} of {len(tf.nest.flatten(y))} arrays. "
                "For a model with several outputs use fastewc.EWCModel(model, ewc) and Keras' "
                "compile(loss=[...]) (a loss per output, summed, as in Keras fit).")
        batch_axis = 0 if k == 1 else 1
        for name, t in leaves:
            if t.shape.rank is None or t.shape.rank <= batch_axis:
                what = "a batch dimension" if k == 1 else f"shape (steps_per_call={k}, batch, ...)"
                raise ValueError(f"`{name}` must have {what}. Received: {name} with shape {t.shape}")
            if k > 1 and t.shape[0] != k:
                raise ValueError(
                    f"`{name}` must stack steps_per_call={k} batches along its first axis, "
                    f"shape ({k}, batch, ...). Received: {name} with shape {t.shape} "
                    f"(leading dimension {t.shape[0]})")
        rows = {name: int(t.shape[batch_axis]) for name, t in leaves}
        if len(set(rows.values())) != 1:
            got = ", ".join(f"{name}: {int(t.shape[batch_axis])}" for name, t in leaves)
            raise ValueError(f"`x`, `y` (and `sample_weight`) must have the same batch size. "
                             f"Received batch sizes {got}")
        if next(iter(rows.values())) == 0:
            raise ValueError("The batch is empty. Received: a batch of 0 examples")
        if self.strategy is not None:
            self._check_ids(x)

    def _raise_if_bad_ids(self, bad_ids, x):
        """The compiled step counted the ids outside each Embedding's table (``bad_ids``:
        (E,), or (k, E) with ``steps_per_call=k``; :class:`fastewc.engines.base.IdGuard`)
        and applied no update from the first step that had any: raise for that step, with
        the range of its offending ids from an eager pass over its batch (the error path
        only).  One device-to-host read of the E (k·E) counts per call, after the step."""
        counts = np.asarray(bad_ids).reshape(-1, len(self._id_layers))
        bad = np.argwhere(counts > 0)
        if not bad.size:
            return
        step, j = (int(i) for i in bad[0])
        layer, k = self._id_layers[j], self.steps_per_call
        batch = x if k == 1 else tf.nest.map_structure(lambda t: t[step], x)
        with IdGuard(self.model, [layer], ranges=True) as guard:
            self.model(batch, training=False)
            found = guard.offending()
        low, high = (found[1], found[2]) if found is not None else (None, None)
        where = ("This step's update was not applied" if k == 1 else
                 f"The update of step {step} of this call ({k} steps) and of any after it were "
                 "not applied; the steps before it were")
        raise ValueError(f"{data_lib.id_range_error(layer, low, high, argument='x')}. {where}: the "
                         "weights and the optimizer state are those before it.")

    def _check_ids(self, x):
        """Under a ``tf.distribute`` strategy: Embedding ids that a model input feeds
        directly (functional and Sequential models) must lie in the table, as Keras ``fit``
        finds (TensorFlow's CPU gather raises); under XLA the gather would clamp them to the
        first or last row silently.  One host min/max of each such input per call, before
        the step runs.  On one device the compiled step counts them instead, for every
        Embedding (:meth:`_raise_if_bad_ids`)."""
        feeds = getattr(self, "_id_feeds", None)
        if feeds is None:
            feeds = self._id_feeds = _direct_id_inputs(self.model)
        if not feeds:
            return
        flat = None if isinstance(x, dict) else tf.nest.flatten(x)
        for position, name, count, layer in feeds:
            if flat is None:
                t = x.get(name)
            else:
                t = flat[position] if len(flat) == count else None
            if t is None or not (t.dtype.is_integer or t.dtype.is_floating) or not t.shape.num_elements():
                continue
            ids = t.numpy()
            if t.dtype.is_floating:               # Embedding casts float ids to int32
                ids = np.trunc(ids[np.isfinite(ids)])
                if not ids.size:
                    continue
            low, high, n = ids.min(), ids.max(), int(layer.input_dim)
            if low < -n or high >= n:
                raise data_lib.id_range_error(layer, int(low), int(high), argument="x")

    def _ensure_traced(self, x, y, sample_weight):
        """The concrete function for this call: traced once per signature -- the input
        structure (tuple, list, dict and keys), dtypes and per-example shapes, the batch
        dimension unknown -- and looked up by a key built without tensor specs.

        One compiled function per RANK signature: ``tf.function``'s ``reduce_retracing``
        would relax a rank it has not seen ((8,) after (8, 1)) to an unknown rank, which
        Keras losses cannot trace; the Fisher keeps one plan per signature likewise.  The
        first rank signature uses ``self._function``; the traces of the others are counted
        in :meth:`tracing_count` (as retired traces) when they happen."""
        if getattr(self, "_traced_for", None) is not self._function:    # a new compiled step
            self._traced_for, self._concretes, self._rank_functions = self._function, {}, {}
        batch_axis = 0 if self.steps_per_call == 1 else 1
        key = _signature_key(x, y, sample_weight, batch_axis)
        concrete = self._concretes.get(key)
        if concrete is not None:
            return concrete
        rank_key = (key[0], tuple(len(shape) for _, shape in key[1]))
        function = self._rank_functions.get(rank_key)
        if function is None:
            function = self._function if not self._rank_functions else self._compile()
            self._rank_functions[rank_key] = function

        def relax(t):
            shape = t.shape.as_list()
            shape[batch_axis] = None
            return tf.TensorSpec(shape, t.dtype)

        specs = (tf.nest.map_structure(relax, x), tf.nest.map_structure(relax, y),
                 None if sample_weight is None else tf.nest.map_structure(relax, sample_weight))
        before = function.experimental_get_tracing_count()
        # Traced here, not at the call: the trace's custom gradients (Keras optimizers
        # register one) are released with this step (see _keras_compat).
        with compat.release_custom_gradients_with(self) as graphs:
            concrete = function.get_concrete_function(*specs)
            graphs.append(concrete.graph)
        if function is not self._function:
            self._retired_traces += function.experimental_get_tracing_count() - before
        if not getattr(self, "_probabilities_checked", False):
            self._probabilities_checked = True
            self._warn_if_probabilities(x)
        self._signatures.add(key)
        self._concretes[key] = concrete
        return concrete

    def _warn_if_probabilities(self, x):
        """A loss with ``from_logits=True`` on outputs a softmax or sigmoid produced: Keras'
        cross-entropy warns itself when it sees them (the activation's ``_keras_logits``),
        but not when the output is cast first (a float16 / bfloat16 output, converted to the
        loss's float32), and then applies the activation a second time.  Warn then, once
        per step, at the first trace: one eager forward pass of one example, for such
        losses on such models only."""
        try:
            lik = likelihood_lib.resolve_loss(self.loss)
        except ValueError:
            return
        narrow = ("float16", "bfloat16")
        if not lik.from_logits or not any(
                getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None) in narrow
                for layer in compat.all_layers(self.model)):
            return
        pick = (lambda t: t[:1]) if self.steps_per_call == 1 else (lambda t: t[0][:1])
        with IdGuard(self.model):
            out = tf.nest.flatten(self.model(tf.nest.map_structure(pick, x), training=False))[0]
        activation = likelihood_lib.probability_activation(out)
        if activation is None or tf.as_dtype(out.dtype) == tf.as_dtype(getattr(self.loss, "dtype", None) or "float32"):
            return              # none, or Keras' loss sees it and warns itself
        warnings.warn(
            f"fastewc.TrainStep: `loss` {type(self.loss).__name__} has from_logits=True, but "
            f"{likelihood_lib.describe_output(self.model)} comes from a {activation} activation, "
            f"so it holds probabilities, not logits. The output is {out.dtype.name} and is cast "
            f"for the loss, which hides the activation from Keras' check: the loss applies "
            f"{activation} a second time. Pass from_logits=False, or remove the activation.",
            stacklevel=4)

    # -- building ------------------------------------------------------------------------
    def _num_replicas(self):
        return 1 if self.strategy is None else int(self.strategy.num_replicas_in_sync)

    def _compile(self, *, distributed_input=False):
        """The compiled step.  Every path is :meth:`_replica_step`: called directly on one
        device, or through ``strategy.run`` on each replica's rows (split here from the
        global batch, or already distributed with ``distributed_input``); k > 1 steps run
        it in a ``tf.while_loop``."""
        strategy, k = self.strategy, self.steps_per_call
        guard, count_ids = self.stop_on_nonfinite or bool(self._id_layers), bool(self._id_layers)
        grads_fn = self._loss_and_grads
        if strategy is not None and self.jit_compile:
            # XLA per replica; the all-reduce and the update run outside it.
            grads_fn = tf.function(grads_fn, jit_compile=True, autograph=False)

        def replica_step(x, y, sample_weight, allowed=None):
            return self._replica_step(x, y, sample_weight, grads_fn, allowed)

        def one_step(x, y, sample_weight, allowed=None):
            if strategy is None:
                return replica_step(x, y, sample_weight, allowed)
            # Any strategy (even one replica) goes through strategy.run: Keras optimizers
            # apply gradients in a replica context.  `allowed` is None: stop_on_nonfinite
            # is refused under a strategy.
            if not distributed_input:
                x, y = distribute_lib.split_rows(strategy, (x, y))
                if sample_weight is not None:
                    sample_weight = distribute_lib.split_rows(strategy, sample_weight)
            per_replica = strategy.run(lambda *args: replica_step(*args)[0],   # no id counts
                                       args=(x, y, sample_weight))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None), None

        if k == 1:
            def function(x, y, sample_weight):
                value, bad_ids = one_step(x, y, sample_weight)
                return (value, bad_ids) if count_ids else value
        else:
            def function(xs, ys, sample_weights):
                def body(i, losses, counts, ok):
                    pick = lambda t: t[i]  # noqa: E731
                    sw = None if sample_weights is None else tf.nest.map_structure(pick, sample_weights)
                    value, bad_ids = one_step(tf.nest.map_structure(pick, xs),
                                              tf.nest.map_structure(pick, ys), sw, ok if guard else None)
                    # once a step is non-finite or reads ids outside a table, no later step
                    # of this call applies
                    if self.stop_on_nonfinite:
                        ok = tf.logical_and(ok, tf.math.is_finite(value))
                    if count_ids:
                        ok = tf.logical_and(ok, tf.reduce_all(bad_ids == 0))
                        counts = counts.write(i, bad_ids)
                    return i + 1, losses.write(i, value), counts, ok

                losses = tf.TensorArray(tf.float32, size=k, element_shape=[])
                counts = tf.TensorArray(tf.float32, size=k, element_shape=[len(self._id_layers)])
                _, losses, counts, _ = tf.while_loop(lambda i, *_: i < k, body,
                                                     (tf.constant(0), losses, counts, tf.constant(True)),
                                                     maximum_iterations=k)
                return (losses.stack(), counts.stack()) if count_ids else losses.stack()

        jit = self.jit_compile and strategy is None
        return tf.function(function, jit_compile=jit, autograph=False, reduce_retracing=True)

    def _loss_and_grads(self, x, y, sample_weight, data_weight, replica_scale):
        """Forward and backward pass: (objective, gradients of the loss-scaled objective,
        the counts of ids outside each Embedding's table (E,), or None without any)."""
        model, optimizer = self.model, self.optimizer
        with tf.GradientTape() as tape:
            with IdGuard(model, self._id_layers) as ids:   # clamps and counts (no-op without)
                y_pred = model(x, training=True)
            data_loss = tf.cast(self.loss(y, y_pred, sample_weight=sample_weight), tf.float32)
            objective = data_loss * data_weight
            if model.losses:
                extra = tf.add_n([tf.cast(l, tf.float32) for l in model.losses])
                objective = objective + extra * replica_scale
            scaled = optimizer.scale_loss(objective)
        grads = tape.gradient(scaled, self._variables)
        return objective, grads, (tf.stack(ids.counts()) if self._id_layers else None)

    def _replica_step(self, x, y, sample_weight, grads_fn, allowed=None):
        """One optimizer step in a replica (or on the one device): (objective, id counts or
        None).  The update is skipped when the objective is not finite
        (``stop_on_nonfinite``), when an Embedding read ids outside its table, or when
        ``allowed`` is False."""
        with tf.name_scope("fastewc/train_step"):
            data_weight, replica_scale = _replica_weights(self.loss, x)
            objective, grads, bad_ids = grads_fn(x, y, sample_weight, data_weight, replica_scale)
            grads = list(grads)
            if self.ewc is not None:
                penalty, grads = add_penalty(self.ewc, grads, self._variables,
                                             optimizer=self.optimizer, replica_scale=replica_scale)
                objective = objective + penalty * replica_scale
            checks = [] if allowed is None else [allowed]
            if self.stop_on_nonfinite:
                checks.append(tf.math.is_finite(objective))
            if bad_ids is not None:
                checks.append(tf.reduce_all(bad_ids == 0))
            if not checks:
                self.optimizer.apply(grads, self._variables)
                return objective, bad_ids

            def apply():
                self.optimizer.apply(grads, self._variables)
                return tf.constant(True)

            tf.cond(tf.reduce_all(tf.stack(checks)), apply, lambda: tf.constant(False))
            return objective, bad_ids


# -- helpers ----------------------------------------------------------------------------
def _raise_if_nonfinite(losses, ewc=None):
    """A FloatingPointError for the first non-finite loss of a call.  When ``ewc``'s
    penalty is what is not finite, the message names its variables: the penalty is read
    again eagerly, on this error path only, at the weights of the step that was stopped
    (it was not applied), where :func:`fastewc.penalty.check_finite` diagnoses it."""
    values = np.atleast_1d(np.asarray(losses))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        where = f"step {i} of this call ({values.size} steps)" if values.size > 1 else "this step"
        cause = None
        if ewc is not None:
            try:
                ewc.penalty()
            except FloatingPointError as err:
                cause = err
        culprit = (f" The EWC penalty is not finite at these weights: {cause}" if cause is not None
                   else " Check the learning rate, the inputs and the EWC lam.")
        raise FloatingPointError(
            f"fastewc: the training loss became non-finite ({values[i]}) at {where}. That update "
            "and any after it in the call were not applied: the weights and the optimizer state are "
            f"those before it.{culprit}") from cause


def _to_tensor(t):
    return t if isinstance(t, tf.Tensor) else tf.convert_to_tensor(t)


def _signature_key(x, y, sample_weight, batch_axis):
    """(structures, ((dtype, shape without the batch axis), ...)): what a trace of the step
    depends on, hashable and cheap to build on every call."""
    nests = (x, y) if sample_weight is None else (x, y, sample_weight)
    structure = tuple(data_lib.structure_key(n) for n in nests) + (sample_weight is None,)
    leaves = []
    for t in tf.nest.flatten(nests):
        shape = tuple(t.shape)
        leaves.append((t.dtype, shape[:batch_axis] + shape[batch_axis + 1:]))
    return structure, tuple(leaves)


def _direct_id_inputs(model):
    """[(position in model.inputs, input name, number of inputs, Embedding layer)] for each
    Embedding whose input is a model input itself (functional and Sequential models; the
    public ``layer.input``: the tensor of its first call)."""
    inputs = list(getattr(model, "inputs", None) or []) if isinstance(model, keras.Model) else []
    feeds = []
    if not inputs:
        return feeds
    for layer in embedding_layers(model):
        try:
            source = layer.input
        except (AttributeError, ValueError, RuntimeError):   # never called symbolically
            continue
        for position, ref in enumerate(inputs):
            if source is ref:
                feeds.append((position, getattr(ref, "name", None), len(inputs), layer))
    return feeds


def _check_single_output(model):
    """``model`` has one output (a functional model with several raises, naming them)."""
    outputs = tf.nest.flatten(getattr(model, "outputs", None) or [])
    if len(outputs) > 1:
        names = [getattr(getattr(t, "_keras_history", None), "operation", None) for t in outputs]
        names = [getattr(op, "name", "?") for op in names]
        raise ValueError(
            f"`model` must have one output: make_train_step trains with one `loss` on one output. "
            f"Received: model '{model.name}' with {len(outputs)} outputs (from layers {names}). "
            "Train it with fastewc.EWCModel(model, ewc) and Keras' compile(loss=[...]) (a loss "
            "per output, summed, as in Keras fit).")


def _any_distributed(x):
    return any(isinstance(t, tf.distribute.DistributedValues) for t in tf.nest.flatten(x))


def _replica_weights(loss, x):
    """(weight of this replica's reduced data loss, weight of batch-independent terms).

    Keras' mean reductions already divide by R inside a replica
    (``scale_loss_for_distribution``); n_r·R/N turns that into this replica's exact share
    of the global mean, also for uneven shards.  ``"sum"`` is summed as it is.
    """
    ctx = tf.distribute.get_replica_context()
    replicas = 1 if ctx is None else ctx.num_replicas_in_sync
    if replicas == 1:
        return tf.constant(1.0), tf.constant(1.0)
    replica_scale = tf.constant(1.0 / replicas)
    if loss.reduction == "sum":
        return tf.constant(1.0), replica_scale
    n_local = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
    n_global = ctx.all_reduce(tf.distribute.ReduceOp.SUM, n_local)
    return n_local * replicas / n_global, replica_scale


def _resolve_loss(loss):
    if isinstance(loss, keras.losses.Loss):
        if loss.reduction in (None, "none"):
            raise ValueError(
                "`loss` must reduce to a scalar: use reduction='sum_over_batch_size' (the "
                f"default) or 'sum'. Received: loss={type(loss).__name__} with "
                f"reduction={loss.reduction!r}")
        return loss
    if isinstance(loss, str):
        try:
            fn = keras.losses.get(loss)
        except ValueError:
            fn = None
        if fn is None:
            raise ValueError(f"`loss` must be a Keras loss name, keras.losses.Loss or a function "
                             f"f(y_true, y_pred). Received: loss={loss!r}")
        if isinstance(fn, keras.losses.Loss):
            return fn
        return compat.LossFunctionWrapper(fn, name=loss)
    if callable(loss):
        return compat.LossFunctionWrapper(loss, name=getattr(loss, "__name__", None))
    raise ValueError(f"`loss` must be a Keras loss name, keras.losses.Loss or a function "
                     f"f(y_true, y_pred). Received: loss of type {type(loss).__name__}")


def _resolve_strategy(strategy, model):
    """The strategy ``model`` was built in (None on one device); an explicit ``strategy``
    must be that one (the default strategy stands for none)."""
    owner = compat.model_strategy(model)
    if strategy is None:
        return owner
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError("`strategy` must be None or a tf.distribute.Strategy. Received: "
                         f"strategy of type {type(strategy).__name__}")
    default = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
    if strategy is owner or (default and owner is None):
        return owner
    where = (f"{type(owner).__name__}.scope()" if owner is not None
             else "no strategy scope: leave `strategy` None")
    raise ValueError(
        f"`strategy` must be None or the tf.distribute strategy `model` '{model.name}' was "
        f"built in ({where}). Received: strategy={type(strategy).__name__}")


def _resolve_optimizer(optimizer, model, strategy):
    if isinstance(optimizer, str):
        optimizer = keras.optimizers.get(optimizer)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError("`optimizer` must be a Keras 3 optimizer (keras.optimizers.Optimizer) "
                        f"or its name. Received: optimizer of type {type(optimizer).__name__}")
    if strategy is not None:
        if compat.optimizer_strategy(optimizer) is not strategy and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "`optimizer` was created outside the tf.distribute strategy scope of `model`: "
                "create it inside `with strategy.scope():`. Received: an optimizer of another "
                "(or no) strategy")
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        if uses_float16(model) and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
    return optimizer
