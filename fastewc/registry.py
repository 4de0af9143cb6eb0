"""Per-layer factored Fisher rules, keyed by layer class.

A rule lets the factored method get every example's squared gradient for a layer's
weights from ONE backward pass, without a per-example gradient of the whole model.

Rule signature::

    rule(layer, inputs, *args, **kwargs) -> (outputs, probe, sum_sq)

* It replaces ``layer.call(inputs, *args, **kwargs)`` during the Fisher's forward pass and
  must return the same ``outputs``.
* ``probe`` is the tensor (leading dim N = examples) whose output gradients δ determine the
  weight gradients, usually the pre-activation z. fastewc back-propagates K cotangents per
  example to it at once.
* ``sum_sq(delta, weight)`` receives ``delta`` float32 of shape (K, N, *probe.shape[1:])
  and ``weight`` float32 (K, N) and returns a list of ``(variable, value)`` pairs, one for
  each trainable variable of the layer, with ``value = Σ_k Σ_n weight[k, n] · g_kn²`` of the
  variable's shape, where g_kn is example n's gradient for cotangent k.  Compute it in
  float32 (cast ``inputs`` first: float16 squares underflow).

Subclasses: a layer class without its own rule uses the rule of its nearest registered
base class in the MRO, unless that rule was registered with ``subclasses=False`` or the
subclass overrides ``call`` (the rule would replace a forward pass it does not know, so
such a subclass has no rule: ``method="auto"`` uses vmap for it, ``"factored"`` raises).
Override a subclass's behaviour by registering a rule for the subclass itself.
"""
import inspect

_RULES = {}


def register_rule(layer_class, rule, *, overwrite=False, subclasses=True):
    """Register ``rule`` for ``layer_class`` (and, by default, its subclasses).

    Raises ValueError if ``layer_class`` already has a rule and ``overwrite`` is False.
    """
    if not inspect.isclass(layer_class):
        raise TypeError(f"`layer_class` must be a class. Received: layer_class={layer_class!r}")
    if not callable(rule):
        raise TypeError(f"`rule` must be callable. Received: rule={rule!r}")
    if layer_class in _RULES and not overwrite:
        raise ValueError(
            f"A rule is already registered for {layer_class.__name__}. Pass overwrite=True to "
            f"replace it. Received: layer_class={layer_class.__name__}, overwrite={overwrite}")
    _RULES[layer_class] = (rule, subclasses)


def unregister_rule(layer_class):
    """Remove the rule of ``layer_class``; returns it (or None)."""
    entry = _RULES.pop(layer_class, None)
    return entry[0] if entry else None


def get_rule(layer):
    """The rule for ``layer`` (an instance or class), or None."""
    cls = layer if inspect.isclass(layer) else type(layer)
    for base in cls.__mro__:
        entry = _RULES.get(base)
        if entry is not None:
            rule, subclasses = entry
            if base is cls:
                return rule
            if not subclasses or getattr(cls, "call", None) is not getattr(base, "call", None):
                return None
            return rule
    return None


def registration_hint(cls_name):
    return (f"Register one with fastewc.register_rule({cls_name}, rule) (see "
            "fastewc.registry for the rule signature), or use method='vmap'.")
