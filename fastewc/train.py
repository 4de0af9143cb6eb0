"""Compiled train steps with the EWC gradient added analytically.

One optimizer step on a batch (x, y) minimises

    L(θ) = L_data(θ) + Σ model.losses + P(θ),      P(θ) = λ/2 · Σ_i A_i (θ_i − μ_i)²

where L_data is the Keras loss with its own reduction (the mean over the batch for
``"sum_over_batch_size"``) and P the EWC penalty (:mod:`fastewc.ewc`).  The gradient is

    ∇L = ∇(L_data + Σ model.losses)   (one GradientTape over the forward pass)
       + λ·A·(θ − μ)                   (``ewc.penalty_gradients()``: analytic, no tape)

so the penalty costs one fused elementwise pass over the parameters, not a second
backward pass.  The value returned by a step is ``L_data + Σ model.losses + P`` at the
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

Tracing.  Every compiled function is traced once per input structure and dtype, with the
batch dimension left unknown: a final partial batch or a new batch size does not retrace
(XLA still compiles one executable per distinct shape, cached).
"""
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras.src.losses.losses import LossFunctionWrapper

from fastewc import distribute as distribute_lib
from fastewc._checks import check_positive_int
from fastewc._layers import has_convolution
from fastewc.ewc import EWC

__all__ = ["make_train_step", "TrainStep", "default_jit_compile", "add_penalty"]


def make_train_step(model, optimizer, loss, *, ewc=None, jit_compile=None, steps_per_call=1,
                    stop_on_nonfinite=False):
    """A compiled ``step(x, y, sample_weight=None) -> loss`` that trains ``model``.

    Args:
      model: a built Keras 3 model.
      optimizer: a Keras 3 optimizer instance (or its name).  Under a ``mixed_float16``
        model it is wrapped in ``keras.optimizers.LossScaleOptimizer`` (``step.optimizer``
        is then the wrapper).  Create it in the same ``strategy.scope()`` as the model.
      loss: a Keras loss name, ``keras.losses.Loss`` or function ``f(y_true, y_pred)``
        returning per-example values (mean-reduced).  Its reduction must be a scalar one.
      ewc: ``None`` or a :class:`fastewc.EWC` built on ``model``; its gradient
        λ·A·(θ − μ) is added analytically to the data gradient.
      jit_compile: XLA on/off; ``None`` picks the faster measured default for the device
        (:func:`default_jit_compile`).
      steps_per_call: k optimizer steps per call; then ``step(xs, ys)`` takes k stacked
        batches, ``xs`` of shape ``(k, batch, ...)``, and returns the k losses.
      stop_on_nonfinite: like Keras ``TerminateOnNaN``, but safer: a step whose loss is
        NaN or Inf is NOT applied (nor any later step of the same call), and ``step()``
        raises ``FloatingPointError`` naming it; weights, optimizer state and so any EWC
        consolidated afterwards stay as they were before that step.  Costs one
        device-to-host read of the loss per call.  Not supported under ``tf.distribute``.

    Returns:
      a :class:`TrainStep`; ``step(x, y)`` returns L_data + Σ model.losses + P, float32
      (shape ``()``, or ``(k,)`` when ``steps_per_call=k > 1``).
    """
    variables = _check_model(model)
    check_positive_int("steps_per_call", steps_per_call)
    if jit_compile not in (None, True, False):
        raise ValueError(
            f"`jit_compile` must be None, True or False. Received: jit_compile={jit_compile!r}")
    loss_obj = _resolve_loss(loss)
    _check_ewc(ewc, model, variables)
    strategy = _model_strategy(model)
    if stop_on_nonfinite not in (True, False):
        raise ValueError("`stop_on_nonfinite` must be True or False. "
                         f"Received: stop_on_nonfinite={stop_on_nonfinite!r}")
    if stop_on_nonfinite and strategy is not None:
        raise ValueError("`stop_on_nonfinite=True` is not supported under tf.distribute (replicas "
                         "would have to agree to skip a step). Received: a model built in "
                         f"{type(strategy).__name__}.scope()")
    optimizer = _resolve_optimizer(optimizer, model, strategy)
    if jit_compile is None:
        jit_compile = default_jit_compile(model)
    elif jit_compile and steps_per_call > 1 and not default_jit_compile(model):
        warnings.warn(
            f"fastewc.make_train_step: jit_compile=True with steps_per_call={steps_per_call} on "
            f"CPU for model '{model.name}', which has convolutions: XLA's CPU convolutions inside "
            "the step loop were ~30x slower than without XLA in our benchmarks (reference CNN). "
            "jit_compile=None picks the faster setting.", stacklevel=2)
    return TrainStep(model, optimizer, loss_obj, ewc=ewc, jit_compile=jit_compile,
                     steps_per_call=steps_per_call, strategy=strategy,
                     stop_on_nonfinite=stop_on_nonfinite)


