"""``tf.distribute`` support for the Fisher: split a batch over replicas, sum the results.

The Fisher is a mean of per-example terms, so a batch's sum S = Σ_n w_n Σ_k W_kn g_kn²
splits exactly over any partition of the rows: replica r computes S_r on rows
[r·B/R, (r+1)·B/R) and ``strategy.reduce(SUM)`` gives S = Σ_r S_r (an all-reduce across
workers under ``MultiWorkerMirroredStrategy``, so every worker gets the same S).  The 0/1
padding mask travels with its rows, so a padded final batch stays exact.  The only
difference from one device is the float32 summation order inside S.

Every worker passes the same batch (the same ``data``); each takes its own replicas'
rows.  :func:`run_fisher_batch` is what a Fisher engine calls per batch when a strategy
with more than one replica is in scope; the replicated functions live in the engine's own
``cache`` (as long as the engine), keyed by strategy.
"""
import tensorflow as tf


def num_replicas():
    """Replicas in sync of the strategy in scope (1 without one)."""
    if not tf.distribute.has_strategy():
        return 1
    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def split_rows(strategy, nest, axis=0):
    """Distributed values giving replica r rows [r·N/R, (r+1)·N/R) along ``axis``."""
    replicas = strategy.num_replicas_in_sync

    def for_replica(ctx):
        r = ctx.replica_id_in_sync_group

        def piece(t):
            n = tf.shape(t)[axis]
            begin = r * n // replicas
            size = (r + 1) * n // replicas - begin
            return tf.gather(t, tf.range(begin, begin + size), axis=axis)

        return tf.nest.map_structure(piece, nest)

    return strategy.experimental_distribute_values_from_function(for_replica)


def run_fisher_batch(cache, fn, x, y, mask, noise):
    """``fn(x, y, mask, noise)`` (a Fisher batch function returning a
    :class:`fastewc.engines.base.BatchSums`) run on each replica's share of the rows: its
    sums and id counts summed over replicas, its output range the replicas' widest.  ``cache`` is the caller's
    dict for the replicated function of each strategy.

    ``noise`` is split along its example axis (axis 1) when it has one (kind="sampled"),
    and passed whole otherwise.
    """
    strategy = tf.distribute.get_strategy()
    owner, replicated = cache.get(id(strategy), (None, None))
    if owner is not strategy:
        def replicated_fn(x, y, mask, noise):
            dx, dy, dmask = split_rows(strategy, (x, y, mask))
            dnoise = split_rows(strategy, noise, axis=1) if noise.shape.rank >= 2 else noise
            # A Python callable, not the tf.function itself: strategy.run would wrap a
            # tf.function around BOTH replicas and XLA would then span two devices.
            results = strategy.run(lambda *args: fn(*args), args=(dx, dy, dmask, dnoise))
            total = lambda s: strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None)  # noqa: E731
            ranges = strategy.gather(strategy.run(lambda r: r[None], args=(results.output_range,)), axis=0)
            return results._replace(sums=tf.nest.map_structure(total, results.sums),
                                    bad_ids=[total(c) for c in results.bad_ids],
                                    output_range=tf.stack([tf.reduce_min(ranges[:, 0]), tf.reduce_max(ranges[:, 1])]))

        replicated = tf.function(replicated_fn, autograph=False)
        cache[id(strategy)] = (strategy, replicated)
    return replicated(x, y, mask, noise)
