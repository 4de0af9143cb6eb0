"""Which model variables an EWC penalizes, and how its state's keys resolve against them.

Variables are tracked by path (``variable.path`` with the model's own name stripped, so a
model that is rebuilt under another auto-generated name still matches).  The tracked set
is the model's trainable variables, minus ``exclude``, when the state is created (at
construction, or at the first consolidation of an unbuilt model); variables that appear
later (a new task head) start with zero state (not penalized) and enter at the next
consolidation.  A tracked variable missing from the model, or with another shape, is an
error naming it.

:meth:`Tracking.plan` resolves the state's blocks against the model's current variables
(:class:`PenaltyPlan`, cached until the model's variables or the state's structure change);
:meth:`Tracking.restore_target` is the model variable a checkpoint's key restores into.
"""
from typing import NamedTuple

import keras
import tensorflow as tf

from fastewc._checks import check_model
from fastewc.blocks import KINDS
from fastewc.blocks.task import shape_of
from fastewc.blocks.penalty import PlanBlock


def relative_path(model, variable):
    """``variable.path`` without the leading ``model.name + "/"`` (EWC's key)."""
    path = getattr(variable, "path", None) or variable.name
    prefix = model.name + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


class PenaltyPlan(NamedTuple):
    """What a penalty evaluation reads, resolved against the model's current variables."""
    blocks: list      # [PlanBlock]: every block of the state, in state order
    trainable: list   # model.trainable_variables: the order gradients are returned in


_NO_PLAN = PenaltyPlan([], [])


