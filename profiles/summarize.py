"""Summarize TensorBoard profiler traces (``.xplane.pb``) as markdown tables.

    python -m profiles.summarize profiles/runs                 # print the summary
    python -m profiles.summarize profiles/runs --readme profiles/README.md
                                          # ... and replace the README's generated section

Reads each trace through the protobuf definitions TensorFlow ships
(``tensorflow.tsl.profiler.protobuf.xplane_pb2.XSpace``, and for XLA programs the
``HloProto`` the profiler stores in the ``/host:metadata`` plane,
``tensorflow.compiler.xla.service.hlo_pb2``).  Accepts the root of
``profiles.capture``'s runs (one subdirectory per capture, its ``capture.json`` and the
newest ``.xplane.pb``), one capture directory, or one ``.xplane.pb`` file.

What is computed, per trace (all times are wall-clock on the traced threads):

* **self time** of an event = its duration minus the durations of the events nested
  directly in it on the same line (thread).  Events on a line nest like a call stack;
  sort by (start, −duration) and keep a stack of open events.
* **op** events are the kernels, classified by how they ran:
  ``tf`` (a graph op run by TensorFlow's executor, named ``scope/name:Type``, grouped by
  ``Type``), ``xla`` (an HLO instruction of an XLA program, grouped by its name without
  the ``.N`` suffix, e.g. ``MatMul`` or ``multiply_multiply_fusion``), ``eager`` (the
  ``KernelAndDeviceFunc::Run`` of an eager op, grouped by the op of the enclosing
  ``EagerLocalExecute: Type``) and ``device`` (an event on an accelerator plane
  ``/device:*``).  An event nested inside a kernel on the same thread (``ParallelFor``
  shards, ...) is that kernel's time; a ``ParallelFor`` on a worker thread is
  ``intra-op`` kernel time.  Everything else is **runtime**: Python, eager dispatch,
  ``tf.function`` call overhead, executor and XLA runtime bookkeeping, annotations -- and
  waiting: the self time of ``KernelAndDeviceFunc::Run (tf.function call)`` or
  ``BlockUntilReady`` is mostly the calling thread waiting for kernels on other threads.
* **host versus device**: ``wall`` is the span of the trace (first event to last);
  ``device`` is the union, over all threads, of the intervals in which some op kernel
  ran (on this CPU-only machine "device" means the op kernels executing on CPU threads;
  on a GPU the accelerator planes add their kernels); ``host only`` = wall − device, the
  time no kernel ran anywhere (Python, dispatch, runtime overhead).
* **scope time** of ``fastewc/<x>``: the union over all threads of the intervals of the
  events in that scope -- TraceMe annotations of that name, graph ops whose name path
  contains it, and XLA instructions whose HLO metadata ``op_name`` contains it.
"""
import argparse
import collections
import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

try:  # the HLO of XLA programs (to put XLA instructions back into their name scopes)
    from tensorflow.compiler.xla.service import hlo_pb2
except ImportError:  # pragma: no cover - other TensorFlow layouts
    hlo_pb2 = None

SCOPES = ("fastewc/train_step", "fastewc/penalty", "fastewc/fisher")
OP_KINDS = ("tf", "xla", "eager", "device", "intra-op")
BEGIN = "<!-- profiles.summarize:begin -->"
END = "<!-- profiles.summarize:end -->"

_TF_OP = re.compile(r"^([^:\s]+):([A-Za-z_][\w>]*)$")       # "scope/name:Type"
_XLA_SUFFIX = re.compile(r"\.\d+$")
_DERIVED_LINES = {"Steps", "XLA Modules", "XLA Ops", "XLA TraceMe", "TensorFlow Name Scope",
                  "TensorFlow Ops", "Framework Name Scope", "Framework Ops", "Source code",
                  "Launch Stats", "SparseCore Ops", "SparseCore Steps"}


# -- reading ----------------------------------------------------------------------------
def load_space(path):
    """The ``XSpace`` of one ``.xplane.pb`` file."""
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    return space


def _stat_value(stat, plane):
    which = stat.WhichOneof("value")
    if which == "ref_value":
        return plane.stat_metadata[stat.ref_value].name
    return getattr(stat, which) if which else None


def _stats(holder, plane):
    return {plane.stat_metadata[s.metadata_id].name: _stat_value(s, plane) for s in holder.stats}


