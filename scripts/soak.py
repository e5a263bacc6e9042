"""Runs the property tests on fresh random draws, round after round, for a while.

    python scripts/soak.py [--minutes 30] [--examples 10] [-k reference_step]

CI runs each ``@given`` test on the same derandomized examples every time, so that it
stays reproducible. This script runs them (and only them) with Hypothesis' random
generation instead: each round draws ``--examples`` new examples per test. The test
suite's own settings are replaced for the run; nothing in ``tests/`` changes.

A failure prints Hypothesis' falsifying example (shrunk) and how to reproduce it; pin
it in the test with ``@example(...)`` once it is understood, as the tests' comments
record for the plans found this way. Exits 1 if any round failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pytest
from hypothesis import HealthCheck, Phase, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RandomDraws:
    """A pytest plugin: keeps only the Hypothesis tests, with random examples."""

    def __init__(self, examples: int):
        self.settings = settings(
            max_examples=examples,
            deadline=None,
            derandomize=False,
            database=None,
            phases=[Phase.generate, Phase.shrink],  # the pinned @example()s run in CI
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )

    def pytest_collection_modifyitems(self, config, items):
        kept, dropped = [], []
        for item in items:
            test = getattr(getattr(item, "obj", None), "hypothesis", None)
            (kept if test is not None else dropped).append(item)
        for item in kept:
            item.obj._hypothesis_internal_use_settings = self.settings
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--examples", type=int, default=10, help="per test and round")
    parser.add_argument("-k", default=None, help="pytest's -k: which tests")
    args = parser.parse_args()
    end = time.monotonic() + args.minutes * 60
    failed, rounds = 0, 0
    while rounds == 0 or time.monotonic() < end:
        pytest_args = ["-q", "-n", "0", "-p", "no:cacheprovider", os.path.join(ROOT, "tests")]
        if args.k:
            pytest_args += ["-k", args.k]
        code = pytest.main(pytest_args, plugins=[RandomDraws(args.examples)])
        rounds += 1
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            failed += 1
        print(f"soak: round {rounds} exit {int(code)}, {failed} failed so far", flush=True)
        if code == pytest.ExitCode.NO_TESTS_COLLECTED:
            break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