class Tracking:
    """The model, the ``exclude`` predicate and the key of each variable."""

    def __init__(self, model, exclude):
        self.model = check_model(model, built=False, trainable=False)
        self.exclude = self._predicate(exclude)
        self._plan = None

    def move_to(self, model, tracked):
        """Track ``model`` instead (a model that contains the ``tracked`` keys, e.g. rebuilt
        with a new head on the same layers), or raise and keep the previous one."""
        check_model(model, built=False, trainable=False)
        previous, self.model = self.model, model
        self.invalidate()
        try:
            if model.built:
                self.check_present(tracked)
        except ValueError:
            self.model = previous
            raise

    def key(self, variable):
        return relative_path(self.model, variable)

    def by_key(self):
        """``{key: model variable}`` of every variable of the model (the first of a path)."""
        out = {}
        for v in self.model.variables:
            out.setdefault(self.key(v), v)
        return out

    def excluded_paths(self):
        return sorted(self.key(v) for v in self.model.variables if self.exclude(v)) if self.model.built else []

    def _predicate(self, exclude):
        if exclude is None:
            return lambda variable: False
        if callable(exclude) and not isinstance(exclude, (list, tuple, set)):
            return exclude
        if isinstance(exclude, (str, tf.Variable, keras.Variable)):
            exclude = [exclude]
        if not isinstance(exclude, (list, tuple, set)):
            raise ValueError(
                "`exclude` must be None, a list of variables or paths, or a predicate "
                f"fn(variable) -> bool. Received: exclude={exclude!r}")
        items = list(exclude)
        ids = {id(item) for item in items if not isinstance(item, str)}
        names = {item for item in items if isinstance(item, str)}
        for item in items:
            if not isinstance(item, (str, tf.Variable, keras.Variable)):
                raise ValueError(
                    "`exclude` entries must be variables or variable paths. Received: "
                    f"an entry {item!r} of type {type(item).__name__}")
        model = self.model
        if model.built:
            known = set()
            for v in model.variables:
                known |= {id(v), v.path, self.key(v)}
            unknown = [item if isinstance(item, str) else getattr(item, "path", item)
                       for item in items if (item if isinstance(item, str) else id(item)) not in known]
            if unknown:
                raise ValueError(
                    f"`exclude` names variables that model '{model.name}' does not have: "
                    f"{unknown}. Received: exclude={[getattr(i, 'path', i) for i in items]!r}")
        return lambda v: id(v) in ids or v.path in names or self.key(v) in names

    def new_trainable(self, tracked):
        """Trainable, not excluded variables of the model whose key is not in ``tracked``,
        in model order; a ValueError if two trainable variables share a path."""
        keys = [self.key(v) for v in self.model.trainable_variables]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"EWC tracks variables by path, but model '{self.model.name}' has "
                             f"several trainable variables with the same path: {dupes}")
        out, seen = [], set(tracked)
        for v, key in zip(self.model.trainable_variables, keys):
            if key in seen or self.exclude(v):
                continue
            seen.add(key)
            out.append(v)
        return out

    def check_present(self, tracked, by_key=None):
        """The model variable of each key of ``tracked`` (``{key: [A, μ]}``); a clear error
        for the first missing one or one of another shape."""
        by_key = self.by_key() if by_key is None else by_key
        found = []
        for key, fields in tracked.items():
            v, shape = by_key.get(key), shape_of(fields[0])
            if v is None:
                raise ValueError(
                    f"EWC state tracks variable '{key}' (shape {shape}), but model "
                    f"'{self.model.name}' has no variable with that path. Every variable the EWC "
                    "tracks must stay in its model (for one head of a multi-output model, keep the "
                    "EWC on the whole model and pass the head to ewc.consolidate(data, loss=..., "
                    "model=keras.Model(full.inputs, full.outputs[i]))); to drop a variable, build "
                    "a new EWC.")
            if shape_of(v) != shape:
                raise ValueError(
                    f"Variable '{v.path}' has shape {shape_of(v)}, but the EWC state tracks it with "
                    f"shape {shape}. A tracked variable must keep its shape; to change it, "
                    "build a new EWC.")
            found.append(v)
        return found

    def restore_target(self, key, what):
        """The model variable of a checkpoint's ``key``, or a ValueError (the model is not
        built, or has no such variable)."""
        model = self.model
        if not model.built:
            raise ValueError(
                f"Cannot restore the {what} of variable '{key}' from the checkpoint: "
                f"model '{model.name}' is not built, so the EWC has no variable to restore "
                "it into. Build the model first (call it on a batch, or "
                "model.build(input_shape)), then restore.")
        v = self.by_key().get(key)
        if v is None:
            raise ValueError(
                f"Cannot restore the {what} of variable '{key}' from the checkpoint: "
                f"model '{model.name}' has no variable with that path. Add it to the model "
                "(e.g. the task head it was saved with) before restoring.")
        return v

    def task_model(self, model):
        """The model a task's Fisher is over: the EWC's model (``model`` None), or a
        sub-model whose trainable variables are all trainable variables of it (the same
        objects: built on its layers), else a ValueError naming the first one that is not."""
        if model is None or model is self.model:
            return check_model(self.model, trainable=False)
        check_model(model, trainable=False, layer_ok=False)
        ours = {id(v) for v in check_model(self.model, trainable=False).trainable_variables}
        foreign = [v for v in model.trainable_variables if id(v) not in ours]
        if foreign:
            raise ValueError(
                f"`model` must be a sub-model of this EWC's model '{self.model.name}', built on its "
                "layers (e.g. one head: keras.Model(full.inputs, full.outputs[i])). Received: "
                f"model '{model.name}', whose trainable variable '{foreign[0].path}' is not a "
                f"trainable variable of '{self.model.name}' ({len(foreign)} such variables).")
        return model

    # -- the plan ------------------------------------------------------------------------
    def invalidate(self):
        """Forget the cached plan (the model, the tracked set or the blocks changed)."""
        self._plan = None

    def plan(self, state, tracked_kind, token):
        """The :class:`PenaltyPlan` of ``state``, cached until the model's variables or
        ``token`` (the state's structure) change; checks the tracked variables present."""
        model = self.model
        signature = (tuple(id(v) for v in model.variables), tuple(id(v) for v in model.trainable_variables),
                     token)
        if self._plan is not None and self._plan[0] == signature:
            return self._plan[1]
        if not model.built:
            plan = _NO_PLAN
        else:
            by_key = self.by_key()
            self.check_present(state.variables(tracked_kind), by_key)
            blocks = [PlanBlock(kind, kind.model_variables(key, by_key), fields, kind.model_variables(key, by_key)[0].path)
                      for kind in KINDS.values() for key, fields in state.variables(kind).items()]
            plan = PenaltyPlan(blocks, list(model.trainable_variables))
        self._plan = (signature, plan)
        return plan
