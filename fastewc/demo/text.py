"""The demo's text scenario (``python -m fastewc demo --scenario text``): a small GPT-2-style
causal language model learns CPython's English documentation, then Python source code,
with fine-tuning, diagonal EWC and KFAC-EWC; held-out perplexity of both tasks after each
stage, λ tuned on the validation split.

Data (:mod:`fastewc.demo.text_data`): byte-level tokens of text every Python installation
has (``pydoc_data.topics``; the standard library's ``*.py`` files), split by document into
train / validation / test, cut into windows of ``seq_len`` tokens with a padding mask.

Model: ``keras_hub.models.GPT2CausalLM(GPT2Backbone(...), preprocessor=None)``, random
initialisation, tied input/output embeddings (``ReversibleEmbedding``), dropout 0;
inputs ``{"token_ids", "padding_mask"}``, labels the next tokens, loss
``SparseCategoricalCrossentropy(from_logits=True)`` weighted by the mask (how keras_hub
trains it).

Protocol (every method sees the same weights and batches, so only the penalty differs):

* stage 1: one run of ``fastewc.make_train_step`` on task 1 (Adam, ``steps`` steps of
  ``batch_size`` windows drawn without replacement from a permutation seeded by (seed,
  task, epoch)).  EWC plays no part before the first consolidation, so this stage is
  shared by every method: it is trained once;
* consolidation at the weights stage 1 reached: ``ewc.consolidate`` on ``fisher_windows``
  training windows of task 1 (a seeded sample), the per-token log-likelihoods summed over
  each window's unmasked positions, ``kind`` (default "sampled": one next token drawn per
  position from the model; "exact" would cost a backward pass per vocabulary entry and
  position), once for the diagonal EWC and once for KFAC-EWC;
* stage 2: from the stage-1 weights and a fresh Adam, train task 2 on the same batches,
  once for fine-tuning and once per λ of the grid for each EWC (``ewc.lam`` is a
  variable: the consolidation is reused);
* evaluation after each stage: perplexity on both tasks' validation and test splits,
  ``exp(Σ NLL / Σ mask)`` over the unmasked target tokens (:func:`perplexity`);
* λ of each EWC: the grid value with the lowest validation criterion after stage 2,
  ``exp(mean over the two tasks of the validation log-perplexity)`` (the geometric mean
  of the two validation perplexities; ties: the smaller λ).  The test split is never used
  for a choice; the reported test numbers are those of the run at the chosen λ.

A consolidation the library cannot perform on this model (an error raised by
``ewc.consolidate``) is reported as such, with its message, in the output and in
``results.json``: the method is then listed as unavailable, not silently replaced.
"""
import dataclasses
import datetime
import math
import os
import time

import numpy as np

from fastewc.blocks import BASE, KINDS
from fastewc.demo import report, text_data

TEXT = "text"
METHODS = ("finetune", "ewc", "kfac")
LABELS = {"finetune": "fine-tuning", "ewc": "diagonal EWC", "kfac": "KFAC-EWC"}
COLORS = {"finetune": "tab:red", "ewc": "tab:blue", "kfac": "tab:purple"}
CRITERION = ("exp(mean over the two tasks of the validation log-perplexity after task 2) "
             "= the geometric mean of the two validation perplexities; lower is better; "
             "ties: the smaller lambda")


