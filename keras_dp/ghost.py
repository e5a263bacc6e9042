"""Ghost clipping for Keras models: which variables get their norms from activations.

``DPConfig(clipping="ghost")`` (and ``"auto"``) computes the per-example gradient
norm of the kernels (and biases) of ``Dense``, ``EinsumDense`` (also with LoRA
enabled), ``Embedding`` (a tied ``ReversibleEmbedding``'s table through both its
reads), ``Conv1D/2D/3D`` (``"causal"`` and grouped too), ``DepthwiseConv1D/2D`` and
``SeparableConv1D/2D`` layers from each layer's input and the
gradient at its output (:mod:`keras_dp.ghost_norms`), and their clipped sum as one contraction over
the examples: no per-example gradient of those variables is formed, except where it is
the cheaper form of its norm (:mod:`keras_dp.ghost_tap`: it is then kept for the
sum). An embedding that the loss reads only through a sum over its positions (an
average, masked or not) takes its norm from each position's gradient norm
(:mod:`keras_dp.ghost_pooling`). Every other
trainable variable (normalisation scales, anything a
layer reads in a way this module does not know) gets per-example gradients in the
same backward pass, and its squared norm is added: the clip bound C holds for the
whole gradient.

How a layer is seen, without patching any class: while the DP step is traced, each
supported layer *instance* gets a ``call`` attribute (removed right after) that does
exactly what its class's ``call`` does, and in addition adds a zero "tap" at the
output of the linear map (whose gradient is g) and keeps the map's input. A layer is
supported only when its class's ``call`` is Keras' own (a subclass that overrides
``call`` keeps its own) and it is not quantized.

A variable's norm is ghost only when it is safe, checked on a trace of one example:
it is tapped exactly once, or its taps are a tied embedding's lookups and reversed reads
(whose cross term :func:`keras_dp.ghost_tap.cross_terms` adds) or einsums of one
structure, convolutions or lookups (a layer called more than once: the norm is one
einsum's or lookup's over all their positions, :func:`keras_dp.ghost_tap.cross_terms`),
outside any loop, map or branch the call traces (``ops.scan``, ``keras.layers.RNN``'s
cell, ``ops.vectorized_map``, ``ops.cond``: a tap there would see only that body's
values), the call has not assigned it before the tap reads it (``SpectralNormalization``
normalises its kernel in place), and the loss reads it nowhere else (a regulariser, a
custom layer reading another's kernel): its per-example gradient is then exactly the
tap's (a tied table's or a shared kernel's: the sum of its taps').
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.extend.core import Literal

try:
    from jax.extend.core import get_opaque_trace_state
except ImportError:  # jax 0.7-0.8 have it only internally (the same function)
    from jax._src.core import get_opaque_trace_state

from keras_dp import _backend, _keras, ghost_cost, ghost_layers, ghost_pooling
from keras_dp import ghost_embedding as ge
from keras_dp.ghost_tap import Tap, norm_costs

logger = logging.getLogger(__name__)

CLIPPINGS = ("auto", "ghost", "per_example")


def likely_per_example_size(model) -> int:
    """Trainable parameters that will get per-example gradients under ghost clipping,
    as far as the layer types tell before any trace (to size chunks on accelerators):
    those of layers without a ghost rule."""
    ghostable = set()
    for layer in _keras.sublayers(model):
        if ghost_layers.rule(layer) is not None:
            ghostable.update(id(v) for v in layer.trainable_variables)
    return sum(math.prod(v.shape) for v in model.trainable_variables if id(v) not in ghostable)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which trainable variables are ghost, and every tap of the trace in order.

    Attributes:
      taps: Every tap of one example's forward pass, in trace order.
      ghost: Indices of the trainable variables whose norm and sum come from taps.
      fallback: Paths of the trainable variables that get per-example gradients.
      flops: Floating-point operations of one example's forward pass (its matrix
        products and convolutions).
      fallback_size: Parameters among the fallback variables.
      fallback_convolved: Whether one of them reaches a convolution's kernel operand.
    """

    taps: tuple
    ghost: frozenset
    fallback: tuple
    flops: int = 0
    fallback_size: int = 0
    fallback_convolved: bool = False

    @property
    def active(self) -> tuple:
        return tuple(t for t in self.taps if t.active)


