"""Fine-tuning vs diagonal EWC vs KFAC-EWC on permuted digits, λ tuned on a held-out split.

    python -m fastewc.demo.compare_curvature \\
        --json benchmarks/results/reference-compare-curvature.json --plot docs/compare-curvature.png

Protocol (issue 17), for each number of tasks T (default 5 and 20) and seed (default 0, 1, 2):

* the demo's permuted-digit scenario (:func:`fastewc.demo.scenarios.permuted_digits`:
  70 % train / 30 % test per seed), then a class-stratified 20 % of each task's TRAINING
  split held out as a validation split (:func:`fastewc.demo.scenarios.with_validation`);
  the models train and consolidate on the remaining 80 % only;
* the demo's model, optimizer and batches (:func:`fastewc.demo.run.train_sequence`: MLP
  64-256-256-10, Adam 1e-3, batch 32, 5 epochs per task, exact Fisher at the end of each
  task), one initialisation per (T, seed) shared by every method and λ;
* every EWC method is trained once per λ of the grid (default 1, 3, 10, ..., 3000, a
  half-decade log grid; the same grid for every method and T) and evaluated after each
  task on BOTH the validation and the test split of every task.  λ is chosen per
  (method, T) by the validation average accuracy after the last task, averaged over the seeds (ties: the smaller λ); the test split plays
  no part in the choice.  The reported test numbers are those of the runs at the chosen λ
  (mean ± sample standard deviation over the seeds).

``--scenario split`` runs the split-digit scenario instead (``--tasks`` <= 5; the demo's
split default for KFAC-EWC's λ was chosen with it).

Methods: ``finetune`` (no penalty), ``ewc_separate`` / ``ewc_online`` (diagonal EWC,
Kirkpatrick et al. 2017 / Schwarz et al. 2018 with γ = 1), ``kfac_separate`` (KFAC-EWC,
Ritter et al. 2018, one Kronecker term per task and layer: the exact sum of the per-task
Kronecker-factored penalties) and ``kfac_online`` (precision Σ_t A_t ⊗ G_t at the latest
weights, by default merged into ONE Kronecker term per layer, ``kfac_sum="nearest"``).
Cost: ``kfac_separate`` keeps T terms per layer (two matmuls each per step), ``kfac_online``
with ``kfac_sum="nearest"`` one; the README gives the measured run times.

Every run is appended to a JSON-lines cache (``--cache``) as it finishes; ``--resume``
reuses the cached runs of the same protocol, so an interrupted experiment, or a grid
extended by a value, only runs what is missing.  Prints a markdown table at the end and
writes the JSON (every run's summary, the chosen runs' accuracy matrices, the tuning
curves, the timings) and a PNG plot.
"""
import argparse
import datetime
import gc
import json
import math
import os
import re
import sys
import time

import numpy as np

from fastewc.blocks import BASE, KINDS
from fastewc.demo import metrics, report, run, scenarios

METHODS = run.all_methods()          # every kind's (fastewc.blocks.KINDS), the demo's names
DEFAULT_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
DEFAULT_TASKS = (5, 20)
DEFAULT_SEEDS = (0, 1, 2)
LABELS = {m: ("diagonal " if m in run.METHODS[1:] else "") + report.LABELS[m] for m in METHODS}


class _NoTensorBoard:
    def scalars(self, *args, **kwargs):
        pass


def _protocol(args):
    """What a cached run must match to be reused (everything but λ, seed, T, method)."""
    return {"scenario": args.scenario, "epochs": args.epochs, "val_fraction": args.val_fraction,
            "kind": args.kind, "damping": args.damping, "kfac_sum": args.kfac_sum,
            "gamma": 1.0, "hidden": [256, 256], "batch_size": 32, "learning_rate": 1e-3}


def _key(tasks, method, lam, seed):
    return (int(tasks), method, None if lam is None else float(lam), int(seed))


def _load_cache(path, protocol):
    runs = {}
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                if record.get("protocol") == protocol:
                    runs[_key(record["tasks"], record["method"], record["lam"], record["seed"])] = record
    return runs


