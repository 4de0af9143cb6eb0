"""Command line: ``python -m fastewc demo [options]`` (console script ``fastewc``).

Exit status: 0 on success, 2 on a bad option (argparse's message names the option).
"""
import argparse
import math
import sys


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}. Received: {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}. Received: {value}")
        return value
    return parse


def _float_in(low, high=math.inf):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}. Received: {text!r}")
        return value
    return parse


def _seed(text):
    value = _int_at_least(0)(text)
    if value >= 2**31:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**31). Received: {value}")
    return value


def build_parser():
    from fastewc.demo.run import CURVATURES, KFAC_SUMS, KINDS
    from fastewc.demo.scenarios import SCENARIOS
    from fastewc.demo.text import TEXT

    parser = argparse.ArgumentParser(
        prog="fastewc", description="fastewc: fast, exact Elastic Weight Consolidation.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo", help="continual learning on sklearn digits: fine-tuning vs EWC, with timings",
        description="Train fine-tuning, EWC (separate) and EWC (online) on a sequence of "
                    "digit tasks; print the accuracy matrices, average accuracy, forgetting, "
                    "timings and the live Fisher speed-up; write results.json, accuracy.png "
                    "and TensorBoard scalars into --out. --curvature kfac adds KFAC-EWC "
                    "(separate and online) to the comparison, --curvature ekfac EKFAC-EWC "
                    "(separate).")
    demo.add_argument("--scenario", choices=SCENARIOS + (TEXT,), default="permuted",
                      help="permuted digits (shared 10-way head; default), split digits "
                           "(shared 2-way head, label = digit mod 2), or text: a byte-level "
                           "GPT-2 learns CPython's documentation, then Python source code "
                           "(fine-tuning, diagonal EWC and KFAC-EWC, lambda tuned on "
                           "validation; only --kind, --seed, --out and --quick apply)")
    demo.add_argument("--tasks", type=_int_at_least(2), default=None,
                      help="number of tasks, >= 2 (default 5; 3 with --quick; split: <= 5)")
    demo.add_argument("--epochs", type=_int_at_least(1), default=None,
                      help="epochs per task (default 5; 3 with --quick)")
    demo.add_argument("--lam", type=_float_in(0.0), default=None,
                      help="EWC strength lambda >= 0 (default 300 for permuted, 30000 for split)")
    demo.add_argument("--gamma", type=_float_in(0.0, 1.0), default=None,
                      help="online EWC decay gamma in [0, 1] (default 1.0)")
    demo.add_argument("--kind", choices=KINDS, default=None,
                      help="Fisher kind for consolidation and the speed-up (default exact; "
                           "sampled for --scenario text)")
    demo.add_argument("--curvature", choices=CURVATURES, default=None,
                      help="diagonal: fine-tuning and diagonal EWC (default); kfac: also "
                           "KFAC-EWC (Kronecker-factored Fisher blocks, Ritter et al. 2018) in "
                           "both modes, kfac_separate and kfac_online, on the same batches; "
                           "ekfac: also EKFAC-EWC (eigenvalue-corrected, George et al. 2018), "
                           "ekfac_separate")
    demo.add_argument("--kfac-lam", type=_float_in(0.0), default=None,
                      help="KFAC-EWC strength lambda >= 0 (default 30 for permuted, 100 for "
                           "split, tuned on validation; also EKFAC-EWC's; not with --curvature diagonal)")
    demo.add_argument("--damping", type=_float_in(0.0), default=None,
                      help="Tikhonov damping >= 0 of KFAC-EWC (factored) and EKFAC-EWC "
                           "(default 0; not with --curvature diagonal)")
    demo.add_argument("--kfac-sum", choices=KFAC_SUMS, default=None,
                      help="how kfac_online adds a task: exact (a Kronecker term per task; "
                           "default) or nearest (one term per layer, the nearest Kronecker "
                           "product; --curvature kfac only)")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="output folder (default runs/demo-<timestamp>/)")
    demo.add_argument("--quick", action="store_true",
                      help="fast variant for tests: 3 tasks, 3 epochs, 16-example speed-up "
                           "(explicit options still win)")
    return parser


def _version():
    try:
        from fastewc import __version__
    except Exception:  # pragma: no cover
        return "fastewc"
    return f"fastewc {__version__}"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        import os
        from fastewc.demo.run import DemoConfig, run_demo
        from fastewc.demo.scenarios import MAX_SPLIT_TASKS

        if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
            parser.error(f"argument --out: {args.out!r} exists and is not a directory")
        if args.scenario == "text":
            return _text_demo(parser, args)
        if args.scenario == "split" and args.tasks is not None and args.tasks > MAX_SPLIT_TASKS:
            parser.error(f"argument --tasks: must be <= {MAX_SPLIT_TASKS} with --scenario split "
                         f"(10 digits, 2 per task). Received: {args.tasks}")
        from fastewc.blocks import BASE, KINDS

        args.curvature = args.curvature or "diagonal"
        kind = KINDS[args.curvature]
        for option, value, name in (("--kfac-lam", args.kfac_lam, None), ("--damping", args.damping, "damping"),
                                    ("--kfac-sum", args.kfac_sum, "kfac_sum")):
            if value is None or (kind is not BASE and (name is None or name in kind.OPTIONS)):
                continue
            takers = [c for c, k in KINDS.items() if k is not BASE and (name is None or name in k.OPTIONS)]
            parser.error(f"argument {option}: applies to --curvature {' or '.join(takers)} only. "
                         f"Received: {option} {value} with --curvature {args.curvature}")
        config = DemoConfig(scenario=args.scenario, tasks=args.tasks, epochs=args.epochs,
                            lam=args.lam, gamma=1.0 if args.gamma is None else args.gamma,
                            kind=args.kind or "exact", seed=args.seed,
                            out=args.out, quick=args.quick, curvature=args.curvature,
                            kfac_lam=args.kfac_lam,
                            damping=0.0 if args.damping is None else args.damping,
                            kfac_sum=args.kfac_sum or "exact")
        run_demo(config, log=lambda line: print(line, flush=True))
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover


def _text_demo(parser, args):
    """``demo --scenario text``: the digit scenarios' options are an error, not ignored."""
    from fastewc.demo.text import TextConfig, run_text_demo

    for option in ("tasks", "epochs", "lam", "gamma", "curvature", "kfac_lam", "damping", "kfac_sum"):
        value = getattr(args, option)
        if value is not None:
            flag = "--" + option.replace("_", "-")
            parser.error(f"argument {flag}: applies to the digit scenarios only (the text "
                         f"scenario tunes lambda on its validation split and runs fine-tuning, "
                         f"diagonal EWC and KFAC-EWC). Received: {flag} {value} with --scenario text")
    config = TextConfig(seed=args.seed, out=args.out, quick=args.quick, kind=args.kind or "sampled")
    run_text_demo(config, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
