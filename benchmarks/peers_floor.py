"""The frameworks' own floors on the peers' problems (issue 25 item 4): what a forward and
backward pass costs in TensorFlow and in PyTorch on the same model, weights and data,
beside the KFAC members of :mod:`benchmarks.peers_kfac`.

Members, in one process: ``tf`` and ``tf_xla`` (:func:`benchmarks.problems.floor_function`:
a compiled forward+backward of the mean loss, its last gradient read back), ``torch`` (the
PyTorch twin's forward, ``loss.backward()``, gradients cleared each call), and the
empirical-kind KFAC members ``fastewc``, ``kernel`` and ``asdl``.  Rotating rounds with the
ring reversed every ``len(members)`` rounds, as in ``peers_kfac``; medians, and each
member's median over the faster TensorFlow floor and over the torch floor.  A KFAC member
cannot cost less than its framework's forward and backward pass, so where torch's floor is
below TensorFlow's by more than a TensorFlow member's margin over the kernel, that gap
bounds "faster than every peer".

    .venv-peers/bin/python -m benchmarks.peers_floor [--problem mlp] [--rounds 40]
"""
import argparse
import statistics
import time

import tensorflow as tf

from benchmarks import peers_kfac, problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(peers_kfac.threads())
    group = peers_kfac.Group(args.problem, "empirical")
    x, y = tf.constant(group.x), tf.constant(group.y)
    floors = {"tf": problems.floor_function(group.model, False), "tf_xla": problems.floor_function(group.model, True)}
    loss = torch.nn.CrossEntropyLoss()

    def torch_floor():
        for p in group.params:
            p.grad = None
        loss(group.twin(group.xt), group.yt).backward()
        return group.params[-1].grad.numpy()

    members = {"tf": lambda: floors["tf"](x, y), "tf_xla": lambda: floors["tf_xla"](x, y), "torch": torch_floor,
               "fastewc": group.fastewc, "kernel": group.kernel_call, "asdl": group.asdl}
    for fn in members.values():           # first calls and a warm-up round
        fn()
        fn()
    order = list(members)
    times = {k: [] for k in members}
    for r in range(args.rounds):
        ring = order if (r // len(order)) % 2 == 0 else order[::-1]
        for k in ring[r % len(order):] + ring[:r % len(order)]:
            start = time.perf_counter()
            members[k]()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    tf_floor = min(med["tf"], med["tf_xla"])
    print(f"{args.problem}, {group.n} examples, {args.rounds} rounds, threads {peers_kfac.threads()}")
    print("| member | median ms | ÷ TF floor | ÷ torch floor |")
    print("|---|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / tf_floor:.2f} | {v / med['torch']:.2f} |")


if __name__ == "__main__":
    main()
