"""The demo's experiment: train fine-tuning, EWC (separate) and EWC (online) -- and with
``curvature="kfac"`` also KFAC-EWC (separate) and KFAC-EWC (online) -- on a task sequence,
measure forgetting and time, and measure the Fisher speed-up live.

Protocol (the same for every method, so that only the penalty differs):

* one model initialisation (``keras.utils.set_random_seed(seed)``), copied into a fresh
  model per method; a fresh Adam optimizer per method, kept across its tasks;
* the same mini-batches: epoch e of task t draws ``floor(min_t n_t / batch_size)``
  batches without replacement from a permutation seeded by (seed, t, e), and runs them
  as ONE compiled call of ``fastewc.make_train_step(..., steps_per_call=batches)``;
* after each task: the test accuracy on every task (a row of the accuracy matrix), then,
  for EWC, ``ewc.consolidate(task's training set, kind=..., method="auto")`` (the exact
  Fisher by default) at the weights just reached.

KFAC-EWC (Ritter, Botev & Barber 2018; ``fastewc.EWC(..., curvature="kfac")``) is added
NEXT TO the diagonal EWC, not instead of it: the point of the demo is the comparison on
the same batches.  It mirrors the diagonal pair: ``kfac_separate`` (one Kronecker term per
task and layer) and ``kfac_online`` (precision Σ_t A_t ⊗ G_t at the latest weights; with
``kfac_sum="nearest"`` one term per layer).  Every layer of the demo's MLP is Dense, so
every weight gets a Kronecker block.  KFAC-EWC has its own λ (``kfac_lam``): the
Kronecker-factored quadratic form is not on the diagonal's scale (see
``python -m fastewc.demo.compare_curvature``, which tunes both on a held-out split).

Everything is seeded (``keras.utils.set_random_seed``, NumPy generators seeded by (seed,
task, epoch), the Fisher's ``seed``): on CPU the same seed gave bit-identical accuracy
matrices and losses in repeated runs (times vary).  We did not need
``tf.config.experimental.enable_op_determinism()``, which is process-global.
"""
import dataclasses
import datetime
import os
import time

import numpy as np

from fastewc.blocks import BASE, KINDS as _CURVATURE_KINDS, option_takers
from fastewc.demo import metrics, report, scenarios
from fastewc.kfac_penalty import KFAC_SUMS

KINDS = ("exact", "empirical", "sampled")
CURVATURES = tuple(_CURVATURE_KINDS)     # the block kinds (fastewc.blocks.KINDS)


def methods_for(curvature):
    """The methods a run trains, in order: fine-tuning, the diagonal EWC's, then those of
    ``curvature``'s kind (each kind names them: ``METHOD`` + one per mode it takes)."""
    kinds = dict.fromkeys((BASE, _CURVATURE_KINDS[curvature]))
    return ("finetune",) + tuple(f"{kind.METHOD}_{mode}" for kind in kinds for mode in kind.MODES)


def all_methods():
    """Every method of every curvature, in order (fine-tuning, the diagonal's, each kind's)."""
    return tuple(dict.fromkeys(m for curvature in CURVATURES for m in methods_for(curvature)))


METHODS = methods_for(BASE.kind)
KFAC_METHODS = methods_for("kfac")[len(METHODS):]        # added with curvature="kfac"


def method_spec(method):
    """``(mode, curvature)`` of an EWC method, None for fine-tuning."""
    if method == "finetune":
        return None
    prefix, mode = method.split("_", 1)
    return mode, next(name for name, kind in _CURVATURE_KINDS.items() if kind.METHOD == prefix)


def ewc_options(curvature, mode, damping, kfac_sum):
    """The ``fastewc.EWC`` keyword arguments of ``curvature`` in ``mode``: the curvature
    and those of the demo's options its kind reads (``OPTIONS``); ``kfac_sum`` applies to
    mode='online' only."""
    options = {"damping": damping, "kfac_sum": kfac_sum if mode == "online" else "exact"}
    kind = _CURVATURE_KINDS[curvature]
    return {"curvature": curvature, **{name: options[name] for name in kind.OPTIONS}}

