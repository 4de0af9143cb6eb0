"""Train steps at GPT-2 base size (issue 24 items 4-5): what EWC adds to a train step of a
124M-parameter model, in time and in peak memory, in float32 and under ``mixed_bfloat16``.

Model: keras_hub's ``GPT2Backbone`` at the GPT-2 base configuration (12 layers, 12 heads,
hidden 768, intermediate 3072, vocabulary 50257; random init) with ``Dense(10)`` on the last
token: 124.4M parameters.  Batch 4 × 128 tokens, Adam(1e-4),
``SparseCategoricalCrossentropy(from_logits=True)``; the EWC is
``EWC(model, lam=1.0).consolidate(one batch, kind="empirical")`` (its state float32, also
under ``mixed_bfloat16``).  Default arguments everywhere (``jit_compile=None``, Keras'
``compile`` defaults).  Two trainers, each with and without EWC:

    step   fastewc.make_train_step(model, optimizer, loss[, ewc=ewc]): one call, one step
    fit    model.fit (Keras' own step)  /  fastewc.EWCModel(model, ewc).fit: one call of
           FIT_STEPS batches (times are per step)

Timing (``test_large_train_time``): the two variants of one trainer on one model, alternating
(:func:`benchmarks.conftest.rotate`) after a warm-up round (trace, compile); the EWC
overhead is the ratio of the medians.  Each member's first call (trace, compile and one
call; a ``fit`` call is FIT_STEPS batches) is timed alone before, the plain one first.
Memory (``test_large_train_peak``): one subprocess
per (trainer, EWC or not) that measures its own peak resident set (``VmHWM``, reset with
``/proc/self/clear_refs`` once the model, optimizer, data and EWC state exist, so the
Fisher's peak is not counted): ``first`` over the first call (trace and compile), ``steady``
over the next ``PEAK_STEPS`` calls; both absolute (the process's whole resident set).

    flock /tmp/fastewc-large.lock .venv/bin/python -m pytest benchmarks/bench_large_train.py \\
        --benchmark-only -q --benchmark-json=benchmarks/results/large_train.json
    .venv/bin/python -m benchmarks.bench_large_train benchmarks/results/large_train.json
    .venv/bin/python -m pytest benchmarks/bench_large_train.py --benchmark-disable -q  # smoke

The second command prints the table and the targets (EWC overhead ≤ 10 % of the plain step;
EWC step peak ≤ plain step peak + 4 GB; our plain step's peak ≤ Keras ``fit``'s).  The smoke
pass runs the same code on a 2-layer, hidden-64 GPT-2 (``benchmarks.models``' keras_hub
sizes), 8 tokens, batch 2, in-process, for one trainer and policy (``SMOKED``:
EWCModel.fit under mixed_bfloat16, which also consolidates) and the state file; not the
peaks (a subprocess each).
"""
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from benchmarks.conftest import rotate

POLICIES = ("float32", "mixed_bfloat16")
TRAINERS = ("step", "fit")
BASE = dict(vocabulary_size=50257, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072,
            max_sequence_length=1024)
TINY = dict(vocabulary_size=1000, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128,
            max_sequence_length=64)
BATCH, LENGTH = 4, 128
TINY_BATCH, TINY_LENGTH = 2, 8
FIT_STEPS = 2          # batches per fit call
ROUNDS = int(os.environ.get("FASTEWC_LARGE_ROUNDS", "7"))   # timed pairs
PEAK_STEPS = 3         # steady calls in the memory measurement
LAM = 1.0
SMOKED = (("fit", "mixed_bfloat16"),)   # (trainer, policy) timed in the smoke pass (kept short)
GIB = 2.0 ** 30


def gpt2_classifier(tiny):
    """The GPT-2 classifier (base or tiny sizes), random init, under the global policy."""
    import keras_hub
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(**(TINY if tiny else BASE))
    logits = keras.layers.Dense(10, name="head")(backbone.output[:, -1, :])
    return keras.Model(backbone.input, logits, name="gpt2_classifier")