def default_jit_compile(model):
    """The faster measured XLA setting for a train step (benchmarks/bench_train_step.py).

    GPU: XLA.  CPU: XLA for models without convolutions, no XLA with them.  Measured on
    the 2-core CPU (min per optimizer step, Adam): reference MLP batch 32, 1.26 ms with
    XLA vs 1.78 ms without (0.66 vs 1.30 ms with ``steps_per_call=10``); batch 256, 3.9
    vs 4.7 ms; reference CNN batch 32, 122 ms with XLA vs 46 ms without (XLA's CPU
    convolutions are slower than TensorFlow's oneDNN kernels, and inside the
    ``steps_per_call`` loop far slower still).
    """
    if tf.config.list_physical_devices("GPU"):
        return True
    return not has_convolution(model)


class TrainStep:
    """A compiled train step; call it as ``step(x, y, sample_weight=None)``.

    Attributes: ``model``, ``optimizer`` (the one that applies the updates, possibly a
    ``LossScaleOptimizer`` wrapper), ``loss``, ``ewc``, ``jit_compile``,
    ``steps_per_call``, ``strategy`` (None on one device).
    """

    def __init__(self, model, optimizer, loss, *, ewc, jit_compile, steps_per_call, strategy,
                 stop_on_nonfinite=False):
        self.stop_on_nonfinite = bool(stop_on_nonfinite)
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.ewc = ewc
        self.jit_compile = bool(jit_compile)
        self.steps_per_call = steps_per_call
        self.strategy = strategy
        self._variables = list(model.trainable_variables)
        self._signatures = set()
        self._retired_traces = 0
        self._dv_function = None
        self._ewc_token = _ewc_token(ewc)
        self._function = self._build_function()

    # -- public --------------------------------------------------------------------------
    def __call__(self, x, y, sample_weight=None):
        if isinstance(x, tf.distribute.DistributedValues) or _any_distributed(x):
            if self.strategy is None:
                raise ValueError("`x` is a distributed value but the model was not built in a "
                                 "tf.distribute strategy scope. Received: x of type "
                                 f"{type(x).__name__}")
            self._refresh_if_ewc_grew()
            return self._distributed_values_function(x, y, sample_weight)
        self._refresh_if_ewc_grew()
        x = tf.nest.map_structure(_to_tensor, x)
        y = tf.nest.map_structure(_to_tensor, y)
        if sample_weight is not None:
            sample_weight = tf.nest.map_structure(_to_tensor, sample_weight)
        self._check_inputs(x, y, sample_weight)
        self._ensure_traced(x, y, sample_weight)
        result = self._function(x, y, sample_weight)
        if self.stop_on_nonfinite:
            _raise_if_nonfinite(result)
        return result

    def tracing_count(self):
        """Number of traces of the compiled step (a no-retrace check for tests)."""
        count = self._retired_traces + self._function.experimental_get_tracing_count()
        if self._dv_function is not None:
            count += self._dv_function.experimental_get_tracing_count()
        return count

    def _refresh_if_ewc_grew(self):
        """A consolidation that started tracking new variables (a grown model) changes what
        the penalty reads: build the compiled step again (one new trace)."""
        token = _ewc_token(self.ewc)
        if token != self._ewc_token:
            self._retired_traces = self.tracing_count()
            self._ewc_token = token
            self._signatures = set()
            self._dv_function = None
            self._function = self._build_function()

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

    def _ensure_traced(self, x, y, sample_weight):
        """Trace once per structure/dtype with the batch dimension unknown."""
        batch_axis = 0 if self.steps_per_call == 1 else 1

        def relax(t):
            shape = t.shape.as_list()
            shape[batch_axis] = None
            return tf.TensorSpec(shape, t.dtype)

        specs = (tf.nest.map_structure(relax, x), tf.nest.map_structure(relax, y),
                 None if sample_weight is None else tf.nest.map_structure(relax, sample_weight))
        key = repr(specs)
        if key not in self._signatures:
            self._function.get_concrete_function(*specs)
            self._signatures.add(key)

    # -- building ------------------------------------------------------------------------
    def _num_replicas(self):
        return 1 if self.strategy is None else int(self.strategy.num_replicas_in_sync)

    def _build_function(self):
        # Any strategy (even one replica) goes through strategy.run: Keras optimizers
        # apply gradients in a replica context.
        if self.strategy is not None:
            inner_jit = self.jit_compile
            grads_fn = tf.function(self._loss_and_grads, jit_compile=True, autograph=False) \
                if inner_jit else self._loss_and_grads
            replica_step = lambda x, y, sw: self._replica_step(x, y, sw, grads_fn)  # noqa: E731
            one_step = lambda x, y, sw: self._distributed_step(replica_step, x, y, sw)  # noqa: E731
            jit = False
        else:
            one_step = lambda x, y, sw, ok=None: self._replica_step(  # noqa: E731
                x, y, sw, self._loss_and_grads, allowed=ok)
            jit = self.jit_compile
        k = self.steps_per_call

        if k == 1:
            def function(x, y, sample_weight):
                return one_step(x, y, sample_weight)
        else:
            def function(xs, ys, sample_weights):
                guard = self.stop_on_nonfinite

                def body(i, losses, ok):
                    pick = lambda t: t[i]  # noqa: E731
                    sw = None if sample_weights is None else tf.nest.map_structure(pick, sample_weights)
                    args = (tf.nest.map_structure(pick, xs), tf.nest.map_structure(pick, ys), sw)
                    if guard:   # once a step is non-finite, no later step of this call applies
                        value = one_step(*args, ok=ok)
                        ok = tf.logical_and(ok, tf.math.is_finite(value))
                    else:
                        value = one_step(*args)
                    return i + 1, losses.write(i, value), ok

                losses = tf.TensorArray(tf.float32, size=k, element_shape=[])
                _, losses, _ = tf.while_loop(lambda i, *_: i < k, body,
                                             (tf.constant(0), losses, tf.constant(True)),
                                             maximum_iterations=k)
                return losses.stack()

        return tf.function(function, jit_compile=jit, autograph=False, reduce_retracing=True)

    def _loss_and_grads(self, x, y, sample_weight, data_weight, replica_scale):
        """Forward and backward pass: (objective, gradients of the loss-scaled objective)."""
        model, optimizer = self.model, self.optimizer
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            data_loss = tf.cast(self.loss(y, y_pred, sample_weight=sample_weight), tf.float32)
            objective = data_loss * data_weight
            if model.losses:
                extra = tf.add_n([tf.cast(l, tf.float32) for l in model.losses])
                objective = objective + extra * replica_scale
            scaled = optimizer.scale_loss(objective)
        grads = tape.gradient(scaled, self._variables)
        return objective, grads

    def _replica_step(self, x, y, sample_weight, grads_fn, allowed=None):
        """One optimizer step in a replica (or on the one device)."""
        with tf.name_scope("fastewc/train_step"):
            data_weight, replica_scale = _replica_weights(self.loss, x)
            objective, grads = grads_fn(x, y, sample_weight, data_weight, replica_scale)
            grads = list(grads)
            if self.ewc is not None:
                with tf.name_scope("ewc_penalty"):
                    # The optimizer divides every gradient by the loss scale: scale the
                    # penalty gradient by it too, and by 1/R (replica gradients are summed).
                    scale = tf.cast(self.optimizer.scale_loss(tf.constant(1.0)), tf.float32) * replica_scale
                    variables = self._variables
                    penalty, grads = add_penalty(
                        self.ewc, grads, lambda g, p: _add_scaled(g, p, scale, variables))
                objective = objective + penalty * replica_scale
            if not self.stop_on_nonfinite:
                self.optimizer.apply(grads, self._variables)
                return objective
            ok = tf.math.is_finite(objective)
            ok = ok if allowed is None else tf.logical_and(ok, allowed)

            def apply():
                self.optimizer.apply(grads, self._variables)
                return tf.constant(True)

            tf.cond(ok, apply, lambda: tf.constant(False))
            return objective

    def _distributed_step(self, replica_step, x, y, sample_weight):
        strategy = self.strategy
        dx, dy = distribute_lib.split_rows(strategy, (x, y))
        dsw = None if sample_weight is None else distribute_lib.split_rows(strategy, sample_weight)
        per_replica = strategy.run(replica_step, args=(dx, dy, dsw))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _distributed_values_function(self, x, y, sample_weight):
        if self.steps_per_call != 1:
            raise ValueError("Distributed values are supported with steps_per_call=1 only. "
                             f"Received: steps_per_call={self.steps_per_call}")
        if self._dv_function is None:
            grads_fn = tf.function(self._loss_and_grads, jit_compile=True, autograph=False) \
                if self.jit_compile else self._loss_and_grads

            def function(dx, dy, dsw):
                per_replica = self.strategy.run(
                    lambda a, b, c: self._replica_step(a, b, c, grads_fn), args=(dx, dy, dsw))
                return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            self._dv_function = tf.function(function, autograph=False, reduce_retracing=True)
        return self._dv_function(x, y, sample_weight)