@dataclasses.dataclass
class TextConfig:
    """Options of the text scenario; ``quick`` shrinks everything (tests: seconds)."""
    seed: int = 0
    out: str = None
    quick: bool = False
    kind: str = "sampled"
    seq_len: int = 64
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_dim: int = 256
    batch_size: int = 32
    steps: int = 300              # optimizer steps per task
    steps_per_call: int = 50
    learning_rate: float = 2e-3
    fisher_windows: int = 256     # task-1 training windows the Fisher is computed on
    max_bytes: tuple = (("train", 400_000), ("val", 40_000), ("test", 40_000))
    # The Fisher is a SUM over a window's 64 positions while the training loss is a MEAN
    # over tokens, so λ = 1 already weighs task 1 ~64x more than a Bayesian posterior of
    # equal-sized tasks would (λ ≈ windows₁ / tokens₂ ≈ 0.015 here); a first grid of
    # {1, ..., 1000} (seed 0, validation) was stiff throughout (λ = 1: task-2 validation
    # perplexity 11.2 vs fine-tuning's 9.3); a second, {0.01, 0.1, 1, 10}, chose its lower
    # edge, 0.01 (λ = 1 and 10 worse than 0.1 on validation), hence this grid around it,
    # the same for both curvatures (their Fishers estimate the same matrix).
    lam_grid: tuple = (0.001, 0.003, 0.01, 0.03, 0.1)
    kfac_lam_grid: tuple = (0.001, 0.003, 0.01, 0.03, 0.1)
    eval_batch: int = 64
    jit_compile: bool = True      # the train steps
    # The consolidation without XLA: it is one call, factored for both curvatures (the tied
    # ReversibleEmbedding included), and XLA's compilation costs more than it saves there
    # (256 windows, untrained model: diagonal 5.1 s without XLA vs 7.6 s with, KFAC 3.0 s
    # vs 7.0 s).
    fisher_jit_compile: bool = False

    def resolved(self):
        c = dataclasses.replace(self)
        if c.quick:
            c = dataclasses.replace(
                c, seq_len=16, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
                batch_size=4, steps=4, steps_per_call=2, fisher_windows=8, eval_batch=16,
                max_bytes=(("train", 3000), ("val", 600), ("test", 600)),
                lam_grid=(0.1, 10.0), kfac_lam_grid=(0.1, 10.0), jit_compile=False)
        if c.out is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            c.out = _unique(os.path.join("runs", f"demo-text-{stamp}"))
        c.max_bytes = tuple(tuple(p) for p in dict(c.max_bytes).items())
        c.lam_grid, c.kfac_lam_grid = tuple(c.lam_grid), tuple(c.kfac_lam_grid)
        return c

    def grid(self, method):
        return {"finetune": (None,), "ewc": self.lam_grid, "kfac": self.kfac_lam_grid}[method]


def _unique(path):
    candidate, i = path, 1
    while os.path.exists(candidate):
        i += 1
        candidate = f"{path}-{i}"
    return candidate


def build_model(config):
    """A tiny GPT-2 causal LM over :data:`text_data.VOCAB` byte ids (random weights)."""
    import keras_hub
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=text_data.VOCAB, num_layers=config.num_layers, num_heads=config.num_heads,
        hidden_dim=config.hidden_dim, intermediate_dim=config.intermediate_dim,
        max_sequence_length=config.seq_len, dropout=0.0)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _loss():
    import keras
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def perplexity(model, split, batch_size):
    """``exp(Σ_n Σ_t mask·NLL / Σ mask)`` of ``model`` on ``split``: the mean negative
    log-likelihood (nats) of the unmasked next tokens, exponentiated.  Returns
    ``(perplexity, mean NLL)``.  Batches of a fixed ``batch_size`` (the last one padded
    with mask 0) so the compiled forward pass is traced once."""
    import tensorflow as tf

    forward = _forward_function(model)
    n = len(split.inputs)
    total, count = 0.0, 0.0
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size)
        real = rows < n
        rows = np.where(real, rows, n - 1)
        mask = split.mask[rows] * real[:, None]
        x = {"token_ids": split.inputs[rows], "padding_mask": split.mask[rows]}
        nll = forward(x, tf.constant(split.targets[rows]), tf.constant(mask, tf.float32))
        total += float(nll)
        count += float(mask.sum())
    mean = total / count
    return math.exp(mean), mean


def _forward_function(model):
    """A cached compiled ``(x, targets, mask) -> Σ mask·NLL`` for ``model``."""
    import tensorflow as tf

    fn = getattr(model, "_fastewc_demo_nll", None)
    if fn is None:
        @tf.function(jit_compile=False, reduce_retracing=True)
        def fn(x, targets, mask):
            logits = tf.cast(model(x, training=False), tf.float32)
            nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
            return tf.reduce_sum(nll * mask)
        model._fastewc_demo_nll = fn
    return fn


def evaluate(model, tasks, config):
    """``{"test": [ppl per task], "val": [...]}`` (perplexities) of ``model``."""
    return {split: [perplexity(model, task.split(split), config.eval_batch)[0] for task in tasks]
            for split in ("val", "test")}


