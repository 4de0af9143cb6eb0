"""The factored engine: per-layer rules on the deltas of ONE forward pass.

For a layer with probe z (usually its pre-activation) and rule-known per-example
gradients g_kn = r(a_n, δ_kn), δ_kn = ∂⟨U_kn, o_n⟩/∂z_n, the engine runs one forward pass
of the batch under :func:`fastewc.capture.capture`, back-propagates the K cotangents
U_k (K, N, *output) to every probe at once, and lets each rule form the sums of the blocks
that cover the layer's variables (:class:`fastewc.blocks.BlockPlan`), e.g. a diagonal
block's

    Σ_k Σ_n W_kn g_kn²

(:meth:`fastewc.registry.RuleOutput.square_sums`), a Kronecker block's factors from its
``kron``.  Examples are independent, so the
deltas of all N examples come from one backward pass per cotangent: cost about one
forward and K backward passes of the batch, memory K · rows · (probe floats) for the
deltas, and no N × P per-example tensor unless a rule needs one.

The K passes run one of three ways:

* one ``tf.vectorized_map`` over the cotangents (the default): every layer's sums from
  the K cotangents' deltas (K, N, *probe) at once, in batched kernels;
* unrolled in the graph (:attr:`FactoredEngine.unroll_cotangents` says when): K backward
  passes, each layer's sums from their stack or from the K tensors apart
  (``Block.per_cotangent``);
* in a ``tf.while_loop`` over the cotangents (:meth:`FactoredEngine.loops_cotangents`):
  the body back-propagates ONE cotangent and adds each block's sums over the cotangents
  (``Block.sums_over_cotangents``: a diagonal's Σ_kn w g², a Kronecker block's G, EKFAC's
  second moments) to loop-carried totals; the sums that do not depend on the cotangents
  (a Kronecker block's A) are formed once outside.  The graph holds one backward pass, a
  call one cotangent's deltas at a time, so its rows are counted with one cotangent's
  deltas (K-fold more rows a call).  Where the K cotangents' deltas of ONE row are more
  than ``FLOOR_FLOATS``: there the other two ways run a row or so per call (the floor
  below), a call of several batches folds every sum into float64 totals and holds the
  K-fold deltas at once, while the loop takes the batch in fewer calls (often one: no
  fold) and holds K-fold fewer deltas, at the same steady time (GPT-2 base's classifier,
  exact: peak memory and first call down).  Below that (the reference MLP and CNN, exact)
  the loop ran slower at steady than the batched or unrolled passes, whose kernels take
  the K · N rows at once, and its first call was no shorter: its smaller graph traced
  faster but instantiated and compiled no faster (README, "The exact kind's K passes in
  a loop").

Rows per call (``batch_size=None``), each bound from a measurement (README, "Rows per
compiled call capped"):

* at most ``MAX_ROWS``: a rule's float32 contraction over the rows of one call is where
  rounding grows, ≈ rows · 2⁻²⁴ (the float64 fold takes over between calls);
* deltas of at most ``CACHE_FLOATS`` floats per call (K · probe floats per row; where the
  K passes loop, one cotangent's: probe floats per row, here and below): beyond,
  on CPU, the temporaries of the K backward passes outgrow the caches and a call gets
  slower per example (the reference CNN, exact: 16 rows 1.4× faster than 256);
* but at least ``MIN_ROWS``: a model of many layers pays a fixed cost per call (one
  dispatch per op); under the 2²⁴ cap alone ResNet50 and DenseNet121 (exact) got 2 rows,
  and raising the cap took MobileNetV2 exact from 25.6× to 15.3× the floor (issue 15);
* that floor itself bounded by ``FLOOR_FLOATS`` deltas per call, or by the S floats of
  the plan's sums where they are more:

      floor = min(MIN_ROWS, 2^⌊log₂(max(FLOOR_FLOATS, S) / (K · probe floats))⌋), at least 1 row,

  so the Applications at 32 px keep ``MIN_ROWS``, while at 224 px, where one image's
  probes are 13–21M floats and a call's fixed cost is small next to its work, the deltas
  a call holds (and with them its peak memory and its first call) no longer grow with
  ``MIN_ROWS``.  Measured at 224 px (README, "Real sizes"): MobileNetV2 (13.4M floats a
  row) ran faster per image, compiled faster and met the memory target at 4 rows against
  16; ResNet50 (21.2M) missed the memory target at 4 rows and met it at 2.  2²⁶ lies
  between the deltas of those two passing calls (4 · 13.4M, 2 · 21.2M) and ResNet50's
  failing one (4 · 21.2M).  S: a call of several batches folds its sums into float64
  totals (≥ 8 S bytes, :func:`fastewc.engines.base.fold`) that a one-batch call does not
  hold, so fewer than S floats of deltas a call save less than splitting adds (ViT-B/16,
  86.6M parameters, 20.3M floats a row: at 2 rows against its 4 examples in one call, a
  higher peak and a slower first call, no faster steady call);
* and never more than the memory budget holds (:mod:`fastewc._memory`).

Rounded down to a power of two; an explicit ``batch_size`` lowers them further (a
memory cap).
"""
import math
import re

