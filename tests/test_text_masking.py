"""Token maskers (SPEC 5) against independent numpy expectations."""

import numpy as np
import pytest

from d2v_jax.modalities.text import masking as tm

T = 100
VOCAB = 50
SPECIAL = 5


def _example(num_pad=10):
    """Tokens with <s> at 0, </s> at 40 and at the end of the real part, padding after."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(SPECIAL, VOCAB, T).astype(np.int32)
    n = T - num_pad
    tokens[0], tokens[40], tokens[n - 1] = 1, 2, 2
    tokens[n:] = 0
    maskable = tokens >= SPECIAL
    return tokens, maskable, n


def test_bert_count_is_probabilistic_rounding_and_specials_untouched():
    tokens, maskable, _ = _example()
    n = int(maskable.sum())  # 87 maskable
    rng = np.random.default_rng(1)
    draws = np.stack([tm.bert_positions(rng, maskable, 0.15) for _ in range(4000)])
    counts = draws.sum(1)
    lo = int(0.15 * n)
    assert set(np.unique(counts)) <= {lo, lo + 1}
    # P(count = lo + 1) = frac(0.15 * n) for int(p n + U).
    assert abs(np.mean(counts == lo + 1) - (0.15 * n - lo)) < 0.03
    assert not draws[:, ~maskable].any()
    # Uniform over the maskable positions: each is chosen with prob E[count] / n.
    freq = draws[:, maskable].mean(0)
    assert np.all(np.abs(freq - 0.15) < 0.035)


def test_corrupt_80_10_10_and_loss_positions():
    tokens = np.random.default_rng(2).integers(SPECIAL, VOCAB, 200_000).astype(np.int32)
    masked = np.random.default_rng(3).random(tokens.size) < 0.5
    inputs, replaced = tm.corrupt(np.random.default_rng(4), tokens, masked, mask_id=4,
                                  random_low=SPECIAL, vocab_size=VOCAB,
                                  leave_unmasked_prob=0.1, random_token_prob=0.1)
    np.testing.assert_array_equal(inputs[~masked], tokens[~masked])  # unmasked untouched
    np.testing.assert_array_equal(replaced, masked & (inputs == 4))
    m = masked.sum()
    got_mask = replaced.sum() / m
    got_random = (masked & (inputs != 4) & (inputs != tokens)).sum() / m
    # A random draw equals the original token with probability 1 / (VOCAB - SPECIAL).
    expect_random = 0.1 * (1 - 1 / (VOCAB - SPECIAL))
    assert abs(got_mask - 0.8) < 0.006 and abs(got_random - expect_random) < 0.004
    rand = inputs[masked & (inputs != 4)]
    assert rand.min() >= SPECIAL and rand.max() < VOCAB  # never a special token


def test_span_masking_rate_and_runs():
    tokens, maskable, _ = _example()
    rng = np.random.default_rng(5)
    draws = np.stack([tm.span_positions(rng, maskable, 0.35, 4) for _ in range(2000)])
    assert not draws[:, ~maskable].any()
    n = maskable.sum()
    # Independent expectation by simulation of the same recipe in plain numpy:
    # int(p n / L + U) starts among maskable positions, spans of L clipped.
    sim = np.random.default_rng(6)
    cand = np.flatnonzero(maskable)
    rates = []
    for _ in range(2000):
        k = int(0.35 * n / 4 + sim.random())
        s = sim.choice(cand, k, replace=False)
        cover = np.zeros(T, bool)
        for a in s:
            cover[a:a + 4] = True
        rates.append((cover & maskable).sum() / n)
    assert abs(draws.sum(1).mean() / n - np.mean(rates)) < 0.01
    assert 0.25 < np.mean(rates) < 0.35  # overlaps keep it below p
    # Spans grow rightwards, so a run of masked positions starts at a span start and
    # is at least L long unless a special token or the end cuts it.
    for row in draws[:200]:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            starts_span = a == 0 or maskable[a - 1]  # not the tail of a span cut at a-1
            if starts_span and a + 4 <= T and maskable[a:a + 4].all():
                assert b - a >= 4


def mae_random_masking(rng, length, mask_ratio):
    """MAE's / fairseq's `random_masking` for one row of `length`, in numpy from
    its description: uniform noise, argsort, keep the first int(L * (1 - r)),
    mask the rest; returns bool [length], True = masked."""
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = np.argsort(rng.random(length))
    mask = np.ones(length, bool)
    mask[ids_shuffle[:len_keep]] = False
    return mask


def test_random_masking_is_mae_random_masking_over_all_real_positions():
    tokens, _, n_real = _example()
    real = np.arange(T) < n_real  # specials (<s> at 0, </s> at 40, 89) are maskable
    rng = np.random.default_rng(7)
    draws = np.stack([tm.random_positions(rng, real, 0.48, n_real) for _ in range(3000)])
    ref_rng = np.random.default_rng(11)
    ref = np.stack([mae_random_masking(ref_rng, n_real, 0.48) for _ in range(3000)])
    # The count: int(90 * 0.52) = 46 kept, 44 masked, in every row.
    assert np.all(draws.sum(1) == 44) and np.all(ref.sum(1) == 44)
    assert not draws[:, n_real:].any()  # padding never
    # Every real position, specials included, is masked as often as MAE's.
    np.testing.assert_allclose(draws[:, :n_real].mean(0), ref.mean(0), atol=0.05)
    # The released recipe: 512 tokens at 0.48 keep int(512 * 0.52) = 266.
    assert tm.num_keep_random(512, 0.48) == 266 and tm.num_masked_random(512, 0.48) == 246
    with pytest.raises(ValueError, match="only 1 are not special"):
        tm.random_positions(rng, np.array([False, True, False, False, False]), 0.48, 5)


@pytest.mark.parametrize("prob", [0.15, 0.48, 0.8])
def test_num_keep_bounds_every_shorter_row(prob):
    # The 2.0 student keeps num_keep_random(T) positions: every row with n <= T real
    # tokens has at most that many visible ones, and enough padding to fill the rest.
    for t in range(3, 300):
        keep = tm.num_keep_random(t, prob)
        for n in range(1, t + 1):
            visible = n - tm.num_masked_random(n, prob)
            assert 1 <= visible <= keep and keep - visible <= t - n


def test_text_masks_v1_and_v2_outputs():
    tokens, maskable, n = _example()
    cfg = dict(kind="bert", ratio=0.15, num_clones=3, span=4, leave_unmasked_prob=0.1,
               random_token_prob=0.1, loss_on="mask_token")
    out = tm.text_masks(np.random.default_rng(8), tokens, maskable, n, cfg, mask_id=4,
                        random_low=SPECIAL, vocab_size=VOCAB)
    assert out["mask"].shape == (3, T) and out["inputs"].shape == (3, T)
    np.testing.assert_array_equal(out["mask"], out["inputs"] == 4)
    out_all = tm.text_masks(np.random.default_rng(8), tokens, maskable, n, dict(cfg, loss_on="all"),
                            mask_id=4, random_low=SPECIAL, vocab_size=VOCAB)
    assert (out_all["mask"] >= out["mask"]).all()  # same draws, more loss positions
    v2 = tm.text_masks(np.random.default_rng(9), tokens, maskable, n,
                       dict(cfg, kind="random", ratio=0.48), mask_id=4, random_low=SPECIAL,
                       vocab_size=VOCAB)
    assert set(v2) == {"mask"} and np.all(v2["mask"].sum(1) == n - int(0.52 * n))
