"""The image fine-tuning augmentation of the official recipes against timm's
own implementation (tests/timm_reference.py loads it): RandAugment
`rand-m9-mstd0.5-inc1`, random erasing, mixup / cutmix with label smoothing
and the soft-target loss.

Two kinds of check: with the *same draws* fed to timm (its `random` / numpy
replaced by the values ours drew), the outputs are equal (pixels exactly;
mixed float images to 1e-6); with *independent* draws (ours from numpy /
jax keys, timm's from its own generators), the distributions agree (KS and
chi-square tests at p > 1e-3, several thousand draws)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from d2v_jax.finetune.steps import compute_loss
from d2v_jax.modalities.image import augment, mixing
from d2v_jax.modalities.image.transforms import resize_center_crop

from helpers import finetune_config
from timm_reference import FeedRandom, load

MEAN = (0.485, 0.456, 0.406)
P_MIN = 1e-3  # distribution tests: p-values above this pass


@pytest.fixture(scope="module")
def aa():
    return load("data/auto_augment")


def _image(h=29, w=37, seed=0):
    """RGB with gradients, edges and noise, so every op changes something."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 7) % 256, (y * 9) % 256, ((x + y) * 5) % 256], -1).astype(np.int32)
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    img[h // 3:h // 2, w // 4:w // 2] = (250, 10, 10)
    return Image.fromarray(img)


def _hparams(aa, fill):
    # transforms_imagenet_train's aa_params for a bicubic recipe
    return {"translate_const": 100, "img_mean": fill, "interpolation": Image.Resampling.BICUBIC}


@pytest.mark.parametrize("name", augment.RAND_INCREASING_TRANSFORMS)
def test_each_rand_augment_op_matches_timm(aa, name):
    img, fill = _image(), augment.fill_color(MEAN, "RGB")
    for magnitude in (0.0, 3.7, 9.0, 9.99, 10.0):
        for negate in (False, True):
            if name == "PosterizeIncreasing" and magnitude == 10.0:
                # 0 bits: Pillow >= 10 raises where the official runs' Pillow gave black
                out = augment.apply_op(img, name, augment.op_argument(name, magnitude, negate),
                                       fill)
                assert not np.asarray(out).any()
                continue
            op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=_hparams(aa, fill))
            # timm's only draw here is _randomly_negate's: negative when random() > 0.5
            aa.random = FeedRandom([("random", 0.9 if negate else 0.1)]
                                   if name in augment.SIGNED else [])
            ref = np.asarray(op(img))
            ours = np.asarray(augment.apply_op(
                img, name, augment.op_argument(name, magnitude, negate), fill))
            np.testing.assert_array_equal(ours, ref, err_msg=f"{name} m={magnitude} neg={negate}")


def _feed_plan(aa, plan, ops_by_name):
    """timm's draws for `plan`: np.random.choice returns the planned ops, each
    op's prob draw fires or not, its gauss draw is the planned magnitude, its
    sign draw the planned sign."""
    draws = []
    for step in plan:
        draws.append(("random", 0.3 if step.applied else 0.7))  # applied iff random() <= 0.5
        if step.applied:
            draws.append(("gauss", step.magnitude))
            if step.op in augment.SIGNED:
                draws.append(("random", 0.9 if step.negate else 0.1))
    aa.random = FeedRandom(draws)

    class Choice:
        @staticmethod
        def choice(ops, n, replace=True, p=None):
            assert n == len(plan) and replace and p is None
            return [ops_by_name[s.op] for s in plan]

    class NumpyProxy:
        random = Choice

        def __getattr__(self, name):
            return getattr(np, name)

    aa.np = NumpyProxy()


def test_rand_augment_policy_matches_timm_given_the_same_draws(aa):
    policy = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert policy == augment.RandAugmentPolicy(9.0, 2, 0.5, 0.5, 10.0, True)
    fill = augment.fill_color(MEAN, "RGB")
    ref = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", _hparams(aa, fill))
    assert [op.name for op in ref.ops] == list(policy.ops) and ref.num_layers == 2
    ops_by_name = {op.name: op for op in ref.ops}
    rng = np.random.default_rng(0)
    for seed in range(40):
        img = _image(seed=seed)
        plan = augment.sample_plan(rng, policy)
        _feed_plan(aa, plan, ops_by_name)
        np.testing.assert_array_equal(np.asarray(augment.rand_augment(img, plan, fill)),
                                      np.asarray(ref(img)), err_msg=str(plan))
        assert not aa.random.draws  # timm used every planned draw


