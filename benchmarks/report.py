"""Turn a pytest-benchmark JSON file into a markdown table of ratios.

    python -m benchmarks.report benchmarks/results/latest.json [--png chart.png]

Within each group (one workload) every benchmark is quoted by its median time, as a
ratio to the floor (the fastest benchmark whose extra_info role is "floor") and, where a
baseline exists, as the speed-up over the eager loop of the same kind (role "loop").
"""
import argparse
import json
import platform
import sys


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def rows_by_group(doc):
    groups = {}
    for bench in doc["benchmarks"]:
        groups.setdefault(bench.get("group") or "ungrouped", []).append(bench)
    return groups


def ratio_table(benches):
    floors = [b for b in benches if b["extra_info"].get("role") == "floor"]
    floor = min(floors, key=lambda b: b["stats"]["median"]) if floors else None
    loops = {b["extra_info"].get("kind"): b for b in benches if b["extra_info"].get("role") == "loop"}
    lines = ["| benchmark | median | × floor | speed-up vs eager loop |", "|---|---:|---:|---:|"]
    for b in sorted(benches, key=lambda b: b["stats"]["median"]):
        median = b["stats"]["median"]
        vs_floor = f"{median / floor['stats']['median']:.2f}×" if floor else "–"
        loop = loops.get(b["extra_info"].get("kind"))
        vs_loop = f"{loop['stats']['median'] / median:.0f}×" if loop and loop is not b else "–"
        lines.append(f"| {b['name'].split('[', 1)[-1].rstrip(']')} | {_fmt(median)} | {vs_floor} | {vs_loop} |")
    if floor:
        lines.append(f"\nFloor: `{floor['name']}` ({_fmt(floor['stats']['median'])}).")
    return "\n".join(lines)


def scaling_table(benches):
    """Rows: method; columns: size; cells: median time and peak memory."""
    sizes = sorted({b["extra_info"]["size"] for b in benches})
    methods = sorted({b["extra_info"]["method"] for b in benches})
    cell = {(b["extra_info"]["method"], b["extra_info"]["size"]): b for b in benches}
    axis = benches[0]["extra_info"]["axis"]
    lines = [f"| method \\ {axis} | " + " | ".join(str(s) for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for m in methods:
        row = []
        for s in sizes:
            b = cell.get((m, s))
            row.append("–" if b is None else
                       f"{_fmt(b['stats']['median'])}, {b['extra_info']['peak_bytes'] / 2**20:.0f} MiB")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    how = benches[0]["extra_info"].get("peak_measure", "")
    lines.append(f"\nCells: median time, peak memory ({how}).")
    return "\n".join(lines)


def _fmt(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def header(doc):
    """"Measured <date> on <CPU> (<n> cores), Python <v>, commit <id>." of a run."""
    info = doc.get("machine_info", {})
    commit = doc.get("commit_info", {}).get("id", "")[:10]
    return (f"Measured {doc.get('datetime', '')[:10]} on {_cpu_model()} "
            f"({info.get('cpu', {}).get('count', '?')} cores), Python {info.get('python_version', '?')}"
            + (f", commit {commit}" if commit else "") + ".")


def render(doc):
    parts = [header(doc)]
    for group, benches in sorted(rows_by_group(doc).items()):
        table = scaling_table(benches) if _is_scaling(benches) else ratio_table(benches)
        parts.append(f"\n### {group}\n\n{table}")
    return "\n".join(parts)


def _is_scaling(benches):
    return all(b["extra_info"].get("role") == "scaling" for b in benches)


def scaling_curves(doc, path):
    """Log-log curves of time and peak memory against size, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(g, b) for g, b in sorted(rows_by_group(doc).items()) if _is_scaling(b)]
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for row, (group, benches) in zip(axes, groups):
        for method in sorted({b["extra_info"]["method"] for b in benches}):
            pts = sorted((b["extra_info"]["size"], b["stats"]["median"], b["extra_info"]["peak_bytes"])
                         for b in benches if b["extra_info"]["method"] == method)
            row[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            row[1].plot([p[0] for p in pts], [max(p[2], 1) / 2**20 for p in pts], marker="o", label=method)
        for ax, label in zip(row, ("median seconds", "peak MiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(benches[0]["extra_info"]["axis"])
            ax.set_ylabel(label)
            ax.set_title(group)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def bar_chart(doc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {g: b for g, b in rows_by_group(doc).items() if not _is_scaling(b)}
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.2 + 0.28 * max(len(b) for b in groups.values()) * len(groups)))
    axes = [axes] if len(groups) == 1 else axes
    for ax, (group, benches) in zip(axes, sorted(groups.items())):
        benches = sorted(benches, key=lambda b: b["stats"]["median"])
        ax.barh([b["name"].split("[", 1)[-1].rstrip("]") for b in benches],
                [b["stats"]["median"] for b in benches])
        ax.set_xscale("log")
        ax.set_xlabel("median seconds (log scale)")
        ax.set_title(group)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--png", help="also write a log-scale bar chart here")
    parser.add_argument("--scaling-png", help="also write the scaling curves here")
    args = parser.parse_args(argv)
    with open(args.json_file) as fh:
        doc = json.load(fh)
    print(render(doc))
    if args.png:
        bar_chart(doc, args.png)
    if args.scaling_png:
        scaling_curves(doc, args.scaling_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
