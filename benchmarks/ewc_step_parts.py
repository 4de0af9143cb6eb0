"""Where the EWC's time goes in a GPT-2 base train step (issue 24 item 5): the update part of
the step alone, with and without the penalty, at 124.4M parameters.

One process: the GPT-2 classifier of :mod:`benchmarks.bench_large_train` (random init),
an EWC over every trainable variable with a random Fisher (``add_task``: A, μ float32), a
Keras Adam, and fixed gradients (random; the token table's an ``IndexedSlices`` of
BATCH × LENGTH rows, as its gather's gradient is).  Each member is one compiled function
(XLA unless ``--no-xla``) of those gradients, the model's step without its forward and
backward pass:

    plain       optimizer.apply(grads)                          (the plain step's update)
    ewc         add_penalty(ewc, grads) then optimizer.apply     (the EWC step's update)
    penalty     add_penalty(ewc, grads) alone, its outputs returned (no update)
    stream      w ← w/2 + 1 over copies of the variables (read P, write P in place: a
                bandwidth bound)
    ewc_<v>     ewc with one piece in another form (``--variants``, :func:`_patched`)

timed alternating (:func:`benchmarks.conftest.rotate`'s order) after a warm-up round.
``--full`` times whole ``make_train_step`` calls instead (the model's batch, forward and
backward included): ``plain``, ``ewc`` and ``ewc_<v>``.
``ewc − plain`` is what the penalty adds to the step, in seconds; the plain train step's
time (``bench_large_train``) is what it is compared with.

    /work/wt/bin/quiet flock /work/wt/big.lock .venv/bin/python -m benchmarks.ewc_step_parts \\
        [--rounds 7] [--policy float32] [--members plain,ewc,penalty,stream] [--no-xla]
        [--variants none,scalar,rows,cols,vecmat,densify] [--dump DIR]

``--dump DIR`` writes XLA's HLO (text, after optimization) of each member there instead
of timing (``XLA_FLAGS`` must be set before TensorFlow loads, so this re-executes itself).
Prints one JSON line: seconds per member (median, min), and P.
"""
import argparse
import contextlib
import json
import os
import resource
import sys
import time

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fastewc  # noqa: E402
from fastewc._penalty_term import add_penalty  # noqa: E402


def setup(policy, tiny=False):
    """(the model, its trainable variables, the EWC, Adam, the gradients as a flat list of
    tensors, a function that rebuilds the gradient list from them)."""
    from benchmarks import bench_large_train as large
    keras.mixed_precision.set_global_policy(policy)
    model = large.gpt2_classifier(tiny)
    variables = list(model.trainable_variables)
    rng = np.random.default_rng(0)
    ewc = fastewc.EWC(model, lam=1.0)
    ewc.add_task([rng.random(v.shape, np.float32) for v in variables])
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(variables)
    vocabulary = (large.TINY if tiny else large.BASE)["vocabulary_size"]
    rows = (large.TINY_BATCH * large.TINY_LENGTH) if tiny else (large.BATCH * large.LENGTH)
    flat, layout = [], []
    for v in variables:
        if tuple(v.shape)[0] == vocabulary and len(v.shape) == 2:     # the token table
            flat.append(tf.constant(rng.standard_normal((rows, v.shape[1]), np.float32) * 1e-3))
            flat.append(tf.constant(rng.integers(0, vocabulary, rows).astype(np.int32)))
            layout.append(("sparse", tuple(v.shape)))
        else:
            flat.append(tf.constant(rng.standard_normal(v.shape, np.float32) * 1e-3))
            layout.append(("dense", None))

    def grads_of(flat):
        out, i = [], 0
        for kind, shape in layout:
            if kind == "sparse":
                out.append(tf.IndexedSlices(flat[i], flat[i + 1], tf.constant(shape, tf.int64)))
                i += 2
            else:
                out.append(flat[i])
                i += 1
        return out

    return model, variables, ewc, optimizer, flat, grads_of


