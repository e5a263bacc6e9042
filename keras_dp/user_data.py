"""User-level data: whose each example is, and what the sampler draws from under
``DPConfig(privacy_unit="user")`` (host-side numpy).

"uls" draws users, each a block of up to k of their examples (:class:`UserSource`);
"els" bounds each user to k examples once, chosen with the secret seed, and draws
examples from those (:class:`Subset`). The unit's gradient in the step:
:mod:`keras_dp.units`.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from keras_dp import sampling
from keras_dp.config import DPConfig

logger = logging.getLogger(__name__)


def group_by_user(user_ids, size: int) -> list[np.ndarray]:
    """The example indices of each user (in order of first appearance), from one id per
    example (any hashable values). Raises before any noise when the ids do not fit."""
    if user_ids is None:
        raise ValueError(
            "DPConfig(privacy_unit='user') needs to know whose each example is: pass "
            "fit(x, y, user_ids=ids) with one id per example."
        )
    ids = list(np.asarray(user_ids).reshape(-1)) if hasattr(user_ids, "shape") else list(user_ids)
    if len(ids) != size:
        raise ValueError(
            f"fit got {len(ids)} user_ids for {size} examples; pass exactly one id per "
            "example (the user who owns it). Nothing was trained."
        )
    index: dict = {}
    try:
        owners = np.asarray([index.setdefault(i, len(index)) for i in ids], np.int64)
    except TypeError as err:
        raise ValueError(f"user_ids must be hashable (ints or strings); {err}.") from err
    order = np.argsort(owners, kind="stable")
    bounds = np.cumsum(np.bincount(owners, minlength=len(index)))[:-1]
    return np.split(order, bounds)


class UserSource:
    """The data as users (user-level sampling): unit ``u`` is user u's examples.

    Attributes:
      examples: The per-example source.
      users: Each user's example indices.
      size: The number of users (the privacy units).
    """

    def __init__(self, examples: sampling.ExampleSource, users: list[np.ndarray], k: int):
        self.examples, self.users, self.k, self.size = examples, users, k, len(users)

    def blocks(self, units: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Up to k examples of each user in ``units``, drawn at random (a user with more
        contributes a fresh random k at every update): indices (len(units), k) and the
        mask of real ones. A short block repeats the user's own first example, masked."""
        indices = np.zeros((len(units), self.k), np.int64)
        inner = np.zeros((len(units), self.k), bool)
        for row, user in enumerate(units):
            own = self.users[user]
            chosen = own if len(own) <= self.k else rng.choice(own, self.k, replace=False)
            indices[row, : len(chosen)] = chosen
            indices[row, len(chosen) :] = own[0]
            inner[row, : len(chosen)] = True
        return indices, inner

    def gather(self, units: np.ndarray, rng=None, physical=None, num_shards: int = 1):
        """(x, y, sample_weight) of the users' blocks, shaped (rows, k, ...), and the
        inner mask. The blocks are drawn in the sampler's order (so they do not depend
        on the device count) and, with ``physical``, laid out as
        :func:`keras_dp.sampling.shard_layout` lays out the users; padding rows hold
        example 0 with an inner mask of zeros."""
        indices, inner = self.blocks(units, rng or np.random.default_rng(0))
        if physical is not None:
            positions = sampling.shard_positions(len(units), physical, num_shards)
            laid = np.zeros((physical, self.k), np.int64)
            laid_inner = np.zeros((physical, self.k), bool)
            laid[positions], laid_inner[positions] = indices, inner
            indices, inner = laid, laid_inner
        flat = self.examples.gather(indices.reshape(-1))
        shape = lambda a: a.reshape(indices.shape + a.shape[1:])  # noqa: E731
        return tuple(None if a is None else keras.tree.map_structure(shape, a) for a in flat), inner


def bound_examples(users: list[np.ndarray], k: int, seed: int) -> tuple[np.ndarray, int]:
    """Example-level sampling at user level: at most k examples of each user, chosen at
    random with the secret ``seed``; the kept indices (sorted) and the number dropped.
    The kept count, Σ min(n_u, k), does not depend on the choice."""
    rng = np.random.default_rng([seed, 0xE15])
    kept = [own if len(own) <= k else rng.choice(own, k, replace=False) for own in users]
    kept = np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
    return kept, sum(max(0, len(own) - k) for own in users)


class Subset:
    """A per-example source restricted to ``kept`` (ELS's bounded examples)."""

    def __init__(self, examples: sampling.ExampleSource, kept: np.ndarray):
        self.examples, self.kept, self.size = examples, kept, len(kept)

    @property
    def in_memory(self) -> bool:
        return self.examples.in_memory

    def gather(self, indices: np.ndarray):
        return self.examples.gather(self.kept[indices])


def users_of(config: DPConfig, user_ids, size: int) -> list[np.ndarray] | None:
    """Each user's example indices for a user-level plan (checked before any noise)."""
    if config.privacy_unit != "user":
        if user_ids is not None:
            raise ValueError(
                "fit got user_ids, but the plan protects examples "
                "(DPConfig(privacy_unit='example')). For user-level DP pass "
                "DPConfig(privacy_unit='user', examples_per_user=k); else drop user_ids."
            )
        return None
    return group_by_user(user_ids, size)


def unit_count(config: DPConfig, users, size: int) -> int:
    """N of the plan: users (ULS), kept examples Σ min(n_u, k) (ELS), or examples."""
    if users is None:
        return size
    if config.user_block is not None:
        return len(users)
    return sum(min(len(own), config.examples_per_user) for own in users)


def unit_source(config: DPConfig, source, users, seed: int):
    """What the sampler draws from: examples, users (ULS), or bounded examples (ELS)."""
    if users is None:
        return source
    if config.user_block is not None:
        return UserSource(source, users, config.user_block)
    kept, dropped = bound_examples(users, config.examples_per_user, seed)
    if dropped:
        logger.warning(
            "user_sampling='els': %d examples of users with more than "
            "examples_per_user=%d were dropped at random (secret seed); %d of %d kept.",
            dropped,
            config.examples_per_user,
            len(kept),
            source.size,
        )
    return Subset(source, kept)