# -- helpers ----------------------------------------------------------------------------
def _raise_if_nonfinite(losses):
    values = np.atleast_1d(np.asarray(losses))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        where = f"step {i} of this call ({values.size} steps)" if values.size > 1 else "this step"
        raise FloatingPointError(
            f"fastewc: the training loss became non-finite ({values[i]}) at {where}. That update "
            "and any after it in the call were not applied: the weights and the optimizer state are "
            "those before it. Check the learning rate, the inputs and the EWC lam.")


def _to_tensor(t):
    return t if isinstance(t, tf.Tensor) else tf.convert_to_tensor(t)


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


def _ewc_token(ewc):
    """Changes when the EWC starts tracking more variables (its state only grows)."""
    return None if ewc is None else len(getattr(ewc, "tracked_paths", ()))


def add_penalty(ewc, grads, combine):
    """``(P, combine(grads, ∇P))``: the EWC penalty and the gradients with ∇P added.

    When the EWC can say whether its penalty is identically zero
    (:meth:`fastewc.EWC.penalty_is_active`: λ = 0 or no task yet), the penalty and the
    sum are one ``tf.cond`` branch: no penalty work at all while it is zero.  The branch
    boundary also makes XLA write each summed gradient g + s·λA(θ − μ) once, instead of
    fusing it into each of the optimizer's passes (Adam: the m and the v update), and
    without weight copies in the ``steps_per_call`` loop.  On the reference MLP at batch
    32 that measured +16-21% against +21-42% in one session and the same as no cond
    (+19-21%) in a later one (benchmarks/bench_train_step.py).  Data gradients that are
    None (unused variables) cannot pass a ``tf.cond``; then the sum is built without it.
    """
    def with_penalty():
        penalty, penalty_grads = _penalty_and_gradients(ewc)
        return penalty, combine(grads, penalty_grads)

    is_active = getattr(ewc, "penalty_is_active", None)
    if is_active is None or any(g is None for g in grads):
        return with_penalty()
    penalty, summed = tf.cond(is_active(), with_penalty, lambda: (tf.constant(0.0), list(grads)))
    return penalty, list(summed)