def hlo_op_names(space):
    """{hlo module name: {instruction name: (tf op_name, tf op_type)}} from the HLO protos
    the profiler stores in the ``/host:metadata`` plane (empty if there are none)."""
    modules = {}
    if hlo_pb2 is None:
        return modules
    for plane in space.planes:
        if plane.name != "/host:metadata":
            continue
        for meta in plane.event_metadata.values():
            for stat in meta.stats:
                if plane.stat_metadata[stat.metadata_id].name != "Hlo Proto":
                    continue
                proto = hlo_pb2.HloProto()
                proto.ParseFromString(stat.bytes_value)
                table = {}
                for comp in proto.hlo_module.computations:
                    for ins in comp.instructions:
                        table[ins.name] = (ins.metadata.op_name, ins.metadata.op_type)
                modules[proto.hlo_module.name] = table
                modules[meta.name] = table
    return modules


class Event:
    __slots__ = ("name", "start", "end", "self_ps", "kind", "key", "op_name", "nested")

    def __init__(self, name, start, end):
        self.name, self.start, self.end = name, start, end
        self.self_ps = end - start
        self.kind, self.key, self.op_name = "runtime", name, ""
        self.nested = False    # inside a kernel: its self time counts for that kernel


def events(space):
    """Every event with a duration, as :class:`Event` with self time and classification."""
    hlo = hlo_op_names(space)
    out = []
    for plane in space.planes:
        if plane.name == "/host:metadata" or not plane.lines:
            continue
        device = plane.name.startswith("/device:")
        for line in plane.lines:
            if device and line.name in _DERIVED_LINES:
                continue
            base = line.timestamp_ns * 1000
            raw = sorted(((e.offset_ps, -e.duration_ps, e) for e in line.events
                          if e.duration_ps > 0), key=lambda t: (t[0], t[1]))
            stack = []   # (Event, eager op of the nearest EagerLocalExecute, enclosing op)
            for offset, neg_dur, e in raw:
                meta = plane.event_metadata[e.metadata_id]
                ev = Event(meta.name, base + offset, base + offset - neg_dur)
                while stack and stack[-1][0].end <= ev.start:
                    stack.pop()
                eager_op, op = (stack[-1][1], stack[-1][2]) if stack else (None, None)
                if stack:
                    parent = stack[-1][0]
                    parent.self_ps -= min(ev.end, parent.end) - ev.start
                _classify(ev, e, meta, plane, device, eager_op, hlo)
                if ev.kind == "runtime" and op is not None:
                    # Work nested in a kernel (ParallelFor shards, ...) is that kernel's time.
                    ev.kind, ev.key, ev.op_name, ev.nested = op.kind, op.key, op.op_name, True
                elif ev.kind == "runtime" and ev.name == "ParallelFor":
                    ev.kind, ev.key = "intra-op", "ParallelFor (kernel shards on a worker thread)"
                if ev.name.startswith("EagerLocalExecute: "):
                    eager_op = ev.name[len("EagerLocalExecute: "):]
                if ev.kind in OP_KINDS and op is None:
                    op = ev
                stack.append((ev, eager_op, op))
                out.append(ev)
    for ev in out:
        ev.self_ps = max(ev.self_ps, 0)
    return out


def _classify(ev, e, meta, plane, device, eager_op, hlo):
    name = ev.name
    stats = _stats(e, plane) if e.stats else {}
    if "hlo_op" not in stats and meta.stats:
        stats.update(_stats(meta, plane))
    if "hlo_op" in stats:
        ev.kind = "xla"
        ev.key = _XLA_SUFFIX.sub("", str(stats["hlo_op"]))
        module = hlo.get(str(stats.get("hlo_module", "")), {})
        ev.op_name = module.get(str(stats["hlo_op"]), ("", ""))[0]
    elif device:
        ev.kind, ev.key = "device", name
        ev.op_name = str(stats.get("tf_op", "")).split(":")[0]
    elif name.startswith("end: "):
        ev.key = "end: <XLA thunk>"
    elif (m := _TF_OP.match(name)) and not name.startswith("__"):
        ev.kind, ev.key, ev.op_name = "tf", m.group(2), m.group(1)
    elif name == "KernelAndDeviceFunc::Run" and eager_op and not eager_op.startswith("__"):
        ev.kind, ev.key = "eager", eager_op
    elif name == "KernelAndDeviceFunc::Run" and eager_op:
        ev.key = "KernelAndDeviceFunc::Run (tf.function call)"
    elif name.startswith("__") and ":" in name:
        ev.key = "tf.function kernel (" + re.sub(r"_\d+$", "", name.split(":")[0]) + ")"