def members(variables, ewc, optimizer, flat, grads_of, *, jit=True, variants=()):
    """({name: compiled function of ``flat``}, P)."""
    params = int(sum(np.prod(v.shape) for v in variables))
    one = tf.constant(1.0)

    def plain(flat):
        optimizer.apply(grads_of(flat), variables)
        return tf.constant(0.0)

    def with_ewc(flat):
        penalty, grads = add_penalty(ewc, grads_of(flat), variables, optimizer=optimizer, replica_scale=one)
        optimizer.apply(grads, variables)
        return penalty

    def penalty(flat):
        value, grads = add_penalty(ewc, grads_of(flat), variables, optimizer=optimizer, replica_scale=one)
        return value, grads

    copies = [tf.Variable(tf.zeros(v.shape, tf.float32)) for v in variables]

    def stream(flat):
        for c in copies:
            c.assign(c * 0.5 + 1.0)
        return tf.constant(0.0)

    fns = {"plain": plain, "ewc": with_ewc, "penalty": penalty, "stream": stream}
    fns.update({"ewc_" + variant: _patched(with_ewc, variant) for variant in variants})
    return {name: tf.function(fn, jit_compile=jit, autograph=False) for name, fn in fns.items()}, params


@contextlib.contextmanager
def patched(variant):
    """While tracing: one piece of the EWC step in another form, for comparison:

    none     the value's sums left out (½ Σ g·d taken as 0: the gradient's cost alone)
    scalar   ½ Σ g·d as one reduce_sum to a scalar
    rows     per-row sums (reduce over the last axis), then their sum
    cols     per-column sums (reduce over the rows), then their sum
    vecmat   the rows' sum as a vector-matrix product (½·1)ᵀ·rows, then its sum
    densify  a sparse data gradient densified, then added (instead of added into the
             penalty gradient row by row)
    nocond   the penalty without its tf.cond on ``penalty_is_active`` (always computed)
    """
    from fastewc import _penalty_term, keras_fit, train
    from fastewc import penalty as penalty_lib

    def half_sum(t):
        if variant == "none":
            return tf.zeros([], t.dtype)
        if variant == "scalar" or t.shape.rank < 2:
            return tf.reduce_sum(0.5 * t)
        rows = tf.reshape(t, [-1, t.shape[-1]])
        if variant == "rows":
            return tf.reduce_sum(tf.reduce_sum(0.5 * rows, axis=-1))
        if variant == "cols":
            return tf.reduce_sum(tf.reduce_sum(0.5 * rows, axis=0))
        half = tf.fill([rows.shape[0]], tf.constant(0.5, t.dtype))       # vecmat
        return tf.reduce_sum(tf.linalg.matvec(rows, half, transpose_a=True))

    def plus(g, p):
        return _penalty_term._dense(g) + p

    def add_penalty_nocond(ewc, grads, variables, *, optimizer, replica_scale):
        scale = tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float32) * replica_scale
        value, penalty_grads = ewc.penalty_and_gradients(inline=True)
        return tf.cast(value, tf.float32), _penalty_term.scaled_sum(
            grads, variables, penalty_grads, ewc.model.trainable_variables, scale)

    if variant == "densify":
        targets = [(_penalty_term, "_plus", plus)]
    elif variant == "nocond":
        targets = [(m, "add_penalty", add_penalty_nocond) for m in (sys.modules[__name__], train, keras_fit)]
    else:
        targets = [(penalty_lib, "_half_sum", half_sum)]
    originals = [(m, name, getattr(m, name)) for m, name, _ in targets]
    for m, name, replacement in targets:
        setattr(m, name, replacement)
    try:
        yield
    finally:
        for m, name, original in originals:
            setattr(m, name, original)


def _patched(with_ewc, variant):
    """``with_ewc`` traced under :func:`patched`."""
    def body(flat):
        with patched(variant):
            return with_ewc(flat)
    return body


