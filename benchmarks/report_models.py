"""Markdown tables of one ``bench_models.py`` run (a pytest-benchmark JSON file).

    python -m benchmarks.report_models models.json

The main table, one row per model (and device, when more than one was benchmarked):

* **auto picks**: the method ``method="auto"`` chose, and the rows per compiled call
  (empirical / exact when they differ);
* **K**: the exact kind's cotangents per example (``plan.num_cotangents``);
* **empirical / exact × floor**: the member's median over the rotation rounds / the
  median of the faster floor of the SAME rotation (floor = compiled forward+backward of
  the mean loss over the same examples, with or without XLA);
* **loop × floor (per example)**: the eager per-example loop's seconds per example × N /
  the floor, i.e. what the loop would cost on the floor's N examples;
* **first call**: trace + compile + one run of a fresh function / estimator: the floor
  (the variant that was faster when steady) → empirical / exact;
* **params**: trainable parameters;
* **max rel. err vs float64 (empirical / exact)**: ``test_fidelity``'s worst relative
  error per variable, max_v max|F_v − F64_v| / max|F64_v|, of the default estimator against
  the float64 per-example oracle (variables whose Fisher is ~0 are judged against 1e-7 of
  the largest entry instead); "(float32 limit)" where float32 itself misses the bound (the
  float32 loop is as far from float64) and fastewc is held to the loop's distance instead,
  "(sampled)" where sampled replaced exact (the exact oracle too slow); bold: beyond the
  bound.  Notes below the table say why.

A model benchmarked with the sampled kind instead of exact (``models.Spec.kinds``: the
causal LM, where exact costs a backward pass per vocabulary entry and position) shows
sampled in the exact columns, marked "(sampled)".

A member that failed shows its exception type (``bench_models.py`` fails that test with
the error and keeps the others).  A second table lists absolute times and the peak
memory of the first calls.  ``--before earlier.json`` adds a before → after table
(:func:`comparison_table`).
"""
import argparse
import json
import sys

from benchmarks.report import header        # one run description for both reports

KINDS = ("empirical", "exact")
FLOORS = ("floor_xla", "floor_noxla")
ROLES = {"models": "steady", "models-loop": "loop", "models-fidelity": "fidelity"}