class Tape:
    """The taps of one trace: recording (planning) or applying (training)."""

    layers = None  # the ghost rules it installs (None: every one)

    def __init__(self, model, values, plan: Plan | None = None, zs=None):
        self.model = model
        self.values = values
        self.plan = plan
        self.zs = list(zs) if zs is not None else None
        self.keras_values = values  # what Keras' own reads start from
        self.trace = None  # the trace the call runs in (set when installed)
        self.index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        self.taps = []
        self.residuals = []
        self.count = 0

    def _ghost(self, variable) -> bool:
        i = self.index.get(id(variable))
        return i is not None and (self.plan is None or i in self.plan.ghost)

    def read(self, variable):
        """The variable as the layer's ``call`` sees it: the tape's value when its norm
        may come from a tap, otherwise Keras' own read (also once the call has assigned
        it: its norm is then not a tap's, and the plan sees the read)."""
        if not self._ghost(variable):
            return variable
        i = self.index[id(variable)]
        if _keras.assigned_in_call(variable, self.keras_values[i]):
            return variable
        value = self.values[i]
        dtype = variable.value.dtype  # what Keras' read would give (autocast included)
        return value if value.dtype == dtype else value.astype(dtype)

    def tap(self, layer, out, x, kind, spec=None, kernel=None, bias=None):
        """``out`` (+ the tap's zero perturbation while training); keeps ``x``."""
        k = self.count
        self.count += 1
        if self.plan is None:
            index = lambda v: None if v is None else self.index.get(id(v))  # noqa: E731
            self.taps.append(
                Tap(
                    kind,
                    spec,
                    index(kernel),
                    index(bias),
                    tuple(kernel.shape) if kernel is not None else (),
                    tuple(bias.shape) if bias is not None else (),
                    jax.ShapeDtypeStruct(out.shape, out.dtype),
                    layer.path,
                    nested=get_opaque_trace_state() != self.trace,
                )
            )
            if kind == "embedding":  # for ghost_pooling, in the plan's trace only
                out = checkpoint_name(out, ghost_pooling.tag(k))
            return out
        tap = self.plan.taps[k]
        if not tap.active:
            return out
        self.residuals.append(x if tap.use_kernel else jnp.zeros((), out.dtype))
        return out + self.zs[len(self.residuals) - 1].astype(out.dtype)

    def tap_later(self, layer, out, kind, spec=None, kernel=None):
        """:meth:`tap` of a map whose input is known only after ``out`` is used (a
        recurrent kernel's: the states its loop produces). Returns ``(out', keep)``;
        ``keep(x)`` hands the input to the tap."""
        k = len(self.residuals)
        out = self.tap(layer, out, None, kind, spec, kernel)
        if self.plan is None or len(self.residuals) == k:  # recording, or inactive
            return out, lambda x: None
        if not self.plan.taps[self.count - 1].use_kernel:
            return out, lambda x: None

        def keep(x):
            self.residuals[k] = x

        return out, keep

    @property
    def installed(self):
        self.trace = get_opaque_trace_state()
        calls = {}
        for layer in _keras.sublayers(self.model):
            rule = ghost_layers.rule(layer)
            if rule is not None and (self.layers is None or rule in self.layers):
                calls[layer] = rule(layer, self, type(layer).call.__get__(layer))
        return _keras.installed_calls(calls)


class _Untapped(Tape):
    """Convolutions' rules only, nothing tapped, every variable read as Keras reads it."""

    layers = ghost_layers.conv_rules

    def read(self, variable):
        return variable

    def tap(self, layer, out, x, kind, spec=None, kernel=None, bias=None):
        return out


def per_example_fn(model, unit):
    """``unit`` for the per-example path: on a CPU, with each convolution that has a
    ghost rule computed by :func:`keras_dp.ghost_conv.conv` (its input's gradient a
    canonical convolution, each example's kernel gradient a batched matrix product:
    autodiff's are a grouped convolution, and slow in a chunk loop). The same values;
    a CNN on 32×32×3 images in chunks of 16 on 2 CPU cores: 964 → 44 ms a step."""
    if not _backend.on_cpu() or not any(
        ghost_layers.rule(layer) in _Untapped.layers for layer in _keras.sublayers(model)
    ):
        return unit

    def fn(params, row, index):
        with _Untapped(model, None).installed:
            return unit(params, row, index)

    return fn


