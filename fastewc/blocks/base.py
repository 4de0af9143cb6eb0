"""The block interface every curvature kind implements (:mod:`fastewc.blocks`).

A kind has two halves: the estimation half (instances made by the plan, used by the
engines and the estimator) and the state half (static methods used by the EWC's store,
penalty and file).  Each is described below.
"""


class Block:
    """One block of curvature over ``variables`` (model variables, in the model's order).

    A kind is a subclass; a block is an instance, made by the plan
    (:class:`fastewc.blocks.plan.BlockPlan`) once per estimator plan.
    """
    kind = None                  # the curvature name: a key of fastewc.blocks.KINDS

    # -- estimation half (engines, estimator, plan) -----------------------------------
    # Per batch an engine forms each block's sums, Σ over the batch's rows of the kind's
    # per-example quantities (not yet divided by the examples N); a one-batch call divides
    # them by N in float32 (fastewc.engines.base.mean), a longer one folds them into
    # float64 totals (fastewc.engines.base.fold: the small sums as one flat vector, each
    # large sum alone); at the end of a call each
    # block gets its means (sums / N, float32) to finish.
    #
    # Class attributes (the kind's properties, read by the plan, never branched on):
    rules_only = None            # None, or why this kind's sums come only from rules'
    #                              outputs: the plan then needs a rule for every weighted
    #                              layer and the factored engine
    dense_sums = False           # True: its sums are dense matrices (d'² floats, not one
    #                              per parameter): a call takes rows enough to amortize
    #                              the fold of a call of several batches
    xla_on_cpu = True            # False: jit_compile=None never means XLA on CPU for a
    #                              plan that has blocks of this kind
    shared_layer_refusal = None  # why this kind cannot take a layer called twice in one
    #                              forward pass (the error says it), or None
    passes = 1                   # 2: its estimate needs a second pass over the same data,
    #                              whose sums use the first pass's part (second_pass)
    own_sums = False             # True: the engine asks the BLOCK's rule_sums (an instance
    #                              method: a second-pass block's sums use its own state),
    #                              not its kind's
    per_cotangent = False        # True: rule_sums also takes the deltas as a list of the K
    #                              cotangents' (N, *probe) tensors (the factored engine's
    #                              unrolled backward passes, not stacked: no copy of them)
    sums_over_cotangents = None  # per sum, in order: True where it is a sum over the K
    #                              cotangents of one cotangent's part, Σ_k s(δ_k) (formed
    #                              per cotangent and added, e.g. in the factored engine's
    #                              loop over them), False where it does not depend on the
    #                              deltas (formed once); None: not said (never looped)
    scales_sums = False          # True: rule_sums takes ``scale`` (a float32 scalar) and
    #                              returns its sums times it: a one-batch call passes 1/N
    #                              and its sums are the means, with no pass to divide them
    # Per block (set by the kind's constructor):
    variables = ()               # the model variables it covers
    sum_shapes = ()              # the shapes of its per-batch sums, in order
    sum_names = ()               # one name per sum, for messages
    gram_sums = ()               # per sum, True for a Gram matrix Σ_r c_r x_r x_rᵀ (c_r ≥ 0):
    #                              finite where its diagonal is (engines.base.all_finite);
    #                              missing entries are False

    @property
    def key(self):
        """The block's name in a batch's sums: (kind, id of its first variable)."""
        return (self.kind, id(self.variables[0]))

    @classmethod
    def blocks_of(cls, layer, result):
        """The blocks of this kind a layer's :class:`fastewc.registry.RuleOutput` gives,
        at planning (one eager pass of one example); the diagonal covers what no block of
        the chosen kind does."""
        return []

    @classmethod
    def rule_sums(cls, result, delta, weight, mask):
        """``{block key: tuple of sums}`` of this kind's blocks in one layer, from its
        rule's output ``result``, its float32 deltas (K, N, *probe), the cotangents'
        ``weight`` (K, N) and the rows' 0/1 ``mask`` (N,) (the factored engine); a kind
        with ``scales_sums`` also takes ``scale=`` (None: 1), one with ``per_cotangent``
        the deltas as a list of K (N, *probe) tensors too."""
        raise NotImplementedError

    def gradient_sums(self, squares):
        """The block's sums from ``squares``: ``{id(variable): Σ_n Σ_k W_kn g_kn²}`` of the
        per-example gradients (the vmap, jacobian and loop engines)."""
        raise NotImplementedError(f"curvature={self.kind!r} needs the factored rules' sums")

    def finish(self, means):
        """Its part of the result from the means of its sums (float32, in order)."""
        raise NotImplementedError

    def second_pass(self):
        """A kind with ``passes = 2``: this block's block of the second pass (made once per
        plan, :meth:`fastewc.blocks.plan.BlockPlan.second_plan`).  That block has
        ``own_sums`` and its ``sum_shapes`` / ``sum_names``; ``prepare(first)`` gives it
        this block's first-pass part before each second pass (a traced pass reads it from
        variables: no retrace per call); ``rule_sums(result, delta, weight, mask)`` (an
        instance method) forms its sums from a rule's output, e.g. the per-example rows
        of :class:`fastewc.contract.KroneckerSums`; ``finish(means, first)`` is this
        block's final part."""
        raise NotImplementedError(f"curvature={self.kind!r} has one estimation pass")

    @classmethod
    def assemble(cls, blocks, parts, variables):
        """The estimate a plan of this kind returns (a public type), from every block's
        part (aligned with ``blocks``) and the model's trainable ``variables``."""
        raise NotImplementedError

    @classmethod
    def check_memory(cls, plan, device_bytes):
        """Raise before any pass when this kind's blocks of ``plan`` would not fit a device
        of ``device_bytes`` (a diagonal always does: it is as large as the model)."""

    # -- file version (the state half's one default, read by fastewc.ewc_file) ---------------
    FILE_VERSION = None          # the first file version that holds this kind's section

    @classmethod
    def file_versions(cls):
        """Every file version a section of this kind is written at (the reader reads their
        union over the kinds): ``(FILE_VERSION,)`` unless a kind's section grew."""
        return (cls.FILE_VERSION,)

    @classmethod
    def file_version(cls, section):
        """The file version ``section`` needs (one of :meth:`file_versions`): a file is
        written at the largest over its sections, so a section that does not use what a
        newer version added keeps the version old readers read."""
        return cls.FILE_VERSION


