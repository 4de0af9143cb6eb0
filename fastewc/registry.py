"""Per-layer factored Fisher rules, and the registry of them as a value.

A rule lets the factored engine get every example's squared gradient for a layer's
weights from ONE backward pass, without a per-example gradient of the whole model.

The rule contract (what a rule returns, :class:`RuleOutput`; the Kronecker blocks it may
supply, :class:`KroneckerSums`; :class:`UnsupportedLayerError`) is stated in
:mod:`fastewc.contract`, a leaf module; its names are re-exported here.

Registries are values (:class:`Rules`): ``default_rules().with_rule(MyLayer, my_rule)``
makes a new registry, passed as ``rules=`` to :func:`fastewc.fisher_diagonal`,
:class:`fastewc.FisherEstimator` or :meth:`fastewc.EWC.consolidate`.  A registry is part
of the key of every compiled Fisher function, so two registries on one model give their
own results.  :func:`register_rule` replaces the default registry (what ``rules=None``
means) with one that has the rule, so it applies to the next call on any model, already
used or not.

Subclasses: a layer class without its own rule uses the rule of its nearest registered
base class in the MRO, unless that rule was registered with ``subclasses=False`` or the
subclass overrides ``call`` (the rule would replace a forward pass it does not know, so
such a subclass has no rule: ``method="auto"`` uses vmap for it, ``"factored"`` raises).
"""
import collections.abc
import inspect

from fastewc.contract import (KroneckerSums, RuleOutput, UnsupportedLayerError,  # noqa: F401 -- public here
                              as_rule_output)


def _check_entry(layer_class, rule):
    if not inspect.isclass(layer_class):
        raise TypeError(f"`layer_class` must be a class. Received: layer_class={layer_class!r}")
    if not callable(rule):
        raise TypeError(f"`rule` must be callable. Received: rule={rule!r}")


class Rules(collections.abc.Mapping):
    """An immutable registry ``layer class -> rule`` (a read-only Mapping of the classes'
    own rules).  Equal registries (same classes, rules and subclass flags) compare and hash
    equal."""

    __slots__ = ("_entries", "_hash")

    def __init__(self, entries=None):
        self._entries = dict(entries or {})      # class -> (rule, subclasses)
        self._hash = hash(frozenset((cls, rule, sub) for cls, (rule, sub) in self._entries.items()))

    def with_rule(self, layer_class, rule, *, subclasses=True):
        """A new registry with ``rule`` for ``layer_class`` (replacing any rule it had)."""
        _check_entry(layer_class, rule)
        entries = dict(self._entries)
        entries[layer_class] = (rule, bool(subclasses))
        return Rules(entries)

    def without_rule(self, layer_class):
        """A new registry without ``layer_class``'s own rule."""
        entries = dict(self._entries)
        entries.pop(layer_class, None)
        return Rules(entries)

    def rule_of(self, layer_class):
        """The rule registered for exactly ``layer_class``, or None."""
        entry = self._entries.get(layer_class)
        return entry[0] if entry else None

    def get(self, layer):
        """The rule for ``layer`` (an instance or class), or None (see the module docstring)."""
        cls = layer if inspect.isclass(layer) else type(layer)
        for base in cls.__mro__:
            entry = self._entries.get(base)
            if entry is not None:
                rule, subclasses = entry
                if base is cls:
                    return rule
                if not subclasses or getattr(cls, "call", None) is not getattr(base, "call", None):
                    return None
                return rule
        return None

    def __getitem__(self, layer_class):
        return self._entries[layer_class][0]

    def __len__(self):
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __eq__(self, other):
        return isinstance(other, Rules) and self._entries == other._entries

    def __hash__(self):
        return self._hash

    def __repr__(self):
        return f"<fastewc.Rules for {sorted(cls.__name__ for cls in self._entries)}>"


_DEFAULT = [Rules()]


def default_rules():
    """The default registry (what ``rules=None`` means): the built-in rules plus those
    added by :func:`register_rule`."""
    return _DEFAULT[0]


def check_rules(rules):
    """``rules`` (None: the default registry) as a :class:`Rules`."""
    if rules is None:
        return default_rules()
    if not isinstance(rules, Rules):
        raise TypeError("`rules` must be None or a fastewc.Rules (e.g. "
                        "fastewc.default_rules().with_rule(MyLayer, my_rule)). "
                        f"Received: rules of type {type(rules).__name__}")
    return rules


def register_rule(layer_class, rule, *, overwrite=False, subclasses=True):
    """Make the default registry one with ``rule`` for ``layer_class`` (and, by default,
    its subclasses).  Applies to the next Fisher of every model that uses the default.

    Raises ValueError if ``layer_class`` already has a rule and ``overwrite`` is False.
    """
    _check_entry(layer_class, rule)
    if layer_class in _DEFAULT[0] and not overwrite:
        raise ValueError(
            f"A rule is already registered for {layer_class.__name__}. Pass overwrite=True to "
            f"replace it. Received: layer_class={layer_class.__name__}, overwrite={overwrite}")
    _DEFAULT[0] = _DEFAULT[0].with_rule(layer_class, rule, subclasses=subclasses)


def unregister_rule(layer_class):
    """Remove the rule of ``layer_class`` from the default registry; returns it (or None)."""
    rule = _DEFAULT[0].rule_of(layer_class)
    _DEFAULT[0] = _DEFAULT[0].without_rule(layer_class)
    return rule


def get_rule(layer, rules=None):
    """The rule for ``layer`` (an instance or class) in ``rules`` (None: the default), or None."""
    return check_rules(rules).get(layer)


def registration_hint(cls_name):
    return (f"Pass rules=fastewc.default_rules().with_rule({cls_name}, rule), or register one "
            f"with fastewc.register_rule({cls_name}, rule) (see fastewc.contract for the rule "
            "contract), or use method='vmap'.")