def _penalty_and_gradients(ewc):
    """(P, ∇P) from one fused pass when the EWC offers it, else from two calls."""
    if isinstance(ewc, EWC):
        value, grads = ewc.penalty_and_gradients(inline=True)   # no nested function
    elif hasattr(ewc, "penalty_and_gradients"):
        value, grads = ewc.penalty_and_gradients()
    else:
        value, grads = ewc.penalty(), ewc.penalty_gradients()
    return tf.cast(value, tf.float32), list(grads)


def _add_scaled(grads, penalty_grads, scale, variables):
    if len(penalty_grads) != len(variables):
        raise ValueError(
            f"`ewc.penalty_gradients()` returned {len(penalty_grads)} tensors for "
            f"{len(variables)} trainable variables: the EWC was built on another model.")
    out = []
    for g, p, v in zip(grads, penalty_grads, variables):
        if p is None:
            out.append(g)
            continue
        if g is None:
            out.append(tf.cast(p * scale, v.dtype))
        else:
            out.append(g + tf.cast(p * scale, g.dtype))
    return out


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a Keras model. Received: model of type {type(model).__name__}")
    if not model.built:
        raise ValueError(f"`model` '{model.name}' is not built: call it on a batch or build it "
                         "with an input shape first. Received: an unbuilt model")
    variables = model.trainable_variables
    if not variables:
        raise ValueError(f"`model` '{model.name}' has no trainable variables, nothing to train. "
                         "Received: a model with 0 trainable variables")
    return variables


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
        return LossFunctionWrapper(fn, name=loss)
    if callable(loss):
        return LossFunctionWrapper(loss, name=getattr(loss, "__name__", None))
    raise ValueError(f"`loss` must be a Keras loss name, keras.losses.Loss or a function "
                     f"f(y_true, y_pred). Received: loss of type {type(loss).__name__}")