class Setup:
    """A GPT-2 classifier under ``policy``, its data, an optimizer and a consolidated EWC."""

    def __init__(self, policy, tiny, *, with_ewc=True):
        keras.mixed_precision.set_global_policy(policy)
        sizes, batch, length = (TINY, TINY_BATCH, TINY_LENGTH) if tiny else (BASE, BATCH, LENGTH)
        self.model = gpt2_classifier(tiny)
        self.params = int(sum(np.prod(v.shape) for v in self.model.trainable_variables))
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        rng = np.random.default_rng(0)
        n = batch * FIT_STEPS
        self.x = {"token_ids": rng.integers(0, sizes["vocabulary_size"], (n, length)).astype(np.int32),
                  "padding_mask": np.ones((n, length), np.int32)}
        self.y = rng.integers(0, 10, n).astype(np.int32)
        self.batch = batch
        self.x_step = {k: tf.constant(v[:batch]) for k, v in self.x.items()}
        self.y_step = tf.constant(self.y[:batch])
        self.ewc = None
        if with_ewc:
            self.ewc = fastewc.EWC(self.model, lam=LAM)
            self.ewc.consolidate((self.x_step, self.y_step), loss=self.loss, kind="empirical")

    def runner(self, trainer, with_ewc):
        """A callable running one call of ``trainer`` (with or without the EWC), forcing it."""
        optimizer = keras.optimizers.Adam(1e-4)
        if trainer == "step":
            step = fastewc.make_train_step(self.model, optimizer, self.loss,
                                           ewc=self.ewc if with_ewc else None)
            return lambda: float(step(self.x_step, self.y_step))
        model = fastewc.EWCModel(self.model, self.ewc) if with_ewc else self.model
        model.compile(optimizer=optimizer, loss=self.loss)
        return lambda: model.fit(self.x, self.y, batch_size=self.batch, epochs=1, verbose=0,
                                 shuffle=False).history["loss"][-1]

    def steps_per_call(self, trainer):
        return 1 if trainer == "step" else FIT_STEPS


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_peak(trainer, with_ewc, policy, tiny):
    """{"first", "steady", "before"}: the process's peak resident bytes over the first call,
    over ``PEAK_STEPS`` more, and its resident set before the first call."""
    setup = Setup(policy, tiny, with_ewc=with_ewc)
    fn = setup.runner(trainer, with_ewc)
    _reset_peak()
    before = _peak()
    fn()
    first = _peak()
    _reset_peak()
    for _ in range(PEAK_STEPS):
        fn()
    return {"before": before, "first": first, "steady": _peak(), "params": setup.params}


def measure_state_file(op, path, tiny):
    """``EWC.save`` (``op="save"``: an EWC over every trainable variable, A random) or
    ``EWC.load`` of ``path``, on the GPT-2 classifier: {"seconds", "before", "peak",
    "state_bytes", "file_bytes"}, ``peak`` the process's peak resident bytes during the call
    and ``before`` its resident set just before (model and, for save, the state resident)."""
    import gc
    model = gpt2_classifier(tiny)
    ewc = None
    if op == "save":
        ewc = fastewc.EWC(model, lam=LAM)
        rng = np.random.default_rng(0)
        fisher = [rng.random(v.shape, np.float32) for v in model.trainable_variables]
        ewc.add_task(fisher)
        del fisher
    gc.collect()
    _reset_peak()
    before = _peak()
    start = time.perf_counter()
    if op == "save":
        ewc.save(path)
    else:
        ewc = fastewc.EWC.load(path, model)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "before": before, "peak": _peak(), "state_bytes": ewc.state_bytes,
            "file_bytes": os.path.getsize(path)}


def _in_subprocess(*args):
    """The JSON line a ``python -m benchmarks.bench_large_train *args`` prints last."""
    cmd = [sys.executable, "-m", "benchmarks.bench_large_train", *args]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def policy_restored():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_large_train_time(benchmark, smoke, device, trainer, policy, policy_restored):
    if smoke and (trainer, policy) not in SMOKED:
        pytest.skip("the smoke pass times one trainer and policy")
    setup = Setup(policy, smoke)
    members = {"ewc": setup.runner(trainer, True), "noewc": setup.runner(trainer, False)}
    benchmark.group = f"gpt2-base-train[{device}]"
    first_call = {}
    if not smoke:         # each member's first call alone: trace, compile and one call
        for name in ("noewc", "ewc"):
            start = time.perf_counter()
            members[name]()
            first_call[name] = time.perf_counter() - start
    times = rotate(benchmark, members, 2 if smoke else ROUNDS)
    if times is None:
        return
    per = setup.steps_per_call(trainer)
    benchmark.extra_info.update(
        kind="paired", trainer=trainer, policy=policy, params=setup.params, batch=setup.batch,
        first_call=first_call,
        per_step={name: float(np.median(t)) / per for name, t in times.items()},
        min_step={name: float(np.min(t)) / per for name, t in times.items()})


