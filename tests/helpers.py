"""Small helpers shared by the test modules."""

import contextlib
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import keras

from keras_dp import _keras, ghost, noise

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"

# The step's noise for the references, jitted: called eagerly, the conditional inside
# noise.gaussian_like compiles again at every call (78 compiles, 21 s, in one test).
gaussian_like = jax.jit(noise.gaussian_like)
correlated_noise = jax.jit(noise.correlated_noise)


class DenseCell(keras.layers.Layer):
    """An RNN cell of two Dense layers: ``keras.layers.RNN`` runs them in a scan (their
    taps are nested: ghost clipping leaves them to per-example gradients)."""

    def __init__(self, units=4, dtype=None, **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.units = self.state_size = units
        self.inputs_dense = keras.layers.Dense(units, dtype=dtype)
        self.state_dense = keras.layers.Dense(units, use_bias=False, dtype=dtype)

    def build(self, input_shape):
        self.inputs_dense.build(input_shape)
        self.state_dense.build((None, self.units))

    def call(self, x, states):
        h = keras.ops.tanh(self.inputs_dense(x) + self.state_dense(states[0]))
        return h, [h]


def ghost_plan(model, x, clipping="ghost"):
    """ghost.plan of ``model`` on the first example of ``x`` (built on it if need be)."""
    row = jax.tree.map(lambda a: jnp.asarray(a[:1]), x)
    if not model.built:
        model(row)
    params = [v.value for v in model.trainable_variables]
    nt = [v.value for v in model.non_trainable_variables]
    training = {"training": True} if _keras.call_has_training_arg(model) else {}

    def loss_fn(p):  # an output and the add_loss/regularisation losses, as in fit
        out, _, losses = model.stateless_call(p, nt, row, return_losses=True, **training)
        return jnp.sum(jax.tree.leaves(out)[0]) + sum(losses)

    return ghost.plan(model, loss_fn, params, clipping)


def load_example(name: str):
    """``examples/<name>.py`` as a module (its sibling ``_report`` importable)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def on_devices(devices: int):
    """``keras.distribution.DataParallel`` over the first ``devices`` devices (none for 1),
    reset afterwards."""
    distribution = None
    if devices > 1:
        distribution = keras.distribution.DataParallel(devices=jax.devices()[:devices])
    keras.distribution.set_distribution(distribution)
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


def whole_batch_update(n: int, clip: float, clipping: str, microbatch_size=None):
    """A plan whose one update is exactly Σ_i clip(g_i) over all ``n`` examples when
    trained with SGD at learning rate ``n``: σ = 0, fixed sampling of B = N, one step."""
    import math

    import keras_dp

    return keras_dp.DPConfig(
        target_epsilon=math.inf,
        noise_multiplier=0.0,
        batch_size=n,
        steps=1,
        sampling="fixed",
        accountant="rdp",
        l2_clip_norm=clip,
        seed=0,
        clipping=clipping,
        microbatch_size=microbatch_size,
    )
