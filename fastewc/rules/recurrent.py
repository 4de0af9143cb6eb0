"""Factored rules for the recurrent layers ``keras.layers.LSTM``, ``GRU``, ``SimpleRNN``
(and ``keras.layers.RNN`` around an ``LSTMCell``, ``GRUCell`` or ``SimpleRNNCell``).

A recurrent layer applies the same weights at every step, so example n's gradient sums
over time BEFORE squaring, like a convolution over positions.  For the LSTM

    z_t = x_t W + h_{t-1} U + b,      (i, f, g, o) = split(z_t)

the rule computes the input projection of every step at once, P = x W + b (N, T, gates),
outside the recurrence: that is the probe, and since z_t = P_t + h_{t-1} U the engine's
delta for P is δ_t = ∂ℓ/∂z_t through the whole recurrence (a step the mask skips gets
δ_t = 0).  The recurrence reads P_t and keeps h_{t-1}; then

    g_kn(W) = Σ_t x_nt ⊗ δ_knt,   g_kn(U) = Σ_t h_n,t-1 ⊗ δ_knt,   g_kn(b) = Σ_t δ_knt.

SimpleRNN is the one-gate case.  The GRU (gates z, r, candidate h) differs in the
candidate block of U:

* ``reset_after=True`` (Keras' default): the candidate adds r_t ⊙ (h_{t-1} U_h + b_rec,h),
  so the recurrent side's delta is δ^rec_t = (δ_z, δ_r, r_t ⊙ δ_h):
  g(U) = Σ_t h_{t-1} ⊗ δ^rec_t, and the bias (2, 3·units) gets (Σ_t δ_t, Σ_t δ^rec_t);
* ``reset_after=False``: the candidate adds (r_t ⊙ h_{t-1}) U_h, so
  g(U_zr) = Σ_t h_{t-1} ⊗ δ_zr,t and g(U_h) = Σ_t (r_t ⊙ h_{t-1}) ⊗ δ_h,t.

Masking, ``go_backwards``, ``return_sequences``, ``return_state``, ``initial_state`` and
``zero_output_for_mask`` follow ``keras.src.backend.tensorflow.rnn.rnn``: a masked step
carries the states over and outputs the previous output (or zeros).
``keras.layers.Bidirectional`` owns no weights: it calls its forward and backward layers,
which take this rule.

The per-example gradients are returned through the generic contract
(:class:`fastewc.registry.RuleOutput` ``per_example``): memory K·N·|θ| floats for the
layer's weights θ, plus the saved per-step states (N·T·units floats; the GRU two such).
The recurrence is a ``tf.while_loop`` with its own backward pass (``tf.custom_gradient``):
a reverse ``tf.while_loop`` over plain tensors that re-runs each step under a tape, because
the engine's ``tf.vectorized_map`` over the K cotangents turns the TensorLists of a while
loop's autodiff into ones XLA cannot compile.  It keeps every step's states (another
N·T·|state| floats), runs with and without XLA, and vectorizes over the cotangents.  Not
an unrolled Python loop: unrolled, a 64-step LSTM took 48 s to compile under XLA and ran
at 8.9× the floor (empirical), against 3.1 s and 1.1× for the loop (README, "Real
models").

Not covered (:class:`fastewc.registry.UnsupportedLayerError`, so ``method="auto"`` uses
vmap): ``stateful=True``, dropout in training mode, LoRA / quantized cells, stacked cells
(``RNN([cell, cell])``) and cells of other classes (or subclasses overriding ``call``).
"""
import keras
import tensorflow as tf

from fastewc.registry import RuleOutput, UnsupportedLayerError, register_rule
from fastewc.rules._common import check_plain

# -- checks ----------------------------------------------------------------------------
def _cell_kind(layer):
    cell = layer.cell
    for kind, cls in (("lstm", keras.layers.LSTMCell), ("gru", keras.layers.GRUCell),
                      ("simple", keras.layers.SimpleRNNCell)):
        if isinstance(cell, cls):
            if type(cell).call is not cls.call:
                raise UnsupportedLayerError(
                    f"Layer '{layer.name}' ({type(layer).__name__}) has a cell of class "
                    f"{type(cell).__name__}, which overrides {cls.__name__}.call; the factored "
                    "Fisher rule knows the built-in cells only. Use method='vmap'.")
            return kind
    raise UnsupportedLayerError(
        f"Layer '{layer.name}' ({type(layer).__name__}) has a cell of class "
        f"{type(cell).__name__}; the factored Fisher rule covers LSTMCell, GRUCell and "
        "SimpleRNNCell only (not stacked or custom cells). Use method='vmap'.")