# Tuned on seeds 0-2 (MLP 64-256-256, Adam 1e-3, batch 32).  Permuted digits: with 5
# epochs per task fine-tuning ends near 50 % average accuracy and EWC near 70-77 %.  Split
# digits needs a ~100x larger lam: a confident 2-way classifier has p(1-p) ~ 0, so its
# exact Fisher is far smaller (trace after task 1, seed 0: 0.75 vs 38 for permuted, ~50x);
# EWC then halves forgetting (about 18 -> 5-8 points) but the average accuracy gains only
# 1-4 points (each new task is learnt less well).
DEFAULT_LAM = {"permuted": 300.0, "split": 30000.0}
# KFAC-EWC's λ, chosen on a held-out validation split (20 % of each task's training data,
# seeds 0-2, 5 tasks; python -m fastewc.demo.compare_curvature, README): permuted 30 (grid
# 1..3000; the diagonal's validation optimum there was 300, as above), split 100 (grid
# 3..100000; the diagonal's: 30000).  KFAC needs a 10-300x smaller λ: its Kronecker blocks
# keep the correlations of a layer's inputs, and the weight changes that a new task makes
# lie where A ⊗ G is ~30x stiffer than the diagonal (same trace, README).
DEFAULT_KFAC_LAM = {"permuted": 30.0, "split": 100.0}
DEFAULT_EPOCHS = {"permuted": 5, "split": 5}
QUICK = {"tasks": 3, "epochs": 3, "speedup_examples": 16}


@dataclasses.dataclass
class DemoConfig:
    """Options of ``python -m fastewc demo``; ``None`` means the scenario's default."""
    scenario: str = "permuted"
    tasks: int = None
    epochs: int = None
    lam: float = None
    kind: str = "exact"
    seed: int = 0
    out: str = None
    quick: bool = False
    gamma: float = 1.0
    curvature: str = "diagonal"   # "kfac": KFAC-EWC next to the diagonal EWC
    kfac_lam: float = None        # KFAC-EWC's λ (None: DEFAULT_KFAC_LAM of the scenario)
    damping: float = 0.0          # KFAC-EWC's factored Tikhonov damping δ
    kfac_sum: str = "exact"       # kfac_online's merge: "exact" (a term per task) or "nearest"
    hidden: tuple = (256, 256)
    batch_size: int = 32
    learning_rate: float = 1e-3
    fisher_batch_size: int = 256
    speedup_examples: int = None
    # XLA off for the demo's own training and consolidation: on CPU an XLA compile costs
    # ~4-5 s per model and function, more than the whole steady-state work of this small
    # demo (a few hundred steps); the speed-up measurement uses the library default.
    jit_compile: bool = False

    def resolved(self):
        """A checked copy with every ``None`` replaced by its (quick or scenario) default."""
        c = dataclasses.replace(self)
        if c.scenario not in scenarios.SCENARIOS:
            raise ValueError(f"`scenario` must be one of {', '.join(map(repr, scenarios.SCENARIOS))}. "
                             f"Received: scenario={c.scenario!r}")
        if c.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {', '.join(map(repr, KINDS))}. "
                             f"Received: kind={c.kind!r}")
        if c.curvature not in _CURVATURE_KINDS:
            raise ValueError(f"`curvature` must be one of {', '.join(map(repr, _CURVATURE_KINDS))}. "
                             f"Received: curvature={c.curvature!r}")
        if c.kfac_sum not in KFAC_SUMS:
            raise ValueError(f"`kfac_sum` must be one of {', '.join(map(repr, KFAC_SUMS))}. "
                             f"Received: kfac_sum={c.kfac_sum!r}")
        for name in ("lam", "kfac_lam", "damping"):
            value = getattr(c, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and 0 <= value < float("inf")):
                raise ValueError(f"`{name}` must be a finite number >= 0. Received: {name}={value!r}")
        kind = _CURVATURE_KINDS[c.curvature]
        for name, value, default in (("kfac_lam", c.kfac_lam, None), ("damping", c.damping, 0),
                                     ("kfac_sum", c.kfac_sum, "exact")):
            reads = kind is not BASE if name == "kfac_lam" else name in kind.OPTIONS
            if value != default and not reads:
                takers = (" or ".join(repr(n) for n, k in _CURVATURE_KINDS.items() if k is not BASE)
                          if name == "kfac_lam" else option_takers(name, _CURVATURE_KINDS))
                raise ValueError(f"`{name}` applies to curvature={takers} only. Received: "
                                 f"{name}={value!r} with curvature={c.curvature!r}")
        for name, low in (("tasks", 2), ("epochs", 1)):
            value = getattr(c, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"`{name}` must be an integer >= {low}. Received: {name}={value!r}")
        quick = QUICK if c.quick else {}
        if c.tasks is None:
            c.tasks = quick.get("tasks", 5)
        if c.epochs is None:
            c.epochs = quick.get("epochs", DEFAULT_EPOCHS[c.scenario])
        if c.lam is None:
            c.lam = DEFAULT_LAM[c.scenario]
        if c.kfac_lam is None and kind is not BASE:
            c.kfac_lam = DEFAULT_KFAC_LAM[c.scenario]
        if c.speedup_examples is None:
            c.speedup_examples = quick.get("speedup_examples", 64)
        if c.out is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            c.out = _unique(os.path.join("runs", f"demo-{stamp}"))
        c.hidden = tuple(c.hidden)
        return c

    @property
    def methods(self):
        return methods_for(self.curvature)

    def lam_of(self, method):
        """λ of ``method``: ``lam`` for the diagonal EWC, ``kfac_lam`` for another kind's
        (KFAC-EWC's and the like: not on the diagonal's scale)."""
        spec = method_spec(method)
        return self.lam if spec is None or _CURVATURE_KINDS[spec[1]] is BASE else self.kfac_lam