def clipping(model, config, unit, trainable, rows) -> tuple:
    """``(example_fn, ghost, plan)`` for a DP step: ``unit`` (as :func:`per_example_fn`
    has it) and no plan when ``config.ghost_clipping`` is False (per-example
    gradients), otherwise the plan made on row 0 and what
    :func:`keras_dp.clipping.clipped_sum` takes. The layers that fall back are logged
    once per model and plan."""
    if not config.ghost_clipping:
        return per_example_fn(model, unit), None, None
    row = jax.tree.map(lambda a: a[0], rows)
    made = plan(model, lambda p: unit(p, row, 0)[0], trainable, config.clipping)
    if config.clipping == "auto" and not ghost_cost.ghost_pays(made, config):
        if getattr(model, "_dp_ghost_logged", None) != "per_example":
            model._dp_ghost_logged = "per_example"
            logger.info(
                "clipping='auto': per-example gradients for every variable (ghost norms "
                "of convolutions over many positions or transposed ones cost more than "
                "the per-example gradients here, on a CPU). clipping='ghost' forces them."
            )
        return per_example_fn(model, unit), None, None
    if made.fallback != getattr(model, "_dp_ghost_logged", None):
        model._dp_ghost_logged = made.fallback
        if made.fallback:
            layers = dict.fromkeys(p.rsplit("/", 1)[0] for p in made.fallback)
            logger.info(
                "Ghost clipping: per-example gradients (not supported, shared, or "
                "cheaper so; their norms are added to the ghost norms) for %d of %d "
                "trainable variables, in %s.",
                len(made.fallback),
                len(trainable),
                ", ".join(layers),
            )
    is_ghost = tuple(i in made.ghost for i in range(len(trainable)))
    return example_fn(model, unit, made), (is_ghost, made.active), made


def plan(model, loss_fn, params, clipping: str) -> Plan:
    """Traces one example's loss (not compiled) and decides which variables are ghost.

    Args:
      model: The Keras model.
      loss_fn: ``params -> loss`` of one example (the row closed over).
      params: The trainable variables' values.
      clipping: "ghost" (every safe variable) or "auto" (those whose ghost norm costs
        no more than forming their per-example gradient; the others get per-example
        gradients in the same pass).
    """
    tape = Tape(model, None)

    def traced(tap_values, keras_values):
        tape.values, tape.keras_values = tap_values, keras_values
        with tape.installed:
            return loss_fn(keras_values)

    closed = jax.make_jaxpr(traced)(list(params), list(params))
    n = len(params)
    live = live_inputs(closed.jaxpr)
    elsewhere = {i for i in range(n) if n + i in live}
    uses = collections.Counter(i for t in tape.taps for i in (t.kernel, t.bias) if i is not None)
    nested = {i for t in tape.taps if t.nested for i in (t.kernel, t.bias)}
    unsafe = elsewhere | nested
    tied = {i for i, c in uses.items() if c > 1 and i not in unsafe and _tied(tape.taps, i)}
    shared = _shared(tape.taps, {i for i, c in uses.items() if c > 1} - unsafe - tied)
    shared |= {i for i in tied if uses[i] > 2}  # each side's norm over its reads
    safe = {i for i, c in uses.items() if c == 1 and i not in unsafe} | tied | shared
    taps = [
        dataclasses.replace(t, pooled=ghost_pooling.is_pooled(closed.jaxpr, ghost_pooling.tag(k)))
        if t.kind == "embedding"
        else t
        for k, t in enumerate(tape.taps)
    ]
    if clipping == "auto":
        safe = {i for i in safe if _cheaper(taps, i)}
    taps = tuple(
        dataclasses.replace(
            t,
            use_kernel=t.kernel in safe,
            use_bias=t.bias in safe,
            tied=t.kernel in tied & safe,
            shared=bool({t.kernel, t.bias} & shared & safe),
        )
        for t in taps
    )
    variables = model.trainable_variables
    fallback = [i for i in range(n) if i not in safe]
    read = fallback + [n + i for i in fallback]  # as the taps and as Keras read them
    return Plan(
        taps,
        frozenset(safe),
        tuple(variables[i].path for i in fallback),
        flops=ghost_cost.flops(closed.jaxpr),
        fallback_size=sum(math.prod(variables[i].shape) for i in fallback),
        fallback_convolved=ghost_cost.reaches_convolution(closed.jaxpr, read),
    )