def test_rand_augment_draws_follow_timms_distribution(aa):
    """Op choice, firing rate, magnitude and sign of ours (numpy Generator) vs
    timm's own sampling (python random / numpy global), 3,000 images each."""
    n = 3000
    policy = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
    rng = np.random.default_rng(1)
    ours = [s for _ in range(n) for s in augment.sample_plan(rng, policy)]

    ref = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", _hparams(aa, (0, 0, 0)))
    seen = []  # (op, magnitude, negated) of the ops timm fired
    for op in ref.ops:
        level_fn = op.level_fn

        def record(m, hp, name=op.name, level_fn=level_fn):
            args = level_fn(m, hp) if level_fn is not None else ()
            seen.append((name, m, args))
            return args

        op.level_fn = record
        op.aug_fn = lambda img, *a, **k: img
    import random as py_random

    aa.random, aa.np = py_random, np
    py_random.seed(0)
    np.random.seed(0)
    img = Image.new("RGB", (4, 4))
    for _ in range(n):
        ref(img)

    fired = [s for s in ours if s.applied]
    # firing rate: 2 n layers, each fires with p 0.5
    counts = [[len(fired), 2 * n - len(fired)], [len(seen), 2 * n - len(seen)]]
    assert stats.chi2_contingency(counts)[1] > P_MIN
    # op choice among the fired ones
    names = list(policy.ops)
    table = [[sum(s.op == k for s in fired) for k in names],
             [sum(s[0] == k for s in seen) for k in names]]
    assert stats.chi2_contingency(table)[1] > P_MIN
    # magnitude N(9, 0.5) clipped to [0, 10]
    assert stats.ks_2samp([s.magnitude for s in fired], [s[1] for s in seen]).pvalue > P_MIN
    # sign of the signed ops: timm's Rotate level is negative iff negated
    ours_neg = [s.negate for s in fired if s.op == "Rotate"]
    ref_neg = [s[2][0] < 0 for s in seen if s[0] == "Rotate"]
    assert stats.chi2_contingency([[sum(ours_neg), len(ours_neg) - sum(ours_neg)],
                                   [sum(ref_neg), len(ref_neg) - sum(ref_neg)]])[1] > P_MIN


# --- random erasing -------------------------------------------------------------------


class _Recording:
    """A numpy Generator that logs its draws as timm's `random` calls."""

    def __init__(self, rng):
        self.rng, self.log = rng, []

    def uniform(self, a=None, b=None):
        if a is None:
            v = self.rng.uniform()
            self.log.append(("random", v))
        else:
            v = self.rng.uniform(a, b)
            self.log.append(("uniform", v))
        return v

    def integers(self, lo, hi):
        v = int(self.rng.integers(lo, hi))
        self.log.append(("randint", v))  # timm's randint(lo, hi - 1) is inclusive
        return v


def test_random_erasing_box_matches_timm_given_the_same_draws():
    re_mod = load("data/random_erasing")
    ours = augment.RandomErasing(prob=0.25, mode="pixel", count=1)
    h, w = 24, 30
    erased = 0
    for seed in range(60):
        rec = _Recording(np.random.default_rng(seed))
        box = ours.boxes(rec, h, w)[0]
        re_mod.random = FeedRandom(rec.log)
        x = torch.zeros(3, h, w)
        out = re_mod.RandomErasing(probability=0.25, mode="pixel", device="cpu")(x.clone())
        changed = (out != 0).any(0).numpy()
        top, left, bh, bw = box
        want = np.zeros((h, w), bool)
        want[top:top + bh, left:left + bw] = True
        np.testing.assert_array_equal(changed, want)
        erased += bool(bh)
    assert 5 <= erased <= 30  # about a quarter of 60