def _unique(path):
    candidate, i = path, 1
    while os.path.exists(candidate):
        i += 1
        candidate = f"{path}-{i}"
    return candidate


def build_model(input_dim, hidden, num_classes):
    """MLP input → ReLU hidden layers → logits (Dense layers only: the factored Fisher)."""
    import keras
    layers = [keras.Input((input_dim,))]
    layers += [keras.layers.Dense(h, activation="relu") for h in hidden]
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers)


def _loss():
    import keras
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def evaluate(model, tasks, split="test"):
    """Accuracy (fraction) of ``model`` on each task's ``split`` ("test" or "val")."""
    out = []
    for task in tasks:
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        logits = model(x, training=False)
        pred = np.argmax(np.asarray(logits), axis=-1)
        out.append(float(np.mean(pred == y)))
    return out


def train_sequence(method, scenario, config, init_weights, log, tb):
    """Train ``method`` on every task in order; returns its JSON-ready results and model."""
    import keras
    import fastewc

    keras.utils.set_random_seed(config.seed)
    model = build_model(scenarios.INPUT_DIM, config.hidden, scenario.num_classes)
    model.set_weights(init_weights)
    loss = _loss()
    ewc, spec = None, method_spec(method)
    if spec is not None:
        mode, curvature = spec
        ewc = fastewc.EWC(model, lam=config.lam_of(method), mode=mode,
                          gamma=config.gamma if mode == "online" else 1.0,
                          **ewc_options(curvature, mode, config.damping, config.kfac_sum))
    width = max(12, *(len(m) for m in config.methods))
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    B = config.batch_size
    n_min = min(len(t.y_train) for t in scenario.tasks)
    batches = max(1, n_min // B)
    # One Fisher batch shape for every task (fisher_diagonal pads the last batch, but
    # uses min(batch_size, n) rows): no retrace when the tasks differ in size.
    fisher_batch = min(config.fisher_batch_size, n_min)
    step = fastewc.make_train_step(model, optimizer, loss, ewc=ewc, steps_per_call=batches,
                                   jit_compile=config.jit_compile)

    T = len(scenario.tasks)
    acc = np.zeros((T, T))
    validate = scenario.tasks[0].x_val is not None
    val_acc = np.zeros((T, T)) if validate else None
    train_s, fisher_s, eval_s, epoch_losses = [], [], [], []
    for t, task in enumerate(scenario.tasks):
        n = len(task.y_train)
        losses = []
        t0 = time.perf_counter()
        for e in range(config.epochs):
            idx = np.random.default_rng([config.seed, t, e]).permutation(n)[:batches * B]
            xs = task.x_train[idx].reshape(batches, B, -1)
            ys = task.y_train[idx].reshape(batches, B)
            value = float(np.mean(step(xs, ys)))   # .numpy(): waits for the compiled call
            losses.append(value)
            tb.scalars(method, t * config.epochs + e, {"train/loss": value})
        train_s.append(time.perf_counter() - t0)
        epoch_losses.append(losses)

        t0 = time.perf_counter()
        acc[t] = evaluate(model, scenario.tasks)
        if validate:
            val_acc[t] = evaluate(model, scenario.tasks, "val")
        eval_s.append(time.perf_counter() - t0)
        tb.scalars(method, t, {**{f"accuracy/task_{k + 1}": acc[t, k] for k in range(T)},
                               "accuracy/average_seen": acc[t, :t + 1].mean()})

        fisher_note = ""
        if ewc is not None:
            t0 = time.perf_counter()
            ewc.consolidate((task.x_train, task.y_train), loss=loss, kind=config.kind,
                            method="auto", batch_size=fisher_batch,
                            seed=config.seed + t, jit_compile=config.jit_compile)
            fisher_s.append(time.perf_counter() - t0)
            fisher_note = f" | Fisher ({config.kind}) {fisher_s[-1]:.2f}s"
        seen = " ".join(f"{100 * a:5.1f}" for a in acc[t, :t + 1])
        log(f"[{method:<{width}}] task {t + 1}/{T} ({task.name}): trained {config.epochs} epochs "
            f"in {train_s[-1]:.1f}s, loss {losses[-1]:.3f} | acc on tasks 1..{t + 1}: {seen} "
            f"| avg {100 * acc[t, :t + 1].mean():.1f}%{fisher_note}")

    result = {
        "label": report.LABELS[method],
        "ewc": None if ewc is None else _ewc_summary(ewc),
        "accuracy_matrix": [[float(a) for a in row] for row in acc],
        "average_accuracy": metrics.average_accuracy(acc),
        "average_forgetting": metrics.average_forgetting(acc),
        "learning_accuracy": metrics.learning_accuracy(acc),
        "epoch_losses": [[round(v, 6) for v in row] for row in epoch_losses],
        "timings": {
            "train_seconds": sum(train_s),
            "fisher_seconds": sum(fisher_s),
            "eval_seconds": sum(eval_s),
            "train_seconds_per_task": train_s,
            "fisher_seconds_per_task": fisher_s,
            "optimizer_steps": T * config.epochs * batches,
            "jit_compile": bool(getattr(step, "jit_compile", False)),
        },
    }
    if validate:
        result["validation"] = {
            "accuracy_matrix": [[float(a) for a in row] for row in val_acc],
            "average_accuracy": metrics.average_accuracy(val_acc),
            "average_forgetting": metrics.average_forgetting(val_acc),
        }
    return result, model


def _ewc_summary(ewc):
    out = {"mode": ewc.mode, "lam": float(ewc.lam), "gamma": float(ewc.gamma),
           "num_tasks": int(ewc.num_tasks), "curvature": ewc.curvature}
    kind = _CURVATURE_KINDS[ewc.curvature]
    if kind is not BASE:        # the kind's blocks (public copies) and the options it reads
        blocks = kind.snapshot(ewc._state.variables(kind))
        out.update({name: getattr(ewc, name) for name in kind.OPTIONS}, kronecker_blocks=len(blocks),
                   kronecker_terms_per_block=max((len(t) for t in blocks.values()), default=0),
                   state_bytes=int(ewc.state_bytes))
    return out


def fisher_speedup(model, task, config):
    """Time ``fisher_diagonal(method="auto")`` against the eager per-example loop
    (``method="loop"``) on the same examples, model and kind; both warmed up first."""
    import fastewc

    n = min(config.speedup_examples, len(task.y_train))
    data = (task.x_train[:n], task.y_train[:n])
    loss = _loss()

    def run(method, d=data):
        t0 = time.perf_counter()
        fisher = fastewc.fisher_diagonal(model, d, loss=loss, kind=config.kind, method=method,
                                         batch_size=n, seed=config.seed)
        fisher = [np.asarray(f) for f in fisher]     # forces completion
        return time.perf_counter() - t0, fisher

    first, _ = run("auto")                  # traces/compiles
    auto_times = []
    for _ in range(3):
        s, f_auto = run("auto")
        auto_times.append(s)
    run("loop", (data[0][:2], data[1][:2]))  # warm-up of the eager path
    loop_s, f_loop = run("loop")
    scale = max(float(np.max(np.abs(f))) for f in f_loop) or 1.0
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(f_auto, f_loop))
    auto_s = min(auto_times)
    return {
        "kind": config.kind,
        "examples": n,
        "auto_seconds": auto_s,
        "auto_first_call_seconds": first,
        "loop_seconds": loop_s,
        "speedup": loop_s / auto_s,
        "max_relative_difference": diff / scale,
        "note": "method='auto' (fastewc's default: factored per-layer rules for Dense) vs "
                "method='loop' (eager, one GradientTape per example); best of 3 warm calls "
                "for auto, one warm call for loop",
    }


