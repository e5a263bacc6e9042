"""Calibration time for typical plans (not a test: run it and read the table).

python benchmarks/calibration.py
"""

import logging
import platform
import statistics
import time

from keras_dp import DPConfig, accounting, calibration

logging.getLogger("absl").setLevel(logging.ERROR)

PLANS = {
    "fine-tune N=15k B=1024 3 ep ε=4": dict(
        dataset_size=15_000, batch_size=1024, epochs=3, target_epsilon=4.0
    ),
    "N=60k B=256 60 ep ε=4": dict(
        dataset_size=60_000, batch_size=256, epochs=60, target_epsilon=4.0
    ),
    "digits N=1797 B=64 20 ep ε=8": dict(
        dataset_size=1_797, batch_size=64, epochs=20, target_epsilon=8.0
    ),
    "N=50k B=64 10 ep ε=0.5": dict(
        dataset_size=50_000, batch_size=64, epochs=10, target_epsilon=0.5
    ),
    "N=15k B=1024 3 ep ε=4 RDP": dict(
        dataset_size=15_000, batch_size=1024, epochs=3, target_epsilon=4.0, accountant="rdp"
    ),
    "N=15k B=1024 3 ep ε=4 fixed/RDP": dict(
        dataset_size=15_000,
        batch_size=1024,
        epochs=3,
        target_epsilon=4.0,
        accountant="rdp",
        sampling="fixed",
    ),
}


def forget() -> None:
    """Empties keras_dp's in-process memories (σ per plan, ε per event), so that each
    repeat searches from nothing, as a new process would."""
    calibration._CALIBRATED.clear()
    accounting.epsilon.cache_clear()
    accounting._kept_epsilon.cache_clear()
    accounting._step_pld.cache_clear()
    accounting._step_rdp.cache_clear()
    accounting._estimate.cache_clear()


def main(repeats: int = 3) -> None:
    DPConfig(**PLANS["digits N=1797 B=64 20 ep ε=8"]).calibrate()  # warm-up (imports, caches)
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print("| plan | steps | B_max | σ | ε | calibration s (median of 3) |")
    print("|---|---|---|---|---|---|")
    for name, plan in PLANS.items():
        times = []
        for _ in range(repeats):
            forget()
            start = time.perf_counter()
            config = DPConfig(**plan).calibrate()
            times.append(time.perf_counter() - start)
        print(
            f"| {name} | {config.steps} | {config.max_batch_size} | "
            f"{config.noise_multiplier:.4f} | {config.epsilon():.4f} | "
            f"{statistics.median(times):.2f} |"
        )


if __name__ == "__main__":
    main()