def batches(task_index, split, config):
    """The stage's batches: ``steps`` batches of ``batch_size`` window indices, drawn without
    replacement from permutations seeded by (seed, task, epoch); the same for every method."""
    n, need = len(split.inputs), config.steps * config.batch_size
    parts, epoch = [], 0
    while sum(len(p) for p in parts) < need:
        parts.append(np.random.default_rng([config.seed, task_index, epoch]).permutation(n))
        epoch += 1
    return np.concatenate(parts)[:need].reshape(config.steps, config.batch_size)


def train_stage(step, optimizer_reset, split, index_batches, config):
    """Run ``step`` (steps_per_call stacked batches per call) on ``index_batches`` of
    ``split``; returns (seconds, mean loss per call)."""
    optimizer_reset()
    k = config.steps_per_call
    losses = []
    t0 = time.perf_counter()
    for start in range(0, len(index_batches), k):
        idx = index_batches[start:start + k]
        if len(idx) < k:                         # a last partial call: same compiled shape
            idx = np.concatenate([idx, idx[:k - len(idx)]])
        x = {"token_ids": split.inputs[idx], "padding_mask": split.mask[idx]}
        loss = step(x, split.targets[idx], split.mask[idx].astype(np.float32))
        losses.append(float(np.mean(loss)))      # reading the loss waits for the call
    return time.perf_counter() - t0, losses


def warm_up(step, split, index_batches, config):
    """One call of a new ``step`` (its trace and compilation), timed; the caller restores
    the weights and the optimizer before the timed runs."""
    t0 = time.perf_counter()
    idx = index_batches[:config.steps_per_call]
    step({"token_ids": split.inputs[idx], "padding_mask": split.mask[idx]}, split.targets[idx],
         split.mask[idx].astype(np.float32)).numpy()
    return time.perf_counter() - t0


def _optimizer_resetter(optimizer):
    """A function that puts ``optimizer``'s variables (moments, step count) back to their
    values now: a fresh Adam for each stage without building (and tracing) a new step."""
    saved = [np.array(v.numpy()) for v in optimizer.variables]

    def reset():
        for v, value in zip(optimizer.variables, saved):
            v.assign(value)
    return reset


def fisher_data(task, config):
    """The consolidation's data: ``fisher_windows`` training windows of ``task`` (a sample
    seeded by (seed, "fisher")), as ``(x, targets)`` with x's ``padding_mask``."""
    split = task.train
    n = min(config.fisher_windows, len(split.inputs))
    rows = np.sort(np.random.default_rng([config.seed, 7]).permutation(len(split.inputs))[:n])
    return {"token_ids": split.inputs[rows], "padding_mask": split.mask[rows]}, split.targets[rows]


def consolidate(ewc, task, config):
    """``ewc.consolidate`` on task 1's Fisher windows; returns (seconds, None) or (seconds,
    the error message) when the library cannot consolidate this model."""
    t0 = time.perf_counter()
    try:
        ewc.consolidate(fisher_data(task, config), loss=_loss(), kind=config.kind, method="auto",
                        seed=config.seed, jit_compile=config.fisher_jit_compile)
    except (ValueError, NotImplementedError, TypeError) as e:
        return time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, None


def choose(runs):
    """Index of the run with the lowest validation criterion (ties: the first, smaller λ)."""
    return min(range(len(runs)), key=lambda i: (round(runs[i]["val_criterion"], 10), i))


def val_criterion(val_ppl):
    return math.exp(float(np.mean(np.log(val_ppl))))