class _Setup:
    """The scenario (with its validation split) and initial weights of one (T, seed)."""

    def __init__(self, tasks, seed, args):
        import keras
        self.scenario = scenarios.with_validation(
            scenarios.load_scenario(args.scenario, tasks, seed), args.val_fraction, seed)
        keras.utils.set_random_seed(seed)
        self.init = run.build_model(scenarios.INPUT_DIM, (256, 256),
                                    self.scenario.num_classes).get_weights()


def run_one(setup, tasks, method, lam, seed, args, protocol):
    """Train ``method`` at ``lam`` on the (T, seed) setup; the cache record."""
    import keras
    spec = run.method_spec(method)
    curvature = BASE.kind if spec is None else spec[1]
    kind = KINDS[curvature]
    config = run.DemoConfig(scenario=args.scenario, tasks=tasks, epochs=args.epochs,
                            lam=lam if lam is not None else 0.0,
                            kfac_lam=None if kind is BASE else (lam if lam is not None else 0.0),
                            curvature=curvature,
                            damping=args.damping if "damping" in kind.OPTIONS else 0.0,
                            kfac_sum=args.kfac_sum if "kfac_sum" in kind.OPTIONS else "exact",
                            kind=args.kind, seed=seed, out="unused").resolved()
    log = (lambda line: print("    " + line, flush=True)) if args.verbose else (lambda line: None)
    t0 = time.perf_counter()
    result, _ = run.train_sequence(method, setup.scenario, config, setup.init, log, _NoTensorBoard())
    wall = time.perf_counter() - t0
    keras.backend.clear_session()
    gc.collect()
    val = result["validation"]
    return {
        "protocol": protocol, "tasks": tasks, "method": method, "lam": lam, "seed": seed,
        "val_average_accuracy": val["average_accuracy"],
        "test_average_accuracy": result["average_accuracy"],
        "test_average_forgetting": result["average_forgetting"],
        "test_learning_accuracy": result["learning_accuracy"],
        "val_average_forgetting": val["average_forgetting"],
        "test_accuracy_matrix": [[round(a, 5) for a in row] for row in result["accuracy_matrix"]],
        "val_accuracy_matrix": [[round(a, 5) for a in row] for row in val["accuracy_matrix"]],
        "ewc": result["ewc"],
        "train_seconds": result["timings"]["train_seconds"],
        "fisher_seconds": result["timings"]["fisher_seconds"],
        "wall_seconds": wall,
    }


def _mean_std(values):
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def select(runs, tasks_list, methods, grid, seeds):
    """Per (T, method): the validation curve over the grid and the chosen λ."""
    out = {}
    for T in tasks_list:
        for method in methods:
            lams = [None] if method == "finetune" else list(grid)
            curve = []
            for lam in lams:
                vals = [runs[_key(T, method, lam, s)]["val_average_accuracy"] for s in seeds]
                tests = [runs[_key(T, method, lam, s)]["test_average_accuracy"] for s in seeds]
                mean, std = _mean_std(vals)
                curve.append({"lam": lam, "val_mean": mean, "val_std": std,
                              "test_mean": _mean_std(tests)[0]})
            best = max(range(len(curve)), key=lambda i: (round(curve[i]["val_mean"], 10), -i))
            chosen = curve[best]["lam"]
            rows = [runs[_key(T, method, chosen, s)] for s in seeds]
            summary = {"lam": chosen,
                       "lam_at_grid_edge": method != "finetune" and best in (0, len(curve) - 1),
                       "tuning_curve": curve}
            for field in ("test_average_accuracy", "test_average_forgetting",
                          "test_learning_accuracy", "val_average_accuracy"):
                mean, std = _mean_std([r[field] for r in rows])
                summary[field] = {"mean": mean, "std": std, "per_seed": [r[field] for r in rows]}
            summary["train_seconds_per_run"] = _mean_std([r["train_seconds"] for r in rows])[0]
            summary["wall_seconds_per_run"] = _mean_std([r["wall_seconds"] for r in rows])[0]
            summary["test_accuracy_matrices"] = [r["test_accuracy_matrix"] for r in rows]
            out.setdefault(str(T), {})[method] = summary
    return out


