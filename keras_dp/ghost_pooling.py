"""Which embedding lookups the loss reads only through one sum over their positions.

A lookup ``out_t = table[id_t]`` whose output the loss reads only as Σ_t w_t·out_t,
with weights that are the same for every feature (``GlobalAveragePooling1D``, masked
or not; ``ops.mean`` or ``ops.sum`` over the tokens; ``SpatialDropout1D`` before
them, which scales each feature alike at every position), gets at every position the
gradient g_t = w_t·u: one vector u per example, scaled. Example b's table gradient
A_b = Σ_t onehot(id_t) ⊗ g_t then has

    ‖A_b‖² = Σ_v ‖Σ_{t: id_t = v} g_t‖² = Σ_v (Σ_{t: id_t = v} ‖g_t‖)²

when the weights are not negative (an average's are not): the norm needs only each
position's ‖g_t‖, the forms of :mod:`keras_dp.ghost_embedding` over one feature instead
of d (the text classifier of ``benchmarks/``, 64 tokens × 64 features: its compiled
step 2.84× → 1.81× plain Keras', ``benchmarks/step_parts.py`` on 2 CPU cores). The
right-hand side bounds the norm from above for *any* gradients (the triangle
inequality, row by row), so the privacy guarantee never rests on this module: a
structure it misreads can only clip an example more than it needs to, never less.

Decided on the plan's trace of one example (:func:`keras_dp.ghost.plan`), where the
lookup's output is marked with ``checkpoint_name`` (:func:`tag`): a walk over the
jaxpr that follows the marked value to one ``reduce_sum`` over all of its positions,
through casts, sums with values that do not depend on it, selections by masks that
are constant across the features or across the positions, and products or quotients
by values constant across the positions (a scale per feature, any sign) or constant
across the features and never negative (a scale per position: iota, a cast mask, a
positive constant; a signed one would make the bound loose). A second use, any other
operation, a loop, a branch or a custom derivative on the way: not pooled.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
from jax.extend.core import Literal

logger = logging.getLogger(__name__)

POOLED = "pooled"
# Operations that carry each position on (a sign change is the same for all of them).
_CARRY = {"convert_element_type", "copy", "neg", "reduce_precision", "name"}
_CALLS = {"pjit", "jit", "closed_call", "core_call"}
# Element-wise operations: their result is constant along an axis where every operand is.
_ELEMENTWISE = _CARRY | {
    "mul", "div", "select_n", "add", "sub", "eq", "ne", "lt", "le", "gt", "ge", "and",
    "or", "not", "xor", "max", "min", "abs", "sign", "exp", "log", "sqrt", "rsqrt",
    "integer_pow", "pow",
}  # fmt: skip
# Results never negative, and those never negative when their operands are not (for
# select_n: its cases).
_NONNEG = {"abs", "exp", "sqrt", "rsqrt", "iota"}
_NONNEG_OF = {
    "convert_element_type", "copy", "name", "broadcast_in_dim", "reshape", "squeeze",
    "transpose", "expand_dims", "concatenate", "reduce_sum", "reduce_max", "reduce_min",
    "mul", "div", "add", "max", "min", "select_n",
}  # fmt: skip


class _Known(collections.namedtuple("_Known", "axes nonneg")):
    """What is known of a value independent of the marked one: the axes along which it
    is constant, and whether it is never negative."""


_UNKNOWN = _Known(frozenset(), False)


class _NotPooled(Exception):
    pass


def tag(index: int) -> str:
    """The ``checkpoint_name`` that marks tap ``index``'s output in the plan's trace."""
    return f"keras_dp_tap_{index}"


def is_pooled(jaxpr, name: str) -> bool:
    """Whether the value marked ``name`` reaches ``jaxpr``'s outputs only through one
    sum over all of its positions, each position scaled by a number ≥ 0 that is the
    same for all its features (its last axis), and each feature by any number that is
    the same at all positions."""
    try:
        facts, _, found = _walk(jaxpr, name, [None] * len(jaxpr.invars), {})
    except _NotPooled:
        return False
    except (AttributeError, IndexError, KeyError, TypeError):  # a structure not foreseen
        logger.debug("ghost_pooling: %s left unpooled (an unforeseen trace).", name, exc_info=True)
        return False
    return found and all(f in (None, POOLED) for f in facts)


def _walk(jaxpr, name, in_facts, in_known) -> tuple:
    """(the outputs' facts, what is known of the independent ones, whether ``name``
    was seen).

    A fact is None (independent of the marked value), ``("copy", axis)`` (the marked
    value, scaled as :func:`is_pooled` allows, its features on ``axis``) or
    :data:`POOLED` (a function of one such sum of it). ``known`` maps independent
    values to their :class:`_Known`."""
    eqns = live_eqns(jaxpr)
    uses = collections.Counter(
        v for e in eqns for v in e.invars if not isinstance(v, Literal)
    ) + collections.Counter(v for v in jaxpr.outvars if not isinstance(v, Literal))
    fact = dict(zip(jaxpr.invars, in_facts))
    known = dict(in_known)
    found = False
    for eqn in eqns:
        ins = [None if isinstance(v, Literal) else fact.get(v) for v in eqn.invars]
        prim = eqn.primitive.name
        if prim == "name" and eqn.params.get("name") == name:
            fact[eqn.outvars[0]] = ("copy", len(eqn.outvars[0].aval.shape) - 1)
            found = True
            continue
        if prim in _CALLS:
            if any(uses[v] != 1 for v, f in zip(eqn.invars, ins) if isinstance(f, tuple)):
                raise _NotPooled
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's
            inner_known = {
                iv: known[v]
                for iv, v in zip(inner.invars, eqn.invars)
                if not isinstance(v, Literal) and v in known
            }
            outs, out_known, seen = _walk(inner, name, ins, inner_known)
            found = found or seen
            for o, io, f in zip(eqn.outvars, inner.outvars, outs):
                fact[o] = f
                if f is None and not isinstance(io, Literal) and io in out_known:
                    known[o] = out_known[io]
            continue
        deps = [f for f in ins if f is not None]
        if not deps:
            for o in eqn.outvars:
                known[o] = _known_of(eqn, known)
            continue
        copies = [i for i, f in enumerate(ins) if isinstance(f, tuple)]
        if not copies:  # only functions of the sum: so is the result
            for o in eqn.outvars:
                fact[o] = POOLED
            continue
        if len(deps) != 1 or uses[eqn.invars[copies[0]]] != 1:
            raise _NotPooled
        fact[eqn.outvars[0]] = _carried(eqn, copies[0], ins[copies[0]][1], known)
    out = [None if isinstance(v, Literal) else fact.get(v) for v in jaxpr.outvars]
    out_known = {v: known[v] for v in jaxpr.outvars if not isinstance(v, Literal) and v in known}
    return out, out_known, found


def _carried(eqn, i: int, axis: int, known):
    """The fact of ``eqn``'s result, whose operand ``i`` is the marked value (features on
    ``axis``); raises where the structure is lost."""
    prim, value = eqn.primitive.name, eqn.invars[i]
    shape = value.aval.shape
    others = [v for j, v in enumerate(eqn.invars) if j != i]
    if prim == "reduce_sum":
        axes = set(eqn.params["axes"])
        positions = [a for a in range(len(shape)) if a != axis and shape[a] > 1]
        if axis in axes or not set(positions) <= axes:
            raise _NotPooled
        return POOLED
    if len(eqn.outvars) != 1 or eqn.outvars[0].aval.shape != shape:
        raise _NotPooled
    if prim in _CARRY or prim in ("add", "sub"):  # a shift: the gradient passes as it is
        return ("copy", axis)
    if prim == "select_n" and i > 0:  # a position or feature kept or not: a 0/1 scale
        if _by_position(others[0], axis, known) or _by_feature(others[0], axis, known):
            return ("copy", axis)
    if prim == "mul" or (prim == "div" and i == 0):
        scale = others[0]
        if _by_feature(scale, axis, known) or (
            _by_position(scale, axis, known) and _nonneg(scale, known)
        ):
            return ("copy", axis)
    raise _NotPooled


def _by_position(v, axis: int, known) -> bool:
    """Whether ``v`` is the same across ``axis`` (the features): a scale per position."""
    return _flat_along(v, axis, known)


def _by_feature(v, axis: int, known) -> bool:
    """Whether ``v`` is the same at every position: a scale per feature (any sign)."""
    return all(_flat_along(v, a, known) for a in range(len(v.aval.shape)) if a != axis)


def _flat_along(v, axis: int, known) -> bool:
    shape = v.aval.shape
    if isinstance(v, Literal) or shape == () or shape[axis] == 1:
        return True
    return axis in known.get(v, _UNKNOWN).axes


def _nonneg(v, known) -> bool:
    if isinstance(v, Literal):
        return bool(np.all(np.asarray(v.val) >= 0))
    return v.aval.dtype == np.bool_ or known.get(v, _UNKNOWN).nonneg


def _known_of(eqn, known) -> _Known:
    """What is known of ``eqn``'s (first) result, all of whose operands are independent."""
    if not eqn.outvars or not hasattr(eqn.outvars[0].aval, "shape"):
        return _UNKNOWN
    out = eqn.outvars[0].aval.shape
    prim = eqn.primitive.name
    operands = [v for v in eqn.invars if not isinstance(v, Literal)]
    cases = eqn.invars[1:] if prim == "select_n" else eqn.invars
    nonneg = prim in _NONNEG or (prim in _NONNEG_OF and all(_nonneg(v, known) for v in cases))
    if prim == "broadcast_in_dim":
        dims = eqn.params["broadcast_dimensions"]
        mapped = dict(zip(dims, range(len(dims))))
        axes = (
            a
            for a in range(len(out))
            if a not in mapped or _flat_along(eqn.invars[0], mapped[a], known)
        )
    elif prim in _ELEMENTWISE and all(len(v.aval.shape) in (0, len(out)) for v in operands):
        axes = (a for a in range(len(out)) if all(_flat_along(v, a, known) for v in operands))
    else:
        axes = ()
    return _Known(frozenset(axes), nonneg)


def live_eqns(jaxpr) -> list:
    """``jaxpr``'s equations that its outputs depend on, or that have effects (dead code
    left out), in order."""
    live = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(o in live for o in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
    return kept[::-1]
