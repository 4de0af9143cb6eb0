"""One traced function per distinct layer signature for the rules' sums of the factored
engine: a model of repeated blocks (ResNet50's stages, GPT-2's identical layers) traces
each distinct layer's sums once and calls that function for every layer like it.

A layer's sums (``kind.rule_sums(result, delta, weight, mask)``) read the deltas, the
weights, the mask, the scale and the tensors the rule's closures hold (its inputs, say).
The first layer of a signature traces them as a ``tf.function`` of the flat deltas, mask
and scale (the weights rebuilt inside as the constant they are where they are static, so
that :func:`fastewc.contract.unit_weights` still holds); its captures are the closure's
tensors.  A later layer of the same signature calls that concrete function with ITS
closure's tensors in the captures' places, and its results take its own variables' keys.

The signature is what the traced function depends on: the kind, the rule's callables
(code, and recursively the values of their closures: a tensor by its dtype and static
shape, a layer by its class, config without name and variables' shapes, other values by
themselves), the deltas' and mask's specs, the weights' static value.  Two layers of one
signature trace the same Python path over inputs of the same specs, so they give the same
graph; a signature whose captures are not all closure tensors (a variable read, a tensor
reached another way) is not shared: each of its layers traces its own sums, as before.
Only fastewc's own rules are shared: that their sums depend on nothing but their
arguments, their closures and the layer's config is checked by their tests; a rule
registered by a user (:func:`fastewc.register_rule`) may read other state (a global, an
attribute of an object it reaches), so its layers trace their own sums.

A signature met once is traced in place, as without sharing (:meth:`SharedSums.expect`).
The calls are inlined when TensorFlow instantiates the batch function (as every nested
``tf.function``'s are, with XLA or without), so the graph that runs is the one tracing each
layer in place gives: what is shared is the Python trace.  Marking the functions not to be
inlined (``_noinline``, instantiated once) was tried and measured (README, "One traced rule
per distinct layer signature"): the instantiation of ResNet50's and MobileNetV2's batch
functions did not shrink, and the small transformer's steady calls ran 2–14 % slower (a call
not inlined runs apart from the graph around it).  Only the sums the plan reads are
returned (``wanted``).
"""
import json
import types

import keras
import tensorflow as tf

_SCALARS = (int, float, bool, str, bytes, type(None))


class _Walk:
    """The closure values of a rule's callables, in a fixed order: ``skeleton`` (hashable,
    what the traced function may depend on), ``tensors`` (the graph tensors met, in order)
    and ``layers`` (the Keras layers met, in order).  ``ok`` is False where a value could
    not be described (then the layer is not shared)."""

    def __init__(self, roots):
        self.tensors, self.layers, self.ok, self._seen = [], [], True, set()
        self.skeleton = tuple(self._value(root, 0) for root in roots)
        first = {}
        # which tensors met are the same tensor: part of what the traced function depends on
        self.aliases = tuple(first.setdefault(id(t), i) for i, t in enumerate(self.tensors))

    def _value(self, value, depth):
        if depth > 12:
            self.ok = False
            return None
        if isinstance(value, _SCALARS):
            return (type(value).__name__, value)
        if isinstance(value, tf.Tensor):
            self.tensors.append(value)
            return ("tensor", value.dtype.name, tuple(value.shape.as_list()) if value.shape.rank is not None else None)
        if isinstance(value, keras.layers.Layer):
            self.layers.append(value)
            return ("layer", type(value), _config(value), tuple(tuple(w.shape) for w in value.weights))
        if isinstance(value, (keras.Variable, tf.Variable)):   # a key, or read (then a capture: not shared)
            return ("variable", tuple(value.shape), str(value.dtype))
        if isinstance(value, tf.DType):
            return ("dtype", value.name)
        if isinstance(value, (set, frozenset)):
            return ("set",) + tuple(sorted((self._value(v, depth + 1) for v in value), key=repr))
        if isinstance(value, (tuple, list)):
            return (type(value).__name__,) + tuple(self._value(v, depth + 1) for v in value)
        if isinstance(value, dict):
            return ("dict",) + tuple((k, self._value(v, depth + 1)) for k, v in sorted(value.items(), key=repr))
        if isinstance(value, types.MethodType):
            return ("method", self._value(value.__self__, depth + 1), self._value(value.__func__, depth + 1))
        if isinstance(value, types.FunctionType):
            if not (value.__module__ or "").startswith("fastewc."):    # a user's rule: not inferred
                self.ok = False
                return None
            if id(value) in self._seen:           # a closure that refers to itself
                return ("function", value.__code__)
            self._seen.add(id(value))
            cells = tuple(self._value(c.cell_contents, depth + 1) if _filled(c) else None
                          for c in value.__closure__ or ())
            return ("function", value.__code__, cells)
        if isinstance(value, (type, types.BuiltinFunctionType, types.ModuleType)):
            return ("global", value)
        self.ok = False
        return None


