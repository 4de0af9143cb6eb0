"""Factored rules for convolutions (channels_last): Conv1D/2D/3D (any ``groups``),
DepthwiseConv1D/2D, SeparableConv1D/2D and Conv1D/2D/3DTranspose.

A convolution is a Dense layer applied at every output position l to the input patch
a_nl (the kernel-size window of the padded input, strided and dilated), so example n's
kernel gradient SUMS over positions BEFORE it is squared:

    g_kn(W) = Σ_l a_nl ⊗ δ_knl,        g_kn(b) = Σ_l δ_knl,
    Σ_k Σ_n w_kn g_kn(W)²              (not Σ_l of squares: that is a different quantity)

with δ_knl = ∂ℓ/∂z_nl for cotangent k (Grosse & Martens 2016, "A Kronecker-factored
approximate Fisher matrix for convolution layers", §2; here exact, not Kronecker-factored).

The patches A (N, L, kernel_size·C_in) are strided slices of the explicitly padded input
(the padding TensorFlow uses for "same"/"valid"/"causal").  With one cotangent (empirical,
sampled with one draw) each kernel offset is a (C_in × L)(L × F) matmul on a strided view,
so the patch tensor is never built; with K cotangents (exact: K = C − 1) the patches are built
ONCE and reused by K matmuls.  Cost ≈ K × the batch kernel gradient; memory
N·L·kernel_size·C_in floats for the patches plus N·|W| per cotangent.

* groups: the input channels split into G groups; g_kn(W)[a, c, g·F_g + o] =
  Σ_l A_nl[a, g, c] δ_knl[g, o].
* depthwise: g_kn(W)[a, c, m] = Σ_l A_nl[a, c] δ_knl[c·M + m].
* separable: z = pointwise(depthwise(x)); δ at the depthwise output is δ·Pᵀ (linear), the
  pointwise kernel is a 1×1 convolution of the depthwise output d_nl: Σ_l d_nl ⊗ δ_knl.
* transpose: z = Cᵀx for the convolution C (z-space → x-space) with the same kernel, so
  ⟨δ, Cᵀ_W x⟩ = ⟨C_W δ, x⟩ and g_kn(W)[a, f, c] = Σ_l patch(δ_kn)_l[a, f] x_nl[c]: the
  patches are taken from δ (K·N of them) over the x positions.

Kronecker factors (``kron``, ungrouped Conv1D/2D/3D only; Grosse & Martens 2016, KFC):
the rows are the patches ā_nl = [a_nl, 1] and the deltas δ_knl at the L output positions,
positions treated as examples (:class:`fastewc.registry.KroneckerSums`): A over patches
divided by L, G summed over positions.  The patch tensor (N·L·kernel_size·C_in floats)
is built once.  Depthwise, separable, grouped and transposed convolutions keep their
diagonal (their weights are not one matrix between input rows and output rows).

The forward pass is the layer's own op, so the outputs are bit-identical.  Depthwise,
separable, grouped and 3-D (transposed) convolutions route their gradient through ops that
``tf.vectorized_map`` can vectorize with a shared weight (see :func:`_with_gradient`);
without that, back-propagating the K cotangents of ``sampled``/``exact`` through such a
layer fails in TensorFlow's pfor.

Unsupported (a clear ValueError naming the layer): data_format="channels_first", LoRA or
quantized kernels, and subclasses that override ``call`` (see :mod:`fastewc.registry`).
"""
import itertools
import math
import typing

import keras
import tensorflow as tf

from fastewc._keras_compat import causal_padding
from fastewc.registry import RuleOutput, register_rule
from fastewc.rules._common import (check_channels_last, check_plain, kronecker_sums, leading_dims,
                                   masked_rows, pair_products, position_pair_square_sum,
                                   static_or_dynamic_shape, use_position_pairs,
                                   weighted_delta_pairs, weighted_rows, weighted_square_sum)


# -- geometry ---------------------------------------------------------------------------
def _max0(v):
    return max(v, 0) if isinstance(v, int) else tf.maximum(v, 0)


