"""Slow, obviously-correct references for tests and benchmarks.

Nothing here shares code with the fast paths: the likelihoods are written out in closed
form (log-softmax, log-sigmoid, Gaussian), each example gets its own GradientTape per
outcome, everything runs eagerly in float64 and sums in NumPy float64.

    F_i = (1/N) Σ_n E_{y~q_n}[(∂ℓ_n(y)/∂θ_i)²]

``reference_fisher`` needs a float64 twin of the model: :func:`float64_twin` builds one for
Sequential and functional models; for subclassed models build it yourself with
``dtype="float64"`` and copy the weights.
"""
import keras
import numpy as np
import tensorflow as tf


def float64_twin(model):
    """A float64 copy of a Sequential/functional ``model`` (nested models included) with
    the same weights.

    Every Keras ``Layer`` is re-created from its config with ``dtype="float64"``; the
    other operations a functional graph can hold (``keras.ops`` calls on symbolic tensors,
    e.g. the ``NotEqual`` of ``Embedding(mask_zero=True)`` or the ``GetItem`` of keras_hub's
    BertBackbone) have no dtype and are re-created from their own config.  Nested
    functional models (a keras_hub Backbone is one) and Sequential models are cloned
    recursively, so their layers are float64 too (a nested functional subclass such as
    ``BertBackbone`` comes back as a plain functional ``keras.Model``, as
    ``keras.models.clone_model`` makes it).  LoRA and frozen layers are copied too
    (:func:`_copy_lora_and_trainable`); LoRA factors stay float32, as Keras makes them.
    """
    def clone(operation):
        config = operation.get_config()
        if isinstance(operation, keras.layers.Layer):
            config = _float64_config(config)
        return operation.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone, recursive=True)
    _copy_lora_and_trainable(model, twin)
    weights = model.get_weights()
    twin_variables = twin.weights
    if len(twin_variables) != len(weights):
        raise ValueError(f"float64_twin: the clone of {model.name!r} has {len(twin_variables)} weights, "
                         f"the model {len(weights)}")
    for variable, value in zip(twin_variables, weights):
        if tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(f"float64_twin: weight {variable.path} has shape {tuple(variable.shape)} in the "
                             f"clone, {np.shape(value)} in the model")
        variable.assign(np.asarray(value, variable.dtype))
    # Keras makes LoRA factors float32 whatever the layer's dtype (their gradients are then
    # float32 products: about 1e-7 relative, far inside the tests' tolerances).
    bad = [v.path for v in _without_lora(twin.trainable_variables, twin) if v.dtype != "float64"]
    if bad:
        raise ValueError(f"float64_twin: trainable variables not float64 in the clone: {bad[:5]}")
    return twin


def _copy_lora_and_trainable(model, twin):
    """LoRA (``enable_lora``: rank and alpha) and ``trainable`` of every layer of ``model`` on
    its twin: the layers a keras_hub backbone builds inside others (the attention's
    projections) are not re-created from a config that holds them, and a Dense re-created
    from its config loses its ``lora_alpha`` (Keras 3.15's ``Dense.build``).  Layers are
    paired through their own variables, LoRA factors aside (the clone's weights are in the
    model's order); frozen first, so that the LoRA factors stay trainable."""
    base, twin_base = _without_lora(model.weights, model), _without_lora(twin.weights, twin)
    if len(base) != len(twin_base):
        return          # reported by float64_twin with the shapes
    counterpart = {id(v): w for v, w in zip(base, twin_base)}
    owner = {id(v): layer for layer in twin._flatten_layers() for v in _own_variables(layer)}
    pairs = []
    for layer in model._flatten_layers(include_self=False):
        own = [v for v in _own_variables(layer) if id(v) in counterpart]
        if own:
            pairs.append((layer, owner[id(counterpart[id(own[0])])]))
    for original, copy in pairs:
        copy.trainable = original.trainable
    for original, copy in pairs:
        if getattr(original, "lora_enabled", False):
            if not copy.lora_enabled:
                copy.enable_lora(original.lora_rank, lora_alpha=original.lora_alpha)
            copy.lora_alpha = original.lora_alpha