import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import _memory
from fastewc import capture as capture_lib
from fastewc import pooling
from fastewc.contract import unit_weights
from fastewc.engines import per_example
from fastewc.engines.shared_sums import SharedSums
from fastewc.engines.base import (UNROLL_COTANGENTS, BatchSums, Engine, IdGuard, cotangent_scale,
                                  drawn_noise, folded_weights, output_range, weighted_cotangents)

MAX_ROWS = 4096
CACHE_FLOATS = 2**24
MIN_ROWS = 16
FLOOR_FLOATS = 2**26


def _power_of_two(n):
    """The largest power of two ≤ ``n``; 1 when ``n`` < 1."""
    return 1 << (max(1, n).bit_length() - 1)


def vectorizes(k, unroll):
    """Whether :func:`cotangent_deltas` runs K backward passes as one ``tf.vectorized_map``."""
    return not (k == 1 or (unroll and k is not None and k <= UNROLL_COTANGENTS))


def cotangent_deltas(tape, out, probes, u, *, unroll=True, apart=()):
    """∂⟨u_k, out⟩/∂probe for each of the K cotangents ``u`` (K, *out.shape): for each
    probe a (K, *probe.shape) tensor, or None where the probe does not reach ``out``.
    With ``unroll`` and up to ``UNROLL_COTANGENTS`` the K backward passes are unrolled in
    the graph (no pfor converter needed), and the probes whose index is in ``apart`` get
    the list of the K passes' (*probe.shape) tensors instead (no stack: a copy of K·probe
    floats); else one ``tf.vectorized_map``."""
    k = u.shape[0]
    if not vectorizes(k, unroll):
        per_k = [tape.gradient(out, probes, output_gradients=u[i]) for i in range(k)]
        return [None if per_probe[0] is None else list(per_probe) if i in apart else tf.stack(per_probe)
                for i, per_probe in enumerate(zip(*per_k))]
    return tf.vectorized_map(lambda uk: tape.gradient(out, probes, output_gradients=uk), u,
                             fallback_to_while_loop=False)


def _scope_name(layer):
    """``rules/<layer name>``, with characters a graph name scope refuses replaced."""
    return "rules/" + re.sub(r"[^A-Za-z0-9_.\-]", "_", layer.name)


