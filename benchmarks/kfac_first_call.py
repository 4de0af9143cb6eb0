"""First calls (trace + compile + run) of fastewc's KFAC factors, the hand-written kernel
and the floor, each in a fresh process, interleaved: issue 25 item 4's "first call ≤ 2×
the floor's".

    .venv/bin/python -m benchmarks.kfac_first_call mlp empirical 3     # problem, kind, rounds

Each round starts one process per member (the model built and TensorFlow initialized
before the clock starts; the first call alone is timed): ``kfac`` (``FisherEstimator``,
curvature="kfac"), ``kernel`` (:mod:`benchmarks.handwritten_kfac`, no XLA), ``floor``
and ``floor_xla`` (:func:`benchmarks.problems.floor_function`).  Prints each member's
median and its ratio to each floor's.
"""
import json
import statistics
import subprocess
import sys
import time

MEMBERS = ("kfac", "kernel", "floor", "floor_xla")


def child(name, kind, member):
    import tensorflow as tf

    import fastewc
    from benchmarks import handwritten_kfac, problems
    model, x, y = problems.make(name)
    if member == "kfac":
        estimator = fastewc.FisherEstimator(model, loss=problems.LOSS, kind=kind, curvature="kfac")
        fn = lambda: estimator((x, y), seed=0)                                   # noqa: E731
    elif member == "kernel":
        kernel = handwritten_kfac.kfac_function(model, kind)
        xt, yt, seed = tf.constant(x), tf.constant(y), tf.constant([0, 0])
        fn = lambda: kernel(xt, yt, seed)[-1][-1].numpy()                       # noqa: E731
    else:
        floor = problems.floor_function(model, member == "floor_xla")
        xt, yt = tf.constant(x), tf.constant(y)
        fn = lambda: floor(xt, yt)                                              # noqa: E731
    start = time.perf_counter()
    fn()
    print(json.dumps(time.perf_counter() - start))


def main(argv):
    if argv[0] == "--child":
        return child(*argv[1:])
    name, kind, rounds = argv[0], argv[1], int(argv[2])
    times = {m: [] for m in MEMBERS}
    for r in range(rounds):
        for member in (MEMBERS if r % 2 == 0 else MEMBERS[::-1]):
            out = subprocess.run([sys.executable, "-m", "benchmarks.kfac_first_call", "--child", name, kind, member],
                                 capture_output=True, text=True, check=True).stdout
            times[member].append(json.loads(out.strip().splitlines()[-1]))
    med = {m: statistics.median(t) for m, t in times.items()}
    print(name, kind, {m: f"{v:.2f} s" for m, v in med.items()},
          "kfac ÷ floor {:.2f}, ÷ floor_xla {:.2f}, ÷ kernel {:.2f}".format(
              med["kfac"] / med["floor"], med["kfac"] / med["floor_xla"], med["kfac"] / med["kernel"]))


if __name__ == "__main__":
    main(sys.argv[1:])