def _fmt(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _by_model(doc):
    """{(model, device): {"steady": bench or None, "loop": ..., "fidelity": ...}} in run order."""
    rows = {}
    for bench in doc.get("benchmarks", []):
        info = bench.get("extra_info", {})
        role = info.get("role")
        if role not in ROLES:
            continue
        device = (bench.get("group") or "").rpartition("[")[2].rstrip("]")
        row = rows.setdefault((info["model"], device), {"steady": None, "loop": None, "fidelity": None})
        row[ROLES[role]] = bench
    return rows


def _member(info, kind):
    """(member, label): ``kind``, or sampled marked " (sampled)" where a model was
    benchmarked with sampled instead of exact (``models.Spec.kinds``)."""
    if kind == "exact":
        seen = {m for key in ("medians", "first_call_s", "errors", "plans") for m in info.get(key, {})}
        if "exact" not in seen and "sampled" in seen:
            return "sampled", " (sampled)"
    return kind, ""


def best_floor(info):
    """(member name, median seconds) of the faster floor, or (None, None)."""
    medians = info.get("medians", {})
    floors = [(medians[f], f) for f in FLOORS if f in medians]
    if not floors:
        return None, None
    median, name = min(floors)
    return name, median


def _failed(info, member):
    error = info.get("errors", {}).get(member)
    return f"**{error.split(':', 1)[0]}**" if error else None


def _ratio(info, kind):
    member, label = _member(info, kind)
    failed = _failed(info, member)
    if failed:
        return failed + label
    _, floor = best_floor(info)
    median = info.get("medians", {}).get(member)
    return "–" if floor is None or median is None else f"{median / floor:.2f}×{label}"


def _auto(info):
    plans = info.get("plans", {})
    if not plans:
        return "–"
    kinds = [_member(info, k)[0] for k in KINDS]
    methods = [plans[k]["method"] for k in kinds if k in plans]
    rows = [str(plans[k]["rows"]) for k in kinds if k in plans]
    method = methods[0] if len(set(methods)) == 1 else " / ".join(methods)
    rows = rows[0] if len(set(rows)) == 1 else " / ".join(rows)
    return f"{method} ({rows} rows)"


def _loop(steady, loop):
    if loop is None:
        return "–"
    per_example = loop["extra_info"].get("per_example_s")
    info = steady["extra_info"] if steady else {}
    _, floor = best_floor(info)
    if per_example is None or floor is None:
        return "–"
    return f"{per_example * info['examples'] / floor:.0f}×"


def _seconds(value):
    return "–" if value is None else (f"{value:.1f} s" if value >= 0.95 else f"{value:.2f} s")


def _first(info):
    first = info.get("first_call_s", {})
    name, _ = best_floor(info)
    if name is None:
        name = next((f for f in FLOORS if f in first), None)
    floor = f"{_seconds(first.get(name))} ({name.split('_', 1)[1]})" if name else "–"
    kinds = " / ".join(_failed(info, m) or _seconds(first.get(m)) + label
                       for m, label in (_member(info, k) for k in KINDS))
    return f"{floor} → {kinds}"


def _params(n):
    if n is None:
        return "–"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def _mib(value):
    return "–" if value is None else f"{value / 2**20:.0f}"


def _fidelity_record(info, kind):
    """(record, label) of ``kind`` in a fidelity bench's extra_info; exact falls back on
    sampled (what replaced it)."""
    records = info.get("fidelity") or {}
    if kind in records:
        return records[kind], ""
    if kind == "exact" and "sampled" in records:
        return records["sampled"], " (sampled)"
    return None, ""


def _fidelity(bench):
    if bench is None:
        return "–"
    info = bench["extra_info"]
    bound, floor = info.get("bound", 1e-4), info.get("zero_floor", 1e-7)
    cells = []
    for kind in KINDS:
        record, label = _fidelity_record(info, kind)
        if record is None:
            cells.append("–")
            continue
        cell = f"{record['error']:.1e}"
        if record["error"] > record.get("bound", bound) or record.get("zero_error", 0.0) > floor:
            cell = f"**{cell}**"
        if record.get("reference", "float64") != "float64":
            cell += f" ({record['reference']})"
        cells.append(cell + label)
    return " / ".join(cells)


def fidelity_notes(doc):
    """Why a model's fidelity was held to the float32 limit, or sampled replaced exact."""
    out = []
    for (model, _), row in _by_model(doc).items():
        info = (row["fidelity"] or {}).get("extra_info", {})
        replaced = info.get("replaced")
        if replaced:
            out.append(f"- {model}: sampled instead of exact: {replaced.get('reason', '')}")
        for kind, record in (info.get("fidelity") or {}).items():
            if record.get("reference", "float64") != "float64":
                out.append(f"- {model} / {kind}: {record['reference']}: {record.get('reason', '')}")
    return "\n".join(out)


def model_table(doc):
    rows = _by_model(doc)
    several_devices = len({device for _, device in rows}) > 1
    lines = ["| model | auto picks | K | empirical × floor | exact × floor | loop × floor (per example) "
             "| first call: floor → empirical / exact | params | max rel. err vs float64 (empirical / exact) |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for (model, device), pair in rows.items():
        steady, loop = pair["steady"], pair["loop"]
        info = steady["extra_info"] if steady else {}
        label = f"{model} ({device})" if several_devices else model
        k = info.get("plans", {}).get(_member(info, "exact")[0], {}).get("K", "–")
        lines.append(f"| {label} | {_auto(info)} | {k} | {_ratio(info, 'empirical')} | {_ratio(info, 'exact')} "
                     f"| {_loop(steady, loop)} | {_first(info) if steady else '–'} | {_params(info.get('params'))} "
                     f"| {_fidelity(pair['fidelity'])} |")
    return "\n".join(lines)


def detail_table(doc):
    lines = ["| model | N | floor xla / noxla | empirical | exact | loop per example | rounds "
             "| first-call peak MiB: floor xla / noxla / empirical / exact |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, device), pair in _by_model(doc).items():
        steady, loop = pair["steady"], pair["loop"]
        info = steady["extra_info"] if steady else {}
        med = info.get("medians", {})
        cell = lambda k: (lambda m, label: _failed(info, m) or ("–" if m not in med else _fmt(med[m]) + label))(
            *_member(info, k))   # noqa: E731
        peaks = info.get("first_call_peak_bytes", {})
        per_example = loop["extra_info"].get("per_example_s") if loop else None
        lines.append(f"| {model} | {info.get('examples', '–')} | {cell('floor_xla')} / {cell('floor_noxla')} "
                     f"| {cell('empirical')} | {cell('exact')} | {'–' if per_example is None else _fmt(per_example)} "
                     f"| {info.get('rounds', '–')} | "
                     f"{' / '.join(_mib(peaks.get(_member(info, m)[0])) for m in FLOORS + KINDS)} |")
    return "\n".join(lines)


def errors(doc):
    out = []
    for (model, _), pair in _by_model(doc).items():
        for member, error in ((pair["steady"] or {}).get("extra_info", {}).get("errors") or {}).items():
            out.append(f"- {model} / {member}: `{error}`")
    return "\n".join(out)


# -- bench_large.py (role "large") ---------------------------------------------------------
def _gib(value):
    return "–" if value is None else f"{value / 2**30:.1f}"


def _exact_cell(info):
    """The exact kind of a bench_large row: its ratio, the refusal, or why it did not run."""
    record = info.get("records", {}).get("exact")
    if record is None:
        return "–"
    if "refused" in record:
        return f"refused in {record['refused_after_s']:.1f} s (suggests sampled)" \
            if "kind='sampled'" in record["refused"] else "refused"
    if "exact_not_run" in record:
        return f"not refused, not run: K = {record['plan']['K']}"
    return _failed(info, "exact") or _ratio(info, "exact")


def large_table(doc):
    """One row per bench_large.py model: params, auto's plan, the floor, each kind's steady
    median ÷ the floor's, first calls ÷ the floor's, and the process peaks (VmHWM)."""
    lines = ["| model (input, batch) | params | auto picks | floor steady / first | empirical × floor "
             "| sampled × floor | exact × floor | first call ÷ floor's: empirical / sampled "
             "| peak RSS GiB: floor → empirical / sampled |",
             "|---|---:|---|---|---:|---:|---|---|---|"]
    for bench in doc.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("role") != "large":
            continue
        name, floor = best_floor(info)
        first = info.get("first_call_s", {})
        plans = info.get("plans", {})
        methods = sorted({f"{p['method']} ({p['rows']} rows)" for k, p in plans.items() if k != "exact"})
        floor_cell = "–" if name is None else f"{_seconds(floor)} / {_seconds(first.get(name))} ({name.split('_', 1)[1]})"
        firsts = " / ".join("–" if name not in first or kind not in first else f"{first[kind] / first[name]:.1f}×"
                            for kind in ("empirical", "sampled"))
        peaks = info.get("peak_bytes", {})
        peak_first = info.get("first_call_peak_bytes", {})
        peak = lambda m: max(peaks.get(m, 0), peak_first.get(m, 0)) or None     # noqa: E731
        memory = f"{_gib(peak(name))} → " + " / ".join(_gib(peak(k)) for k in ("empirical", "sampled"))
        lines.append(f"| {info['model']} ({info.get('describe', '')}) | {_params(info.get('params'))} "
                     f"| {', '.join(methods) or '–'} | {floor_cell} | {_ratio(info, 'empirical')} "
                     f"| {_ratio(info, 'sampled')} | {_exact_cell(info)} | {firsts} | {memory} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def large_notes(doc):
    """The warnings each kind's estimator gave (e.g. a layer without a rule)."""
    out = []
    for bench in doc.get("benchmarks", []):
        info = bench.get("extra_info", {})
        for member, record in (info.get("records") or {}).items() if info.get("role") == "large" else ():
            for message in sorted(set(record.get("warnings", []))):
                out.append(f"- {info['model']} / {member}: {message}")
    return "\n".join(out)


def render(doc):
    large = large_table(doc)
    if large and not _by_model(doc):
        notes = large_notes(doc)
        return "\n".join([header(doc), "", large, "",
                          "Ratios: the member's median over its steady calls / the faster floor's (each member in "
                          "its own process). First call: trace + compile + one run. Peak: the process's resident "
                          "high-water mark over its first and steady calls (model and data included)."]
                         + (["", "Warnings:", "", notes] if notes else []))
    parts = [header(doc), "", model_table(doc), "",
             "Ratios: median of the rotation rounds / the faster floor's median (same rotation). "
             "Loop: seconds per example × N / floor. First call: trace + compile + one run. "
             "Fidelity: worst relative error per variable against the float64 per-example oracle."]
    notes = fidelity_notes(doc)
    if notes:
        parts += ["", "Fidelity notes:", "", notes]
    parts += ["", detail_table(doc)]
    failed = errors(doc)
    if failed:
        parts += ["", "Failed:", "", failed]
    return "\n".join(parts)


def _ratio_value(info, kind):
    member = _member(info, kind)[0]
    _, floor = best_floor(info)
    median = info.get("medians", {}).get(member)
    return None if floor is None or median is None else median / floor


def _first_ratio(info, kind):
    """A member's first call / the faster floor's first call."""
    member = _member(info, kind)[0]
    name, _ = best_floor(info)
    first = info.get("first_call_s", {})
    return first[member] / first[name] if name in first and member in first else None


def comparison_table(before, after):
    """Before → after, per model in both runs: each kind's steady ratio to its own run's
    floor and its first call over that run's floor's first call (each run normalised by
    its own floor, so two runs on a drifting machine compare)."""
    old = {key: pair["steady"]["extra_info"] for key, pair in _by_model(before).items() if pair["steady"]}
    lines = ["| model | empirical × floor | exact × floor | first call ÷ floor's: empirical | exact |",
             "|---|---:|---:|---:|---:|"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}×"     # noqa: E731
    for key, pair in _by_model(after).items():
        if key not in old or not pair["steady"]:
            continue
        new = pair["steady"]["extra_info"]
        cells = [f"{fmt(f(old[key], k))} → {fmt(f(new, k))}"
                 for f in (_ratio_value, _first_ratio) for k in KINDS]
        lines.append(f"| {key[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--before", help="an earlier run's JSON: print a before → after table too")
    args = parser.parse_args(argv)
    with open(args.json_file) as fh:
        doc = json.load(fh)
    print(render(doc))
    if args.before:
        with open(args.before) as fh:
            print("\nBefore → after (" + args.before + " → " + args.json_file + "):\n")
            print(comparison_table(json.load(fh), doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
