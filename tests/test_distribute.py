"""tf.distribute: make_train_step, fisher_diagonal, kfac_fisher and EWC.consolidate on 2 replicas.

Logical devices must be configured before TensorFlow runs any op, and a
MultiWorkerMirroredStrategy must be created at program start, so every case runs in its
own Python process (this pytest process is never reconfigured):

* MirroredStrategy on 2 logical CPU devices, one subprocess;
* MultiWorkerMirroredStrategy with 2 worker processes on 127.0.0.1 (TF_CONFIG, free
  loopback ports), bounded by a timeout and always stopped.

Each process computes the distributed result, and the single-device reference (outside the
strategy scope; in the multi-worker case the first worker only: the reference is the same
computation in both), and reports them as JSON.  Tolerances: Fisher within 1e-6 relative
to its max, weights after the steps within 1e-6, losses within rtol 1e-6 (measured on
MirroredStrategy: Fisher 1.4e-7 relative, losses 2.3e-7 relative, weights 6e-8: float32
summation order).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 150   # seconds for a whole case (TensorFlow start-up included)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = textwrap.dedent('''
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    MODE = sys.argv[1]
    OUT = sys.argv[2]
    # fastewc is imported BEFORE the devices are configured, as users write it: importing it
    # must leave TensorFlow uninitialized (a logical-device configuration or a coordination
    # service after an initialized context raises), and a process's first tensor may be a
    # Fisher batch's (``call_tensor`` initializes the eager context itself, as
    # ``tf.convert_to_tensor`` does).
    import numpy as np
    import tensorflow as tf
    import fastewc
    from fastewc._keras_compat import call_tensor
    if MODE == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        FIRST_TENSOR = float(tf.reduce_sum(call_tensor(np.arange(4, dtype=np.float32))))
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        # The strategy's coordination service, configured as the strategy would (it does so
        # only when nothing is configured yet) but with a heartbeat timeout past the case's
        # own TIMEOUT: with TensorFlow's default (10 s) a worker starved of CPU on a loaded
        # machine was declared dead and both aborted (a timing dependence, not a failure).
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context
        workers = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
        context.context().configure_coordination_service(
            service_type="standalone", service_leader="/job:worker/replica:0/task:0",
            coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=len(workers))],
            heartbeat_timeout_in_ms=600_000)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()     # (at program start)
        FIRST_TENSOR = float(tf.reduce_sum(call_tensor(np.arange(4, dtype=np.float32))))
    import keras

    LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(13, 6)).astype("float32")
    y = rng.integers(0, 3, 13).astype("int32")
    xb = rng.normal(size=(3, 8, 6)).astype("float32")
    yb = rng.integers(0, 3, (3, 8)).astype("int32")

    def mlp():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                                 keras.layers.Dense(3)])

    def run():
        """Fisher, consolidation and EWC train steps; 13 examples in batches of 5 (a padded,
        unevenly split final batch), train batches of 8 and 5 rows and a k=2 call."""
        out = {}
        model = mlp()
        if MODE == "mirrored":   # the multi-worker case is kept lighter (two processes, 2 cores)
            out["fisher_sampled"] = [f.numpy().tolist() for f in fastewc.fisher_diagonal(
                model, (x, y), loss=LOSS, kind="sampled", num_samples=2, seed=3, batch_size=5)]
            factors = fastewc.kfac_fisher(model, (x, y), loss=LOSS, kind="exact", batch_size=5)
            out["kfac"] = [m.numpy().tolist() for block in factors.blocks for m in (block.a, block.g)]
        ewc = fastewc.EWC(model, lam=3.0)
        out["fisher_exact"] = [f.numpy().tolist() for f in ewc.consolidate((x, y), loss=LOSS, batch_size=5)]
        for v in model.trainable_variables:
            v.assign(v + 0.05)
        losses = []
        for jit in ((True, False) if MODE == "mirrored" else (True,)):
            step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOSS, ewc=ewc, jit_compile=jit)
            losses += [float(step(xb[0], yb[0])), float(step(xb[1, :5], yb[1, :5])), float(step(xb[2], yb[2]))]
            out["tracing_count_jit%d" % jit] = step.tracing_count()
        step2 = fastewc.make_train_step(model, keras.optimizers.Adam(0.01), LOSS, ewc=ewc, steps_per_call=2)
        losses += step2(xb[:2], yb[:2]).numpy().tolist()
        # already distributed input (strategy.experimental_distribute_dataset)
        step3 = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOSS, ewc=ewc, jit_compile=False)
        if tf.distribute.has_strategy() and MODE == "mirrored":
            dataset = tf.data.Dataset.from_tensor_slices((xb[0], yb[0])).batch(8)
            batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
            losses.append(float(step3(*batch)))
        else:
            losses.append(float(step3(xb[0], yb[0])))
        out["losses"] = losses
        out["weights"] = [v.numpy().tolist() for v in model.trainable_variables]
        out["replicas"] = 1 if not tf.distribute.has_strategy() else strategy.num_replicas_in_sync
        return out

    # the single-device reference is the same computation in every worker: the first computes it
    chief = MODE == "mirrored" or json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0
    single = run() if chief else None
    with strategy.scope():
        distributed = run()
    with open(OUT, "w") as f:
        json.dump({"single": single, "distributed": distributed, "first_tensor": FIRST_TENSOR,
                   "fastewc": fastewc.__file__}, f)
''')


def _env():
    """The environment of a case: this checkout's fastewc first on the path (a script's
    directory, not the working directory, starts ``sys.path``)."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("TF_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def _check(result, single=None):
    """``result``'s distributed run against the single-device reference (``result``'s own, or
    ``single`` for a worker that did not compute it)."""
    import numpy as np

    assert result["fastewc"].startswith(ROOT + os.sep), result["fastewc"]     # this checkout's
    assert result["first_tensor"] == 6.0
    single, dist = single or result["single"], result["distributed"]
    assert single["replicas"] == 1 and dist["replicas"] == 2
    for key in ("fisher_sampled", "fisher_exact", "kfac"):
        assert (key in single) == (key in dist)
        for a, b in zip(single.get(key, []), dist.get(key, [])):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, atol=1e-6 * max(1e-12, np.abs(a).max()))
    np.testing.assert_allclose(dist["losses"], single["losses"], rtol=1e-6)
    for a, b in zip(single["weights"], dist["weights"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
    assert dist["tracing_count_jit1"] == 1 and dist.get("tracing_count_jit0", 1) == 1


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def _run(procs, outs):
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(procs)
        pytest.fail(f"distributed case did not finish within {TIMEOUT} s")
    finally:
        _stop(procs)
    for p in procs:
        if p.returncode != 0:
            err = p.stderr.read().decode(errors="replace")[-3000:]
            pytest.fail(f"worker exited with {p.returncode}:\n{err}")
    return [json.load(open(o)) for o in outs]


def test_mirrored_strategy_two_logical_cpus(tmp_path):
    script = tmp_path / "case.py"
    script.write_text(COMMON)
    out = tmp_path / "out.json"
    proc = subprocess.Popen([sys.executable, str(script), "mirrored", str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    (result,) = _run([proc], [out])
    _check(result)


def _free_ports(n):
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_two_processes(tmp_path):
    script = tmp_path / "case.py"
    script.write_text(COMMON)
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs, outs = [], []
    try:
        for index in range(2):
            env = _env()
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                           "task": {"type": "worker", "index": index}})
            out = tmp_path / f"out{index}.json"
            outs.append(out)
            procs.append(subprocess.Popen([sys.executable, str(script), "multiworker", str(out)],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        results = _run(procs, outs)
    finally:
        _stop(procs)
    for result in results:
        _check(result, results[0]["single"])
    # every worker ends with the same weights
    import numpy as np
    for a, b in zip(results[0]["distributed"]["weights"], results[1]["distributed"]["weights"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