def _check(layer, training):
    family = type(layer).__name__
    kind = _cell_kind(layer)
    check_plain(layer, family)
    check_plain(layer.cell, family)
    if layer.stateful:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({family}) is stateful (stateful=True): its state carries "
            "over between batches, which the factored Fisher rule does not cover. Use "
            "method='vmap', or build the layer with stateful=False.")
    cell = layer.cell
    if training and (getattr(cell, "dropout", 0) or getattr(cell, "recurrent_dropout", 0)):
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({family}) was called with training={training!r} and "
            f"dropout={cell.dropout}, recurrent_dropout={cell.recurrent_dropout}: the factored "
            "Fisher rule covers inference mode only. Call the model with training=False.")
    return kind


def _activation(fn):
    return fn if fn is not None else (lambda v: v)


# -- the recurrence --------------------------------------------------------------------
def _loop(step, p, states, mask, *, go_backwards, zero_output_for_mask, return_sequences):
    """Run ``step(p_t, states) -> (output, new_states, saved)`` over the time axis of
    ``p`` (N, T, G) as ``keras.src.backend.tensorflow.rnn.rnn`` does.  Returns
    (last_output, outputs (N, T, units) in processing order or None, final states,
    saved: a tuple of (N, T, ·) tensors in the ORIGINAL time order, as the probe)."""
    p_t = tf.transpose(p, [1, 0, 2])                                     # (T, N, G)
    m_t = None if mask is None else tf.transpose(tf.cast(mask, tf.bool), [1, 0])
    if go_backwards:
        p_t = tf.reverse(p_t, [0])
        m_t = None if m_t is None else tf.reverse(m_t, [0])

    def one_step(pt, mt, prev_output, states):
        output, new_states, saved = step(pt, states)
        if mt is not None:
            m = mt[:, None]
            fill = tf.zeros_like(output) if zero_output_for_mask else prev_output
            output = tf.where(m, output, fill)
            new_states = tuple(tf.where(m, s, ps) for s, ps in zip(new_states, states))
        return output, tuple(new_states), tuple(saved)

    outputs, states, saved = _looped(one_step, p_t, m_t, tuple(states))
    last = outputs[-1]
    if go_backwards:
        saved = tuple(tf.reverse(s, [0]) for s in saved)
    saved = tuple(tf.transpose(s, [1, 0, 2]) for s in saved)
    outputs = tf.transpose(outputs, [1, 0, 2]) if return_sequences else None
    return last, outputs, states, saved


