"""Every private Keras / TensorFlow API that fastewc relies on, in one place.

Each entry says why no public API does the job.  When Keras moves one of these, this is
the only module to change; each falls back to the closest public behaviour where one
exists.
"""
import collections
import contextlib
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

try:  # TensorFlow's global gradient registry (see release_custom_gradients_with).
    from tensorflow.python.framework import ops as _tf_ops
except ImportError:  # pragma: no cover
    _tf_ops = None

try:  # The eager tensor constructor tf.convert_to_tensor reaches, after a copy that a
    # tensor living for one call does not need (call_tensor).
    from tensorflow.python.eager import context as _tf_context
    from tensorflow.python.framework.ops import EagerTensor as _EagerTensor
except ImportError:  # pragma: no cover
    _tf_context = _EagerTensor = None

try:  # A scope with dtype None switches a layer's float16 autocast of variables off;
    # Keras has no public way to read the float32 master weight inside a mixed layer call.
    from keras.src.backend.common.variables import AutocastScope
except ImportError:  # pragma: no cover - other Keras layouts
    AutocastScope = None

try:  # Wraps a plain f(y_true, y_pred) into a Loss with a reduction, as compile() does;
    # keras.losses exports the class only for its own built-in losses.
    from keras.src.losses.losses import LossFunctionWrapper
except ImportError:  # pragma: no cover
    LossFunctionWrapper = None

try:  # Keras' loss tracker divides by the replicas; this undoes it for the logged loss.
    from keras.src.losses.loss import unscale_loss_for_distribution
except ImportError:  # pragma: no cover
    def unscale_loss_for_distribution(value):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return value * replicas if replicas > 1 else value

try:  # ConvNeXt's per-channel scale layer is not exported by keras.layers.
    from keras.src.applications.convnext import LayerScale
except ImportError:  # pragma: no cover
    LayerScale = None


def all_layers(model):
    """``model`` and every layer nested in it, depth first (``Layer._flatten_layers``:
    ``model.layers`` lists direct children only and skips the sublayers of a custom layer
    such as MultiHeadAttention's projections)."""
    return [model] + list(model._flatten_layers(include_self=False, recursive=True))


def nested_layers(model):
    """Every layer nested in ``model``, without the model itself."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def child_layers(layer):
    """The layers directly nested in ``layer`` (its sublayers, not theirs)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def owned_trainable_variables(layer):
    """The trainable variables a layer created itself, not those of its sublayers
    (``layer.trainable_weights`` includes sublayers; ``_trainable_variables`` is the
    layer's own list)."""
    if not layer.trainable:
        return []
    return [v for v in getattr(layer, "_trainable_variables", []) if v.trainable]


def model_strategy(model):
    """The ``tf.distribute`` strategy ``model`` was built in (Keras records it privately
    as ``_distribute_strategy``), else the strategy in scope, else None."""
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    return strategy


def optimizer_strategy(optimizer):
    """The strategy an optimizer was created in (private ``_distribution_strategy``)."""
    return getattr(optimizer, "_distribution_strategy", None)


def reads_with_autocast(variable):
    """Whether ``variable`` is a Keras variable that autocasts inside a layer call."""
    return AutocastScope is not None and hasattr(variable, "_maybe_autocast")


def causal_padding(layer):
    """A causal Conv1D's left padding (``Conv1D._compute_causal_padding``: the layer keeps
    the amount private and pads inside ``call``)."""
    return layer._compute_causal_padding()


def compiled_loss(model, x, y, y_pred, sample_weight):
    """Keras' total loss of a compiled model: compiled losses + ``model.losses``, divided by
    the replicas (``Trainer._compute_loss``: the public ``compute_loss`` skips the
    distribution scaling Keras' own ``train_step`` uses)."""
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                               training=True)


def loss_tracker(model):
    """The ``loss`` metric of a compiled Keras model (``Trainer._loss_tracker``)."""
    return model._loss_tracker


def layer_scale_class():
    """``keras.applications``' LayerScale class, or None if this Keras has none."""
    return LayerScale