def _pads(in_sizes, out_sizes, kernel_size, strides, dilation, padding):
    """(before, after) zero padding per spatial dim, as TensorFlow pads for ``padding``."""
    pads = []
    for n_in, n_out, k, s, d in zip(in_sizes, out_sizes, kernel_size, strides, dilation):
        if padding == "valid":
            pads.append((0, 0))
        elif padding == "causal":
            pads.append(((k - 1) * d, 0))
        else:                                   # "same": TF puts the odd pixel after
            total = _max0((n_out - 1) * s + (k - 1) * d + 1 - n_in)
            pads.append((total // 2, total - total // 2))
    return pads


def _pad(x, pads):
    if all(isinstance(p, int) and p == 0 for pair in pads for p in pair):
        return x
    return tf.pad(x, [[0, 0]] + [list(p) for p in pads] + [[0, 0]])


def _window(x, offsets, strides, dilation, out_sizes):
    """The input entries that kernel offset ``offsets`` meets: (B, *out, C) strided slice."""
    index = [slice(None)]
    for o, s, d, n_out in zip(offsets, strides, dilation, out_sizes):
        index.append(slice(o * d, o * d + (n_out - 1) * s + 1, s))
    return x[tuple(index + [slice(None)])]


def _offsets(kernel_size):
    """Kernel offsets in the row-major order of a Keras kernel (k_1, ..., k_r, C_in, ...)."""
    return itertools.product(*(range(k) for k in kernel_size))


def extract_patches(x, kernel_size, strides, dilation, pads, out_sizes):
    """Patches of ``x`` (B, *in, C) padded by ``pads``: (B, *out, prod(kernel_size), C).

    Strided 2-D: one ``tf.image.extract_patches``, several times faster than one strided
    slice per kernel offset (with stride 1 the slices are as fast or faster)."""
    x = _pad(x, pads)
    if len(kernel_size) == 2 and any(s > 1 for s in strides) and x.shape[-1] is not None:
        patches = tf.image.extract_patches(x, [1, *kernel_size, 1], [1, *strides, 1],
                                           [1, *dilation, 1], "VALID")
        shape = static_or_dynamic_shape(patches)[:-1]
        return tf.reshape(patches, shape + [math.prod(kernel_size), x.shape[-1]])
    return tf.stack([_window(x, o, strides, dilation, out_sizes) for o in _offsets(kernel_size)],
                    axis=-2)


def _patch_columns(x, geometry):
    """Patches of ``x`` (B, *in, C) as columns: (B, prod(kernel_size)·C, L), row a·C + c
    (a Keras kernel's row-major order), one column per output position.  Built from the
    channels-first input so that the kernel gradient is a plain (I × L)(L × F) matmul and
    no (B, L, I) tensor is transposed."""
    kernel_size, strides, dilation, pads, out_sizes = geometry
    rank = len(kernel_size)
    xp = tf.transpose(_pad(x, pads), [0, rank + 1] + list(range(1, rank + 1)))   # (B, C, *in)
    columns = []
    for offsets in _offsets(kernel_size):
        index = [slice(None), slice(None)]
        for o, s, d, n_out in zip(offsets, strides, dilation, out_sizes):
            index.append(slice(o * d, o * d + (n_out - 1) * s + 1, s))
        columns.append(xp[tuple(index)])                                        # (B, C, *out)
    batch, channels = leading_dims(tf.expand_dims(x, 0))[1], x.shape[-1]
    return tf.reshape(tf.stack(columns, axis=1), [batch, len(columns) * channels, -1])


def _static_positions(out_sizes):
    """The number of output positions, or None where a spatial size is dynamic."""
    return math.prod(out_sizes) if all(isinstance(o, int) for o in out_sizes) else None


def _spatial(t, lead):
    """Spatial sizes of channels_last ``t`` with ``lead`` leading (batch) dims."""
    return static_or_dynamic_shape(t)[lead:-1]


def _bias_shape(layer, channels):
    return (1,) * (layer.rank + 1) + (channels,)


def _bias_sq(delta, weight):
    """Σ_kn w_kn (Σ_l δ_knl)² for ``delta`` (K, N, *spatial, F)."""
    return weighted_square_sum(tf.reduce_sum(delta, axis=list(range(2, delta.shape.rank - 1))), weight)


def _check(layer, family):
    check_plain(layer, family)
    check_channels_last(layer, family)


def _bias_and_activation(layer, z, channels):
    """(z + bias, activation(z + bias)): the pre-activation probe and the layer output."""
    if layer.use_bias:
        z = keras.ops.add(z, keras.ops.reshape(layer.bias, _bias_shape(layer, channels)))
    return z, (layer.activation(z) if layer.activation is not None else z)


def _squared(variable, g, weight):
    """(variable, Σ_kn w_kn g_kn²) for per-example gradients ``g`` (K, N, ...)."""
    return variable, tf.reshape(weighted_square_sum(g, weight), variable.shape)


def _with_bias(layer, delta, weight, *pairs):
    """The rule's (variable, value) pairs, plus the bias's Σ_kn w_kn (Σ_l δ_knl)² if any."""
    pairs = list(pairs)
    if layer.use_bias:
        pairs.append((layer.bias, _bias_sq(delta, weight)))
    return pairs


# Below this many input channels one matmul over all kernel offsets beats a matmul per offset.
_MIN_CHANNELS_PER_OFFSET = 8


def _dense_patch_square_sum(a, delta, weight, geometry):
    """Σ_kn w_kn (Σ_l patch_nl ⊗ δ_knl)², shape (prod(kernel_size)·C_in, F).

    Few output positions L (:func:`use_position_pairs`): pairs of positions,
    :func:`fastewc.rules._common.position_pair_square_sum`, no per-example gradient.
    Else K = 1 with enough input channels: one (C_in × L)(L × F) matmul per kernel offset on a
    strided view of the input, so the (N, L, kk·C_in) patch tensor is never built (it is
    memory-bound: building it costs more than the matmul).  K > 1: the patches are built
    once and reused by one matmul per cotangent (memory N·|W| per cotangent, not K·N·|W|).
    """
    kernel_size, strides, dilation, pads, out_sizes = geometry
    k, n = delta.shape[0], leading_dims(delta)[1]        # k stays None when unknown
    c_in, filters = a.shape[-1], delta.shape[-1]
    d = tf.reshape(delta, [tf.shape(delta)[0] if k is None else k, n, -1, filters])   # (K, N, L, F)
    positions = _static_positions(out_sizes)
    if use_position_pairs(positions, k):        # few positions: no per-example gradient
        p = tf.reshape(extract_patches(a, *geometry), [n, positions, math.prod(kernel_size) * c_in])
        return position_pair_square_sum(p, d, weight)
    if k is None:                               # unknown K: one einsum, K·N·|W| memory
        p = tf.reshape(extract_patches(a, *geometry), [n, -1, math.prod(kernel_size) * c_in])
        return weighted_square_sum(tf.einsum("nli,knlo->knio", p, d), weight)
    if k == 1 and c_in >= _MIN_CHANNELS_PER_OFFSET:
        a = _pad(a, pads)
        sums = []
        for offsets in _offsets(kernel_size):
            view = tf.reshape(_window(a, offsets, strides, dilation, out_sizes), [n, -1, c_in])
            g = tf.matmul(view, d[0], transpose_a=True)                        # (N, C_in, F)
            sums.append(weighted_rows(weight[0], tf.square(g)))
        return tf.concat(sums, 0)
    p = _patch_columns(a, geometry)                                            # (N, I, L)
    total = None
    for i in range(k):
        g = tf.matmul(p, d[i])                                                 # (N, I, F)
        term = weighted_rows(weight[i], tf.square(g))
        total = term if total is None else total + term
    return total


# -- gradients that TensorFlow's vectorized_map cannot vectorize --------------------------
def _with_gradient(native, grad_fn, x, *params):
    """``native(x, *params)`` (the layer's own op: its exact outputs) differentiated by
    ``grad_fn(x, params, dy) -> [dx, *dparams]``.

    fastewc back-propagates the K cotangents of a batch at once with ``tf.vectorized_map``
    (pfor).  TensorFlow has no pfor conversion for the input gradient of depthwise, grouped
    and 3-D (transposed) convolutions whose weight is shared across the vectorized index
    ('Input "filter" of op ... expected to be not loop invariant'), so those layers keep
    their own forward op and take their gradient from ``grad_fn``: strided slices, pads and
    einsums for grouped and 3-D convolutions, and for depthwise ones TensorFlow's own
    gradient with the weight made to vary (:func:`_depthwise_grads`).
    """
    @tf.custom_gradient
    def call(x, *params):
        def grad(dy):
            return grad_fn(x, params, dy)
        return native(x, *params), grad

    return call(x, *params)


def _value(variable):
    """The variable's (autocast) value as a plain tensor, for a custom_gradient argument."""
    return tf.identity(keras.ops.convert_to_tensor(variable))


def _place(t, offsets, strides, dilation, padded_sizes):
    """Adjoint of :func:`_window`: ``t`` (B, *out, C) scattered into zeros of shape
    (B, *padded_sizes, C) at the positions offset ``offsets`` reads.  Zero insertion for
    strides and one pad: no StridedSliceGrad (slow on CPU)."""
    out_sizes = static_or_dynamic_shape(t)[1:-1]
    paddings = [[0, 0]]
    for axis, (o, s, d, n_out, n_pad) in enumerate(
            zip(offsets, strides, dilation, out_sizes, padded_sizes), start=1):
        span = (n_out - 1) * s + 1
        if s > 1:                      # (.., n, ..) -> (.., n, s, ..) -> (.., n·s, ..) -> span
            t = tf.expand_dims(t, axis + 1)
            t = tf.pad(t, [[0, 0]] * (axis + 1) + [[0, s - 1]] + [[0, 0]] * (t.shape.rank - axis - 2))
            shape = static_or_dynamic_shape(t)
            t = tf.reshape(t, shape[:axis] + [shape[axis] * s] + shape[axis + 2:])
            t = t[(slice(None),) * axis + (slice(0, span),)]
        paddings.append([o * d, n_pad - o * d - span])
    return tf.pad(t, paddings + [[0, 0]])


def _windowed_grads(layer, padding, x, dy, back, outer):
    """Gradients of z = Σ_offsets T_a(window_a(pad(x))) for per-offset channel maps T_a:
    dx = crop(Σ_a place_a(T_aᵀ dy)), dT_a = Σ_{batch, positions} outer(window_a, dy).

    ``back(dy, i)`` is T_iᵀ dy (B, *out, C_in); ``outer(win, dy, i)`` is dT_i."""
    kernel_size = tuple(layer.kernel_size)
    in_sizes, out_sizes = _spatial(x, 1), _spatial(dy, 1)
    pads = _pads(in_sizes, out_sizes, kernel_size, layer.strides, layer.dilation_rate, padding)
    padded = [n + before + after for n, (before, after) in zip(in_sizes, pads)]
    xp, dxs, dws = _pad(x, pads), [], []
    for i, offsets in enumerate(_offsets(kernel_size)):
        dxs.append(_place(back(dy, i), offsets, layer.strides, layer.dilation_rate, padded))
        dws.append(outer(_window(xp, offsets, layer.strides, layer.dilation_rate, out_sizes), dy, i))
    dxp = tf.add_n(dxs)
    crop = tuple([slice(None)] + [slice(before, before + n) for n, (before, _) in zip(in_sizes, pads)]
                 + [slice(None)])
    return dxp[crop], tf.stack(dws)


def _rows(t, *tail):
    """(B, *positions, *tail) -> (B·positions, *tail)."""
    return tf.reshape(t, [-1, *tail])


def _conv_grad(layer, padding, groups):
    """grad_fn of a (grouped) convolution: T_a is a per-group matmul by W[a]."""
    def grad_fn(x, params, dy):
        (kernel,) = params
        c_in, filters = x.shape[-1], kernel.shape[-1]
        cg, fg = c_in // groups, filters // groups
        w = tf.reshape(kernel, [-1, cg, groups, fg])
        lead = static_or_dynamic_shape(dy)[:-1]
        dyg = tf.reshape(dy, lead + [groups, fg])

        def back(dy, i):
            return tf.reshape(tf.einsum("...go,cgo->...gc", dyg, w[i]), lead + [c_in])

        def outer(win, dy, i):
            return tf.einsum("bgc,bgo->cgo", _rows(win, groups, cg), _rows(dy, groups, fg))

        dx, dw = _windowed_grads(layer, padding, x, dy, back, outer)
        return [dx, tf.reshape(dw, kernel.shape)]

    return grad_fn


class Window(typing.NamedTuple):
    """How a convolution slides: kernel size, strides, dilation and padding mode."""
    kernel_size: tuple
    strides: tuple
    dilation: tuple
    padding: str

    @classmethod
    def of(cls, layer, padding=None):
        return cls(tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate),
                   padding or layer.padding)


def _depthwise_op(window):
    def native(x, kernel):
        return keras.ops.depthwise_conv(x, kernel, strides=window.strides, padding=window.padding,
                                        dilation_rate=window.dilation, data_format="channels_last")
    return native


def _depthwise_grads(window, x, kernel, dy):
    """(dx, dkernel) of a depthwise convolution from TensorFlow's own gradient, with input
    and kernel made to vary with ``dy`` (+ 0·dy[0]): the vectorized_map converters of the
    depthwise ops then apply (they fold the cotangents into channels).  Unused parts (the
    recomputed forward, dkernel) are pruned from the graph when shapes are static."""
    zero = 0.0 * tf.reshape(dy, [-1])[0]
    x_v, kernel_v = x + tf.cast(zero, x.dtype), kernel + tf.cast(zero, kernel.dtype)
    with tf.GradientTape() as tape:
        tape.watch([x_v, kernel_v])
        z = _depthwise_op(window)(x_v, kernel_v)
    return tape.gradient(z, [x_v, kernel_v], output_gradients=dy)


def _grouped_as_depthwise_grad(window, multiplier):
    """grad_fn of a grouped convolution with one input channel per group (ConvNeXt's 7×7):
    its kernel (*k, 1, C·M) is the depthwise kernel (*k, C, M) in the same order, so
    TensorFlow's depthwise gradient applies (the per-offset einsums of :func:`_conv_grad`
    become C tiny matmuls each here)."""
    def grad_fn(x, params, dy):
        (kernel,) = params
        depthwise = tf.reshape(kernel, list(window.kernel_size) + [x.shape[-1], multiplier])
        dx, dkernel = _depthwise_grads(window, x, depthwise, dy)
        return [dx, tf.reshape(dkernel, kernel.shape)]
    return grad_fn


def _conv_transpose_grad(layer):
    """Gradients of z = Cᵀx: dx = C(dy) (a convolution of dy) and dW from patches of dy."""
    kernel_size = tuple(layer.kernel_size)

    def grad_fn(x, params, dy):
        (kernel,) = params
        filters, c_in = kernel.shape[-2], kernel.shape[-1]
        x_sizes = _spatial(x, 1)
        pads = _pads(_spatial(dy, 1), x_sizes, kernel_size, layer.strides, layer.dilation_rate,
                     layer.padding)
        w = tf.reshape(kernel, [-1, filters, c_in])
        dyp, dx, dw = _pad(dy, pads), None, []
        for i, offsets in enumerate(_offsets(kernel_size)):
            win = _window(dyp, offsets, layer.strides, layer.dilation_rate, x_sizes)
            term = tf.tensordot(win, w[i], 1)
            dx = term if dx is None else dx + term
            dw.append(tf.matmul(tf.reshape(win, [-1, filters]), tf.reshape(x, [-1, c_in]),
                                transpose_a=True))
        return [dx, tf.reshape(tf.stack(dw), kernel.shape)]

    return grad_fn


# -- Conv1D / Conv2D / Conv3D -------------------------------------------------------------
def conv_rule(layer, inputs, *args, **kwargs):
    family = type(layer).__name__
    _check(layer, family)
    x, padding, native = inputs, layer.padding, layer.convolution_op
    if padding == "causal":        # as keras.layers.Conv1D.call: pad left, then "valid"
        x, padding = keras.ops.pad(x, causal_padding(layer)), "valid"

        def native(x, kernel):
            return keras.ops.conv(x, kernel, strides=list(layer.strides), padding="valid",
                                  dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    depthwise = 1 < layer.groups == x.shape[-1] and layer.rank < 3    # one channel per group
    if depthwise:
        grad_fn = _grouped_as_depthwise_grad(Window.of(layer, padding), layer.filters // layer.groups)
        z = _with_gradient(native, grad_fn, x, _value(layer.kernel))
    elif layer.groups > 1 or layer.rank == 3:
        z = _with_gradient(native, _conv_grad(layer, padding, layer.groups), x, _value(layer.kernel))
    else:
        z = native(x, layer.kernel)
    z, outputs = _bias_and_activation(layer, z, layer.filters)
    a = tf.cast(x, tf.float32)
    kernel_size = tuple(layer.kernel_size)
    groups = layer.groups

    def geometry_of(delta):
        out_sizes = _spatial(delta, 2)
        pads = _pads(_spatial(a, 1), out_sizes, kernel_size, layer.strides, layer.dilation_rate,
                     padding)
        return (kernel_size, layer.strides, layer.dilation_rate, pads, out_sizes)

    def sum_sq(delta, weight):
        geometry = geometry_of(delta)
        if groups == 1:
            sq_kernel = _dense_patch_square_sum(a, delta, weight, geometry)
        elif depthwise:
            sq_kernel = _depthwise_square_sum(a, delta, weight, Window.of(layer, padding),
                                              layer.filters // groups)
        else:
            sq_kernel = _grouped_square_sum(extract_patches(a, *geometry), delta, weight, groups)
        return _with_bias(layer, delta, weight, (layer.kernel, tf.reshape(sq_kernel, layer.kernel.shape)))

    def kron(delta, weight, mask):
        k, n = leading_dims(delta)
        rows = tf.reshape(extract_patches(masked_rows(a, mask), *geometry_of(delta)),
                          [n, -1, math.prod(kernel_size) * a.shape[-1]])
        deltas = tf.reshape(delta, [k, n, -1, delta.shape[-1]])
        block = (layer.kernel, layer.bias) if layer.use_bias else (layer.kernel,)
        return [kronecker_sums(block, rows, deltas, weight, mask, bias=layer.use_bias)]

    return RuleOutput(outputs, z, sum_sq=sum_sq, kron=kron if groups == 1 else None)


def _grouped_square_sum(patches, delta, weight, groups):
    """Σ_kn w_kn g_kn(W)² of a grouped convolution, (kk, C_in/G, G, F/G) for ``patches``
    (N, *out, kk, C_in) and ``delta`` (K, N, *out, F): per group g, example n's gradient
    is Σ_l patch_nl[·, g, ·] ⊗ δ_knl[g, ·].  Few positions: pairs of positions (as
    :func:`fastewc.rules._common.position_pair_square_sum`, one matmul per group over
    N·P rows); else the K·N·|W| per-example gradients."""
    k, n = leading_dims(delta)
    kk, c_in, filters = patches.shape[-2], patches.shape[-1], delta.shape[-1]
    p = tf.reshape(patches, [n, -1, kk, groups, c_in // groups])          # (N, L, kk, G, Cg)
    d = tf.reshape(delta, [k, n, -1, groups, filters // groups])          # (K, N, L, G, Fg)
    positions = p.shape[1]
    if use_position_pairs(positions, k, elementwise=c_in // groups * (filters // groups) < 64):
        products, _ = pair_products(p, 1, positions)                       # (N, P, kk, G, Cg)
        c = weighted_delta_pairs(d, weight)                                # (N, P, G, Fg)
        if c_in == groups:           # depthwise: G × (kk × N·P)(N·P × Fg) is too small a matmul
            return tf.reduce_sum(products[..., 0, None] * c[:, :, None], axis=[0, 1])[:, None]
        return tf.einsum("npagc,npgo->acgo", products, c)
    return weighted_square_sum(tf.einsum("nlagc,knlgo->knacgo", p, d), weight)


# -- DepthwiseConv1D / DepthwiseConv2D ----------------------------------------------------
def _depthwise_grad(a, delta, window, multiplier):
    """Per-example depthwise kernel gradients (K, N, kk, C, M) from inputs ``a`` (N, *in, C):
    per kernel offset, Σ_l window(a)_nlc · δ_knlcm (elementwise, no matmul: C separate
    (kk × L)(L × M) products are too small for one)."""
    k, n = leading_dims(delta)
    out_sizes = _spatial(delta, 2)
    pads = _pads(_spatial(a, 1), out_sizes, *window[:3], window.padding)
    c = a.shape[-1]
    d = tf.reshape(delta, [k, n, -1, c, multiplier])                           # (K, N, L, C, M)
    if len(window.kernel_size) == 2 and any(s > 1 for s in window.strides):
        # Strided: one patch op, offsets first (contiguous slices), not kk strided slices.
        patches = extract_patches(a, window.kernel_size, window.strides, window.dilation, pads,
                                  out_sizes)
        kk = math.prod(window.kernel_size)
        windows = tf.transpose(tf.reshape(patches, [n, -1, kk, c]), [2, 0, 1, 3])   # (kk, N, L, C)
        wins = [windows[i] for i in range(kk)]
    else:
        ap = _pad(a, pads)
        wins = [_window(ap, offsets, window.strides, window.dilation, out_sizes)
                for offsets in _offsets(window.kernel_size)]
    grads = [tf.reduce_sum(tf.reshape(win, [n, -1, c, 1]) * d, axis=2)         # (K, N, C, M)
             for win in wins]
    return tf.stack(grads, axis=2)


def _depthwise_square_sum(a, delta, weight, window, multiplier):
    """Σ_kn w_kn g_kn² of a depthwise kernel, (kk, C, M) in the depthwise kernel's order
    (also a grouped kernel's (kk, 1, C·M)): pairs of positions where few
    (:func:`_grouped_square_sum`), else per-example gradients (:func:`_depthwise_grad`)."""
    out_sizes = _spatial(delta, 2)
    positions = _static_positions(out_sizes)
    if use_position_pairs(positions, delta.shape[0], elementwise=True):
        pads = _pads(_spatial(a, 1), out_sizes, *window[:3], window.padding)
        patches = extract_patches(a, window.kernel_size, window.strides, window.dilation, pads,
                                  out_sizes)
        return _grouped_square_sum(patches, delta, weight, groups=a.shape[-1])
    return weighted_square_sum(_depthwise_grad(a, delta, window, multiplier), weight)


def depthwise_conv_rule(layer, inputs, *args, **kwargs):
    family = type(layer).__name__
    _check(layer, family)
    window = Window.of(layer)

    def grad_fn(x, params, dy):
        return list(_depthwise_grads(window, x, params[0], dy))

    z = _with_gradient(_depthwise_op(window), grad_fn, inputs, _value(layer.kernel))
    channels = inputs.shape[-1] * layer.depth_multiplier
    z, outputs = _bias_and_activation(layer, z, channels)
    a = tf.cast(inputs, tf.float32)

    def sum_sq(delta, weight):
        sq = _depthwise_square_sum(a, delta, weight, window, layer.depth_multiplier)
        return _with_bias(layer, delta, weight, (layer.kernel, tf.reshape(sq, layer.kernel.shape)))

    return RuleOutput(outputs, z, sum_sq=sum_sq)


# -- SeparableConv1D / SeparableConv2D ----------------------------------------------------
def separable_conv_rule(layer, inputs, *args, **kwargs):
    family = type(layer).__name__
    _check(layer, family)
    def native(x, depthwise_kernel, pointwise_kernel):
        return keras.ops.separable_conv(x, depthwise_kernel, pointwise_kernel,
                                        strides=layer.strides, padding=layer.padding,
                                        dilation_rate=layer.dilation_rate,
                                        data_format=layer.data_format)

    window = Window.of(layer)

    def grad_fn(x, params, dy):
        depthwise_kernel, pointwise_kernel = params
        mid = _depthwise_op(window)(x, depthwise_kernel)
        pw = tf.reshape(pointwise_kernel, [mid.shape[-1], -1])                 # (C·M, F)
        d_mid = tf.tensordot(dy, tf.transpose(pw), 1)
        dx, d_depthwise = _depthwise_grads(window, x, depthwise_kernel, d_mid)
        d_pointwise = tf.matmul(_rows(mid, pw.shape[0]), _rows(dy, pw.shape[1]), transpose_a=True)
        return [dx, d_depthwise, tf.reshape(d_pointwise, pointwise_kernel.shape)]

    z = _with_gradient(native, grad_fn, inputs,
                       _value(layer.depthwise_kernel),
                       _value(layer.pointwise_kernel))
    z, outputs = _bias_and_activation(layer, z, layer.filters)
    a = tf.cast(inputs, tf.float32)

    def sum_sq(delta, weight):
        # The depthwise output (pointwise input); recomputed here, off the probe's path.
        mid = keras.ops.depthwise_conv(a, tf.cast(layer.depthwise_kernel, tf.float32),
                                       strides=layer.strides, padding=layer.padding,
                                       dilation_rate=layer.dilation_rate,
                                       data_format=layer.data_format)
        k, n = leading_dims(delta)
        filters = delta.shape[-1]
        pw = tf.reshape(tf.cast(layer.pointwise_kernel, tf.float32), [-1, filters])   # (C·M, F)
        d = tf.reshape(delta, [k, n, -1, filters])                                     # (K, N, L, F)
        m = tf.reshape(mid, [n, -1, pw.shape[0]])                                      # (N, L, C·M)
        g_pw = tf.einsum("nlj,knlf->knjf", m, d)
        delta_mid = tf.reshape(tf.einsum("knlf,jf->knlj", d, pw),
                               static_or_dynamic_shape(delta)[:-1] + [pw.shape[0]])
        g_dw = _depthwise_grad(a, delta_mid, window, layer.depth_multiplier)
        return _with_bias(layer, delta, weight, _squared(layer.depthwise_kernel, g_dw, weight),
                          _squared(layer.pointwise_kernel, g_pw, weight))

    return RuleOutput(outputs, z, sum_sq=sum_sq)


# -- Conv1DTranspose / Conv2DTranspose / Conv3DTranspose ----------------------------------
def conv_transpose_rule(layer, inputs, *args, **kwargs):
    family = type(layer).__name__
    _check(layer, family)
    def native(x, kernel):
        return keras.ops.conv_transpose(x, kernel, strides=list(layer.strides),
                                        padding=layer.padding, output_padding=layer.output_padding,
                                        dilation_rate=layer.dilation_rate,
                                        data_format=layer.data_format)

    if layer.rank == 3:
        z = _with_gradient(native, _conv_transpose_grad(layer), inputs,
                           _value(layer.kernel))
    else:
        z = native(inputs, layer.kernel)
    z, outputs = _bias_and_activation(layer, z, layer.filters)
    x = tf.cast(inputs, tf.float32)
    kernel_size = tuple(layer.kernel_size)

    def sum_sq(delta, weight):
        k, n = leading_dims(delta)
        filters, c_in = delta.shape[-1], x.shape[-1]
        z_sizes, x_sizes = _spatial(delta, 2), _spatial(x, 1)
        # The convolution z-space -> x-space whose adjoint the layer computes.
        pads = _pads(z_sizes, x_sizes, kernel_size, layer.strides, layer.dilation_rate, layer.padding)
        flat_delta = tf.reshape(delta, [-1] + static_or_dynamic_shape(delta)[2:])
        patches = extract_patches(flat_delta, kernel_size, layer.strides, layer.dilation_rate,
                                  pads, x_sizes)                      # (K·N, *x_sizes, kk, F)
        p = tf.reshape(patches, [k, n, -1, math.prod(kernel_size) * filters])
        xs = tf.reshape(x, [n, -1, c_in])
        g = tf.einsum("knlj,nlc->knjc", p, xs)
        return _with_bias(layer, delta, weight, _squared(layer.kernel, g, weight))

    return RuleOutput(outputs, z, sum_sq=sum_sq)


for _cls in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D):
    register_rule(_cls, conv_rule)
for _cls in (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D):
    register_rule(_cls, depthwise_conv_rule)
for _cls in (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D):
    register_rule(_cls, separable_conv_rule)
for _cls in (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose):
    register_rule(_cls, conv_transpose_rule)