def _tied(taps, index: int) -> bool:
    """Whether the taps that read variable ``index`` are a table's lookups and its
    reversed reads as logits (:func:`keras_dp.ghost_embedding.ties`): a tied embedding,
    whose norm :func:`keras_dp.ghost_tap.cross_terms` completes."""
    reads = [t for t in taps if index in (t.kernel, t.bias)]
    kinds = {t.kind for t in reads}
    if kinds != {"einsum", "embedding"} or any(t.bias == index for t in reads):
        return False
    return all(t.kind == "embedding" or (t.spec is not None and ge.ties(t.spec)) for t in reads)


def _shared(taps, candidates: set) -> set:
    """The ``candidates`` (variables read by more than one tap) whose reads are all
    einsums of one structure, all convolutions or all lookups (a layer called more than
    once: its kernel in each) or all biases, and whose taps read no variable but such
    ones: their norms come from all their reads together (:attr:`Tap.shared`,
    :func:`keras_dp.ghost_tap.cross_terms`)."""
    shared = set(candidates)
    changed = True
    while changed:
        changed = False
        for i in sorted(shared):
            reads = [t for t in taps if i in (t.kernel, t.bias)]
            if all(t.kernel == i and t.kind in ("conv", "depthwise", "embedding") for t in reads):
                ok = len({t.kind for t in reads}) == 1  # inputs or ids of one kernel
            elif all(t.kernel == i for t in reads):
                einsums = all(t.kind == "einsum" and t.spec is not None for t in reads)
                ok = einsums and len({(t.spec.k, t.spec.kx, t.spec.ko) for t in reads}) == 1
            else:  # a bias: each read's gradient is g summed to its shape
                ok = all(t.bias == i and t.kind in ("einsum", "conv", "bias") for t in reads)
            ok = ok and all(v in shared for t in reads for v in (t.kernel, t.bias) if v is not None)
            if not ok:
                shared.discard(i)
                changed = True
    return shared


def _cheaper(taps, index: int) -> bool:
    """auto: a tapped kernel is ghost unless its norm costs more than forming its
    per-example gradient (:func:`keras_dp.ghost_tap.norm_costs`, over all its reads):
    an embedding over sequences long against its table, whose per-example gradient (a
    zeroed V×d table an example) is charged its memory traffic
    (:data:`ghost_embedding.TABLE_COST`). Charging each einsum's gradient its traffic
    too sent Gemma3's LoRA adapters to per-example gradients, 10% slower
    (benchmarks/clipping.py).

    A tied table on a CPU is ghost only when its norm costs at most twice its size:
    beside the norm, the ghost sum contracts the logits' gradient with the hidden
    states again, as much work as forming each example's gradient, which then needs
    only its square and its weighted sum. ``benchmarks/tied_embedding.py`` (Gemma3, 2
    layers, hidden 128, 64 tokens, batch 16, fully fine-tuned; ghost / the table
    per-example, ms a step): vocabulary 1,024 59 / 56, 8,192 135 / 126, 32,768 556 /
    436 (BART's three reads: ``--model bart``). On accelerators it stays ghost: its
    per-example gradients hold the vocabulary times the width for every example."""
    reads = [t for t in taps if t.kernel == index]
    maps = ("einsum", "conv", "depthwise")
    if not reads or (len(reads) > 1 and all(t.kind in maps for t in reads)):
        return True  # a bias: its norm is its gradient; read by maps: one einsum's or formed
    norm, formed = norm_costs(reads)
    if {t.kind for t in reads} == {"einsum", "embedding"} and _backend.on_cpu():  # tied
        return norm <= 2 * math.prod(reads[0].kernel_shape)
    return norm <= formed


def live_inputs(jaxpr) -> set:
    """Positions of ``jaxpr``'s inputs that its outputs depend on (dead code ignored)."""
    values = [v for e in ghost_pooling.live_eqns(jaxpr) for v in e.invars] + list(jaxpr.outvars)
    live = {v for v in values if not isinstance(v, Literal)}
    return {i for i, v in enumerate(jaxpr.invars) if v in live}


def example_fn(model, unit, plan_: Plan):
    """``(params, row, index, zs) -> (loss, aux, residuals)``: ``unit`` with the plan's taps."""

    def fn(params, row, index, zs):
        tape = Tape(model, params, plan_, zs)
        with tape.installed:
            loss, aux = unit(params, row, index)
        if tape.count != len(plan_.taps):
            raise RuntimeError(
                f"Internal: ghost clipping traced {tape.count} taps, planned "
                f"{len(plan_.taps)}. Please report this; clipping='per_example' avoids it."
            )
        return loss, aux, tuple(tape.residuals)

    return fn