def call_concrete(concrete, args):
    """``concrete(*args)`` through ``ConcreteFunction._call_flat`` (the flat tensors and
    the captures; it returns the structured output): the public call binds and casts
    every argument against the function type, which is host time on every call of a
    function with many small inputs.  Falls back to the public call if it is missing."""
    call_flat = getattr(concrete, "_call_flat", None)
    if call_flat is None:  # pragma: no cover - other TensorFlow versions
        return concrete(*args)
    return call_flat(tf.nest.flatten(args), concrete.captured_inputs)


def call_tensor(array):
    """A NumPy ``array`` of real numbers as an eager tensor for ONE call's compiled work,
    without ``tf.convert_to_tensor``'s defensive copy: that copies every array in Python,
    into a fresh allocation each call (``convert_to_eager_tensor``: "the EagerTensor might
    share the underlying memory with the input array"), then hands the copy to
    TensorFlow's own conversion, which copies once more unless the copy is 64-byte
    aligned.  Here TensorFlow's conversion alone runs (``ops.EagerTensor``, which
    ``convert_to_eager_tensor`` calls after its copy): one copy, into TensorFlow's
    allocator, or none for an aligned array, whose memory the tensor then shares.  Sound only for a tensor that does not
    outlive the call that made it (the Fisher's batches: the call reads its result back
    before it returns), so that a later change to the array cannot reach it; TensorFlow
    never writes into such memory (a buffer it does not own is never forwarded to an
    op's output).  Anything else (a subclass, a list, strings, objects) takes
    ``tf.convert_to_tensor``, with its errors."""
    if _EagerTensor is None or type(array) is not np.ndarray or array.dtype.kind not in "biuf" \
            or not tf.executing_eagerly():
        return tf.convert_to_tensor(array)
    context = _tf_context.context()
    context.ensure_initialized()      # as convert_to_eager_tensor does: a process's first tensor
    return _EagerTensor(array, context.device_name, None)


_UNOPTIMIZED_CALL_OPTIONS = {}   # the thread's call options (serialized config) -> a copy without Grappler