def test_random_erasing_boxes_and_fill_follow_timms_distribution():
    import random as py_random

    re_mod = load("data/random_erasing")
    re_mod.random = py_random
    py_random.seed(0)
    torch.manual_seed(0)
    h, w, n = 24, 30, 3000
    ref_boxes, ref_fill = [], []
    eraser = re_mod.RandomErasing(probability=0.25, mode="pixel", device="cpu")
    for _ in range(n):
        out = eraser(torch.full((3, h, w), 100.0))
        mask = (out != 100.0).any(0).numpy()
        if mask.any():
            ys, xs = np.nonzero(mask)
            ref_boxes.append((ys.min(), xs.min(), np.ptp(ys) + 1, np.ptp(xs) + 1))
            ref_fill.append(out[:, mask].numpy().ravel())
    rng = np.random.default_rng(0)
    ours = augment.RandomErasing(prob=0.25)
    boxes = np.stack([ours.boxes(rng, h, w)[0] for _ in range(n)])
    boxes = boxes[boxes[:, 2] > 0]
    assert stats.chi2_contingency([[len(boxes), n - len(boxes)],
                                   [len(ref_boxes), n - len(ref_boxes)]])[1] > P_MIN
    ref_boxes = np.asarray(ref_boxes)
    for k, what in enumerate(("top", "left", "height", "width")):
        assert stats.ks_2samp(boxes[:, k], ref_boxes[:, k]).pvalue > P_MIN, what
    # the device fill: N(0, 1) per pixel and channel, as timm's normal_()
    x = jnp.full((4, h, w, 3), 7.0)
    b = jnp.asarray(boxes[:4, None, :])
    filled = np.asarray(mixing.erase(jax.random.PRNGKey(0), x, b, "pixel"))
    inside = np.asarray(mixing.box_mask(jnp.stack([b[:, 0, 0], b[:, 0, 0] + b[:, 0, 2],
                                                   b[:, 0, 1], b[:, 0, 1] + b[:, 0, 3]], -1),
                                        h, w))
    assert np.all(filled[~inside] == 7.0)
    values = filled[inside].ravel()
    assert stats.ks_2samp(values, np.concatenate(ref_fill)[:20000]).pvalue > P_MIN
    assert stats.kstest(values, "norm").pvalue > P_MIN


# --- mixup / cutmix ----------------------------------------------------------------------


class _NumpyFeed:
    """timm mixup's `np` with its random draws replaced by planned ones."""

    def __init__(self, rand=(), beta=(), randint=()):
        feed = self

        class Random:
            @staticmethod
            def rand(*size):
                return feed.rand.pop(0)

            @staticmethod
            def beta(a, b, size=None):
                return feed.beta.pop(0)

            @staticmethod
            def randint(lo, hi, size=None):
                v = feed.randint.pop(0)
                assert lo <= v < hi
                return v

        self.rand, self.beta, self.randint, self.random = list(rand), list(beta), list(randint), Random

    def __getattr__(self, name):
        return getattr(np, name)


def _mixed_by_timm(mod, x, labels, k, mode, feed):
    mod.np = feed
    mixer = mod.Mixup(mixup_alpha=0.7, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5, mode=mode,
                      label_smoothing=0.1, num_classes=k)
    xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)).copy())
    out, target = mixer(xt, torch.tensor(labels))
    assert not (feed.rand or feed.beta or feed.randint)  # timm used exactly the planned draws
    return np.transpose(out.numpy(), (0, 2, 3, 1)), target.numpy()


def _mixed_by_us(x, labels, k, lam, cut, cy, cx):
    b, h, w = x.shape[:3]
    boxes = mixing.bbox(jnp.asarray(lam), jnp.asarray(cy), jnp.asarray(cx), h, w)
    targets = mixing.smooth_one_hot(jnp.asarray(labels), k, 0.1)
    out, t = mixing.mix(jnp.asarray(x), targets, jnp.asarray(lam, jnp.float32),
                        jnp.asarray(cut), boxes)
    return np.asarray(out), np.asarray(t)


