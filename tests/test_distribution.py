"""One guarantee on 1 or N devices: keras.distribution and multi-process training.

The fits run in subprocesses (tests/multidevice_worker.py) because the number of
simulated CPU devices is fixed when JAX is imported.
"""

import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from keras_dp import clipping, sampling

WORKER = os.path.join(os.path.dirname(__file__), "multidevice_worker.py")


def start_worker(out: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WORKER, out, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker's results on 1 device, on 4 devices, and on 2 processes × 2 devices
    (the four processes run at once)."""
    tmp = tmp_path_factory.mktemp("multidevice")
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = {name: str(tmp / f"{name}.npz") for name in ("one", "four", "procs")}
    procs = [
        start_worker(outs["one"], 1),
        start_worker(outs["four"], 4),
        *(start_worker(outs["procs"], 2, i, 2, port) for i in range(2)),
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
    one, four = (dict(np.load(outs[k].replace(".npz", ".0.npz"))) for k in ("one", "four"))
    processes = [dict(np.load(outs["procs"].replace(".npz", f".{i}.npz"))) for i in range(2)]
    return one, four, processes


def test_one_and_four_devices_train_the_same_weights_and_spend_the_same_epsilon(runs):
    one, four, _ = runs
    assert one["devices"] == 1 and four["devices"] == 4
    # Poisson sampling, per-example dropout, 15 noisy steps: only float reduction order differs.
    np.testing.assert_allclose(four["mlp_weights"], one["mlp_weights"], atol=1e-6)
    assert four["mlp_epsilon"] == one["mlp_epsilon"] and four["mlp_steps"] == 15
    np.testing.assert_allclose(four["mlp_accuracy"], one["mlp_accuracy"], rtol=1e-6)
    assert four["mlp_physical"] % 4 == 0


def test_noise_on_four_devices_is_drawn_once_with_std_sigma_c_over_b(runs):
    one, four, _ = runs
    update = four["noise_update"]  # SGD(1) on a zero loss: -(noise)/B
    expected_std = 2.0 * 3.0 / 8  # σ·C/B, not scaled by the device count
    assert stats.kstest(update / expected_std, "norm").pvalue > 0.01
    assert abs(np.std(update) / expected_std - 1) < 0.05
    # The same noise as on one device: one key, one draw for the global sum.
    np.testing.assert_allclose(update, one["noise_update"], atol=1e-6)


def test_a_batch_that_does_not_divide_the_devices_is_padded_not_dropped(runs):
    one, four, _ = runs
    # 10 rows on 4 devices: 4 shards of 3 rows (2 of them padding), every real row counted.
    assert one["uneven_physical"] == 10 and four["uneven_physical"] == 12
    np.testing.assert_allclose(four["uneven_weights"], one["uneven_weights"], atol=1e-6)
    np.testing.assert_allclose(four["uneven_loss"], one["uneven_loss"], rtol=1e-6)


@pytest.mark.parametrize("name", ["gemma", "gemma_full"])  # LoRA; full, ghost (tied table)
def test_gemma3_under_model_parallel_matches_one_device(runs, name):
    one, four, _ = runs
    assert four[f"{name}_sharded_on_model"] > 0  # the layout map really sharded weights
    np.testing.assert_allclose(four[f"{name}_weights"], one[f"{name}_weights"], atol=1e-6)
    assert four[f"{name}_epsilon"] == one[f"{name}_epsilon"]


def test_two_processes_draw_one_global_sample_and_match_one_process(runs):
    _, four, processes = runs
    first, second = processes
    assert first["devices"] == 4
    # Without a configured seed, process 0's secret seed is shared with process 1.
    np.testing.assert_array_equal(first["secret_seed"], second["secret_seed"])
    for key in ("mlp_weights", "uneven_weights", "noise_update"):
        np.testing.assert_allclose(first[key], four[key], atol=1e-6)
    assert first["mlp_epsilon"] == four["mlp_epsilon"]


def test_shard_layout_deals_real_rows_round_robin_each_shard_real_first():
    indices = np.array([5, 8, 13, 21, 34])
    padded, mask = sampling.shard_layout(indices, 8, num_shards=2)
    np.testing.assert_array_equal(padded.reshape(2, 4), [[5, 13, 34, 0], [8, 21, 0, 0]])
    np.testing.assert_array_equal(mask.reshape(2, 4), [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert sampling.physical_batch_size(10, 5, 4) == 20  # 4 shards of ceil(3/5)·5 rows
    with pytest.raises(ValueError, match="do not fit"):
        sampling.shard_layout(np.arange(7), 6, num_shards=2)


def test_sharded_clipped_sum_equals_one_shard_on_the_same_rows():
    """Pure JAX: shards only change where rows are summed, and rows keep their rank."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    rows = rng.normal(size=(5, 3)).astype("float32") * 4

    def example_fn(params, row, index):
        return jnp.sum(params * row) ** 2, index

    p1, m1 = sampling.shard_layout(np.arange(5), 6, 1)
    p3, m3 = sampling.shard_layout(np.arange(5), 6, 3)
    g1, l1, ids1, *_ = clipping.clipped_sum(example_fn, w, jnp.asarray(rows[p1]), m1, 1.0, 2)
    g3, l3, ids3, *_ = clipping.clipped_sum(example_fn, w, jnp.asarray(rows[p3]), m3, 1.0, 1, 3)
    np.testing.assert_allclose(g3, g1, rtol=1e-5)
    # Each real row's loss and rank are the same whichever shard it landed in.
    order = np.argsort(p3[m3])  # the sampled indices here are the ranks 0..4
    np.testing.assert_allclose(l3[m3][order], l1[m1], rtol=1e-6)
    np.testing.assert_array_equal(ids3[m3], p3[m3])
    np.testing.assert_array_equal(ids1[m1], p1[m1])
