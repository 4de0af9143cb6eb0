"""Compare the benchmark suites of two commits, interleaved in one run.

    .venv/bin/python -m benchmarks.compare REF_BEFORE REF_AFTER [--rounds N]
        [--suites fisher,penalty,train_step,host,kfac] [-k EXPR] [--out DIR] [--bench-from DIR]

e.g. ``python -m benchmarks.compare 7f0526c HEAD --rounds 4`` (issue 14: no suite more
than 10 % slower after the change).

What it does
------------
1. ``git worktree add --detach`` of each ref under a temporary directory (removed at the
   end, also on error or Ctrl-C).  Each run imports its own tree's ``fastewc``: cwd is the
   worktree and ``PYTHONPATH=<worktree>``, which comes before the editable install of the
   venv.  Before timing, a tiny subprocess per tree prints ``fastewc.__file__`` and the run
   stops unless it lies in that tree; afterwards the ``commit_info`` that pytest-benchmark
   writes into each JSON is checked against the tree's commit.
2. Every suite runs N rounds per tree, each round a fresh process
   ``.venv/bin/python -m pytest benchmarks/bench_<suite>.py -q --benchmark-only
   --benchmark-json=F -p no:cacheprovider -o python_files=bench_*.py [-k EXPR]`` with the
   environment of ``make bench`` (TF_CPP_MIN_LOG_LEVEL=2, PYTHONHASHSEED=0).
3. The JSONs are merged and a table is printed and written as Markdown, with the raw
   JSONs beside it (``DIR/compare-<before>-<after>.md`` and ``...-<suite>-<side>-r<k>.json``;
   DIR defaults to benchmarks/results, whose JSONs git ignores).

Interleaving
------------
The two trees never run at the same time (the machine has 2 cores); they alternate, suite
by suite, in the order  before, after | after, before | before, after | ...  (round k's
pair is reversed when k is odd).  A slow drift of the machine (another job starting,
thermal state, page cache) then hits both trees about equally: over a pair of rounds a
linear drift cancels exactly, and whichever tree goes first in one round goes second in
the next.  Use an even N; N ≥ 4 for a figure worth quoting.

Reading the table
-----------------
One row per benchmark (pytest-benchmark ``fullname``) present in both trees, and one per
member of a benchmark that times several members in one rotation (``<fullname> <member>``,
from its ``extra_info["medians"]``: e.g. bench_host's ``estimator`` and ``compiled``):

* ``before ms`` / ``after ms``: the median over the N rounds of each round's median time
  per benchmark round (pytest-benchmark's ``stats.median``, in milliseconds; what a "round"
  times is the suite's own choice, e.g. 10 optimizer steps in bench_train_step.py).
* ``ratio`` = after / before: < 1 faster after, > 1 slower.  Rows are sorted by ratio,
  worst first; ``SLOWER`` marks a ratio > 1.10 (the issue's threshold).
* ``round ratios``: the smallest and largest per-round ratio (after_k / before_k of the
  same round pair), a direct view of the noise: a ratio of 1.12 whose rounds span
  0.95–1.30 is noise, one whose rounds span 1.10–1.14 is not.

Benchmarks present in only one tree are listed below the table.  ``--bench-from DIR``
copies DIR/benchmarks/*.py into both worktrees first, so both trees run the same benchmark
code and only ``fastewc`` differs (e.g. ``--bench-from .`` for uncommitted benchmark fixes).
The exit status is 1 when a ratio exceeds 1.10, 0 otherwise.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"fisher": "benchmarks/bench_fisher.py", "penalty": "benchmarks/bench_penalty.py",
          "train_step": "benchmarks/bench_train_step.py", "host": "benchmarks/bench_host.py",
          "kfac": "benchmarks/bench_kfac.py"}
THRESHOLD = 1.10
NO_TESTS_COLLECTED = 5   # pytest's exit code when -k selects nothing


def git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def bench_env(tree):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")    # as `make bench`
    env.setdefault("PYTHONHASHSEED", "0")
    env["PYTHONPATH"] = str(tree)                  # this tree's fastewc, not the editable one
    return env


def check_import(python, tree):
    """The ``fastewc`` a run in ``tree`` imports lies in ``tree``; returns its path."""
    out = subprocess.run([python, "-c", "import fastewc; print(fastewc.__file__)"], cwd=tree,
                         env=bench_env(tree), check=True, capture_output=True, text=True)
    path = Path(out.stdout.strip().splitlines()[-1]).resolve()
    if Path(tree).resolve() not in path.parents:
        raise SystemExit(f"compare: a run in {tree} imports fastewc from {path}, not from that tree")
    return path


def run_suite(python, tree, suite, json_path, log_path, k_expr):
    cmd = [python, "-m", "pytest", SUITES[suite], "-q", "--benchmark-only",
           f"--benchmark-json={json_path}", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py"]
    if k_expr:
        cmd += ["-k", k_expr]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=tree, env=bench_env(tree), stdout=log,
                              stderr=subprocess.STDOUT)
    return proc.returncode


def medians(doc):
    """Each benchmark's median, and each member's of a benchmark that times several in one
    rotation (``extra_info["medians"]``, :func:`benchmarks.conftest.rotate`) as
    ``"<fullname> <member>"``."""
    out = {}
    for b in doc["benchmarks"]:
        out[b["fullname"]] = b["stats"]["median"]
        for member, value in (b.get("extra_info") or {}).get("medians", {}).items():
            out[f"{b['fullname']} {member}"] = value
    return out


def merge(runs):
    """``runs``: {side: [doc per round]} → rows (name, before s, after s, ratio, lo, hi) and
    the names present on one side only."""
    per_round = {side: [medians(doc) for doc in docs] for side, docs in runs.items()}
    names = {side: set().union(*rounds) if rounds else set() for side, rounds in per_round.items()}
    rows = []
    for name in names["before"] & names["after"]:
        b = [r[name] for r in per_round["before"] if name in r]
        a = [r[name] for r in per_round["after"] if name in r]
        pairs = [ra[name] / rb[name] for rb, ra in zip(per_round["before"], per_round["after"])
                 if name in rb and name in ra]
        before, after = statistics.median(b), statistics.median(a)
        rows.append((name, before, after, after / before, min(pairs), max(pairs)))
    rows.sort(key=lambda r: -r[3])
    only = {side: sorted(names[side] - names[other])
            for side, other in (("before", "after"), ("after", "before"))}
    return rows, only


def table(rows):
    lines = ["| benchmark | before ms | after ms | ratio | round ratios | |",
             "|---|---:|---:|---:|---:|---|"]
    for name, before, after, ratio, lo, hi in rows:
        flag = f"SLOWER > {THRESHOLD:.2f}" if ratio > THRESHOLD else ""
        lines.append(f"| `{name.split('::', 1)[-1]}` | {before * 1e3:.3f} | {after * 1e3:.3f} | "
                     f"{ratio:.3f} | {lo:.2f}–{hi:.2f} | {flag} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per tree and suite (default 4)")
    parser.add_argument("--suites", default=",".join(SUITES),
                        help=f"comma-separated, of {', '.join(SUITES)} (default all)")
    parser.add_argument("-k", dest="k_expr", default=None, help="pytest -k expression for every suite")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="directory for the Markdown report and raw JSONs (default benchmarks/results)")
    parser.add_argument("--bench-from", type=Path, default=None,
                        help="copy DIR/benchmarks/*.py into both trees (same benchmark code on both sides)")
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    args = parser.parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        parser.error(f"--suites: unknown {unknown}; choose from {', '.join(SUITES)}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    refs = {side: (ref, git("rev-parse", "--verify", f"{ref}^{{commit}}"))
            for side, ref in (("before", args.before), ("after", args.after))}
    short = {side: sha[:7] for side, (_, sha) in refs.items()}
    stem = f"compare-{short['before']}-{short['after']}"
    args.out.mkdir(parents=True, exist_ok=True)
    started, t0 = datetime.datetime.now(), time.perf_counter()
    load_start = os.getloadavg()

    tmp = Path(tempfile.mkdtemp(prefix="fastewc-compare-"))
    trees, runs, skipped, logs = {}, {s: {"before": [], "after": []} for s in suites}, [], []
    try:
        for side, (ref, sha) in refs.items():
            trees[side] = tmp / side
            git("worktree", "add", "--detach", str(trees[side]), sha)
            if args.bench_from is not None:
                for f in sorted((args.bench_from / "benchmarks").glob("*.py")):
                    shutil.copy2(f, trees[side] / "benchmarks" / f.name)
            path = check_import(args.python, trees[side])
            print(f"{side}: {ref} = {sha[:10]}  imports {path}", file=sys.stderr)
        for suite in suites:
            for k in range(args.rounds):
                order = ["before", "after"] if k % 2 == 0 else ["after", "before"]
                for side in order:
                    name = f"{stem}-{suite}-{side}-r{k + 1}"
                    json_path, log_path = args.out / f"{name}.json", tmp / f"{name}.log"
                    t = time.perf_counter()
                    rc = run_suite(args.python, trees[side], suite, json_path, log_path, args.k_expr)
                    print(f"[{suite} round {k + 1}/{args.rounds} {side}] rc={rc} "
                          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
                    if rc == NO_TESTS_COLLECTED:
                        break
                    if rc != 0:
                        kept = args.out / log_path.name
                        shutil.copy2(log_path, kept)
                        tail = log_path.read_text().splitlines()[-25:]
                        raise SystemExit(f"compare: {suite} failed in the {side} tree (rc={rc}); "
                                         f"log {kept}:\n" + "\n".join(tail))
                    doc = json.loads(json_path.read_text())
                    commit = (doc.get("commit_info") or {}).get("id")
                    if commit and commit != refs[side][1]:
                        raise SystemExit(f"compare: {json_path} was run on commit {commit}, "
                                         f"expected {refs[side][1]}")
                    runs[suite][side].append(doc)
                else:
                    continue
                skipped.append(suite)   # -k selected nothing in this suite
                break
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.perf_counter() - t0
    subjects = {side: git("log", "-1", "--format=%s", sha)[:100] for side, (_, sha) in refs.items()}
    command = "python -m benchmarks.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [f"# Benchmarks: {args.before} ({short['before']}) → {args.after} ({short['after']})", "",
          f"- before: `{short['before']}` {subjects['before']}",
          f"- after: `{short['after']}` {subjects['after']}",
          f"- command: `{command}`",
          f"- {started:%Y-%m-%d %H:%M}, {elapsed / 60:.1f} min, {args.rounds} round(s) per tree "
          f"and suite, interleaved (before, after | after, before | ...); load average "
          f"{load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} CPUs",
          f"- times: median over rounds of each round's median; ratio = after / before; "
          f"SLOWER marks > {THRESHOLD:.2f}; raw JSONs `{stem}-<suite>-<side>-r<k>.json`"]
    if args.bench_from is not None:
        md.append(f"- benchmark code of both trees copied from `{args.bench_from}`")
    worst = []
    for suite in suites:
        rows, only = merge(runs[suite])
        md += ["", f"## {suite} ({SUITES[suite]})", ""]
        if suite in skipped and not rows:
            md.append(f"-k {args.k_expr!r} selects no benchmark in this suite.")
            continue
        md += table(rows)
        if rows:
            ratios = [r[3] for r in rows]
            md += ["", f"{len(rows)} benchmarks; ratio median {statistics.median(ratios):.3f}, "
                       f"worst {max(ratios):.3f}; {sum(r > THRESHOLD for r in ratios)} above "
                       f"{THRESHOLD:.2f}."]
            worst.append((suite, max(ratios)))
        for side, names in only.items():
            if names:
                md += ["", f"Only {side}: " + ", ".join(f"`{n.split('::', 1)[-1]}`" for n in names)]
    if worst:
        md += ["", "**Verdict:** " + "; ".join(
            f"{s} worst ratio {w:.3f} ({'over' if w > THRESHOLD else 'within'} {THRESHOLD:.2f})"
            for s, w in worst)]
    report = args.out / f"{stem}.md"
    report.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwritten {report}", file=sys.stderr)
    return 1 if any(w > THRESHOLD for _, w in worst) else 0


if __name__ == "__main__":
    sys.exit(main())
