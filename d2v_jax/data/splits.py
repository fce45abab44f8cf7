"""Train / test splits and label subsets for fine-tuning (pure numpy).

- `allocate(class_sizes, total)`: per-class counts proportional to the class
  sizes, at least one per class, summing to exactly `total` (largest remainder).
- `split_test(labels, test_fraction, seed)`: the held-out test indices. The
  seed is `config.data.split_seed`, not the run's seed, so every fine-tune of a
  task (any label fraction, any seed, pretrained or scratch) is scored on the
  same examples; pretraining holds out the same indices (`data.pipeline.holdout_split`).
- `label_subset(labels, pool, fraction, seed)`: the stratified fraction of the
  training pool whose labels a run may use; it keeps every class.
"""

from __future__ import annotations

import numpy as np

from d2v_jax.errors import ConfigError, DataError


def allocate(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """Counts per class summing to exactly `total`, each in [1, size].

    Proportional to `class_sizes` (Hamilton's largest-remainder method), then
    raised to one for any class that got none, taking the example back from
    the classes furthest above their proportional share.
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    k, n = len(sizes), int(sizes.sum())
    if np.any(sizes < 1):
        raise DataError(f"allocate: every class needs at least one example, got sizes {sizes.tolist()}")
    if not k <= total <= n:
        raise DataError(
            f"allocate: cannot keep every one of {k} classes with {total} of {n} examples; "
            f"the count must be in [{k}, {n}]")
    share = sizes * (total / n)
    counts = np.floor(share).astype(np.int64)
    # Largest remainders first; ties broken by class order for determinism.
    order = np.lexsort((np.arange(k), -(share - counts)))
    counts[order[: total - counts.sum()]] += 1
    while np.any(counts < 1):
        lacking = int(np.argmax(counts < 1))
        surplus = np.where(counts > 1, counts - share, -np.inf)
        donor = int(np.argmax(surplus))
        counts[donor] -= 1
        counts[lacking] += 1
    return counts


def _stratified_pick(labels: np.ndarray, pool: np.ndarray, count: int,
                     rng: np.random.Generator) -> np.ndarray:
    classes, inverse = np.unique(labels[pool], return_inverse=True)
    counts = allocate(np.bincount(inverse, minlength=len(classes)), count)
    picked = [rng.permutation(pool[inverse == c])[:counts[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(picked))


def fraction_count(fraction: float, n: int, field: str) -> int:
    """round(fraction * n), checked: `field` names the config key in errors."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"config.{field}={fraction} must be in (0, 1]")
    return int(round(fraction * n))


def split_test(labels: np.ndarray, test_fraction: float, seed: int,
               stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train_pool, test) index arrays, sorted, disjoint, covering every example.

    `test` has round(test_fraction * n) examples, stratified by class when
    `stratify` (classification) and uniform otherwise (regression).
    """
    labels = np.asarray(labels)
    n = len(labels)
    all_idx = np.arange(n)
    count = fraction_count(test_fraction, n, "data.test_fraction")
    if count >= n:
        raise ConfigError(f"config.data.test_fraction={test_fraction} leaves no training examples of {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7e57]))
    if stratify:
        test = _stratified_pick(labels, all_idx, count, rng)
    else:
        test = np.sort(rng.permutation(n)[:count])
    return np.setdiff1d(all_idx, test), test


def label_subset(labels: np.ndarray, pool: np.ndarray, fraction: float, seed: int,
                 stratify: bool = True) -> np.ndarray:
    """round(fraction * len(pool)) indices of `pool`, sorted.

    Stratified (every class kept, proportions preserved up to rounding) when
    `stratify`; uniform otherwise. `fraction == 1` returns the whole pool.
    """
    labels, pool = np.asarray(labels), np.asarray(pool)
    count = fraction_count(fraction, len(pool), "data.label_fraction")
    if count == len(pool):
        return np.sort(pool)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1abe1]))
    if stratify:
        num_classes = len(np.unique(labels[pool]))
        if count < num_classes:
            raise ConfigError(
                f"config.data.label_fraction={fraction} keeps {count} of {len(pool)} training "
                f"labels, fewer than the {num_classes} classes; raise it to at least "
                f"{num_classes / len(pool):.4f}")
        return _stratified_pick(labels, pool, count, rng)
    if count < 1:
        raise ConfigError(f"config.data.label_fraction={fraction} keeps no example of {len(pool)}")
    return np.sort(rng.permutation(pool)[:count])
