"""The one XLA policy: which ``jit_compile`` ``None`` means, per kind of compiled work.

The defaults come from the benchmarks (``benchmarks/bench_fisher.py``,
``bench_train_step.py``, ``bench_penalty.py``; figures in the README):

* GPU: XLA everywhere (it fuses the elementwise passes into few kernels).
* CPU, Fisher and train steps: XLA for models without convolutions; none with them
  (XLA's CPU convolutions are slower than TensorFlow's oneDNN kernels).
* CPU, the Fisher's ``jacobian`` and ``loop`` methods: never (open XLA bugs / eager).
* CPU, the standalone fused penalty: none (XLA's CPU reduction to a scalar is slower
  than TensorFlow's kernel for large P).
* Memory: TensorFlow keeps every XLA executable it compiles, for the life of the process
  (the ``DeviceCompiler`` in the device's resource manager, keyed by function name and
  shapes; no eviction, and neither ``context().clear_kernel_cache()`` nor removing the
  function from the eager context frees it).  A new model's functions are new names, so
  each model trained under these defaults keeps about 10 MiB after it is collected (its
  Fisher, consolidation and train step; README, "Memory").  The default stays XLA for its
  steady speed; a process that trains many models passes ``jit_compile=False`` (flat
  memory, ``tests/test_leaks.py``).
* CPU, a Fisher whose block kinds say so (``xla_on_cpu=False``, :mod:`fastewc.blocks`: the
  Kronecker factors, whose XᵀX XLA's CPU dot computes slower than oneDNN: reference MLP,
  empirical, 20.3 ms with XLA against 14.9 ms without, measured side by side;
  ``benchmarks/bench_kfac.py``): none.
"""
import tensorflow as tf

from fastewc import _keras_compat as compat

CONVOLUTIONS = None   # filled on first use: keras.layers' convolution classes


def _convolutions():
    global CONVOLUTIONS
    if CONVOLUTIONS is None:
        import keras
        CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                        keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
                        keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
                        keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                        keras.layers.Conv3DTranspose)
    return CONVOLUTIONS


def has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


def has_convolution(model):
    """Whether ``model`` or any layer nested in it is a convolution."""
    return any(isinstance(layer, _convolutions()) for layer in compat.all_layers(model))


def default_jit_compile(model=None, *, xla_capable=True, xla_on_cpu=True):
    """``jit_compile=None`` resolved: XLA on GPU; on CPU XLA when ``xla_capable``,
    ``xla_on_cpu`` (what a Fisher's block kinds say: :attr:`fastewc.blocks.BlockPlan.xla_on_cpu`)
    and ``model`` (if any) has no convolution.  ``model=None`` is the standalone penalty."""
    if not xla_capable:
        return False
    if has_gpu():
        return True
    if not xla_on_cpu:
        return False
    if model is None:
        return False
    return not has_convolution(model)


# Graphs above this many operations skip Grappler on CPU (a Keras Application's Fisher
# graph is several times larger; the reference MLP's far smaller, where it costs little).
GRAPH_OPTIMIZER_MAX_OPS = 2000


def skip_graph_optimizer(graph):
    """Whether a Fisher engine calls the compiled function of ``graph`` without Grappler
    (:func:`fastewc._keras_compat.without_graph_optimizer`): on CPU and for a graph of
    more than ``GRAPH_OPTIMIZER_MAX_OPS`` operations as instantiated (a nested function's
    ops once per call, :func:`fastewc._keras_compat.instantiated_operation_count`: what
    Grappler would optimize), where Grappler was a large part of a Keras Application's
    first call and changed no steady call (README, "Real models").  Kept on GPU, where its
    layout optimizer matters for convolutions."""
    global _HAS_GPU
    if _HAS_GPU is None:                          # the devices a process sees do not change
        _HAS_GPU = has_gpu()
    return not _HAS_GPU and compat.instantiated_operation_count(graph) > GRAPH_OPTIMIZER_MAX_OPS


_HAS_GPU = None