def run_demo(config=None, log=print):
    """Run the demo; returns the results dict (also written to ``<out>/results.json``)."""
    import keras

    wall0 = time.perf_counter()
    config = (config or DemoConfig()).resolved()
    os.makedirs(config.out, exist_ok=True)
    scenario = scenarios.load_scenario(config.scenario, config.tasks, config.seed)
    keras.utils.set_random_seed(config.seed)
    init = build_model(scenarios.INPUT_DIM, config.hidden, scenario.num_classes).get_weights()
    arch = "-".join(str(d) for d in (scenarios.INPUT_DIM, *config.hidden, scenario.num_classes))
    model_desc = (f"MLP {arch} (ReLU, logits), Adam lr={config.learning_rate:g}, "
                  f"batch {config.batch_size}")
    log(f"fastewc demo: {scenario.description}")
    log(f"  head: {scenario.head}; model: {model_desc}")
    log(f"  {config.epochs} epochs per task, lam={config.lam:g}, {config.kind} Fisher, "
        f"seed {config.seed}; output: {config.out}")
    kind = _CURVATURE_KINDS[config.curvature]
    if "kfac_sum" in kind.OPTIONS:
        log(f"  {kind.TITLE}: lam={config.kfac_lam:g}, damping={config.damping:g}, "
            f"kfac_sum={config.kfac_sum!r} for {kind.METHOD}_online ({kind.METHOD}_separate: a term per task)")
    elif kind is not BASE:
        log(f"  {kind.TITLE}: lam={config.kfac_lam:g}")
    methods = config.methods

    tb = report.TensorBoardLog(config.out)
    results = {
        "methods": list(methods),
        "scenario": scenario.summary(),
        "config": {**dataclasses.asdict(config), "hidden": list(config.hidden),
                   "model": model_desc, "optimizer": "adam",
                   "online_gamma": config.gamma},
        "definitions": metrics.DEFINITIONS,
    }
    model = None
    try:
        for method in methods:
            results[method], trained = train_sequence(method, scenario, config, init, log, tb)
            if method in METHODS:
                model = trained      # the speed-up runs on the last diagonal method's model
        t0 = time.perf_counter()
        results["fisher_speedup"] = fisher_speedup(model, scenario.tasks[0], config)
        speedup_s = time.perf_counter() - t0
    finally:
        tb.close()

    results["timings"] = {
        "train_seconds": sum(results[m]["timings"]["train_seconds"] for m in methods),
        "fisher_seconds": sum(results[m]["timings"]["fisher_seconds"] for m in methods),
        "speedup_measurement_seconds": speedup_s,
    }
    results["files"] = {"json": "results.json", "plot": "accuracy.png", "tensorboard": "tensorboard"}

    for method in methods:
        log("")
        log(f"Accuracy matrix, {method} (%, row: after task t, column: task k):")
        log(report.format_matrix(results[method]["accuracy_matrix"]))
    log("")
    log("Average accuracy after the last task; average forgetting = mean over tasks k < T "
        "of (best accuracy before the last task - final accuracy):")
    log(report.format_summary(results))
    log(report.format_first_call_note(results, len(scenario.tasks[0].y_train)))
    log("")
    log(report.format_speedup(results["fisher_speedup"]))

    report.plot(os.path.join(config.out, "accuracy.png"), results)
    results["timings"]["total_seconds"] = time.perf_counter() - wall0
    report.write_json(os.path.join(config.out, "results.json"), results)
    log(f"Total {results['timings']['total_seconds']:.1f}s (training "
        f"{results['timings']['train_seconds']:.1f}s, Fisher estimation "
        f"{results['timings']['fisher_seconds']:.1f}s). Wrote {config.out}/results.json, "
        f"{config.out}/accuracy.png and TensorBoard scalars in {config.out}/tensorboard "
        f"(tensorboard --logdir {config.out}/tensorboard).")
    return results
