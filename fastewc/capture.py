"""Run a model's forward pass with each weighted layer's ``call`` swapped for its rule
(and each non-overlapping max pooling's for :mod:`fastewc.pooling`'s cheaper backward).

``owned_trainable_variables(layer)`` is a layer's own trainable weights (not those of its
sublayers): those are what a rule accounts for.  Nested models and layers made of
sublayers (MultiHeadAttention, a Sequential inside a functional model) are walked down to
their leaves.  The swap is an instance attribute, set and removed around each trace, so
the model is never left modified.
"""
import contextlib

from fastewc import pooling, registry


def owned_trainable_variables(layer):
    if not layer.trainable:
        return []
    return [v for v in getattr(layer, "_trainable_variables", []) if v.trainable]


def weighted_layers(model):
    """Every layer (model included) that owns trainable variables, in model order."""
    layers = [model] + list(model._flatten_layers(include_self=False, recursive=True))
    seen, out = set(), []
    for layer in layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if owned_trainable_variables(layer):
            out.append(layer)
    return out


def layers_without_rule(model):
    return [layer for layer in weighted_layers(model) if registry.get_rule(layer) is None]


class SharedLayerError(ValueError):
    """A layer was called more than once in one forward pass."""


class Recorder:
    def __init__(self):
        self.records = []       # (layer, probe, sum_sq)
        self.shared = []        # layers called more than once
        self._called = set()
        # Set by the caller before back-propagating: K ≥ pooling.MIN_COTANGENTS.
        self.mask_pooling = False

    def wrap(self, layer, rule):
        def call(inputs, *args, **kwargs):
            outputs, probe, sum_sq = rule(layer, inputs, *args, **kwargs)
            if id(layer) in self._called:
                # Raised by capture() once the forward pass is over, so that Keras does not
                # wrap the message in its call-context decoration.
                if all(seen is not layer for seen in self.shared):
                    self.shared.append(layer)
            else:
                self._called.add(id(layer))
                self.records.append((layer, probe, sum_sq))
            return outputs
        return call

    def check_not_shared(self):
        if self.shared:
            names = ", ".join(f"'{layer.name}' ({type(layer).__name__})" for layer in self.shared)
            raise SharedLayerError(
                f"Layer {names} is called more than once in one forward pass (a shared layer). "
                "The factored rules do not support shared layers yet: use method='vmap' for "
                "this model.")


@contextlib.contextmanager
def capture(model):
    """Context in which ``model(x)`` records (layer, probe, sum_sq) for each weighted layer."""
    recorder = Recorder()
    patched = []
    try:
        for layer in weighted_layers(model):
            rule = registry.get_rule(layer)
            if rule is None:
                raise ValueError(
                    f"Layer '{layer.name}' of class {type(layer).__name__} has trainable weights "
                    "but no factored Fisher rule. " + registry.registration_hint(type(layer).__name__))
            if layer is model:
                raise ValueError(
                    f"Model '{model.name}' owns trainable variables directly; the factored method "
                    "needs them inside layers. Use method='vmap'.")
            object.__setattr__(layer, "call", recorder.wrap(layer, rule))
            patched.append(layer)
        for layer in model._flatten_layers(include_self=False, recursive=True):
            call = pooling.masked_max_pool_call(layer, lambda: recorder.mask_pooling)
            if call is not None and "call" not in layer.__dict__:
                object.__setattr__(layer, "call", call)
                patched.append(layer)
        yield recorder
    finally:
        for layer in patched:
            layer.__dict__.pop("call", None)
    recorder.check_not_shared()
