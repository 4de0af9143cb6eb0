"""Run a model's forward pass with each weighted layer's ``call`` swapped for its rule
(and each non-overlapping max pooling's for :mod:`fastewc.pooling`'s cheaper backward).

A layer's own trainable weights (not those of its sublayers) are what its rule accounts
for (:func:`fastewc._keras_compat.owned_trainable_variables`); a weighted layer without a
rule gets :func:`fastewc.generic_rule.generic_rule` (its own per-example gradients,
vectorized for that layer alone).  Nested models and layers
made of sublayers (MultiHeadAttention, a Sequential inside a functional model) are walked
down to their leaves.  The swap is an instance attribute, set and removed around each
trace, so the model is never left modified.

The swap itself is :func:`swapped_calls`, the one mechanism of the package that replaces a
layer's ``call`` (the Embedding id guard, :class:`fastewc.engines.base.IdGuard`, uses it
too).  Threads: the swapped ``call`` applies to the thread that opened the context only
(another thread calling the model meanwhile runs the layer's ``call`` as it was), and one
model's calls are swapped by one thread at a time (a lock kept on the model), so two Fisher
estimators planning or tracing on one model from two threads do not see each other's layers.
"""
import contextlib
import threading

import keras
import numpy as np
import tensorflow as tf

from fastewc import _cache
from fastewc import _keras_compat as compat
from fastewc import pooling, registry
from fastewc.generic_rule import generic_rule

_CAPTURE_LOCK = "_fastewc_capture"


def weighted_layers(model, rules=None):
    """The layers the factored engine takes one rule each for, in model order: a layer
    with a rule and trainable variables of its own or of its sublayers (the rule accounts
    for all of them: an LSTM's rule for its cell's weights), else each layer that owns
    trainable variables (the model included).  ``rules`` None: the default registry."""
    rules = registry.check_rules(rules)
    seen, out = set(), []

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if layer is not model and rules.get(layer) is not None and layer.trainable_weights:
            out.append(layer)
            return
        if compat.owned_trainable_variables(layer):
            out.append(layer)
        for child in compat.child_layers(layer):
            visit(child)

    visit(model)
    return out


def outer_layers(model):
    """{id(layer): the outermost layer (not a Model) it is nested in} for every layer of
    ``model`` nested inside another layer: the layer the user wrote (the LSTM of an
    LSTMCell, the MultiHeadAttention of an EinsumDense)."""
    found = {}

    def visit(layer, outer):
        for child in compat.child_layers(layer):
            if id(child) in found:
                continue
            if outer is not None:
                found[id(child)] = outer
            visit(child, outer if outer is not None or isinstance(child, keras.Model) else child)

    visit(model, None)
    return found


def layers_without_rule(model, rules):
    return [layer for layer in weighted_layers(model, rules) if rules.get(layer) is None]


class SharedLayerError(registry.UnsupportedLayerError):
    """A layer was called more than once in one forward pass (``layers``: those layers)."""

    def __init__(self, message, layers=()):
        super().__init__(message)
        self.layers = list(layers)


def shared_layer_error(layers, *, refusal=None):
    """The :class:`SharedLayerError` for ``layers``.  ``refusal``: why the curvature chosen
    cannot take a shared layer at all (its kind's ``shared_layer_refusal``: a layer applied
    at several places per example has a sum of Kronecker products as its Fisher block, not
    one), then the diagonal is the way; None: the diagonal's own way, per-example gradients
    (method='vmap')."""
    what = (f"Layer {describe(layers)} is called more than once in one forward pass (a shared "
            "layer). ")
    if refusal is not None:
        return SharedLayerError(
            what + refusal + " Use curvature='diagonal' for this model (with method='auto' its "
            "Fisher then comes from per-example gradients).", layers)
    return SharedLayerError(
        what + "The factored rules do not support shared layers yet: use method='vmap' for "
        "this model.", layers)


class Recorder:
    def __init__(self):
        self.records = []       # (layer, RuleOutput)
        self.shared = []        # layers called more than once whose rule has no ``merge``
        self.unsupported = None  # the first UnsupportedLayerError a rule raised, as raised
        self._called = {}       # id(layer) -> its index in ``records``
        # Set by the caller before back-propagating: K ≥ pooling.MIN_COTANGENTS.
        self.mask_pooling = False

    def wrap(self, layer, rule):
        def call(inputs, *args, **kwargs):
            try:
                result = registry.as_rule_output(rule(layer, inputs, *args, **kwargs), layer)
            except registry.UnsupportedLayerError as err:
                self.unsupported = self.unsupported or err   # before Keras decorates it
                raise
            index = self._called.get(id(layer))
            if index is None:
                self._called[id(layer)] = len(self.records)
                self.records.append((layer, result))
            elif self.records[index][1].merge is not None:
                # A rule that takes several calls (a tied embedding): one record, both calls.
                merged = registry.as_rule_output(self.records[index][1].merge(result), layer)
                self.records[index] = (layer, merged)
            elif all(seen is not layer for seen in self.shared):
                # Raised by capture() once the forward pass is over, so that Keras does not
                # wrap the message in its call-context decoration.
                self.shared.append(layer)
            return result.outputs
        return call

    def check_not_shared(self):
        if self.shared:
            raise shared_layer_error(self.shared)