def _compact_json(value):
    """Indented JSON with every innermost list of numbers on one line, floats to 5 digits."""
    def rounded(v):
        if isinstance(v, float):
            return float(f"{v:.5g}")
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [rounded(x) for x in v]
        return v
    text = json.dumps(rounded(value), indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s*([-0-9.eE+, \n]*?)\s*\]",
                  lambda m: "[" + re.sub(r"\s*,\s*", ", ", m.group(1).strip()) + "]", text)
    # flat objects (a run's summary, a mean/std) on one line too
    return re.sub(r"\{\n\s*([^{}\[\]]*?)\n\s*\}",
                  lambda m: "{" + re.sub(r",\n\s*", ", ", m.group(1)) + "}", text)


def _pct(stat):
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _lam_text(s):
    if s["lam"] is None:
        return "–"
    return f"{s['lam']:g}" + (" (edge)" if s["lam_at_grid_edge"] else "")


def markdown_table(selection, tasks_list, methods, labels):
    head = "| method |" + "".join(f" T={T}: λ | T={T}: avg acc (%) | T={T}: forgetting (pts) |"
                                  for T in tasks_list)
    lines = [head, "|---|" + "---|---|---|" * len(tasks_list)]
    for method in methods:
        cells = []
        for T in tasks_list:
            s = selection[str(T)][method]
            cells.append(f" {_lam_text(s)} | {_pct(s['test_average_accuracy'])} | "
                         f"{_pct(s['test_average_forgetting'])} |")
        lines.append(f"| {labels[method]} |" + "".join(cells))
    return "\n".join(lines)


