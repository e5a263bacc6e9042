"""Calibration at the corners: every plan returns or is refused, in bounded time and memory.

Each corner runs in its own process under an address-space limit (8 GiB) and a
timeout (300 s); the table gives wall time, peak memory (max RSS) and the outcome.

    python benchmarks/calibration_corners.py [--out benchmarks/results/calibration_corners.md]
"""

import argparse
import json
import os
import subprocess
import sys
import time

CORNERS = {
    "ε=0.01, q=0.07 (N=1400 B=100), 2 epochs": dict(
        target_epsilon=0.01, dataset_size=1400, batch_size=100, epochs=2
    ),
    "ε=1, q=0.07, 2 epochs": dict(target_epsilon=1, dataset_size=1400, batch_size=100, epochs=2),
    "ε=100, q=0.07, 2 epochs": dict(
        target_epsilon=100, dataset_size=1400, batch_size=100, epochs=2
    ),
    "ε=1000 (the ceiling), q=0.07, 2 epochs": dict(
        target_epsilon=1000, dataset_size=1400, batch_size=100, epochs=2
    ),
    "ε=1e4 (above the ceiling)": dict(
        target_epsilon=1e4, dataset_size=1400, batch_size=100, epochs=2
    ),
    "ε=1e6 (the issue's example)": dict(
        target_epsilon=1e6, dataset_size=1400, batch_size=100, epochs=2
    ),
    "tiny q=1e-7 (N=1e7 B=1), 1e6 steps, ε=0.01": dict(
        target_epsilon=0.01, dataset_size=10_000_000, batch_size=1, steps=1_000_000
    ),
    "q=1e-3 (N=60k B=64), 1e6 steps, ε=1": dict(
        target_epsilon=1, dataset_size=60_000, batch_size=64, steps=1_000_000
    ),
    "q=1 (B=N=1400), 1e6 steps, ε=1000": dict(
        target_epsilon=1000, dataset_size=1400, batch_size=1400, steps=1_000_000
    ),
    "q=1, 10 steps, ε=2": dict(target_epsilon=2, dataset_size=1400, batch_size=1400, steps=10),
    "q=1, 1e5 steps, ε=2": dict(
        target_epsilon=2, dataset_size=1400, batch_size=1400, steps=100_000
    ),
    "q=0.5 (N=1000 B=500), 1000 steps, ε=8": dict(
        target_epsilon=8, dataset_size=1000, batch_size=500, steps=1000
    ),
    "fine-tune N=15k B=1024 3 epochs ε=4": dict(
        target_epsilon=4, dataset_size=15_000, batch_size=1024, epochs=3
    ),
    "RDP, ε=1000, q=0.07": dict(
        target_epsilon=1000, dataset_size=1400, batch_size=100, epochs=2, accountant="rdp"
    ),
    "fixed/RDP, ε=0.01, N=1e5 B=10, 1e5 steps": dict(
        target_epsilon=0.01,
        dataset_size=100_000,
        batch_size=10,
        steps=100_000,
        sampling="fixed",
        accountant="rdp",
    ),  # fmt: skip
}

CHILD = """
import json, logging, resource, sys, time
limit = 8 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
logging.getLogger("absl").setLevel(logging.ERROR)
from keras_dp import DPConfig
start = time.perf_counter()
try:
    config = DPConfig(**json.loads(sys.argv[1])).calibrate()
    outcome = f"σ = {config.noise_multiplier:.4g}, ε = {config.epsilon():.4g}"
except Exception as err:
    outcome = f"refused: {type(err).__name__}: {str(err)[:90]}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps([time.perf_counter() - start, peak, outcome]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    lines = ["| corner | seconds | peak MB | outcome |", "|---|---|---|---|"]
    for name, plan in CORNERS.items():
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(plan)],
                capture_output=True, text=True, timeout=300, env=env,
            )  # fmt: skip
            seconds, peak, outcome = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            seconds, peak, outcome = time.perf_counter() - start, float("nan"), "TIMED OUT"
        except (IndexError, json.JSONDecodeError):
            seconds, peak = time.perf_counter() - start, float("nan")
            outcome = f"CRASHED: {done.stderr.strip().splitlines()[-1][:90]}"
        lines.append(f"| {name} | {seconds:.2f} | {peak:.0f} | {outcome} |")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