def _check_ewc(ewc, model, variables):
    if ewc is None:
        return
    if not (hasattr(ewc, "penalty") and hasattr(ewc, "penalty_gradients")):
        raise TypeError("`ewc` must be None or a fastewc.EWC. "
                        f"Received: ewc of type {type(ewc).__name__}")
    ewc_model = getattr(ewc, "model", None)
    if ewc_model is not None and ewc_model is not model:
        ewc_vars = {id(v) for v in ewc_model.trainable_variables}
        if [id(v) for v in variables] != [id(v) for v in ewc_model.trainable_variables] \
                or not ewc_vars:
            raise ValueError(
                f"`ewc` was built on model '{ewc_model.name}', not on `model` '{model.name}'. "
                "Received: an EWC for another model")


def _model_strategy(model):
    """The strategy ``model`` was built in (or the current one), None on the default."""
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    return strategy


def _uses_float16(model):
    layers = [model] + list(model._flatten_layers(include_self=False, recursive=True))
    return any(getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None) == "float16"
               for layer in layers)


def _resolve_optimizer(optimizer, model, strategy):
    if isinstance(optimizer, str):
        optimizer = keras.optimizers.get(optimizer)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError("`optimizer` must be a Keras 3 optimizer (keras.optimizers.Optimizer) "
                        f"or its name. Received: optimizer of type {type(optimizer).__name__}")
    if strategy is not None:
        opt_strategy = getattr(optimizer, "_distribution_strategy", None)
        if opt_strategy is not strategy and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "`optimizer` was created outside the tf.distribute strategy scope of `model`: "
                "create it inside `with strategy.scope():`. Received: an optimizer of another "
                "(or no) strategy")
    scope = strategy.scope() if strategy is not None else _null_scope()
    with scope:
        if _uses_float16(model) and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
    return optimizer


class _null_scope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