def run_text_demo(config=None, log=print):
    """Run the text scenario; returns the results (also ``<out>/results.json``)."""
    import warnings

    import keras
    import fastewc

    wall0 = time.perf_counter()
    config = (config or TextConfig()).resolved()
    os.makedirs(config.out, exist_ok=True)
    t0 = time.perf_counter()
    tasks = text_data.load_tasks(config.seq_len, dict(config.max_bytes))
    data_s = time.perf_counter() - t0
    keras.utils.set_random_seed(config.seed)
    model = build_model(config)
    model_desc = (f"keras_hub GPT2CausalLM, random init: {config.num_layers} layers, hidden "
                  f"{config.hidden_dim}, {config.num_heads} heads, MLP {config.intermediate_dim}, "
                  f"vocabulary {text_data.VOCAB} (bytes + EOS + PAD), {model.count_params():,} "
                  f"parameters; sequence {config.seq_len}; Adam lr={config.learning_rate:g}, "
                  f"batch {config.batch_size}, {config.steps} steps per task")
    log("fastewc demo: text scenario, task 1 = "
        f"{tasks[0].description}, task 2 = {tasks[1].description}")
    for t in tasks:
        sizes = ", ".join(f"{s} {t.split(s).num_bytes / 1000:.0f} KB / {len(t.split(s).documents)} docs"
                          for s in text_data.SPLITS)
        log(f"  {t.name}: {sizes}")
    log(f"  model: {model_desc}")
    log(f"  Fisher: {config.kind}, {config.fisher_windows} task-1 windows; λ grids: diagonal "
        f"{_grid_text(config.lam_grid)}, KFAC {_grid_text(config.kfac_lam_grid)}; chosen by "
        f"the validation criterion exp(mean log val perplexity of both tasks)")
    log(f"  output: {config.out}")

    loss = _loss()
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    steps = {}

    def step_for(method, ewc=None):
        if method not in steps:
            steps[method] = fastewc.make_train_step(model, optimizer, loss, ewc=ewc,
                                                    steps_per_call=config.steps_per_call,
                                                    jit_compile=config.jit_compile)
        return steps[method]

    reset = None
    results = {"methods": list(METHODS), "labels": LABELS, "criterion": CRITERION,
               "tasks": [t.summary() for t in tasks],
               "config": {**dataclasses.asdict(config), "max_bytes": dict(config.max_bytes),
                          "model": model_desc, "python": _python_version()},
               "definitions": {
                   "perplexity": "exp(mean negative log-likelihood, nats, of the next byte "
                                 "over the unmasked positions of a split)",
                   "stage": "stage 1: after training task 1; stage 2: after training task 2"}}

    # -- stage 1: task 1, shared by every method ------------------------------------------
    finetune_step = step_for("finetune")
    reset = _optimizer_resetter(optimizer)
    init_weights = model.get_weights()
    first_call = {"finetune": warm_up(finetune_step, tasks[0].train, batches(0, tasks[0].train, config),
                                      config)}
    model.set_weights(init_weights)
    train_s, losses = train_stage(finetune_step, reset, tasks[0].train, batches(0, tasks[0].train, config),
                                  config)
    t0 = time.perf_counter()
    stage1 = evaluate(model, tasks, config)
    eval_s = time.perf_counter() - t0
    weights1 = model.get_weights()
    results["stage1"] = {"perplexity": stage1, "train_seconds": train_s, "eval_seconds": eval_s,
                         "losses": [round(v, 5) for v in losses]}
    log(f"\nstage 1 (task 1, {config.steps} steps): {train_s:.1f}s, loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; test perplexity docs {stage1['test'][0]:.2f}, code {stage1['test'][1]:.2f}")

    # -- consolidation ----------------------------------------------------------------------
    ewcs, consolidation = {}, {}
    for method, curvature in (("ewc", "diagonal"), ("kfac", "kfac")):
        ewc = fastewc.EWC(model, lam=1.0, curvature=curvature)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seconds, error = consolidate(ewc, tasks[0], config)
        notes = sorted({str(w.message) for w in caught})
        consolidation[method] = {"seconds": seconds, "error": error, "warnings": notes}
        for note in notes:
            log(f"  note ({LABELS[method]} consolidation): {note}")
        if error is None:
            ewcs[method] = ewc
            log(f"consolidation, {LABELS[method]} ({config.kind} Fisher, "
                f"{min(config.fisher_windows, len(tasks[0].train.inputs))} windows): {seconds:.1f}s")
        else:
            log(f"consolidation, {LABELS[method]}: NOT AVAILABLE for this model -- {error}")
    results["consolidation"] = consolidation

    # -- stage 2: task 2, per method and λ ---------------------------------------------------
    idx2 = batches(1, tasks[1].train, config)
    for method in METHODS:
        if method != "finetune" and method not in ewcs:
            results[method] = {"available": False, "reason": consolidation[method]["error"]}
            continue
        new = method not in steps
        step = step_for(method, ewcs.get(method))
        if new:
            model.set_weights(weights1)
            first_call[method] = warm_up(step, tasks[1].train, idx2, config)
        runs = []
        for lam in config.grid(method):
            if lam is not None:
                ewcs[method].lam = lam
            model.set_weights(weights1)
            train_s, losses = train_stage(step, reset, tasks[1].train, idx2, config)
            t0 = time.perf_counter()
            ppl = evaluate(model, tasks, config)
            eval_s = time.perf_counter() - t0
            run = {"lam": lam, "perplexity": ppl, "val_criterion": val_criterion(ppl["val"]),
                   "train_seconds": train_s, "eval_seconds": eval_s,
                   "losses": [round(v, 5) for v in losses]}
            runs.append(run)
            lam_text = "" if lam is None else f" λ={lam:g}"
            log(f"stage 2 [{LABELS[method]}{lam_text}]: {train_s:.1f}s, loss {losses[-1]:.3f}; "
                f"validation perplexity docs {ppl['val'][0]:.2f}, code {ppl['val'][1]:.2f} "
                f"(criterion {run['val_criterion']:.3f})")
        best = choose(runs)
        results[method] = {"available": True, "lam": runs[best]["lam"], "runs": runs,
                           "chosen": runs[best], "ewc": _ewc_summary(ewcs.get(method)),
                           "lam_at_grid_edge": method != "finetune" and best in (0, len(runs) - 1)}

    results["timings"] = {
        "data_seconds": data_s,
        "first_call_seconds": first_call,
        "stage1_train_seconds": results["stage1"]["train_seconds"],
        "consolidation_seconds": {m: c["seconds"] for m, c in consolidation.items()},
        "stage2_train_seconds_per_run": {
            m: [r["train_seconds"] for r in results[m]["runs"]] for m in METHODS
            if results[m]["available"]},
    }
    results["files"] = {"json": "results.json", "plot": "perplexity.png"}
    for line in format_report(results):
        log(line)
    plot(os.path.join(config.out, "perplexity.png"), results)
    results["timings"]["total_seconds"] = time.perf_counter() - wall0
    report.write_json(os.path.join(config.out, "results.json"), results)
    log(f"Total {results['timings']['total_seconds']:.1f}s. Wrote {config.out}/results.json and "
        f"{config.out}/perplexity.png")
    return results


