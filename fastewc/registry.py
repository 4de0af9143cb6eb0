"""Per-layer factored Fisher rules, and the registry of them as a value.

A rule lets the factored engine get every example's squared gradient for a layer's
weights from ONE backward pass, without a per-example gradient of the whole model.

Rule contract::

    rule(layer, inputs, *args, **kwargs) -> RuleOutput(outputs, probe, per_example=..., sum_sq=...)

* It replaces ``layer.call(inputs, *args, **kwargs)`` during the Fisher's forward pass and
  must return the same ``outputs``.
* ``probe`` is the tensor (leading dim N = examples) whose output gradients δ determine the
  weight gradients, usually the pre-activation z.  The engine back-propagates K cotangents
  per example to it at once and hands the rule ``delta``, float32 of shape
  (K, N, *probe.shape[1:]).
* ``per_example(delta)`` (the generic contract, BackPACK's base-class pattern) returns a
  list of ``(variable, g)`` pairs, one per trainable variable of the layer, with ``g`` of
  shape (K, N, *variable.shape): example n's gradient for cotangent k.  The engine forms
  Σ_k Σ_n w_kn · g_kn² itself.  Compute it in float32 (cast ``inputs`` first: float16
  squares underflow).
* ``sum_sq(delta, weight)`` (the optional fast override) receives ``weight`` float32 (K, N)
  as well and returns ``(variable, Σ_k Σ_n weight[k, n] · g_kn²)`` pairs directly, for
  rules that never need to hold K·N·|θ| floats (a Dense layer: one matmul of squares).
  When both are given the engine uses ``sum_sq``.
* ``kron(delta, weight, mask)`` (optional: Kronecker-factored curvature, see
  :mod:`fastewc.curvature`) receives ``mask`` float32 (N,) as well (1 for an example, 0
  for a padding row) and returns a list of :class:`KroneckerSums`, one per block of the
  layer's weights that has a Kronecker form (a Dense or convolution kernel with its bias);
  the layer's other variables, if any, still come from ``sum_sq`` / ``per_example``.  A
  rule returns ``kron=None`` for a configuration without a Kronecker form (a grouped
  convolution): the layer then keeps its diagonal.  A plain 3-tuple
  ``(outputs, probe, sum_sq)`` is read as ``RuleOutput(outputs, probe, sum_sq=sum_sq)``.
* ``merge(later)`` (optional: a layer called more than once in one forward pass, such as a
  tied language-model head that embeds tokens and projects onto the same table) receives
  the RuleOutput the same rule returned for the layer's later call and returns the
  RuleOutput of both calls: its ``probe`` a tuple (or other nest) of the calls' probes,
  its ``sum_sq`` / ``per_example`` given ``delta`` as the same nest of deltas, and each
  example's gradient is the SUM of the calls' gradients, taken before squaring.  Without
  ``merge`` a second call raises :class:`fastewc.capture.SharedLayerError`.

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
import typing



class UnsupportedLayerError(ValueError):
    """A layer the factored engine cannot take: no rule, a shared layer, or a
    configuration its rule does not cover.  ``method="auto"`` steps down to vmap on it."""


class KroneckerSums(typing.NamedTuple):
    """One Kronecker block of a layer, summed over the rows of a batch (the engine divides
    by the examples seen).  For input rows ā_nl = [a_nl, 1] (the 1 only with a bias) at the
    L positions l of example n (L = 1 for a plain Dense layer) and deltas δ_knl:

        a = Σ_n mask_n · (1/L) Σ_l ā_nl ā_nlᵀ              (d', d')
        g = Σ_k Σ_n weight_kn Σ_l δ_knl δ_knlᵀ             (u, u)

    (the "expand" convention of Eschenhagen et al. 2023, KFC's for convolutions: positions
    are treated as examples).  ``variables`` is (kernel, bias) or (kernel,): the block's
    weight matrix is the kernel reshaped to (d, u) with the bias as its last row
    (:func:`fastewc.kronecker.weight_matrix`)."""
    variables: tuple
    a: typing.Any
    g: typing.Any


class RuleOutput(typing.NamedTuple):
    """What a rule returns (see the module docstring)."""
    outputs: typing.Any
    probe: typing.Any
    per_example: typing.Optional[typing.Callable] = None
    sum_sq: typing.Optional[typing.Callable] = None
    kron: typing.Optional[typing.Callable] = None
    merge: typing.Optional[typing.Callable] = None

    def square_sums(self, delta, weight):
        """``[(variable, Σ_k Σ_n weight[k, n] · g_kn²)]``: the fast override if the rule
        has one, else the generic weighted square sum of its per-example gradients."""
        if self.sum_sq is not None:
            return self.sum_sq(delta, weight)
        from fastewc.rules._common import weighted_square_sum   # rules import this module
        return [(variable, weighted_square_sum(g, weight)) for variable, g in self.per_example(delta)]


def as_rule_output(result, layer):
    """A rule's return value as a :class:`RuleOutput` (legacy 3-tuples accepted)."""
    if isinstance(result, RuleOutput):
        out = result
    elif isinstance(result, tuple) and len(result) == 3:
        out = RuleOutput(result[0], result[1], sum_sq=result[2])
    else:
        raise TypeError(f"The factored rule of layer '{layer.name}' ({type(layer).__name__}) must return "
                        f"a fastewc.RuleOutput. Received: {type(result).__name__}")
    if out.per_example is None and out.sum_sq is None:
        raise TypeError(f"The factored rule of layer '{layer.name}' ({type(layer).__name__}) returned "
                        "a RuleOutput with neither `per_example` nor `sum_sq`.")
    return out


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
            f"with fastewc.register_rule({cls_name}, rule) (see fastewc.registry for the rule "
            "contract), or use method='vmap'.")