@pytest.mark.parametrize("case", ["mixup", "cutmix", "none", "cutmix_edge"])
def test_batch_mixing_matches_timm_given_the_same_draws(case):
    mod = load("data/mixup")
    b, h, w, k = 6, 12, 10, 5
    rng = np.random.default_rng(3)
    x = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    labels = rng.integers(0, k, b)
    lam, cut, cy, cx = {"mixup": (0.63, False, 0, 0), "cutmix": (0.41, True, 5, 4),
                        "none": (1.0, False, 0, 0), "cutmix_edge": (0.2, True, 11, 0)}[case]
    applied = case != "none"
    feed = _NumpyFeed(rand=[0.0 if applied else 0.99] + ([0.0 if cut else 0.99] if applied else []),
                      beta=[lam] if applied else [], randint=[cy, cx] if cut else [])
    ref_x, ref_t = _mixed_by_timm(mod, x, labels, k, "batch", feed)
    ours_x, ours_t = _mixed_by_us(x, labels, k, np.full(b, lam), np.full(b, cut),
                                  np.full(b, cy), np.full(b, cx))
    np.testing.assert_allclose(ours_x, ref_x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours_t, ref_t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_per_row_mixing_matches_timm_given_the_same_draws(mode):
    mod = load("data/mixup")
    b, h, w, k = 6, 12, 10, 4
    rng = np.random.default_rng(5)
    x = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    labels = rng.integers(0, k, b)
    n = b if mode == "elem" else b // 2
    cut = np.array([True, False, True, False, True, True][:n])
    lam_cut, lam_mix = rng.uniform(0.1, 0.9, n), rng.uniform(0.1, 0.9, n)
    apply_ = np.array([True, True, False, True, True, True][:n])
    lam = np.where(apply_, np.where(cut, lam_cut, lam_mix), 1.0)
    centres = [(int(rng.integers(0, h)), int(rng.integers(0, w))) for _ in range(n)]
    randint = [v for i in range(n) if cut[i] and apply_[i] for v in centres[i]]
    feed = _NumpyFeed(rand=[np.where(cut, 0.0, 0.99), np.where(apply_, 0.0, 0.99)],
                      beta=[lam_cut, lam_mix], randint=randint)
    ref_x, ref_t = _mixed_by_timm(mod, x, labels, k, mode, feed)
    cy, cx = np.array([c[0] for c in centres]), np.array([c[1] for c in centres])
    if mode == "pair":  # row B-1-i shares row i's draws
        lam, cut, cy, cx = (np.concatenate([v, v[::-1]]) for v in (lam, cut & apply_, cy, cx))
    else:
        cut = cut & apply_
    ours_x, ours_t = _mixed_by_us(x, labels, k, lam, cut, cy, cx)
    np.testing.assert_allclose(ours_x, ref_x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours_t, ref_t, rtol=0, atol=1e-6)


def test_mixing_draws_follow_timms_distribution():
    """Which batches are mixed, mixup vs cutmix, lam, and cutmix's area-corrected
    lam: ours (jax keys) vs timm's (numpy), 4,000 batches each."""
    mod = load("data/mixup")
    n, h, w = 4000, 14, 10
    m = mixing.Mixing(0.7, 1.0, 0.9, 0.5, "batch")
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    p = jax.vmap(lambda key: mixing.sample_params(key, 2, m))(keys)
    lam, cut = np.asarray(p["lam"][:, 0]), np.asarray(p["cutmix"][:, 0])
    boxes = jax.vmap(lambda key, l: mixing.cutmix_boxes(key, l, h, w))(
        jax.random.split(jax.random.PRNGKey(1), n), p["lam"])
    area = np.asarray((boxes[:, 0, 1] - boxes[:, 0, 0]) * (boxes[:, 0, 3] - boxes[:, 0, 2]))
    ours_corrected = 1 - area[cut] / (h * w)

    np.random.seed(0)
    mixer = mod.Mixup(mixup_alpha=0.7, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5)
    ref = [mixer._params_per_batch() for _ in range(n)]
    ref_lam = np.array([r[0] for r in ref])
    ref_cut = np.array([r[1] for r in ref])
    ref_corrected = np.array([mod.cutmix_bbox_and_lam((1, 3, h, w), l)[1]
                              for l in ref_lam[ref_cut]])
    mixed, ref_mixed = lam < 1, ref_lam < 1
    assert stats.chi2_contingency([[mixed.sum(), n - mixed.sum()],
                                   [ref_mixed.sum(), n - ref_mixed.sum()]])[1] > P_MIN
    assert stats.chi2_contingency([[cut.sum(), mixed.sum() - cut.sum()],
                                   [ref_cut.sum(), ref_mixed.sum() - ref_cut.sum()]])[1] > P_MIN
    assert stats.ks_2samp(lam[mixed & ~cut], ref_lam[ref_mixed & ~ref_cut]).pvalue > P_MIN
    assert stats.ks_2samp(lam[cut], ref_lam[ref_cut]).pvalue > P_MIN
    assert stats.ks_2samp(ours_corrected, ref_corrected).pvalue > P_MIN


def test_soft_target_loss_is_timms_soft_target_cross_entropy():
    ce = load("loss/cross_entropy")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    targets = rng.dirichlet(np.ones(5), 6).astype(np.float32)
    ref = ce.SoftTargetCrossEntropy()(torch.tensor(logits), torch.tensor(targets)).item()
    ours = float(compute_loss(finetune_config("imagenet_v2"), jnp.asarray(logits),
                              jnp.zeros(6, jnp.int32), (0.0, 1.0), jnp.asarray(targets)))
    assert ours == pytest.approx(ref, rel=1e-6)
    # unmixed rows with smoothing 0.1: timm's LabelSmoothingCrossEntropy value
    labels = rng.integers(0, 5, 6)
    smooth = ce.LabelSmoothingCrossEntropy(0.1)(torch.tensor(logits), torch.tensor(labels)).item()
    soft = mixing.smooth_one_hot(jnp.asarray(labels), 5, 0.1)
    assert float(compute_loss(finetune_config("imagenet_v2"), jnp.asarray(logits),
                              jnp.asarray(labels), (0.0, 1.0), soft)) == pytest.approx(smooth,
                                                                                        rel=1e-5)


def test_device_augment_normalizes_erases_and_mixes_with_smoothed_targets():
    m = mixing.Mixing(0.7, 1.0, 1.0, 0.5, "batch")
    aug = mixing.DeviceAugment("image", MEAN, (0.229, 0.224, 0.225), m, 0.1, "pixel")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    boxes = np.zeros((4, 1, 4), np.int32)
    labels = jnp.asarray([0, 1, 2, 1])
    out, t = jax.jit(lambda b, k: aug(b, labels, 3, k))(
        {"image": jnp.asarray(img), "erase_box": jnp.asarray(boxes)}, jax.random.PRNGKey(0))
    assert "erase_box" not in out and out["image"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, atol=1e-6)
    # no mixing, no box: the model's own normalization, the smoothed one-hot targets
    still = mixing.DeviceAugment("image", MEAN, (0.229, 0.224, 0.225), mixing.Mixing(), 0.1)
    out, t = jax.jit(lambda b, k: still(b, labels, 3, k))(
        {"image": jnp.asarray(img), "erase_box": jnp.asarray(boxes)}, jax.random.PRNGKey(0))
    norm = (img / 255.0 - np.asarray(MEAN)) / np.asarray((0.229, 0.224, 0.225))
    np.testing.assert_allclose(np.asarray(out["image"]), norm, atol=1e-5)
    np.testing.assert_allclose(np.asarray(t)[0], [0.1 / 3 + 0.9, 0.1 / 3, 0.1 / 3], atol=1e-7)
    with pytest.raises(ValueError, match="even batch"):
        aug({"image": jnp.asarray(img[:3])}, labels[:3], 3, jax.random.PRNGKey(0))


def test_eval_resize_and_centre_crop_are_torchvisions():
    """Resize(256) then CenterCrop(224) as torchvision computes them: the
    longer side int(256 * long / short), crop offsets int(round(d / 2))."""
    rng = np.random.default_rng(0)
    for h, w in [(375, 500), (500, 333), (300, 300), (257, 641)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        short = 256
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
        ref = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BICUBIC))
        ref = ref[top:top + 224, left:left + 224]
        np.testing.assert_array_equal(resize_center_crop(img, 224, 224 / 256), ref)


def test_image_finetune_transform_draws_are_seeded_and_ship_erase_boxes(tmp_path):
    from d2v_jax.modalities.image.labeled import ImageFinetuneTransform, image_view
    from helpers import tiny_config

    config = finetune_config("imagenet_v2", **{"data.path": str(tmp_path)})
    view = image_view(config, tiny_config("image", **{"model.channels": 3,
                                                       "data.mean": MEAN,
                                                       "data.std": (0.229, 0.224, 0.225)}))
    t = ImageFinetuneTransform(config, view)
    assert t.policy.increasing and t.erasing.prob == 0.25 and t.device_augment.mixing.active
    element = {"image": np.asarray(_image(40, 48)), "label": 1, "index": 7}
    a, b, c = t(element, 0), t(element, 0), t(element, 1)
    np.testing.assert_array_equal(a["image"], b["image"])  # (seed, epoch, index) fixes it
    assert a["image"].shape == (32, 32, 3) and a["erase_box"].shape == (1, 4)
    assert not np.array_equal(a["image"], c["image"])
    assert math.isclose(t.eval.crop_fraction, 224 / 256)
