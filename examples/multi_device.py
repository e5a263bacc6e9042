"""DP-SGD over several devices and processes with keras.distribution.

Trains the digits MLP at ε = 3 with ``keras.distribution.DataParallel``. The
result (weights, ε) is that of a one-device run of the same plan, up to float
reduction order: every process samples the same global batch from a shared
secret seed, each device clips its own rows, and the noise is drawn once.

    python examples/multi_device.py --devices 4              # 4 simulated CPU devices
    python examples/multi_device.py --devices 2 --processes 2  # 2 local processes × 2

On real hosts, run one process per host with ``--coordinator HOST:PORT
--num-processes N --process-id I`` (``--devices`` is then ignored: each host's
accelerators are used).
"""

import argparse
import os
import subprocess
import sys
import time


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="simulated CPU devices per process")
    parser.add_argument("--processes", type=int, default=1, help="local processes to launch")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-host)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--epsilon", type=float, default=3.0)
    return parser.parse_args()


def launch_local(args) -> int:
    """Starts ``--processes`` copies of this script on localhost and waits for them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, __file__, "--devices", str(args.devices)]
    base += ["--epsilon", str(args.epsilon), "--coordinator", f"127.0.0.1:{port}"]
    base += ["--num-processes", str(args.processes)]
    procs = [subprocess.Popen(base + ["--process-id", str(i)]) for i in range(args.processes)]
    return max(proc.wait() for proc in procs)


def main(args) -> None:
    if args.coordinator is None or args.devices:
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    if args.coordinator is not None:
        # Collectives between processes on CPU devices (accelerators bring their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import keras_dp

    devices = keras.distribution.list_devices()
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype("float32"), y, test_size=448, random_state=0
    )
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="tanh"), keras.layers.Dense(10)]
    )
    config = keras_dp.DPConfig(
        target_epsilon=args.epsilon, batch_size=128, epochs=40, l2_clip_norm=1.0
    )
    model = keras_dp.make_private(model, config)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = model.fit(x_train, y_train, verbose=0)
    seconds = time.perf_counter() - start
    # Keras' own evaluate shards each batch too: 448 = 7 batches of 64, which divide over up
    # to 64 devices (DP fit pads its batches itself). With several processes each one feeds
    # its own share of the test set, and Keras is told so.
    distribution.auto_shard_dataset = False
    share = slice(jax.process_index(), None, jax.process_count())
    _, accuracy = model.evaluate(
        x_test[share], y_test[share], batch_size=64 // jax.process_count(), verbose=0
    )
    if jax.process_index() == 0:
        spent = model.privacy_spent()
        print(
            f"{jax.process_count()} process(es), {len(devices)} devices: ε={spent.epsilon:.3f} "
            f"(δ={spent.delta:g}) after {spent.steps} updates, final loss "
            f"{history.history['loss'][-1]:.3f}, test accuracy {accuracy:.3f}, fit {seconds:.1f} s"
        )


if __name__ == "__main__":
    arguments = parse()
    if arguments.processes > 1:
        sys.exit(launch_local(arguments))
    main(arguments)
