"""Reporting for the demo: text tables, ``results.json``, the PNG plot, TensorBoard scalars."""
import json
import os

import numpy as np

from fastewc.blocks import BASE, KINDS

# Every kind's methods (``fastewc.demo.run.methods_for``): "<METHOD>_<mode>", titled
# "<TITLE> (<mode>)".  A colour per method in that order; the diagonal EWC solid, each
# other kind a line style of its own (the same mode in a related colour family would be
# too subtle in a small panel).
_PALETTE = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink",
            "tab:olive", "tab:cyan", "tab:gray")
_LINES = ("--", ":", "-.")
_KIND_METHODS = {f"{kind.METHOD}_{mode}": (kind, mode) for kind in KINDS.values() for mode in kind.MODES}
LABELS = {"finetune": "fine-tuning", **{m: f"{kind.TITLE} ({mode})" for m, (kind, mode) in _KIND_METHODS.items()}}
COLORS = dict(zip(LABELS, _PALETTE))
STYLES = {m: _LINES[list(KINDS.values()).index(kind) % len(_LINES) - 1]
          for m, (kind, _) in _KIND_METHODS.items() if kind is not BASE}


def format_matrix(acc, task_names=None):
    """The accuracy matrix in percent: a row per 'after task t', a column per task k."""
    acc = np.asarray(acc)
    T = acc.shape[0]
    head = "            " + "".join(f"{'task ' + str(k + 1):>9}" for k in range(T))
    lines = [head]
    for t in range(T):
        cells = "".join(f"{100 * acc[t, k]:9.1f}" for k in range(T))
        lines.append(f"after {t + 1:<5} " + cells)
    return "\n".join(lines)


def format_summary(results):
    w = max(14, *(len(name) + 2 for name in results["methods"]))
    lines = [f"{'method':<{w}}{'avg acc':>9}{'forgetting':>12}{'learning acc':>14}"
             f"{'train s':>9}{'fisher s':>10}"]
    for name in results["methods"]:
        r = results[name]
        lines.append(f"{name:<{w}}{100 * r['average_accuracy']:8.1f}%"
                     f"{100 * r['average_forgetting']:9.1f} pts"
                     f"{100 * r['learning_accuracy']:13.1f}%"
                     f"{r['timings']['train_seconds']:9.1f}{r['timings']['fisher_seconds']:10.2f}")
    return "\n".join(lines)


def format_first_call_note(results, examples):
    """Where the Fisher time goes: the first consolidation of each method traces (and the
    EWC merge compiles) once; the later ones are the steady-state cost."""
    parts, later = [], []
    for name in results["methods"]:
        per_task = results[name]["timings"]["fisher_seconds_per_task"]
        if per_task:
            parts.append(f"{name} {per_task[0]:.2f} s of {sum(per_task):.2f} s")
            later += per_task[1:]
    if not parts:
        return ""
    text = ("Fisher time includes one-time tracing/compilation at each method's first "
            f"consolidation ({'; '.join(parts)})")
    if later:
        text += (f"; the later consolidations ({examples} examples each) took "
                 f"{min(later):.2f}-{max(later):.2f} s")
    return text + "."


def format_speedup(s):
    return (f"Fisher speed-up ({s['kind']}, {s['examples']} examples, same model): "
            f"fastewc method='auto' {1000 * s['auto_seconds']:.1f} ms "
            f"(first call with tracing {1000 * s['auto_first_call_seconds']:.0f} ms) vs "
            f"eager per-example loop {s['loop_seconds']:.2f} s -> {s['speedup']:.0f}x faster; "
            f"max |difference| / max |F| = {s['max_relative_difference']:.1e}")


def write_json(path, results):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")


def plot(path, results):
    """Accuracy on each task over the training sequence, one line per method (Agg backend)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = results["methods"]
    T = results["scenario"]["num_tasks"]
    task_names = results["scenario"]["task_names"]
    panels = T + 1
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows + 0.7),
                             sharey=True, squeeze=False)
    axes = axes.ravel()
    steps = np.arange(1, T + 1)
    for k in range(T):
        ax = axes[k]
        ax.axvspan(k + 0.5, k + 1.5, color="0.92", zorder=0)
        for name in names:
            acc = np.asarray(results[name]["accuracy_matrix"])
            ax.plot(steps[k:], 100 * acc[k:, k], marker="o", ms=3, ls=STYLES.get(name, "-"),
                    color=COLORS.get(name), label=LABELS.get(name, name))
        ax.set_title(f"task {k + 1}: {task_names[k]}", fontsize=9)
        ax.set_xticks(steps)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    ax = axes[T]
    for name in names:
        acc = np.asarray(results[name]["accuracy_matrix"])
        seen = [100 * acc[t, :t + 1].mean() for t in range(T)]
        ax.plot(steps, seen, marker="o", ms=3, ls=STYLES.get(name, "-"), color=COLORS.get(name),
                label=LABELS.get(name, name))
    ax.set_title("average over tasks seen", fontsize=9)
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.axis("off")
    for r in range(rows):
        axes[r * cols].set_ylabel("test accuracy (%)")
    for ax in axes[:panels]:
        ax.set_xlabel("after training task", fontsize=8)
    axes[T].legend(fontsize=8, loc="lower left")
    cfg = results["config"]
    kfac, kind = "", KINDS.get(cfg.get("curvature", BASE.kind), BASE)
    if kind is not BASE:        # a block kind's own λ and the options it reads
        parts = [f"{kind.TITLE}: lam={cfg['kfac_lam']:g}"]
        parts += [f"damping {cfg['damping']:g}" if name == "damping" else f"{cfg[name]} sum"
                  for name in kind.OPTIONS]
        kfac = f" ({', '.join(parts)})"
    fig.suptitle(f"fastewc demo: {results['scenario']['name']} digits, {T} tasks, "
                 f"{cfg['epochs']} epochs/task, lam={cfg['lam']:g}{kfac}, {cfg['kind']} Fisher\n"
                 "test accuracy on each task after each training stage "
                 "(shaded: while the task is trained)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class TensorBoardLog:
    """One tf.summary file writer per method under ``<out>/tensorboard/<method>``.

    Scalars are written with the core op ``tf.summary.write`` and the "scalars" plugin
    metadata -- the same records ``tf.summary.scalar`` writes -- because
    ``tf.summary.scalar`` needs the ``tensorboard`` package, which ``tensorflow-cpu``
    does not install.  ``tensorboard --logdir <out>/tensorboard`` reads them.
    """

    def __init__(self, out_dir):
        self.root = os.path.join(out_dir, "tensorboard")
        self._writers = {}

    def _writer(self, method):
        import tensorflow as tf
        if method not in self._writers:
            self._writers[method] = tf.summary.create_file_writer(os.path.join(self.root, method))
        return self._writers[method]

    def scalars(self, method, step, values):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata()
        metadata.plugin_data.plugin_name = "scalars"
        with self._writer(method).as_default():
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(float(value), tf.float32), step=int(step),
                                 metadata=metadata)

    def close(self):
        for w in self._writers.values():
            w.flush()
            w.close()
        self._writers = {}