def _grid_text(grid):
    return "{" + ", ".join(f"{g:g}" for g in grid) + "}"


def _python_version():
    import platform
    return platform.python_version()


def _ewc_summary(ewc):
    if ewc is None:
        return None
    out = {"mode": ewc.mode, "curvature": ewc.curvature, "num_tasks": int(ewc.num_tasks)}
    kind = KINDS[ewc.curvature]
    if kind is not BASE:        # the kind's blocks (public copies)
        out["kronecker_blocks"] = len(kind.snapshot(ewc._state.variables(kind)))
    return out


def format_report(results):
    """The printed summary: λ tuning, the test-perplexity table, the verdict."""
    lines = ["", "λ tuning (validation criterion: geometric mean of the two validation "
                 "perplexities after task 2; lower is better):"]
    for method in METHODS[1:]:
        r = results[method]
        if not r["available"]:
            lines.append(f"  {LABELS[method]}: not available ({r['reason']})")
            continue
        cells = ", ".join(f"λ={run['lam']:g}: {run['val_criterion']:.3f}" + (" *" if run is r["chosen"] else "")
                          for run in r["runs"])
        edge = " (at the grid's edge)" if r["lam_at_grid_edge"] else ""
        lines.append(f"  {LABELS[method]}: {cells}{edge}")
    s1 = results["stage1"]["perplexity"]["test"]
    lines += ["", "Test perplexity (lower is better; task 1 = docs, task 2 = code):",
              f"{'method':<14}{'λ':>7}{'docs after 1':>14}{'docs after 2':>14}{'code after 2':>14}"
              f"{'train 2 s':>11}{'consol. s':>11}"]
    for method in METHODS:
        r = results[method]
        if not r["available"]:
            lines.append(f"{method:<14}{'':>7}{'n/a (consolidation unavailable, see above)':>50}")
            continue
        c = r["chosen"]
        lam = "-" if c["lam"] is None else f"{c['lam']:g}"
        consol = results["consolidation"].get(method, {}).get("seconds", 0.0)
        lines.append(f"{method:<14}{lam:>7}{s1[0]:14.2f}{c['perplexity']['test'][0]:14.2f}"
                     f"{c['perplexity']['test'][1]:14.2f}{c['train_seconds']:11.1f}{consol:11.1f}")
    lines.append(f"(stage 1, shared: {results['stage1']['train_seconds']:.1f}s training; code "
                 f"perplexity after task 1: {s1[1]:.2f}. Training times exclude each train step's "
                 "first call, its trace and compilation: "
                 + ", ".join(f"{m} {s:.1f}s" for m, s in results["timings"]["first_call_seconds"].items())
                 + ")")
    lines += [""] + verdict(results)
    return lines