def tuning_table(selection, tasks_list, methods, grid, labels):
    """Validation average accuracy (mean over seeds, %) per λ: the curves λ was chosen on."""
    lines = []
    for T in tasks_list:
        lines.append(f"| T={T}, validation avg acc (%) | " + " | ".join(f"λ={g:g}" for g in grid) + " |")
        lines.append("|---|" + "---|" * len(grid))
        for method in methods:
            if method == "finetune":
                continue
            s = selection[str(T)][method]
            cells = []
            for point in s["tuning_curve"]:
                text = f"{100 * point['val_mean']:.1f}"
                cells.append(f"**{text}**" if point["lam"] == s["lam"] else text)
            lines.append(f"| {labels[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(path, selection, tasks_list, methods, labels, grid, protocol):
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from fastewc.demo import report

    cols = len(tasks_list)
    fig, axes = plt.subplots(2, cols, figsize=(5.6 * cols, 8.2), squeeze=False)
    for c, T in enumerate(tasks_list):
        ax = axes[0, c]
        steps = np.arange(1, T + 1)
        for method in methods:
            s = selection[str(T)][method]
            curves = np.array([[np.mean(np.asarray(m)[t, :t + 1]) for t in range(T)]
                               for m in s["test_accuracy_matrices"]]) * 100
            mean, std = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else 0 * curves[0]
            lam = "" if s["lam"] is None else f", λ={s['lam']:g}"
            ax.plot(steps, mean, marker="o", ms=3, color=report.COLORS.get(method),
                    ls=report.STYLES.get(method, "-"), label=labels[method] + lam)
            ax.fill_between(steps, mean - std, mean + std, color=report.COLORS.get(method), alpha=0.15)
        ax.set_title(f"{T} {protocol['scenario']}-digit tasks: test accuracy averaged over the tasks seen\n"
                     f"(mean ± std over {len(s['test_accuracy_matrices'])} seeds, λ chosen on validation)",
                     fontsize=9)
        ax.set_xlabel("after training task")
        ax.set_xticks(steps if T <= 10 else steps[::max(1, T // 10)])
        ax.set_ylabel("average test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")

        ax = axes[1, c]
        for method in methods:
            s = selection[str(T)][method]
            if method == "finetune":
                ax.axhline(100 * s["val_average_accuracy"]["mean"], color=report.COLORS["finetune"],
                           lw=1, label=labels[method])
                continue
            lams = [p["lam"] for p in s["tuning_curve"]]
            mean = np.array([p["val_mean"] for p in s["tuning_curve"]]) * 100
            std = np.array([p["val_std"] for p in s["tuning_curve"]]) * 100
            ax.errorbar(lams, mean, yerr=std, marker="o", ms=3, capsize=2, color=report.COLORS.get(method),
                        ls=report.STYLES.get(method, "-"), label=labels[method])
            ax.plot([s["lam"]], [100 * s["val_average_accuracy"]["mean"]], marker="*", ms=12,
                    color=report.COLORS.get(method))
        ax.set_xscale("log")
        ax.set_title(f"{T} tasks: validation average accuracy after the last task vs λ "
                     "(★ chosen)", fontsize=9)
        ax.set_xlabel("λ")
        ax.set_ylabel("validation average accuracy (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Fine-tuning vs diagonal EWC vs KFAC-EWC, sklearn digits ({protocol['scenario']}), {protocol['epochs']} "
                 f"epochs/task, {protocol['kind']} Fisher,\nKFAC damping {protocol['damping']:g}, "
                 f"kfac_online: {protocol['kfac_sum']} sum", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _positive_floats(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers > 0. Received: {text!r}")
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers > 0. Received: {text!r}")
    return tuple(sorted(set(values)))


def _ints(low):
    def parse(text):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers >= {low}. Received: {text!r}")
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers >= {low}. Received: {text!r}")
        return tuple(dict.fromkeys(values))
    return parse


def _methods(text):
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [v for v in values if v not in METHODS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"must be comma-separated names from {', '.join(METHODS)}. "
                                         f"Received: {text!r}")
    return values


def build_parser():
    from fastewc.__main__ import _float_in, _int_at_least
    p = argparse.ArgumentParser(
        prog="python -m fastewc.demo.compare_curvature",
        description="Fine-tuning vs diagonal EWC vs KFAC-EWC on permuted digits: λ tuned per "
                    "method and task count on a held-out validation split, test accuracy over "
                    "several seeds; a markdown table, a JSON and a PNG plot.")
    p.add_argument("--scenario", choices=scenarios.SCENARIOS, default="permuted",
                   help="permuted digits (default) or split digits (--tasks <= 5)")
    p.add_argument("--tasks", type=_ints(2), default=DEFAULT_TASKS,
                   help="task counts, comma-separated (default 5,20)")
    p.add_argument("--seeds", type=_ints(0), default=DEFAULT_SEEDS, help="seeds (default 0,1,2)")
    p.add_argument("--grid", type=_positive_floats, default=DEFAULT_GRID,
                   help="λ grid for every EWC method (default 1,3,10,30,100,300,1000,3000)")
    p.add_argument("--methods", type=_methods, default=METHODS,
                   help=f"methods (default {','.join(METHODS)})")
    p.add_argument("--epochs", type=_int_at_least(1), default=5, help="epochs per task (default 5)")
    p.add_argument("--val-fraction", type=_float_in(0.01, 0.9), default=0.2,
                   help="fraction of each task's training split held out for λ (default 0.2)")
    p.add_argument("--kind", choices=run.KINDS, default="exact", help="Fisher kind (default exact)")
    p.add_argument("--damping", type=_float_in(0.0), default=0.0, help="KFAC damping (default 0)")
    p.add_argument("--kfac-sum", choices=run.KFAC_SUMS, default="nearest",
                   help="kfac_online's merge (default nearest: one Kronecker term per layer)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    p.add_argument("--json", default=os.path.join("runs", f"compare-curvature-{stamp}", "results.json"),
                   help="output JSON (default runs/compare-curvature-<time>/results.json)")
    p.add_argument("--plot", default=None, help="output PNG (default: next to the JSON)")
    p.add_argument("--cache", default=None,
                   help="JSON-lines run cache (default runs/compare-curvature-cache.jsonl)")
    p.add_argument("--resume", action="store_true", help="reuse the cached runs of the same protocol")
    p.add_argument("--verbose", action="store_true", help="print the per-task progress lines")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scenario == "split" and max(args.tasks) > scenarios.MAX_SPLIT_TASKS:
        parser.error(f"argument --tasks: must be <= {scenarios.MAX_SPLIT_TASKS} with --scenario split. "
                     f"Received: {','.join(map(str, args.tasks))}")
    plot_path = args.plot or os.path.join(os.path.dirname(args.json) or ".", "accuracy.png")
    cache_path = args.cache or os.path.join("runs", "compare-curvature-cache.jsonl")
    protocol = _protocol(args)
    runs = _load_cache(cache_path, protocol) if args.resume else {}
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    if not args.resume and os.path.exists(cache_path):
        os.replace(cache_path, cache_path + ".previous")

    wall0 = time.perf_counter()
    todo = [(T, seed, method, lam) for T in args.tasks for seed in args.seeds
            for method in args.methods
            for lam in ([None] if method == "finetune" else args.grid)]
    missing = [item for item in todo if _key(item[0], item[2], item[3], item[1]) not in runs]
    print(f"compare_curvature: {len(todo)} runs ({len(todo) - len(missing)} cached), tasks "
          f"{list(args.tasks)}, seeds {list(args.seeds)}, λ grid {[f'{g:g}' for g in args.grid]}, "
          f"protocol {protocol}", flush=True)
    setups, ran_seconds = {}, 0.0
    for i, (T, seed, method, lam) in enumerate(missing):
        if (T, seed) not in setups:
            setups = {(T, seed): _Setup(T, seed, args)}     # one setup alive at a time
        record = run_one(setups[(T, seed)], T, method, lam, seed, args, protocol)
        ran_seconds += record["wall_seconds"]
        runs[_key(T, method, lam, seed)] = record
        with open(cache_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        lam_text = "-" if lam is None else f"{lam:g}"
        print(f"[{i + 1}/{len(missing)}] T={T} seed={seed} {method:<13} λ={lam_text:<6} "
              f"val {100 * record['val_average_accuracy']:5.1f}%  test "
              f"{100 * record['test_average_accuracy']:5.1f}%  forgetting "
              f"{100 * record['test_average_forgetting']:5.1f} pts  "
              f"({record['wall_seconds']:.1f}s; elapsed {time.perf_counter() - wall0:.0f}s)", flush=True)

    selection = select(runs, args.tasks, args.methods, args.grid, args.seeds)
    labels = dict(LABELS)
    if "kfac_online" in labels:
        labels["kfac_online"] = f"KFAC-EWC (online, {args.kfac_sum} sum)"
    table = markdown_table(selection, args.tasks, args.methods, labels)
    tuning = tuning_table(selection, args.tasks, args.methods, args.grid, labels)
    total = time.perf_counter() - wall0
    all_run_seconds = sum(runs[_key(T, m, lam, s)]["wall_seconds"] for T, s, m, lam in todo)
    results = {
        "command": "python -m fastewc.demo.compare_curvature " + " ".join(sys.argv[1:] if argv is None else argv),
        "protocol": protocol,
        "tasks": list(args.tasks), "seeds": list(args.seeds), "grid": list(args.grid),
        "methods": list(args.methods), "labels": labels,
        "selection_rule": "per (method, T): the λ of the grid with the highest validation "
                          "average accuracy after the last task, averaged over the seeds "
                          "(ties: smaller λ); test numbers are the runs at that λ, mean ± "
                          "sample std (ddof=1) over the seeds",
        "definitions": metrics.DEFINITIONS,
        "results": selection,
        "runs": [{k: v for k, v in runs[_key(T, m, lam, s)].items()
                  if k not in ("protocol", "test_accuracy_matrix", "val_accuracy_matrix", "ewc")}
                 for T, s, m, lam in todo],
        "timings": {"wall_seconds_this_invocation": total,
                    "run_seconds_this_invocation": ran_seconds,
                    "run_seconds_all_runs": all_run_seconds,
                    "runs": len(todo), "runs_from_cache": len(todo) - len(missing)},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        f.write(_compact_json(results) + "\n")
    plot(plot_path, selection, args.tasks, args.methods, labels, args.grid, protocol)
    print()
    print(table)
    print()
    print(tuning)
    print()
    for T in args.tasks:
        sel = selection[str(T)]
        pairs = [("kfac_separate", "ewc_separate"), ("kfac_online", "ewc_online")]
        for kfac, diag in pairs:
            if kfac in sel and diag in sel:
                d = np.subtract(sel[kfac]["test_average_accuracy"]["per_seed"],
                                sel[diag]["test_average_accuracy"]["per_seed"]) * 100
                print(f"T={T}: {kfac} - {diag}, test avg acc per seed: "
                      f"{', '.join(f'{v:+.1f}' for v in d)} pts (mean {d.mean():+.1f})")
    print(f"\nWrote {args.json} and {plot_path}. This invocation: {total:.0f}s wall "
          f"({len(missing)} runs, {ran_seconds:.0f}s training/evaluating); all {len(todo)} runs "
          f"together: {all_run_seconds:.0f}s of run time.")
    return results


if __name__ == "__main__":
    main()