@contextlib.contextmanager
def without_graph_optimizer():
    """tf.function calls in this block, on this thread, instantiate their graphs with
    Grappler's meta optimizer off.  Private API: ``context().function_call_options`` (per
    thread; its ``config_proto`` goes with every call and is read when a function is
    first instantiated).  On CPU Grappler was a large part of a first Fisher call on a
    Keras Application and changed no steady call time (README, "Real models"), so the
    engines skip it there (:func:`fastewc._policy.skip_graph_optimizer`).  The options
    must be the same on every call of a function, or it is instantiated again."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context as tf_context
    ctx = tf_context.context()
    old = ctx.function_call_options
    key = (old.config_proto_serialized, old.executor_type)
    new = _UNOPTIMIZED_CALL_OPTIONS.get(key)
    if new is None:
        config = config_pb2.ConfigProto()
        config.ParseFromString(old.config_proto_serialized or b"")
        config.graph_options.rewrite_options.disable_meta_optimizer = True
        new = _UNOPTIMIZED_CALL_OPTIONS[key] = type(old)(old.executor_type, config)
    ctx.function_call_options = new
    try:
        yield
    finally:
        ctx.function_call_options = old


def _gradient_registry():
    registry = getattr(getattr(_tf_ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


def _graphs_of(fn, depth=3):
    """The graphs of the symbolic tensors a registered gradient function closes over."""
    graphs, stack = [], [(fn, 0)]
    while stack:
        obj, level = stack.pop()
        if isinstance(obj, (list, tuple)):
            stack.extend((item, level) for item in obj[:64])
            continue
        graph = getattr(obj, "graph", None) if isinstance(obj, tf.Tensor) else None
        if graph is not None:
            graphs.append(graph)
        elif level < depth and callable(obj):
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    stack.append((cell.cell_contents, level + 1))
                except ValueError:       # an empty cell
                    pass
    return graphs


def _registered_function(entry):
    """A registry entry is ``{"type": fn, "location": ...}`` (older TF: the function)."""
    return entry.get("type") if isinstance(entry, dict) else entry


def _within(graph, ours):
    while graph is not None:
        if any(graph is g for g in ours):
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def _release(keys):
    registry = _gradient_registry()
    for key in keys:
        registry.pop(key, None)


@contextlib.contextmanager
def release_custom_gradients_with(owner):
    """Trace inside this context; ``graphs`` (the yielded list) receives the traced
    FuncGraphs.  Every ``tf.custom_gradient`` registered inside one of those graphs is
    removed from TensorFlow's global gradient registry when ``owner`` is collected.

    Why: in graph mode ``tf.custom_gradient`` registers a gradient function
    ``CustomGradient-<uid>`` in a global registry that is never emptied, and the function
    closes over the forward tensors, so the whole traced graph stays in memory forever
    (TensorFlow issue #97697; Keras optimizers reach it through
    ``ReplicaContext.all_reduce``).  The registration is only needed while the graph can
    still be differentiated, i.e. while its owner (an engine, a train step) lives."""
    graphs = []
    registry = _gradient_registry()
    before = set(registry) if registry is not None else None
    try:
        yield graphs
    finally:
        if registry is not None:
            new = [key for key in set(registry) - before if key.startswith("CustomGradient-")
                   and any(_within(g, graphs) for g in _graphs_of(_registered_function(registry[key])))]
            if new:
                weakref.finalize(owner, _release, new)



def onednn_enabled():
    """Whether TensorFlow runs its CPU kernels through oneDNN (the default on x86 Linux,
    off with ``TF_ENABLE_ONEDNN_OPTS=0``); ``_pywrap_util_port.IsMklEnabled`` is the build
    flag TensorFlow itself reads."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip() in ("0", "false", "False"):
        return False
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # pragma: no cover
        return False


def tracing_for_xla():
    """Whether the op being traced will be compiled by XLA (a ``tf.function`` with
    ``jit_compile=True``, or one nested in it).  ``control_flow_util`` is private; it is
    what ``tf.function`` itself asks before it marks a nested function for XLA.  False
    eagerly, and if the module moved."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _graphs(graph):
    """``graph`` and the graphs of the functions in its library and theirs, each once
    (``FuncGraph._functions`` is private): ``[(graph, {function name: its graph})]``."""
    seen, stack, found = set(), [graph], []
    while stack:
        g = stack.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        library = {name: fn.graph for name, fn in getattr(g, "_functions", {}).items()
                   if getattr(fn, "graph", None) is not None}
        found.append((g, library))
        stack.extend(library.values())
    return found


def graph_operations(graph):
    """Every op of ``graph`` and of the functions in its library (while-loop bodies, the
    functions pfor and custom gradients create, nested ``tf.function`` calls), each
    function once."""
    return [op for g, _ in _graphs(graph) for op in g.get_operations()]


FUNCTION_CALLS = ("PartitionedCall", "StatefulPartitionedCall")


def instantiated_operation_count(graph):
    """The number of ops of ``graph`` as TensorFlow instantiates it: those of
    :func:`graph_operations`, plus a called function's ops again for each further call
    op of it (a nested ``tf.function``'s call is inlined at instantiation, so a function
    called K times puts K copies of its body in the graph that is optimized and run; a
    loop body, run by its loop op, is there once)."""
    graphs = _graphs(graph)
    sizes = {name: len(inner.get_operations()) for _, library in graphs for name, inner in library.items()}
    calls = collections.Counter(op.get_attr("f").name for g, _ in graphs for op in g.get_operations()
                                if op.type in FUNCTION_CALLS)
    ops = sum(len(g.get_operations()) for g, _ in graphs)
    return ops + sum((count - 1) * sizes.get(name, 0) for name, count in calls.items())


__all__ = ["AutocastScope", "LossFunctionWrapper", "unscale_loss_for_distribution", "keras"]