def _looped(one_step, p_t, m_t, states0):
    """The recurrence as a ``tf.while_loop`` with its own backward pass: a reverse
    ``tf.while_loop`` over plain tensors that re-runs each step under a tape (the engine's
    ``tf.vectorized_map`` over cotangents turns the TensorLists autodiff of a while loop
    would keep into ones XLA cannot compile)."""
    num_states = len(states0)

    @tf.custom_gradient
    def run(p_t, *states0):
        steps = tf.shape(p_t)[0]
        zero = tf.zeros_like(states0[0])
        _, _, s0 = one_step(p_t[0], None if m_t is None else m_t[0], zero, states0)

        def array(like):
            return tf.TensorArray(like.dtype, size=steps, element_shape=like.shape)

        def body(t, prev, out_ta, state_tas, saved_tas, *states):
            mt = None if m_t is None else tf.gather(m_t, t)
            state_tas = tuple(ta.write(t, s) for ta, s in zip(state_tas, states))
            output, new_states, saved = one_step(tf.gather(p_t, t), mt, prev, states)
            out_ta = out_ta.write(t, output)
            saved_tas = tuple(ta.write(t, s) for ta, s in zip(saved_tas, saved))
            return (t + 1, output, out_ta, state_tas, saved_tas) + new_states

        result = tf.while_loop(
            lambda t, *_: t < steps, body,
            (tf.constant(0), zero, array(zero), tuple(array(s) for s in states0),
             tuple(array(s) for s in s0)) + tuple(states0),
            maximum_iterations=steps)
        outputs = result[2].stack()
        state_seqs = tuple(ta.stack() for ta in result[3])       # the states each step reads
        saved = tuple(ta.stack() for ta in result[4])
        final = tuple(result[5:])
        prev_outputs = tf.concat([zero[None], outputs[:-1]], 0)  # the output each step reads

        def grad(d_outputs, *d_rest):
            d_final = d_rest[:num_states]
            d_outputs = tf.zeros_like(outputs) if d_outputs is None else d_outputs
            d_final = tuple(tf.zeros_like(s) if d is None else d for s, d in zip(final, d_final))

            def back(i, d_prev, d_p, *d_states):
                t = steps - 1 - i
                pt = tf.gather(p_t, t)
                st = tuple(tf.gather(seq, t) for seq in state_seqs)
                prev = tf.gather(prev_outputs, t)
                mt = None if m_t is None else tf.gather(m_t, t)
                with tf.GradientTape() as tape:
                    tape.watch([pt, prev, *st])
                    output, new_states, _ = one_step(pt, mt, prev, st)
                grads = tape.gradient([output, *new_states], [pt, prev, *st],
                                      output_gradients=[tf.gather(d_outputs, t) + d_prev, *d_states])
                grads = [tf.zeros_like(v) if g is None else g for v, g in zip([pt, prev, *st], grads)]
                d_p = tf.tensor_scatter_nd_update(d_p, [[t]], grads[0][None])
                return (i + 1, grads[1], d_p) + tuple(grads[2:])

            result = tf.while_loop(
                lambda i, *_: i < steps, back,
                (tf.constant(0), tf.zeros_like(zero), tf.zeros_like(p_t)) + d_final,
                maximum_iterations=steps)
            return [result[2], *result[3:]]

        return (outputs, *final, *saved), grad

    result = run(p_t, *states0)
    return result[0], tuple(result[1:1 + num_states]), tuple(result[1 + num_states:])


# -- the cells -------------------------------------------------------------------------
def _lstm(cell):
    act, ract = _activation(cell.activation), _activation(cell.recurrent_activation)
    u = tf.convert_to_tensor(cell.recurrent_kernel)

    def step(pt, states):
        h, c = states
        z = pt + tf.matmul(h, u)
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = ract(f) * c + ract(i) * act(g)
        h_new = ract(o) * act(c)
        return h_new, (h_new, c), (h,)

    return cell.bias, step, _one_input_grads(cell)


def _simple(cell):
    act = _activation(cell.activation)
    u = tf.convert_to_tensor(cell.recurrent_kernel)

    def step(pt, states):
        (h,) = states
        out = act(pt + tf.matmul(h, u))
        return out, (out,), (h,)

    return cell.bias, step, _one_input_grads(cell)


def _one_input_grads(cell):
    def grads(x, delta, saved):
        (h_prev,) = saved
        pairs = [(cell.kernel, tf.einsum("ntd,kntg->kndg", x, delta)),
                 (cell.recurrent_kernel, tf.einsum("ntu,kntg->knug", h_prev, delta))]
        if cell.bias is not None:
            pairs.append((cell.bias, tf.reduce_sum(delta, axis=2)))
        return pairs
    return grads