def describe(layers, model=None):
    """"'dense' (Dense), 'lstm_cell' (LSTMCell) in 'lstm' (LSTM)": layers as the warnings
    name them; with ``model``, a nested layer also names the layer the user wrote."""
    outer = outer_layers(model) if model is not None else {}

    def one(layer):
        text = f"'{layer.name}' ({type(layer).__name__})"
        if id(layer) in outer:
            text += f" in '{outer[id(layer)].name}' ({type(outer[id(layer)]).__name__})"
        return text
    return ", ".join(one(layer) for layer in layers)


def model_lock(model):
    """The per-model re-entrant lock held while :func:`swapped_calls` has layers' ``call``
    swapped: the swaps of two threads never interleave, and one thread's swaps can nest."""
    return _cache.owned_cache(model, _CAPTURE_LOCK).setdefault("lock", threading.RLock())


@contextlib.contextmanager
def swapped_calls(model, swaps):
    """Within this context the current thread calls ``make(call)`` in place of each layer's
    ``call``, for the ``(layer, make)`` pairs of ``swaps`` (layers of ``model``; ``call`` is
    the layer's ``call`` as the context found it, which ``make``'s may wrap); any other
    thread keeps calling ``call``.

    The swap is an instance ``call`` attribute (Keras' ``__call__`` reads ``self.call``),
    set on entry and put back as it was on exit, under :func:`model_lock`: contexts nest
    (an inner one wraps or replaces the outer one's call and restores it), and the model is
    never left modified."""
    thread = threading.get_ident()
    with model_lock(model):
        saved = []
        try:
            for layer, make in swaps:
                previous = layer.call
                saved.append((layer, layer.__dict__.get("call", _UNSET)))
                object.__setattr__(layer, "call", _this_thread_only(previous, make(previous), thread))
            yield
        finally:
            for layer, call in reversed(saved):
                if call is _UNSET:
                    layer.__dict__.pop("call", None)
                else:
                    object.__setattr__(layer, "call", call)


_UNSET = object()


def _this_thread_only(previous, call, thread):
    def dispatch(*args, **kwargs):
        return (call if threading.get_ident() == thread else previous)(*args, **kwargs)
    return dispatch


@contextlib.contextmanager
def capture(model, rules):
    """Context in which ``model(x)`` records (layer, RuleOutput) for each weighted layer
    (on this thread, see :func:`swapped_calls`)."""
    recorder = Recorder()
    with swapped_calls(model, _swaps(model, rules, recorder)):
        yield recorder
    recorder.check_not_shared()


def _swaps(model, rules, recorder):
    """The (layer, make call) pairs of :func:`capture`: each weighted layer's rule, each
    non-overlapping max pooling's masked backward (:mod:`fastewc.pooling`)."""
    swaps = []
    for layer in weighted_layers(model, rules):
        if layer is model:
            raise registry.UnsupportedLayerError(
                f"Model '{model.name}' owns trainable variables directly; the factored method "
                "needs them inside layers. Use method='vmap'.")
        rule = rules.get(layer) or generic_rule      # no rule: the per-layer path
        swaps.append((layer, lambda _, layer=layer, rule=rule: recorder.wrap(layer, rule)))
    for layer in compat.nested_layers(model):
        call = pooling.masked_max_pool_call(layer, lambda: recorder.mask_pooling)
        if call is not None and "call" not in layer.__dict__:
            swaps.append((layer, lambda _, call=call: call))
    return swaps


def survey(model, x, rules):
    """One eager forward pass of one example ``x`` under :func:`capture` (an estimator's
    planning pass): ``(records, probe floats per example)``, ``records`` the (layer,
    RuleOutput) of each weighted layer (the block plan's input,
    :class:`fastewc.blocks.BlockPlan`) and the probe floats what the K deltas of one
    example take; or raises :class:`fastewc.registry.UnsupportedLayerError` (no rule, a
    shared layer, a layer configuration its rule does not cover)."""
    recorder = None
    try:
        with capture(model, rules) as recorder:
            model(x, training=False)
    except registry.UnsupportedLayerError:
        if recorder is not None and recorder.unsupported is not None:
            raise recorder.unsupported from None      # the rule's own message
        raise
    return recorder.records, sum(int(np.prod(probe.shape[1:])) for _, result in recorder.records
                                 for probe in tf.nest.flatten(result.probe))