def full_steps(policy, variants, tiny=False):
    """({name: one make_train_step call}, P): the GPT-2 step of
    :mod:`benchmarks.bench_large_train` (its model, batch and loss; the EWC from a random
    Fisher instead of a consolidation), plain, with the EWC, and with the EWC traced under
    each variant (its first call, the warm-up, traces it)."""
    from benchmarks import bench_large_train as large
    s = large.Setup(policy, tiny, with_ewc=False)
    rng = np.random.default_rng(0)
    ewc = fastewc.EWC(s.model, lam=1.0)
    ewc.add_task([rng.random(v.shape, np.float32) for v in s.model.trainable_variables])
    runs = {}
    for name, variant in [("plain", None), ("ewc", None)] + [("ewc_" + v, v) for v in variants]:
        step = fastewc.make_train_step(s.model, keras.optimizers.Adam(1e-4), s.loss,
                                       ewc=None if name == "plain" else ewc)
        runs[name] = _first_call_patched(step, variant, s.x_step, s.y_step)
    return runs, s.params


def _first_call_patched(step, variant, x, y):
    calls = []

    def run(_):
        if variant is not None and not calls:
            with patched(variant):
                out = step(x, y)
        else:
            out = step(x, y)
        calls.append(1)
        return out
    return run


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--policy", default="float32")
    parser.add_argument("--members", default="plain,ewc,penalty,stream")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dump", default=None)
    parser.add_argument("--variants", default="", help="comma list: none,scalar,rows,cols,vecmat,densify")
    parser.add_argument("--no-xla", action="store_true")
    parser.add_argument("--full", action="store_true", help="whole make_train_step calls")
    parser.add_argument("--profile", default=None,
                        help="after the timed rounds, a tf.profiler trace of 2 calls of each member "
                             "into DIR/<member> (read with profiles.summarize)")
    parser.add_argument("--layers", type=int, default=None,
                        help="GPT-2 base widths with this many layers (a smaller model to probe)")
    args = parser.parse_args(argv)
    if args.layers is not None:
        from benchmarks import bench_large_train as large
        large.BASE = dict(large.BASE, num_layers=args.layers)
    if args.dump and "--xla_dump_to" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text").strip()
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.ewc_step_parts", *(argv or sys.argv[1:])])
    variants = [v for v in args.variants.split(",") if v]
    if args.full:
        fns, params = full_steps(args.policy, variants, args.tiny)
        names, flat = list(fns), None
    else:
        _, variables, ewc, optimizer, flat, grads_of = setup(args.policy, args.tiny)
        fns, params = members(variables, ewc, optimizer, flat, grads_of, jit=not args.no_xla,
                              variants=variants)
        names = args.members.split(",") + ["ewc_" + v for v in variants]
    times = {name: [] for name in names}
    faults = {name: [] for name in names}
    order = list(names)
    for round_ in range(args.rounds + 1):
        for name in order:
            minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            out = fns[name](flat)
            # a tensor's .numpy() waits for the whole function (all outputs are ready)
            tf.nest.flatten(out)[0].numpy()
            if round_:
                times[name].append(time.perf_counter() - start)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt)
        order.reverse()
        if args.dump:
            break
    if args.profile:
        for name in names:
            tf.profiler.experimental.start(os.path.join(args.profile, name))
            for _ in range(2):
                tf.nest.flatten(fns[name](flat))[0].numpy()
            tf.profiler.experimental.stop()
    print(json.dumps({"params": params, "policy": args.policy, "xla": not args.no_xla, "full": args.full,
                      "rounds": args.rounds, "malloc_env": _malloc_env(),
                      "median": {k: float(np.median(v)) for k, v in times.items() if v},
                      "min": {k: float(np.min(v)) for k, v in times.items() if v},
                      "minor_faults": {k: int(np.median(v)) for k, v in faults.items() if v},
                      "pair_ratios": _pair_ratios(times)}))


def _pair_ratios(times):
    """{name: (25th, 50th, 75th percentile)} of the per-round ratios name / plain: each
    round's members ran next to each other, so the ratio of a round cancels the drift
    between rounds that the ratio of the medians keeps."""
    base = times.get("plain")
    if not base:
        return {}
    return {name: [float(q) for q in np.percentile(np.asarray(t) / np.asarray(base), [25, 50, 75])]
            for name, t in times.items() if name != "plain" and len(t) == len(base)}


def _malloc_env():
    """The allocator settings of this process's environment (they change what a step's
    temporary buffers cost: README, train-step figures)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(("MALLOC_", "TF_CPU_", "LD_PRELOAD"))}


if __name__ == "__main__":
    main()
