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
| auto       | factored when every weighted layer has a rule (decided once,|                    |
|            | before the stream, by the estimator's plan), else vmap     |                    |

Streaming: examples go through in fixed-size batches (:mod:`fastewc.data`); per-batch
sums are accumulated in float64, so memory is O(P) whatever N, and no float32 drift
builds up over many batches.  Each batch runs one compiled function, traced once per
plan and reused across calls.

:func:`fisher_diagonal` is a thin wrapper over :class:`fastewc.FisherEstimator`: it keeps
one estimator per configuration on the model itself, so the compiled state lives as long
as the model and no longer.  Hold a :class:`fastewc.FisherEstimator` yourself to own it.

Mixed precision: the model may compute in float16 or bfloat16; the Fisher is float32.
Cotangents are multiplied by 2⁸ before a float16 backward pass and the gradients divided
by it in float32 before squaring (a static loss scale against underflow).
"""
from fastewc import _cache
from fastewc._checks import check_model
from fastewc.estimator import FisherEstimator, make_config

_CACHE_ATTRIBUTE = _cache.FISHER_ESTIMATORS


def fisher_diagonal(model, data, *, loss, kind="empirical", method="auto", batch_size=None,
                    num_samples=1, seed=None, jit_compile=None, verbose=0, rules=None,
                    max_examples=None, positions="sum"):
    """Diagonal Fisher of ``model`` over ``data``: a list of float32 tensors, one per
    ``model.trainable_variables`` entry, with the same shapes.

    Args:
      model: a built Keras 3 model (Sequential, functional or subclassed).
      data: ``(x, y)`` or ``(x, y, sample_weight)`` arrays/tensors, or a ``tf.data.Dataset``
        yielding such batches; ``sample_weight`` (batch,) or (batch, positions...) weighs
        each example's or position's log-likelihood (0 for padding).
      loss: Keras loss name or object: sparse/categorical/binary cross-entropy
        (``from_logits`` honoured) or ``"mse"`` (unit-variance Gaussian).
      kind: ``"empirical"`` (true labels), ``"sampled"`` (``num_samples`` labels drawn from
        the model per example) or ``"exact"`` (full expectation over the outcomes).
      method: ``"auto"``, ``"factored"``, ``"vmap"``, ``"jacobian"`` or ``"loop"``.
      batch_size: None (default): the engine takes as many examples per compiled call as
        its memory budget holds (:mod:`fastewc._memory`); n: at most n (a memory cap; the
        result is the mean over all examples whatever the batching).
      num_samples: draws per example for ``kind="sampled"``.
      seed: int for reproducible sampled labels (same seed and batch_size, same result).
      jit_compile: XLA on/off; None picks the faster measured default for the device.
      verbose: 0 silent, 1 a progress bar and the method chosen.
      rules: a :class:`fastewc.Rules` registry for the factored engine (None: the default).
      max_examples: the most examples read: None reads all of ``data``, except that a
        ``tf.data.Dataset`` of unknown cardinality (which may be endless, e.g.
        ``ds.repeat().filter(f)``) is read up to ``fastewc.data.UNKNOWN_CARDINALITY_MAX_EXAMPLES``
        examples, with a warning if it had more; n reads the first n (an infinite dataset
        needs it).
      positions: outputs with positions (tokens, pixels): ``"sum"`` (default) or ``"mean"``
        of the per-position log-likelihoods per example (:class:`fastewc.FisherEstimator`).

    Returns:
      list of float32 ``tf.Tensor``: F = (1/N) Σ_n E_y[g_n(y)²] for each variable.
    """
    return estimator_for(model, loss=loss, kind=kind, method=method, batch_size=batch_size,
                         num_samples=num_samples, jit_compile=jit_compile, rules=rules,
                         positions=positions)(
        data, seed=seed, verbose=verbose, max_examples=max_examples)


def kfac_fisher(model, data, *, loss, kind="empirical", batch_size=None, num_samples=1, seed=None,
                jit_compile=None, verbose=0, rules=None, max_examples=None, positions="sum"):
    """Kronecker-factored Fisher of ``model`` over ``data`` (:mod:`fastewc.curvature`): for
    each Dense, convolution or EinsumDense layer the factors of its block, F_W̄ ≈ A ⊗ G,

        A = (1/N) Σ_n (1/L) Σ_l ā_nl ā_nlᵀ,      G = (1/N) Σ_n E_y[Σ_l δ_nl δ_nlᵀ]

    (ā = [a, 1]: the layer's input rows at its L output positions; δ = ∂ℓ/∂z), and the
    diagonal Fisher of every other trainable variable.  Same arguments as
    :func:`fisher_diagonal`; the method is the factored engine's (every weighted layer
    needs a rule).  Cost: one forward pass and K backward passes per batch, as the
    diagonal, plus two matmuls per block; memory d'² + u² floats per block.

    Returns:
      :class:`fastewc.curvature.KroneckerFisher`: ``blocks`` (layer, variables, A, G: float32)
      and ``diagonal`` aligned with ``model.trainable_variables`` (None where a block covers
      the variable).
    """
    return estimator_for(model, loss=loss, kind=kind, method="factored", batch_size=batch_size,
                         num_samples=num_samples, jit_compile=jit_compile, rules=rules,
                         curvature="kfac", positions=positions)(
        data, seed=seed, verbose=verbose, max_examples=max_examples)


def estimator_for(model, *, owner=None, **config):
    """The :class:`FisherEstimator` of ``model`` for this configuration, cached on ``owner``
    (None: ``model``; an EWC passes itself) by :func:`fastewc._cache.cached`: it lives
    exactly as long as its owner.  The key is (id(model), config): the estimator holds
    ``model``, so the id names it while cached."""
    check_model(model, built=False)
    key = (id(model), make_config(**config))
    return _cache.cached(model if owner is None else owner, _CACHE_ATTRIBUTE, key,
                         lambda: FisherEstimator(model, **config))


def tracing_count(model):
    """Total traces of the compiled Fisher functions cached on ``model`` (for tests)."""
    return sum(e.tracing_count() for e in model.__dict__.get(_CACHE_ATTRIBUTE, {}).values())
