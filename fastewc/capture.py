"""Run a model's forward pass with each weighted layer's ``call`` swapped for its rule
(and each non-overlapping max pooling's for :mod:`fastewc.pooling`'s cheaper backward).

A layer's own trainable weights (not those of its sublayers) are what its rule accounts
for (:func:`fastewc._keras_compat.owned_trainable_variables`).  Nested models and layers
made of sublayers (MultiHeadAttention, a Sequential inside a functional model) are walked
down to their leaves.  The swap is an instance attribute, set and removed around each
trace, so the model is never left modified.

Threads: the swapped ``call`` applies to the thread that opened the context only (another
thread calling the model meanwhile runs the layer's own ``call``), and one model is
captured by one thread at a time (a lock kept on the model), so two Fisher estimators
planning or tracing on one model from two threads do not see each other's layers.
"""
import contextlib
import threading

import numpy as np

from fastewc import _cache
from fastewc import _keras_compat as compat
from fastewc import pooling, registry

_CAPTURE_LOCK = "_fastewc_capture"


def weighted_layers(model):
    """Every layer (model included) that owns trainable variables, in model order."""
    seen, out = set(), []
    for layer in compat.all_layers(model):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if compat.owned_trainable_variables(layer):
            out.append(layer)
    return out


def layers_without_rule(model, rules):
    return [layer for layer in weighted_layers(model) if rules.get(layer) is None]


class SharedLayerError(registry.UnsupportedLayerError):
    """A layer was called more than once in one forward pass."""


class Recorder:
    def __init__(self):
        self.records = []       # (layer, RuleOutput)
        self.shared = []        # layers called more than once
        self.unsupported = None  # the first UnsupportedLayerError a rule raised, as raised
        self._called = set()
        # Set by the caller before back-propagating: K ≥ pooling.MIN_COTANGENTS.
        self.mask_pooling = False

    def wrap(self, layer, rule):
        own_call = type(layer).call
        thread = threading.get_ident()

        def call(inputs, *args, **kwargs):
            if threading.get_ident() != thread:       # another thread: the layer as it is
                return own_call(layer, inputs, *args, **kwargs)
            try:
                result = registry.as_rule_output(rule(layer, inputs, *args, **kwargs), layer)
            except registry.UnsupportedLayerError as err:
                self.unsupported = self.unsupported or err   # before Keras decorates it
                raise
            if id(layer) in self._called:
                # Raised by capture() once the forward pass is over, so that Keras does not
                # wrap the message in its call-context decoration.
                if all(seen is not layer for seen in self.shared):
                    self.shared.append(layer)
            else:
                self._called.add(id(layer))
                self.records.append((layer, result))
            return result.outputs
        return call

    def check_not_shared(self):
        if self.shared:
            raise SharedLayerError(
                f"Layer {describe(self.shared)} is called more than once in one forward pass (a "
                "shared layer). The factored rules do not support shared layers yet: use "
                "method='vmap' for this model.")


def describe(layers):
    """"'dense' (Dense), 'scale' (LayerScale)": layers as the warnings name them."""
    return ", ".join(f"'{layer.name}' ({type(layer).__name__})" for layer in layers)


def model_lock(model):
    """The per-model re-entrant lock held while layers' ``call`` are swapped (here and by
    :class:`fastewc.engines.base.IdGuard`): the swaps of two threads never interleave."""
    return _cache.owned_cache(model, _CAPTURE_LOCK).setdefault("lock", threading.RLock())


@contextlib.contextmanager
def capture(model, rules):
    """Context in which ``model(x)`` records (layer, RuleOutput) for each weighted layer."""
    with model_lock(model):
        with _swapped_calls(model, rules) as recorder:
            yield recorder
        recorder.check_not_shared()


@contextlib.contextmanager
def _swapped_calls(model, rules):
    recorder = Recorder()
    patched = []
    thread = threading.get_ident()
    try:
        for layer in weighted_layers(model):
            rule = rules.get(layer)
            if rule is None:
                raise registry.UnsupportedLayerError(
                    f"Layer '{layer.name}' of class {type(layer).__name__} has trainable weights "
                    "but no factored Fisher rule. " + registry.registration_hint(type(layer).__name__))
            if layer is model:
                raise registry.UnsupportedLayerError(
                    f"Model '{model.name}' owns trainable variables directly; the factored method "
                    "needs them inside layers. Use method='vmap'.")
            object.__setattr__(layer, "call", recorder.wrap(layer, rule))
            patched.append(layer)
        for layer in compat.nested_layers(model):
            call = pooling.masked_max_pool_call(layer, lambda: recorder.mask_pooling)
            if call is not None and "call" not in layer.__dict__:
                object.__setattr__(layer, "call", _this_thread_only(layer, call, thread))
                patched.append(layer)
        yield recorder
    finally:
        for layer in patched:
            layer.__dict__.pop("call", None)


def _this_thread_only(layer, call, thread):
    own_call = type(layer).call

    def dispatch(*args, **kwargs):
        if threading.get_ident() != thread:
            return own_call(layer, *args, **kwargs)
        return call(*args, **kwargs)
    return dispatch


def survey(model, x, rules):
    """One eager forward pass of one example under :func:`capture`: the per-example probe
    size (floats the K deltas of one example take), or raises
    :class:`fastewc.registry.UnsupportedLayerError` (no rule, a shared layer, a layer
    configuration its rule does not cover)."""
    recorder = None
    try:
        with capture(model, rules) as recorder:
            model(x, training=False)
    except registry.UnsupportedLayerError:
        if recorder is not None and recorder.unsupported is not None:
            raise recorder.unsupported from None      # the rule's own message
        raise
    return sum(int(np.prod(result.probe.shape[1:])) for _, result in recorder.records)