def verdict(results):
    """Did EWC keep task-1 perplexity down, by how much, at what cost: one line per EWC."""
    ft = results["finetune"]["chosen"]["perplexity"]["test"]
    s1 = results["stage1"]["perplexity"]["test"][0]
    lines = []
    for method in METHODS[1:]:
        r = results[method]
        if not r["available"]:
            lines.append(f"{LABELS[method]}: could not be run on this model (see above).")
            continue
        c = r["chosen"]["perplexity"]["test"]
        forget_ft, forget = ft[0] - s1, c[0] - s1
        kept = c[0] < ft[0]
        lines.append(
            f"{LABELS[method]} (λ={r['lam']:g}): task-1 test perplexity {c[0]:.2f} vs fine-tuning's "
            f"{ft[0]:.2f} ({100 * (c[0] / ft[0] - 1):+.1f} %; rise over stage 1 {forget:+.2f} vs "
            f"{forget_ft:+.2f}) -- {'EWC kept task 1 better' if kept else 'EWC did NOT keep task 1 better'}; "
            f"cost: task-2 test perplexity {c[1]:.2f} vs {ft[1]:.2f} ({100 * (c[1] / ft[1] - 1):+.1f} %), "
            f"consolidation {results['consolidation'][method]['seconds']:.1f}s, task-2 training "
            f"{r['chosen']['train_seconds']:.1f}s vs {results['finetune']['chosen']['train_seconds']:.1f}s.")
    return lines


def plot(path, results):
    """Test perplexity of each task after each stage, per method; and the λ tuning curves."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    s1 = results["stage1"]["perplexity"]["test"]
    for k, name in enumerate(("task 1: docs", "task 2: code")):
        ax = axes[k]
        for method in METHODS:
            r = results[method]
            if not r["available"]:
                continue
            c = r["chosen"]
            lam = "" if c["lam"] is None else f", λ={c['lam']:g}"
            ax.plot([1, 2], [s1[k], c["perplexity"]["test"][k]], marker="o", color=COLORS[method],
                    label=LABELS[method] + lam)
        ax.set_title(f"{name}: test perplexity", fontsize=9)
        ax.set_xticks([1, 2])
        ax.set_xticklabels(["after task 1", "after task 2"])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax = axes[2]
    ft = results["finetune"]["chosen"]["val_criterion"]
    ax.axhline(ft, color=COLORS["finetune"], lw=1, label=LABELS["finetune"])
    for method in METHODS[1:]:
        r = results[method]
        if not r["available"]:
            continue
        lams = [run["lam"] for run in r["runs"]]
        ax.plot(lams, [run["val_criterion"] for run in r["runs"]], marker="o", color=COLORS[method],
                label=LABELS[method])
        ax.plot([r["lam"]], [r["chosen"]["val_criterion"]], marker="*", ms=12, color=COLORS[method])
    ax.set_xscale("log")
    ax.set_title("validation criterion vs λ (★ chosen)", fontsize=9)
    ax.set_xlabel("λ")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    unavailable = [LABELS[m] for m in METHODS if not results[m]["available"]]
    note = f" ({', '.join(unavailable)}: unavailable on this model)" if unavailable else ""
    cfg = results["config"]
    fig.suptitle(f"fastewc demo, text: byte-level GPT-2 ({cfg['num_layers']} layers, hidden "
                 f"{cfg['hidden_dim']}), docs then code, {cfg['kind']} Fisher{note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