def _filled(cell):
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def _config(layer):
    try:
        config = dict(layer.get_config())
    except Exception:    # noqa: BLE001 -- a layer without a config is described by identity
        return ("id", id(layer))
    config.pop("name", None)
    return json.dumps(config, sort_keys=True, default=repr)


def _flat_args(flat_delta, mask, weight, static_weight, scale):
    """A traced sums function's inputs: the flat deltas, the mask, the weights unless
    static (then rebuilt inside as a constant), the scale when given."""
    return flat_delta + [mask] + ([] if static_weight is not None else [weight]) + \
        ([scale] if scale is not None else [])


def _spec(t):
    return (t.dtype.name, tuple(t.shape.as_list()) if t.shape.rank is not None else None)


class _Traced:
    """One signature's traced sums: the concrete function, where its captures come from
    (indices into a walk's tensors; None: not shareable), the keys it returns (and how
    many sums each), every key the kind gave, the layers whose variables the keys name."""

    def __init__(self, concrete, positions, keys, sizes, all_keys, layers, walk_specs):
        self.concrete, self.positions, self.keys, self.sizes = concrete, positions, keys, sizes
        self.all_keys, self.layers, self.walk_specs = all_keys, layers, walk_specs


class SharedSums:
    """The rules' sums of one traced batch function, one traced function per signature
    (module docstring).  Made per trace of the engine's batch function."""

    def __init__(self, *, wanted=None):
        self.wanted = wanted        # the block keys the plan reads (None: all); the others are not returned
        self._by_signature = {}
        self._expected = {}         # signature -> layers of it (expect); unknown: shared

    def __call__(self, kind, layer, result, delta, weight, mask, scaling):
        """``kind.rule_sums(result, delta, weight, mask, **scaling)``, through the traced
        function of this layer's signature."""
        found = self.signature(kind, layer, result, delta, weight, mask, scaling)
        if found is None or self._expected.get(found[0], 2) < 2:    # unique: traced in place
            return kind.rule_sums(result, delta, weight, mask, **scaling)
        signature, walk = found
        flat, static_w, scale = tf.nest.flatten(delta), tf.get_static_value(weight), scaling.get("scale")
        traced = self._by_signature.get(signature)
        if traced is None:
            traced = self._by_signature[signature] = self._trace(kind, layer, result, delta, weight, static_w,
                                                                 mask, scaling, walk)
            if not traced.keys:
                return {}
            args = _flat_args(flat, mask, weight, static_w, scale)
            outputs = traced.concrete(*args)
            return self._keyed(traced, outputs, {})
        if traced.positions is None or len(walk.tensors) != len(traced.walk_specs) or any(
                _spec(t) != s for t, s in zip(walk.tensors, traced.walk_specs)) \
                or len(walk.layers) + 1 != len(traced.layers):
            return kind.rule_sums(result, delta, weight, mask, **scaling)
        renamed = {}
        for mine, theirs in zip(traced.layers, [layer] + walk.layers):
            if len(mine.weights) != len(theirs.weights):
                return kind.rule_sums(result, delta, weight, mask, **scaling)
            renamed.update((id(a), id(b)) for a, b in zip(mine.weights, theirs.weights))
        if [self._wants(self._renamed(key, renamed)) for key in traced.all_keys] != \
                [self._wants(key) for key in traced.all_keys]:
            return kind.rule_sums(result, delta, weight, mask, **scaling)
        if not traced.keys:
            return {}
        args = _flat_args(flat, mask, weight, static_w, scale)
        outputs = traced.concrete._call_flat(args, [walk.tensors[i] for i in traced.positions])
        return self._keyed(traced, outputs, renamed)

    def expect(self, calls):
        """Count the signatures of the layers to come (``calls``: the arguments of
        :meth:`__call__`): a signature met once is traced in place, as without sharing (a
        function of its own would add its trace and a call, and save nothing)."""
        self._expected = {}
        for call in calls:
            found = self.signature(*call)
            if found is not None:
                self._expected[found[0]] = self._expected.get(found[0], 0) + 1

    @staticmethod
    def signature(kind, layer, result, delta, weight, mask, scaling):
        """(signature, closure walk) of a layer's sums, or None where they are not shared."""
        if not isinstance(kind, type):      # a kind instance (a second pass's block): its own state
            return None
        walk = _Walk([result.per_example, result.sum_sq, result.kron, result.merge])
        flat = tf.nest.flatten(delta)
        if not walk.ok or any(not isinstance(t, tf.Tensor) for t in flat):
            return None
        static_w = tf.get_static_value(weight)
        return (kind, type(layer), _config(layer), walk.skeleton, walk.aliases,
                str(tf.nest.map_structure(lambda _: 0, delta)), tuple(_spec(t) for t in flat), _spec(mask),
                "scale" in scaling, None if static_w is None else (static_w.shape, static_w.tobytes()),
                _spec(weight)), walk

    def _trace(self, kind, layer, result, delta, weight, static_w, mask, scaling, walk):
        structure, keys, sizes, all_keys = delta, [], [], []

        def sums(*args):
            args = list(args)
            flat_delta, args = args[:len(tf.nest.flatten(structure))], args[len(tf.nest.flatten(structure)):]
            d = tf.nest.pack_sequence_as(structure, flat_delta)
            m = args.pop(0)
            w = tf.constant(static_w) if static_w is not None else args.pop(0)
            options = {"scale": args.pop(0)} if "scale" in scaling else {}
            out = kind.rule_sums(result, d, w, m, **options)
            all_keys[:] = list(out)
            keys[:] = [key for key in out if self._wants(key)]     # the rest: not computed
            sizes[:] = [len(out[key]) for key in keys]
            return [t for key in keys for t in out[key]]

        args = _flat_args(tf.nest.flatten(delta), mask, weight, static_w, scaling.get("scale"))
        function = tf.function(sums, autograph=False)
        concrete = function.get_concrete_function(*args)
        where = {id(t): i for i, t in enumerate(walk.tensors)}
        positions = [where.get(id(external)) for external in concrete.captured_inputs]
        layers = [layer] + walk.layers
        own = {id(v) for l in layers for v in l.weights}
        shareable = all(p is not None for p in positions) and all(
            any(part in own for part in key if isinstance(part, int)) for key in keys)
        return _Traced(concrete, positions if shareable else None, keys, sizes, all_keys, layers,
                       [_spec(t) for t in walk.tensors])

    def _wants(self, key):
        return self.wanted is None or key in self.wanted

    @staticmethod
    def _renamed(key, renamed):
        return tuple(renamed.get(part, part) if isinstance(part, int) else part for part in key)

    @staticmethod
    def _keyed(traced, outputs, renamed):
        outputs, out, i = list(outputs), {}, 0
        for key, size in zip(traced.keys, traced.sizes):
            out[SharedSums._renamed(key, renamed)] = tuple(outputs[i:i + size])
            i += size
        return out