def _gru(cell):
    act, ract = _activation(cell.activation), _activation(cell.recurrent_activation)
    units, u = cell.units, tf.convert_to_tensor(cell.recurrent_kernel)
    bias = cell.bias
    if cell.reset_after:
        input_bias = None if bias is None else bias[0]
        recurrent_bias = None if bias is None else bias[1]

        def step(pt, states):
            (h,) = states
            inner = tf.matmul(h, u)
            if recurrent_bias is not None:
                inner = inner + recurrent_bias
            x_z, x_r, x_h = tf.split(pt, 3, axis=-1)
            rec_z, rec_r, rec_h = tf.split(inner, 3, axis=-1)
            z = ract(x_z + rec_z)
            r = ract(x_r + rec_r)
            hh = act(x_h + r * rec_h)
            h_new = z * h + (1 - z) * hh
            return h_new, (h_new,), (h, r)

        def grads(x, delta, saved):
            h_prev, r = saved
            r = tf.cast(r, tf.float32)
            delta_rec = tf.concat([delta[..., :2 * units], r[None] * delta[..., 2 * units:]], axis=-1)
            pairs = [(cell.kernel, tf.einsum("ntd,kntg->kndg", x, delta)),
                     (cell.recurrent_kernel, tf.einsum("ntu,kntg->knug", h_prev, delta_rec))]
            if bias is not None:
                pairs.append((bias, tf.stack([tf.reduce_sum(delta, axis=2),
                                              tf.reduce_sum(delta_rec, axis=2)], axis=2)))
            return pairs
    else:
        input_bias = bias
        u_zr, u_h = u[:, :2 * units], u[:, 2 * units:]

        def step(pt, states):
            (h,) = states
            inner = tf.matmul(h, u_zr)
            x_z, x_r, x_h = tf.split(pt, 3, axis=-1)
            z = ract(x_z + inner[:, :units])
            r = ract(x_r + inner[:, units:])
            rh = r * h
            hh = act(x_h + tf.matmul(rh, u_h))
            h_new = z * h + (1 - z) * hh
            return h_new, (h_new,), (h, rh)

        def grads(x, delta, saved):
            h_prev, rh = saved
            g_u = tf.concat([tf.einsum("ntu,kntg->knug", h_prev, delta[..., :2 * units]),
                             tf.einsum("ntu,kntg->knug", tf.cast(rh, tf.float32), delta[..., 2 * units:])],
                            axis=-1)
            pairs = [(cell.kernel, tf.einsum("ntd,kntg->kndg", x, delta)),
                     (cell.recurrent_kernel, g_u)]
            if bias is not None:
                pairs.append((bias, tf.reduce_sum(delta, axis=2)))
            return pairs
    return input_bias, step, grads


_CELLS = {"lstm": _lstm, "gru": _gru, "simple": _simple}


# -- the rule --------------------------------------------------------------------------
def _initial_states(layer, sequences, initial_state):
    dtype = layer.cell.compute_dtype
    if initial_state is None:
        n = tf.shape(sequences)[0]
        sizes = layer.state_size
        return [tf.zeros(tf.stack([n, size]), dtype) for size in sizes]
    if not isinstance(initial_state, (list, tuple)):
        initial_state = [initial_state]
    flat = tf.nest.flatten(initial_state)
    if len(flat) != len(layer.state_size):
        raise ValueError(f"Layer '{layer.name}' ({type(layer).__name__}) expects "
                         f"{len(layer.state_size)} initial state tensors. Received: {len(flat)}")
    return [tf.cast(tf.convert_to_tensor(s), dtype) for s in flat]


def recurrent_rule(layer, sequences, initial_state=None, mask=None, training=None):
    kind = _check(layer, training)
    if isinstance(sequences, (list, tuple)):        # RNN([x, state, ...]) as Keras 2 did
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({type(layer).__name__}) received a list of inputs; the "
            "factored Fisher rule takes initial states as `initial_state=` only. Use method='vmap'.")
    if isinstance(mask, (list, tuple)):
        mask = mask[0]
    cell = layer.cell
    input_bias, step, grads = _CELLS[kind](cell)
    states = _initial_states(layer, sequences, initial_state)

    p = tf.tensordot(sequences, cell.kernel, 1)
    if input_bias is not None:
        p = p + input_bias
    last, outputs, states, saved = _loop(
        step, p, states, mask, go_backwards=layer.go_backwards,
        zero_output_for_mask=layer.zero_output_for_mask, return_sequences=layer.return_sequences)
    dtype = layer.compute_dtype
    output = tf.cast(outputs if layer.return_sequences else last, dtype)
    result = (output, *[tf.cast(s, dtype) for s in states]) if layer.return_state else output

    x = tf.cast(sequences, tf.float32)
    saved = tuple(tf.cast(s, tf.float32) for s in saved)

    def per_example(delta):                 # delta (K, N, T, G)
        return grads(x, delta, saved)

    return RuleOutput(result, p, per_example=per_example)


for _cls in (keras.layers.RNN, keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN):
    register_rule(_cls, recurrent_rule)