# -- state half (EWC: state, merge, penalty, file, checkpoint) -------------------------------
# A kind's state methods are static (a block, on the EWC side, is its ``key`` and its
# values).  A block's state is a flat list of float32 tensors (``fields``), stored by
# :class:`fastewc.blocks.store.State` as tf.Variables, each checkpointed at one address
# ``(table, table key)`` of the kind's ``TABLES``:
#
# * ``OPTIONS``: the EWC options it reads; ``MODES``: the EWC modes it takes; ``METHOD`` /
#   ``TITLE``: the prefix and title of its methods in the demo ("kfac_online": "KFAC-EWC
#   (online)", :mod:`fastewc.demo.run`); ``TABLES``: ``{table: checkpoint path}``;
#   ``FILE_FIELD`` / ``FILE_VERSION``: its section's name in :class:`fastewc.ewc_file.EWCFile` and
#   the first file version that holds it (the reader asks a kind for its section from that
#   version on); ``file_version(section)`` / ``file_versions()`` (defaults above): the version
#   a section is written at and all of them.
# * ``check_result(result, source, tracking)``: refuse a Fisher result it cannot use;
#   ``estimate(result, source, tracking)`` → ``{key: estimate}`` of a task.
# * ``merge(current, task, settings, tracking)`` → ``({key: fields}, Δc)``: pure (nothing
#   assigned), every block the task changes, raising (naming the variable or layer) for an
#   estimate or a result float32 cannot hold.
# * ``penalty(thetas, fields, lam, damping)`` → ``(value, [gradient per theta])``, traced
#   inline into the one compiled penalty (:mod:`fastewc.blocks.penalty`); ``explain(thetas,
#   fields, lam)`` says why a value is not finite.
# * ``model_variables(key, by_key)``, ``label(key)``, ``num_terms(fields)``,
#   ``snapshot(blocks)``: the block's variables, name, terms and public copy.
# * ``addresses(key, n)``, ``from_checkpoint(tables, tracking, current)``: checkpoint keys
#   and the checked restore; ``to_file`` / ``from_file``, ``file_arrays`` /
#   ``file_shapes`` / ``read_file_arrays``: the file section.
#   (Their task types and helpers: :mod:`fastewc.blocks.task`.)