def _without_lora(variables, model):
    lora = {id(v) for layer in model._flatten_layers() if getattr(layer, "lora_enabled", False)
            for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    return [v for v in variables if id(v) not in lora]


def _own_variables(layer):
    return list(getattr(layer, "_trainable_variables", [])) + list(getattr(layer, "_non_trainable_variables", []))


def _float64_config(config):
    """``config`` with ``dtype="float64"``, and so the serialized layers nested in it (an
    RNN's ``cell``, a Bidirectional's ``layer``), which their owner re-creates from their
    own config."""
    def nested(value):
        if isinstance(value, dict) and isinstance(value.get("config"), dict) and "class_name" in value \
                and "dtype" in value["config"]:
            return {**value, "config": _float64_config(value["config"])}
        if isinstance(value, list):
            return [nested(v) for v in value]
        return value
    out = {key: nested(value) for key, value in config.items()}
    out["dtype"] = "float64"
    return out


def _slice(x, start, stop):
    """Rows ``start:stop`` of every array in ``x`` (an array, or a dict/list/tuple of
    arrays), floating ones as float64."""
    def one(a):
        a = np.asarray(a)[start:stop]
        return tf.constant(a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a)
    return tf.nest.map_structure(one, x)


def _num_examples(x):
    sizes = {np.shape(a)[0] for a in tf.nest.flatten(x)}
    if len(sizes) != 1:
        raise ValueError(f"reference_fisher: inputs disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def reference_fisher_of(model, x, y, *, loss, kind="empirical", num_samples=1, seed=0,
                        batch_size=None, sample_weight=None, positions="sum"):
    """:func:`reference_fisher` on ``model``'s float64 twin; for ``kind="sampled"`` the
    labels fastewc draws with ``num_samples``, ``seed`` and ``batch_size``."""
    twin = float64_twin(model)
    labels = None
    if kind == "sampled":
        labels = reference_sampled_labels(twin, x, loss=loss, num_samples=num_samples,
                                          seed=seed, batch_size=batch_size)
    return reference_fisher(twin, x, y, loss=loss, kind=kind, sampled_labels=labels,
                            sample_weight=sample_weight, positions=positions)


def _family(loss):
    """(family, from_logits, sparse) for the losses fastewc supports, written out here."""
    if isinstance(loss, str):
        return {
            "sparse_categorical_crossentropy": ("categorical", False, True),
            "categorical_crossentropy": ("categorical", False, False),
            "binary_crossentropy": ("binary", False, None),
            "mse": ("gaussian", None, None),
            "mean_squared_error": ("gaussian", None, None),
        }[loss]
    from_logits = bool(loss.get_config().get("from_logits", False))
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return "categorical", from_logits, True
    if isinstance(loss, keras.losses.CategoricalCrossentropy):
        return "categorical", from_logits, False
    if isinstance(loss, keras.losses.BinaryCrossentropy):
        return "binary", from_logits, None
    return "gaussian", None, None


def _log_probs(family, from_logits, o):
    """Categorical: log p over classes.  Binary: (log p(1), log p(0)) per unit."""
    if family == "categorical":
        if from_logits:
            return tf.nn.log_softmax(o, axis=-1)
        return tf.math.log(o / tf.reduce_sum(o, axis=-1, keepdims=True))
    if from_logits:
        return tf.math.log_sigmoid(o), tf.math.log_sigmoid(-o)
    return tf.math.log(o), tf.math.log(1.0 - o)


def reference_fisher(model64, x, y, *, loss, kind="empirical", sampled_labels=None,
                     sample_weight=None, positions="sum"):
    """Float64 per-example reference: one tape per example and outcome.

    ``x`` is an array, or a dict (list, tuple) of arrays sliced per example entry by entry
    (floating entries cast to float64), as the model takes it.

    ``sampled_labels`` (num_samples, N, *positions) class ids are required for
    ``kind="sampled"`` (categorical losses): the reference then averages the squared
    gradients over them.

    Per-position outputs (an example's output of rank ≥ 2: positions..., classes/units),
    or ``sample_weight``: the example's negative log-likelihood is written out as
    Σ_t s_t ℓ_t over its positions t, s_t the product of the Keras mask of the output
    (``_keras_mask``), ``x["padding_mask"]`` and ``sample_weight`` (per example or per
    position), divided by #{t: s_t > 0} for ``positions="mean"``; the exact kind is the
    per-position expectation Σ_t Σ_c p_tc (∂ s_t ℓ_t(c)/∂θ)² (the positions' labels are
    independent given x; tests check it against the joint expectation).
    Returns a list of float64 NumPy arrays aligned with ``model64.trainable_variables``.
    """
    variables = model64.trainable_variables
    sums = [np.zeros(v.shape, np.float64) for v in variables]
    x = tf.nest.map_structure(np.asarray, x)
    y = np.asarray(y)
    n_total = _num_examples(x)

    def accumulate(weight, tape, target):
        grads = tape.gradient(target, variables)
        for i, g in enumerate(grads):
            if g is not None:
                sums[i] += weight * np.square(tf.convert_to_tensor(g).numpy().astype(np.float64))  # IndexedSlices too

    for n in range(n_total):
        xn = _slice(x, n, n + 1)
        draws = None if sampled_labels is None else sampled_labels[:, n]
        with tf.GradientTape(persistent=True) as tape:
            raw = model64(xn, training=False)
            o = tf.cast(raw, tf.float64)[0]
            weight = _position_weight(raw, xn, None if sample_weight is None else np.asarray(sample_weight)[n])
            if o.shape.rank >= 2 or weight is not None:
                outcomes = _positional_outcomes(loss, kind, o, y[n], draws, weight, positions)
            else:
                outcomes = _outcomes(loss, kind, o, y[n], draws)
        for weight, target in outcomes:
            accumulate(weight, tape, target)
        del tape
    return [s / n_total for s in sums]


def _position_weight(raw, xn, sample_weight):
    """s_t of one example: the product of the masks that apply, None without any."""
    factors = []
    mask = getattr(raw, "_keras_mask", None)
    if mask is not None and raw.shape.rank >= 3:
        factors.append(np.asarray(mask, np.float64)[0])
    if isinstance(xn, dict) and "padding_mask" in xn and raw.shape.rank >= 3:
        factors.append(np.asarray(xn["padding_mask"], np.float64)[0])
    if sample_weight is not None:
        factors.append(np.asarray(sample_weight, np.float64))
    if not factors:
        return None
    rank = max(f.ndim for f in factors)
    out = np.ones(())
    for f in factors:
        out = out * f.reshape(f.shape + (1,) * (rank - f.ndim))
    return out


def _positional_outcomes(loss, kind, o, y_n, draws, weight, positions):
    """[(weight, target)] for an example with positions: o (*positions, classes/units)."""
    family, from_logits, sparse = _family(loss)
    shape = tuple(o.shape)
    elementwise = family != "categorical" and weight is not None and weight.ndim == len(shape) and \
        weight.shape == shape
    if elementwise:
        o, units = tf.reshape(o, [-1, 1]), 1
    else:
        units = shape[-1] if shape else 1
        o = tf.reshape(o, [-1, units])
    num = int(o.shape[0])
    grid = shape if elementwise else shape[:-1]
    w = np.ones(()) if weight is None else np.asarray(weight, np.float64)
    if w.ndim == len(grid) + 1 and w.shape[-1] == 1:
        w = w[..., 0]
    s = np.broadcast_to(w.reshape(w.shape + (1,) * (len(grid) - w.ndim)), grid).reshape(-1)
    if positions == "mean":
        count = np.sum(s > 0)
        s = s / count if count else s * 0.0
    y_n = np.asarray(y_n)
    if family == "categorical":
        logp = _log_probs(family, from_logits, o)                  # (P, C)
        ids = y_n.reshape(-1) if sparse else np.argmax(y_n.reshape(num, -1), axis=-1)
        if kind == "empirical":
            return [(1.0, -tf.add_n([s[t] * logp[t, int(ids[t])] for t in range(num)]))]
        if kind == "exact":
            p = np.exp(logp.numpy())
            return [(p[t, c], -s[t] * logp[t, c]) for t in range(num) for c in range(units)]
        draws = np.asarray(draws).reshape(len(draws), -1)
        return [(1.0 / len(draws), -tf.add_n([s[t] * logp[t, int(d[t])] for t in range(num)])) for d in draws]
    if kind == "sampled":
        raise ValueError("reference: sampled is only written out for categorical losses")
    yv = y_n.astype(np.float64).reshape(num, units)
    if family == "binary":
        log1, log0 = _log_probs(family, from_logits, o)
        if kind == "empirical":
            return [(1.0, -tf.reduce_sum(s[:, None] * (yv * log1 + (1.0 - yv) * log0)))]
        p1 = np.exp(log1.numpy())
        return [(weight_, -s[t] * logq[t, j]) for t in range(num) for j in range(units)
                for logq, weight_ in ((log1, p1[t, j]), (log0, 1.0 - p1[t, j]))]
    if kind == "empirical":
        return [(1.0, 0.5 * tf.reduce_sum(s[:, None] * tf.square(yv - o)))]
    return [(1.0, s[t] * o[t, j]) for t in range(num) for j in range(units)]


def _outcomes(loss, kind, o, y_n, draws):
    """[(weight, −log q(outcome))] for one example's output ``o`` (call inside the tape):
    E_y[g(y)²] = Σ weight · (∂ target/∂θ)².  Categorical: the true label (empirical), each
    class c with p_c (exact), each draw with 1/S (sampled).  Binary: the summed true-label
    terms, or each unit's two outcomes.  Gaussian (unit variance): ½‖y − o‖², or each output
    coordinate (exact: diag(JᵀJ))."""
    family, from_logits, sparse = _family(loss)
    if family == "categorical":
        logp = _log_probs(family, from_logits, o)
        if kind == "empirical":
            return [(1.0, -logp[int(y_n) if sparse else int(np.argmax(y_n))])]
        if kind == "exact":
            p = np.exp(logp.numpy())
            return [(p[c], -logp[c]) for c in range(p.shape[-1])]
        return [(1.0 / len(draws), -logp[int(label)]) for label in draws]
    if kind == "sampled":
        raise ValueError("reference: sampled is only written out for categorical losses")
    if family == "binary":
        log1, log0 = _log_probs(family, from_logits, o)
        if kind == "empirical":
            return [(1.0, -tf.reduce_sum(y_n * log1 + (1.0 - y_n) * log0))]
        p1 = np.exp(log1.numpy())
        return [(weight, -logq[j]) for j in range(o.shape[-1])
                for logq, weight in ((log1, p1[j]), (log0, 1.0 - p1[j]))]
    flat = tf.reshape(o, [-1])
    if kind == "empirical":
        return [(1.0, 0.5 * tf.reduce_sum(tf.square(tf.reshape(y_n.astype(np.float64), [-1]) - flat)))]
    return [(1.0, flat[j]) for j in range(int(flat.shape[0]))]


def reference_kronecker_factors(model64, x, y, *, loss, kind="empirical", sampled_labels=None):
    """Float64 per-example reference of the Kronecker factors of each Dense and
    (ungrouped) convolution layer of a Sequential ``model64``:

        A = (1/N) Σ_n (1/L) Σ_l ā_nl ā_nlᵀ,     G = (1/N) Σ_n Σ_y w_y Σ_l δ_nl(y) δ_nl(y)ᵀ

    with ā = [a, 1] (bias last).  Nothing comes from the fast path: the input rows ā_nl are
    read off a tape as the Jacobian ∂z_nl[0]/∂W[:, 0] of the layer's pre-activation (for
    z = W̄ᵀ ā that IS the row, patches included), z comes from a linear copy of the layer,
    and δ_nl(y) = ∂(−log q(y))/∂z_nl from one tape per example and outcome
    (:func:`_outcomes`).  Returns ``{layer name: (A, G)}`` as float64 NumPy arrays.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    n_total = x.shape[0]
    layers = list(model64.layers)
    out = {}
    for i, layer in enumerate(layers):
        if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
                                  keras.layers.Conv3D)) or getattr(layer, "groups", 1) != 1 \
                or type(layer).__name__.endswith("Transpose"):
            continue
        linear = layer.__class__.from_config({**layer.get_config(), "activation": "linear"})
        a_sum, g_sum = 0.0, 0.0
        for n in range(n_total):
            draws = None if sampled_labels is None else sampled_labels[:, n]
            h = _slice(x, n, n + 1)
            for previous in layers[:i]:
                h = previous(h, training=False)
            if not linear.built:
                linear.build(h.shape)
                linear.set_weights(layer.get_weights())
            with tf.GradientTape(persistent=True) as tape:
                z = linear(h)
                first = tf.reshape(z[..., 0], [-1])
                o = layer.activation(z)
                for following in layers[i + 1:]:
                    o = following(o, training=False)
                outcomes = _outcomes(loss, kind, tf.cast(o, tf.float64)[0], y[n], draws)
            units = z.shape[-1]
            rows = tape.jacobian(first, linear.kernel).numpy()[..., 0].reshape(first.shape[0], -1)
            if layer.use_bias:
                rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
            a_sum = a_sum + rows.T @ rows / rows.shape[0]
            for weight, target in outcomes:
                delta = tape.gradient(target, z).numpy().reshape(-1, units)
                g_sum = g_sum + weight * delta.T @ delta
            del tape
        out[layer.name] = (a_sum / n_total, g_sum / n_total)
    return out


def reference_sampled_labels(model64, x, *, loss, num_samples, seed, batch_size):
    """Class ids drawn as fastewc documents it, re-derived in float64 NumPy.

    Batch b uses ``tf.random.stateless_uniform([num_samples, B, *positions], seed=[seed, b],
    alg="philox")`` and the inverse CDF of p(·|x_n) at each position: label = #{c : cdf_c < u}.  B is
    ``batch_size``, or the next power of two ≥ N when N < batch_size (the last batch padded);
    ``batch_size=None`` reads all N examples as one batch, as fastewc does whenever the rows
    its memory budget allows are at least N.
    """
    family, from_logits, _ = _family(loss)
    assert family == "categorical"
    x = tf.nest.map_structure(np.asarray, x)
    n_total = _num_examples(x)
    if batch_size is None:                       # one batch, padded to its power of two
        batch_size = 1 << max(0, (n_total - 1).bit_length())
    b = batch_size if n_total >= batch_size else min(batch_size, 2 ** int(np.ceil(np.log2(n_total))))
    positions = tuple(model64(_slice(x, 0, 1), training=False).shape[1:-1])
    labels = np.zeros((num_samples, n_total) + positions, np.int64)
    for index, start in enumerate(range(0, n_total, b)):
        stop = min(start + b, n_total)
        u = tf.random.stateless_uniform([num_samples, b, *positions], seed=[seed, index], alg="philox").numpy()
        u = u[:, :stop - start]
        o = tf.cast(model64(_slice(x, start, stop), training=False), tf.float64)
        p = np.exp(_log_probs(family, from_logits, o).numpy())
        cdf = np.cumsum(p, axis=-1)
        ids = (cdf[None] < u[..., None]).sum(-1)
        labels[:, start:stop] = np.minimum(ids, p.shape[-1] - 1)
    return labels

