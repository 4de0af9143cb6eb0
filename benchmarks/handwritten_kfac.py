"""A plain hand-written TensorFlow KFAC kernel: the yardstick of issue 25 item 4.

What a user who knows KFAC writes in TensorFlow for a Sequential model of Dense and Conv2D
layers (valid padding, stride 1) with a softmax cross-entropy on logits: one compiled
function that runs the layers one by one, keeps each weighted layer's input and output,
and takes the output deltas δ = ∂ℓ_n/∂z of the per-example losses by one backward pass
per cotangent.  Its factors are those of :mod:`fastewc.curvature`'s docstring,

    A = (1/N) Σ_n (1/L) Σ_l ā_nl ā_nlᵀ,    G = (1/N) Σ_n Σ_k w_k Σ_l δ_nlk δ_nlkᵀ,

ā = [a, 1] the layer's input rows (a convolution's patches, in the kernel's (kh, kw, c)
order), with the cotangents of the kind: the true label (empirical), one label drawn from
p(·|x_n) (sampled), or the K = classes cotangents √p_k (e_k − p) of the exact Fisher of
the logits, diag(p) − ppᵀ = Σ_k p_k (e_k − p)(e_k − p)ᵀ.  Float32 throughout, one batch,
no streaming, no checks: the floor of what KFAC factors cost on this machine, which
``benchmarks/bench_kfac.py`` sets fastewc's factors against.  Written as a user who
minds the cost would: im2col by ``tf.image.extract_patches``, one matmul per factor and
per cotangent, no copy or pass over a large A that the rows can take instead
(:func:`_a_factor`).
"""
import keras
import tensorflow as tf


def _weighted_layers(model):
    layers = [layer for layer in model.layers if layer.trainable_weights]
    for layer in layers:
        if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            raise TypeError(f"handwritten KFAC takes Dense and Conv2D layers only, not {type(layer).__name__}")
        if isinstance(layer, keras.layers.Conv2D) and (layer.padding != "valid" or layer.strides != (1, 1)
                                                        or layer.dilation_rate != (1, 1)):
            raise TypeError("handwritten KFAC takes Conv2D layers with valid padding, stride 1, no dilation")
    return layers


def _a_factor(layer, inputs):
    """A = (1/N) Σ_n (1/L) Σ_l ā_nl ā_nlᵀ with ONE matmul over the layer's input rows
    (N·L, d) (a convolution's im2col by ``tf.image.extract_patches``) and no pass over A
    beyond the matmul's own where A is the larger: the 1/(N·L) goes into the rows as
    1/√(N·L), and the bias's 1 as a column of the rows, when the rows are fewer floats
    than A (the reference CNN's Dense(9216 → 128): 256 rows against a 9217² A); else
    (a convolution's N·L patches) A's last row and column are the rows' column sums."""
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        patches = tf.image.extract_patches(inputs, [1, kh, kw, 1], [1, 1, 1, 1], [1, 1, 1, 1], "VALID")
        rows = tf.reshape(patches, [-1, patches.shape[-1]])
    else:
        rows = inputs
    count = tf.cast(tf.shape(rows)[0], tf.float32)           # N·L
    d = rows.shape[-1]
    if rows.shape[0] is not None and rows.shape[0] <= d:     # rows fewer than A's floats
        rows = rows * tf.math.rsqrt(count)
        if layer.use_bias:
            rows = tf.concat([rows, tf.fill([tf.shape(rows)[0], 1], tf.math.rsqrt(count))], -1)
        return tf.matmul(rows, rows, transpose_a=True)
    a = tf.matmul(rows, rows, transpose_a=True) / count
    if not layer.use_bias:
        return a
    column = tf.reduce_sum(rows, 0)[:, None] / count
    return tf.concat([tf.concat([a, column], 1), tf.concat([tf.transpose(column), [[1.0]]], 1)], 0)


def _pre_activation(layer, h):
    if isinstance(layer, keras.layers.Conv2D):
        z = tf.nn.conv2d(h, layer.kernel, 1, "VALID")
    else:
        z = tf.matmul(h, layer.kernel)
    return z + layer.bias if layer.use_bias else z


def kfac_function(model, kind, *, jit_compile=False):
    """``(x, y, seed) -> [(A, G) per weighted layer]`` for ``kind`` in empirical, sampled,
    exact (``seed``: an int32 pair for the sampled label)."""
    weighted = _weighted_layers(model)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def factors(x, y, seed):
        n = tf.cast(tf.shape(x)[0], tf.float32)
        inputs, outputs = {}, {}
        with tf.GradientTape(persistent=kind == "exact") as tape:
            h = x
            for layer in model.layers:
                if layer in weighted:
                    inputs[layer.name] = h
                    z = _pre_activation(layer, h)
                    tape.watch(z)
                    outputs[layer.name] = z
                    h = layer.activation(z)
                else:
                    h = layer(h)
            logits = h
            p = tf.nn.softmax(logits)
            if kind == "exact":
                classes = logits.shape[-1]
                # Σ_k √p_k (e_k − p)ᵀ logits per cotangent k; its gradient is the k-th δ.
                weights = tf.sqrt(tf.stop_gradient(p))
                outs = [tf.reduce_sum(weights[:, k] * (logits[:, k] - tf.reduce_sum(tf.stop_gradient(p) * logits, -1)))
                        for k in range(classes)]
            else:
                labels = y if kind == "empirical" else tf.random.stateless_categorical(
                    tf.stop_gradient(logits), 1, seed, dtype=tf.int32)[:, 0]
                outs = [tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))]
        names = list(outputs)
        g = {name: 0.0 for name in names}
        for out in outs:
            deltas = tape.gradient(out, [outputs[name] for name in names])
            for name, delta in zip(names, deltas):
                d = tf.reshape(delta, [-1, delta.shape[-1]])
                g[name] += tf.matmul(d, d, transpose_a=True)
        return [(_a_factor(layer, inputs[layer.name]), g[layer.name] / n) for layer in weighted]

    return factors