@pytest.mark.parametrize("policy", POLICIES)
def test_large_train_peak(benchmark, smoke, device, policy, policy_restored):
    cases = [(trainer, with_ewc) for trainer in TRAINERS for with_ewc in (False, True)]
    if smoke:
        pytest.skip("a subprocess per case: not in the smoke pass")
    peaks = {}

    def measure():   # one subprocess each, one after the other (never two at once)
        for trainer, with_ewc in cases:
            peaks[f"{trainer}-{'ewc' if with_ewc else 'noewc'}"] = _in_subprocess(
                "--peak", trainer, "ewc" if with_ewc else "noewc", policy)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.group = f"gpt2-base-train-peak[{device}]"
    benchmark.extra_info.update(kind="peak", policy=policy, peaks=peaks)


def test_large_state_file(benchmark, smoke, device, tmp_path):
    """EWC.save then EWC.load of the GPT-2 classifier's whole state (124M parameters: A and
    μ, 0.93 GiB), each in its own subprocess (in-process and tiny in the smoke pass)."""
    path = str(tmp_path / "state.npz")
    if smoke:
        benchmark(lambda: [measure_state_file(op, path, True) for op in ("save", "load")])
        return
    result = {}

    def measure():
        for op in ("save", "load"):
            result[op] = _in_subprocess("--state", op, path)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.group = f"gpt2-base-state-file[{device}]"
    benchmark.extra_info.update(kind="state_file", **result)


# -- summary ------------------------------------------------------------------------------
def summary(doc):
    """The time and memory table and the targets, as markdown."""
    lines = ["| policy | trainer | plain step | EWC step | EWC overhead (median) | first call plain → EWC "
             "| peak RSS plain → EWC (steady; first call) |",
             "|---|---|---:|---:|---:|---|---|"]
    times, peaks, files = {}, {}, {}
    for b in doc["benchmarks"]:
        info = b["extra_info"]
        if info.get("kind") == "paired":
            times[(info["policy"], info["trainer"])] = info
        elif info.get("kind") == "peak":
            peaks[info["policy"]] = info["peaks"]
        elif info.get("kind") == "state_file":
            files = info
    checks = []
    for policy in POLICIES:
        p = peaks.get(policy, {})
        for trainer in TRAINERS:
            t = times.get((policy, trainer))
            plain, ewc = p.get(f"{trainer}-noewc"), p.get(f"{trainer}-ewc")
            mem = (f"{plain['steady'] / GIB:.2f} → {ewc['steady'] / GIB:.2f} GiB; "
                   f"{plain['first'] / GIB:.2f} → {ewc['first'] / GIB:.2f} GiB") if plain and ewc else "–"
            if t:
                on, off = t["per_step"]["ewc"], t["per_step"]["noewc"]
                first = t.get("first_call") or {}
                first = f"{first['noewc']:.1f} → {first['ewc']:.1f} s" if first else "–"
                lines.append(f"| {policy} | {trainer} | {off:.2f} s | {on:.2f} s | {100 * (on / off - 1):+.1f}% "
                             f"| {first} | {mem} |")
                checks.append(f"{policy} {trainer}: EWC adds {100 * (on / off - 1):+.1f}% (need ≤ 10%)")
            if plain and ewc:
                extra = max(ewc["steady"], ewc["first"]) - max(plain["steady"], plain["first"])
                checks.append(f"{policy} {trainer}: EWC peak {extra / GIB:+.2f} GiB beyond the plain one (need ≤ 4 GB)")
        ours, keras_fit = p.get("step-noewc"), p.get("fit-noewc")
        if ours and keras_fit:
            checks.append(f"{policy}: plain make_train_step peak {max(ours['steady'], ours['first']) / GIB:.2f} GiB, "
                          f"Keras fit {max(keras_fit['steady'], keras_fit['first']) / GIB:.2f} GiB (need ours ≤ Keras')")
    for op in ("save", "load") if files else ():
        r = files[op]
        # a load creates the state itself: what it holds besides is the extra
        extra = r["peak"] - r["before"] - (r["state_bytes"] if op == "load" else 0)
        checks.append(f"EWC.{op} of {r['state_bytes'] / GIB:.2f} GiB of state: {r['seconds']:.2f} s, peak "
                      f"{(r['peak'] - r['before']) / GIB:+.2f} GiB above the resident set before it, "
                      f"{extra / r['state_bytes']:.2f} extra copies of the state (need ≤ 1)")
    return "\n".join(lines + [""] + ["- " + c for c in checks])


if __name__ == "__main__":
    if sys.argv[1] == "--state":
        print(json.dumps(measure_state_file(sys.argv[2], sys.argv[3], tiny="--tiny" in sys.argv)))
    elif sys.argv[1] == "--peak":
        trainer, ewc_flag, policy = sys.argv[2:5]
        print(json.dumps(measure_peak(trainer, ewc_flag == "ewc", policy, tiny="--tiny" in sys.argv)))
    else:
        with open(sys.argv[1]) as fh:
            print(summary(json.load(fh)))