# -- analysis ---------------------------------------------------------------------------
def _union(intervals):
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def in_scope(ev, scope):
    if ev.name == scope or ev.name.startswith(scope + "/"):
        return True
    return bool(ev.op_name) and ("/" + scope + "/") in ("/" + ev.op_name + "/")


def analyze(space):
    """Totals of one trace (picoseconds): wall, device, host_only, per-scope unions, op and
    runtime self times grouped by (kind, key) with counts."""
    evs = events(space)
    if not evs:
        raise ValueError("The trace has no timed events.")
    wall = max(e.end for e in evs) - min(e.start for e in evs)
    ops = [e for e in evs if e.kind in OP_KINDS]
    device = _union((e.start, e.end) for e in ops)
    groups = collections.defaultdict(lambda: [0, 0])
    for e in evs:
        g = groups[(e.kind, e.key)]
        g[0] += not e.nested
        g[1] += e.self_ps
    scopes = {s: _union((e.start, e.end) for e in evs if in_scope(e, s)) for s in SCOPES}
    scope_events = {s: sum(1 for e in evs if in_scope(e, s)) for s in SCOPES}
    return {
        "wall": wall, "device": device, "host_only": max(wall - device, 0),
        "op_self": sum(e.self_ps for e in ops), "scopes": scopes, "scope_events": scope_events,
        "groups": dict(groups), "events": len(evs),
    }


def find_traces(path):
    """[(name, xplane path, capture.json dict or {})] for a runs root, a capture directory
    or a single ``.xplane.pb``."""
    if os.path.isfile(path):
        return [(os.path.basename(path).split(".")[0], path, {})]
    out = []
    dirs = [path] + sorted(os.path.join(path, d) for d in os.listdir(path)
                           if os.path.isdir(os.path.join(path, d)))
    for d in dirs:
        profile = os.path.join(d, "plugins", "profile")
        if not os.path.isdir(profile):
            continue
        files = sorted(os.path.join(profile, run, f) for run in os.listdir(profile)
                       if os.path.isdir(os.path.join(profile, run))
                       for f in os.listdir(os.path.join(profile, run)) if f.endswith(".xplane.pb"))
        if not files:
            continue
        meta = {}
        if os.path.exists(os.path.join(d, "capture.json")):
            with open(os.path.join(d, "capture.json"), encoding="utf-8") as f:
                meta = json.load(f)
        chosen = os.path.join(d, meta["xplane"]) if meta.get("xplane") and \
            os.path.exists(os.path.join(d, meta["xplane"])) else files[-1]
        out.append((meta.get("name") or os.path.basename(os.path.normpath(d)), chosen, meta))
    out.sort(key=_capture_order)
    if not out:
        raise SystemExit(f"No .xplane.pb found under {path} (expected <dir>/plugins/profile/*/*.xplane.pb).")
    return out


_WORKLOAD_ORDER = ("mlp", "cnn", "transformer")
_KIND_ORDER = ("train_eager", "train_compiled", "fisher_loop", "fisher_factored")


def _capture_order(item):
    """profiles.capture's order (workload, then eager/compiled/loop/factored), else by name."""
    name, _, meta = item
    w, k = meta.get("workload"), meta.get("kind")
    if w in _WORKLOAD_ORDER and k in _KIND_ORDER:
        return (0, _WORKLOAD_ORDER.index(w), _KIND_ORDER.index(k), name)
    return (1, 0, 0, name)


# -- markdown ---------------------------------------------------------------------------
def _ms(ps):
    return f"{ps / 1e9:,.1f}" if ps >= 1e10 else f"{ps / 1e9:,.2f}"


def _pct(part, whole):
    return f"{100.0 * part / whole:.0f}%" if whole else "–"


def _scope_cell(ps, wall):
    return "–" if not ps else f"{_ms(ps)} ({_pct(ps, wall)})"