class FactoredEngine(Engine):
    name = "factored"
    scales_sums = True       # batch_sums(..., scale=): the kinds that can return their sums times it
    in_graph_noise = True    # the sampled kind's noise drawn in batch_sums without XLA (draws_noise)
    _unroll = None           # decided on first use: see unroll_cotangents
    _vectorized = False      # the last trace vectorized its K backward passes
    _loop = None             # None: loops_cotangents decides; True / False: forced

    def rows_per_call(self, batch_size, num_cotangents, probe_floats, budget):
        live = 1 if self.loops_cotangents(num_cotangents, probe_floats) else num_cotangents  # deltas at once
        per_row = live * (probe_floats or 1)
        sums = sum(math.prod(shape) for shape in self.blocks.shapes)
        floor = min(MIN_ROWS, _power_of_two(max(FLOOR_FLOATS, sums) // per_row))
        cached = max(floor, _power_of_two(CACHE_FLOATS // per_row))
        folded = self.blocks.amortized_floats
        if folded:
            # Each call folds every sum (Kronecker factors: Σ d'² + u² floats) into the float64
            # total: take rows enough that a call's deltas are at least that many floats (the
            # reference CNN's Dense(9216 → 128) has an 85M-float A; at the 16 rows the deltas
            # alone allow, exact, the folds took 14× the diagonal's time).
            cached = max(cached, 1 << max(0, -(-folded // per_row) - 1).bit_length())
        cap = min(MAX_ROWS, cached) if batch_size is None else min(batch_size, MAX_ROWS, cached)
        return _memory.rows_within(budget, 4 * per_row, cap)

    @property
    def unroll_cotangents(self):
        """Whether the K backward passes are unrolled in the graph rather than vectorized
        (one ``tf.vectorized_map`` backward pass over the K cotangents).  Vectorized by
        default: the smaller graph traces and optimises faster, and on the Keras
        Applications it also ran faster (README, "Real models").  Unrolled without XLA
        where the model has a max pooling the mask route covers (:mod:`fastewc.pooling`:
        the mask is built once and reused by the K passes, which the reference CNN measured
        faster; its vectorized form is a rank-7 broadcast TensorFlow's CPU kernels refuse),
        and where the vectorized graph would run a batched matmul oneDNN gets wrong
        (:func:`fastewc.engines.per_example.onednn_broadcast_matmuls`): then traced again.
        Also unrolled without XLA for a plan whose every block takes the K passes' deltas
        apart (``Block.per_cotangent``: Kronecker blocks alone, the reference MLP's exact
        kind): each layer's G is then one matmul per cotangent on deltas never stacked, its
        rule traced once (:func:`fastewc.blocks.kronecker.per_cotangent_sums`): on the
        reference MLP's exact kind a faster steady call than the vectorized passes, for a
        longer first call that stays within the first-call bound (README, "The MLP's exact
        passes unrolled")."""
        if self._unroll is None:
            self._unroll = not self.jit_compile and (
                any(pooling.covers(layer) for layer in compat.nested_layers(self.model))
                or self.takes_cotangents_apart)
        return self._unroll

    @property
    def takes_cotangents_apart(self):
        """Whether every block of the plan takes the K cotangents' deltas as a list
        (``Block.per_cotangent``), so that unrolled passes feed no stack."""
        blocks = self.blocks.blocks
        return bool(blocks) and all(block.per_cotangent for block in blocks)

    def loops_cotangents(self, k, probe_floats):
        """Whether the K backward passes run one at a time in a ``tf.while_loop`` over the
        cotangents (:meth:`_looped_sums`) for ``probe_floats`` per row: where the K
        cotangents' deltas of ONE row are more than ``FLOOR_FLOATS`` (module docstring),
        and every block of the plan says which of its sums add over the cotangents
        (``Block.sums_over_cotangents``)."""
        if k is None or k == 1:
            return False
        wanted = self._loop if self._loop is not None else (      # _loop set: a test's or a measurement's
            probe_floats is not None and k * probe_floats > FLOOR_FLOATS)
        return bool(wanted) and all(block.sums_over_cotangents is not None for block in self.blocks.blocks)

    def _concrete_for(self, args, *, alone):
        key = (int(args[2].shape[0]), alone)
        new = key not in self._concrete
        concrete = super()._concrete_for(args, alone=alone)
        if new and not self.jit_compile and self._vectorized \
                and per_example.onednn_broadcast_matmuls(concrete.graph):
            del self._concrete[key]
            self._unroll, self._function, self._sums_function = True, None, None
            concrete = super()._concrete_for(args, alone=alone)
        return concrete

    def _apart(self, records):
        """The flat indices (over the records' probes) of the probes whose deltas the
        unrolled backward passes leave as K tensors: a layer of one probe whose kinds all
        take them so (``Block.per_cotangent``, e.g. a Kronecker factor G = Σ_k δ_kᵀδ_k,
        one matmul per cotangent on deltas never copied into a (K, N, ...) stack)."""
        apart, index = set(), 0
        for layer, result in records:
            if isinstance(result.probe, tf.Tensor) and all(
                    kind.per_cotangent for kind in self.blocks.kinds_of(layer)):
                apart.add(index)
            index += len(tf.nest.flatten(result.probe))
        return apart

    def _rule_sums(self, records, deltas, w, mask, scale, loss_scale, shared, select=None):
        """``{block key: sums}`` of every layer's kinds (those ``select`` takes: all by
        default) from its ``deltas`` (K, N, *probe) (None where the probe does not reach
        the output; a list of K where ``_apart``)."""
        def prepared(probe, delta):
            if delta is None:
                return tf.zeros(tf.concat([[tf.shape(w)[0]], tf.shape(probe)], 0), tf.float32)
            delta = tf.cast(delta, tf.float32)
            return delta / loss_scale if loss_scale != 1.0 else delta

        calls = []
        for (layer, result), delta in zip(records, deltas):
            kinds = [kind for kind in self.blocks.kinds_of(layer) if select is None or select(kind)]
            if not kinds:
                continue
            with tf.name_scope(_scope_name(layer)) as scope:      # a profile names the layer
                if isinstance(delta, list):     # the K cotangents' deltas apart (_apart)
                    delta = [prepared(result.probe, d) for d in delta]
                else:
                    delta = tf.nest.map_structure(prepared, result.probe, delta)
            for kind in kinds:       # the kinds of its blocks
                scaling = {"scale": scale} if scale is not None and kind.scales_sums else {}
                calls.append((scope, (kind, layer, result, delta, w, mask, scaling)))
        shared.expect(call for _, call in calls)     # which signatures repeat
        sums = {}
        for scope, call in calls:
            with tf.name_scope(scope):          # the layer's scope again (a name ending in /)
                sums.update(shared(*call))
        return sums

    def _looped_sums(self, tape, out, records, u, w, mask, scale, loss_scale, shared):
        """The sums of :meth:`_rule_sums` with the K backward passes in a ``tf.while_loop``
        over the cotangents (:meth:`loops_cotangents`): its body back-propagates ONE
        cotangent to every probe and adds each block's sums over the cotangents
        (``Block.sums_over_cotangents``) to loop-carried totals; the sums that do not
        depend on the cotangents (a Kronecker block's A) are formed once, outside, from
        the same rule outputs (their deltas then unused, pruned from the graph)."""
        blocks = self.blocks.blocks
        carried = [(block, i) for block in blocks for i, adds in enumerate(block.sums_over_cotangents) if adds]
        probes = [result.probe for _, result in records]
        flat = tf.nest.flatten(probes)
        ones = unit_weights(w)        # each cotangent's weights statically 1: a constant, as unrolled
        row_weights = tf.ones([1, w.shape[1]]) if ones else None

        def body(i, totals):
            d = tape.gradient(out, flat, output_gradients=tf.gather(u, i))
            deltas = tf.nest.pack_sequence_as(probes, [None if t is None else t[None] for t in d])
            sums = self._rule_sums(records, deltas, row_weights if ones else tf.gather(w, i)[None], mask,
                                   scale, loss_scale, shared)
            return i + 1, [total + sums[block.key][j] for total, (block, j) in zip(totals, carried)]

        zeros = [tf.zeros(block.sum_shapes[j], tf.float32) for block, j in carried]
        _, totals = tf.while_loop(lambda i, _: i < tf.shape(u)[0], body, (tf.constant(0), zeros),
                                  parallel_iterations=1, maximum_iterations=u.shape[0])
        sums = {block.key: [None] * len(block.sum_shapes) for block in blocks}
        for total, (block, j) in zip(totals, carried):
            sums[block.key][j] = total
        once = [block for block in blocks if not all(block.sums_over_cotangents)]
        if once:      # the sums that do not depend on the cotangents: their deltas a stand-in
            stand_in = [None] * len(flat)
            outside = self._rule_sums(records, tf.nest.pack_sequence_as(probes, stand_in),
                                      row_weights if ones else w[:1], mask, scale, loss_scale,
                                      SharedSums(wanted={block.key for block in once}),
                                      select=lambda kind: not all(kind.sums_over_cotangents))
            for block in once:
                for j, adds in enumerate(block.sums_over_cotangents):
                    if not adds:
                        sums[block.key][j] = outside[block.key][j]
        return {key: tuple(values) for key, values in sums.items()}

    def batch_sums(self, x, y, mask, noise, scale=None):
        model, variables = self.model, self.variables
        with tf.name_scope("fastewc/fisher"):
            with capture_lib.capture(model, self.rules) as recorder, IdGuard(model, self.id_layers) as ids:
                with tf.GradientTape(persistent=True) as tape:
                    out = model(x, training=False)
            if self.kind == "sampled":
                noise = drawn_noise(self.likelihood, noise, self.num_samples, mask.shape[0], self.out_tail)
            u, w = folded_weights(*weighted_cotangents(self.likelihood, self.kind, out, y, mask, noise, x,
                                                       self.out_tail))
            loss_scale = cotangent_scale(out.dtype)
            u = tf.cast(u * loss_scale, out.dtype)
            probes = [result.probe for _, result in recorder.records]   # a nest for a shared layer
            k = u.shape[0]
            unroll = self.unroll_cotangents     # the probe floats of one row, as the plan's survey counts them:
            loop = self.loops_cotangents(k, sum(t.shape[1:].num_elements() or 0 for t in tf.nest.flatten(probes)))
            recorder.mask_pooling = (k is None or k >= pooling.MIN_COTANGENTS) and (
                unroll or loop or self.jit_compile)
            self._vectorized = not loop and vectorizes(k, unroll)
            mask = tf.cast(mask, tf.float32)
            # one traced function per repeated layer signature (inlined: the trace is shared)
            shared = SharedSums(wanted={block.key for block in self.blocks.blocks})
            if loop:
                sums = self._looped_sums(tape, out, recorder.records, u, w, mask, scale, loss_scale, shared)
            else:
                deltas = tf.nest.pack_sequence_as(probes, cotangent_deltas(
                    tape, out, tf.nest.flatten(probes), u, unroll=unroll, apart=self._apart(recorder.records)))
                sums = self._rule_sums(recorder.records, deltas, w, mask, scale, loss_scale, shared)
            del tape
            return BatchSums(self.blocks.collect(sums), ids.counts(), output_range(out))