def overview_table(results):
    rows = ["| capture | what ran | iterations | wall ms | ms / iteration | device (op kernels) ms "
            "| host only ms | " + " | ".join(f"`{s}` ms" for s in SCOPES) + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(SCOPES)]
    for name, meta, a in results:
        n = meta.get("iterations")
        per = _ms(a["wall"] / n) if n else "–"
        it = f"{n} {meta.get('unit', '')}{'s' if n and n > 1 else ''}".strip() if n else "–"
        rows.append(
            f"| {name} | {meta.get('description', '')} | {it} | {_ms(a['wall'])} | {per} | "
            f"{_ms(a['device'])} ({_pct(a['device'], a['wall'])}) | "
            f"{_ms(a['host_only'])} ({_pct(a['host_only'], a['wall'])}) | "
            + " | ".join(_scope_cell(a["scopes"][s], a["wall"]) for s in SCOPES) + " |")
    return "\n".join(rows)


def top_ops_table(a, top):
    ops = sorted(((k, v) for k, v in a["groups"].items() if k[0] in OP_KINDS),
                 key=lambda kv: -kv[1][1])[:top]
    rows = ["| # | op | kind | count | self ms | % of op time |", "|---|---|---|---|---|---|"]
    for i, ((kind, key), (count, ps)) in enumerate(ops, 1):
        rows.append(f"| {i} | `{key}` | {kind} | {count} | {_ms(ps)} | {_pct(ps, a['op_self'])} |")
    return "\n".join(rows)


def top_runtime_table(a, top):
    rt = sorted(((k, v) for k, v in a["groups"].items() if k[0] == "runtime"),
                key=lambda kv: -kv[1][1])[:top]
    rows = ["| # | runtime event | count | self ms | % of wall |", "|---|---|---|---|---|"]
    for i, ((_, key), (count, ps)) in enumerate(rt, 1):
        rows.append(f"| {i} | `{key}` | {count} | {_ms(ps)} | {_pct(ps, a['wall'])} |")
    return "\n".join(rows)


def machine_line(metas):
    m = next((meta["machine"] for meta in metas if meta.get("machine")), None)
    if not m:
        return ""
    cores = f"{m['cores']} cores" + (f" ({m['usable_cores']} usable)" if m.get("usable_cores") not in
                                     (None, m["cores"]) else "")
    gpus = ", GPUs: " + ", ".join(m["gpus"]) if m.get("gpus") else ", no GPU"
    return (f"Machine: {m['cpu']}, {cores}{gpus}; TensorFlow {m['tensorflow']}, Keras "
            f"{m['keras']}, Python {m['python']}; captured {m['date']}.")


def summarize(path, *, top=8, top_runtime=5):
    """Markdown summary of every trace under ``path``; returns (markdown, results)."""
    results = []
    for name, xplane, meta in find_traces(path):
        results.append((name, meta, analyze(load_space(xplane))))
    parts = []
    line = machine_line([m for _, m, _ in results])
    if line:
        parts.append(line)
    parts.append("Times are milliseconds of wall clock inside the traced window (warm-up "
                 "excluded), with the profiler's own overhead included. *device* = union of "
                 "intervals in which an op kernel ran on any thread; *host only* = wall − "
                 "device; scope columns = union of the intervals of events in that scope.")
    parts.append(overview_table(results))
    for name, meta, a in results:
        head = f"#### {name}"
        if meta.get("description"):
            head += f": {meta['description']}"
        parts.append(head)
        parts.append(f"Op kernels: {_ms(a['op_self'])} ms self time summed over threads; "
                     f"{a['events']:,} timed events.")
        parts.append(top_ops_table(a, top))
        if top_runtime:
            parts.append(top_runtime_table(a, top_runtime))
    return "\n\n".join(parts) + "\n", results


def write_readme(readme, markdown):
    """Replace the text between the BEGIN and END markers of ``readme`` with ``markdown``."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no '{BEGIN}' ... '{END}' section to replace.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{markdown}{END}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m profiles.summarize",
                                     description="Markdown summary of profiler traces (.xplane.pb).")
    parser.add_argument("path", nargs="?", default=os.path.join("profiles", "runs"),
                        help="runs root, one capture directory or one .xplane.pb")
    parser.add_argument("--top", type=int, default=8, help="ops per capture table (default 8)")
    parser.add_argument("--top-runtime", type=int, default=5,
                        help="runtime events per capture table (default 5; 0: none)")
    parser.add_argument("--readme", metavar="FILE",
                        help=f"also write the summary between the {BEGIN} / {END} markers of FILE")
    args = parser.parse_args(argv)
    markdown, _ = summarize(args.path, top=args.top, top_runtime=args.top_runtime)
    print(markdown, end="")
    if args.readme:
        write_readme(args.readme, markdown)
        print(f"(written into {args.readme})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
