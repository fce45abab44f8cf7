"""Device-side image fine-tuning augmentation, inside the jitted train step:
normalization, random erasing's noise, mixup / cutmix and their soft targets
with label smoothing (timm's `Mixup` and `RandomErasing`, as data2vec 2.0's
`MaeImageClassificationModel` and BEiT's `run_class_finetuning.py` use them).

Order as in the official code: the host pipeline crops, flips and RandAugments
uint8 pixels (`augment.py`); here they are normalized ((x / 255 - mean) / std,
the model's own formula), the erased boxes drawn on the host are filled with
N(0, 1) noise (timm erases after normalizing), then the batch is mixed with
its reverse (timm mixes `x.flip(0)`) and the one-hot targets, smoothed, are
mixed with the same weights. The model takes a float image as normalized.

Every draw is from the step's key; shapes are static (boxes are masks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from d2v_jax.errors import ConfigError
from d2v_jax.modalities.image.model import normalize_pixels

MIX_MODES = ("batch", "pair", "elem")


@dataclasses.dataclass(frozen=True)
class Mixing:
    """timm Mixup's parameters (`mixup_alpha`, `cutmix_alpha`, `prob`,
    `switch_prob`, `mode`, `label_smoothing`; `correct_lam` on, no cutmix minmax)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"

    def __post_init__(self):
        if self.mode not in MIX_MODES:
            raise ConfigError(f"config.mixup.mode={self.mode!r}; expected one of {MIX_MODES}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError(f"config.mixup: alphas mixup={self.mixup_alpha}, cutmix="
                              f"{self.cutmix_alpha} must be >= 0")
        for name in ("prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"config.mixup.{name}={getattr(self, name)} is not in [0, 1]")

    @property
    def active(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """timm `mixup_target`'s one-hot: off = smoothing / K, on = 1 - smoothing + off."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def sample_params(key: jax.Array, batch_size: int, m: Mixing) -> dict[str, jax.Array]:
    """Per-row (lam [B] before cutmix's area correction, cutmix bool [B]) drawn
    as timm does: `batch` one draw for the whole batch, `elem` one per row,
    `pair` one per pair (row i and row B-1-i share it). A row is mixed with
    probability `prob`; with both alphas > 0 it is cutmix with probability
    `switch_prob`, lam ~ Beta(alpha, alpha) of the chosen kind; unmixed rows
    have lam = 1."""
    n = {"batch": 1, "elem": batch_size, "pair": batch_size // 2}[m.mode]
    k_apply, k_switch, k_cut, k_mix = jax.random.split(key, 4)
    applied = jax.random.uniform(k_apply, (n,)) < m.prob
    if m.mixup_alpha > 0 and m.cutmix_alpha > 0:
        cut = jax.random.uniform(k_switch, (n,)) < m.switch_prob
        lam = jnp.where(cut, jax.random.beta(k_cut, m.cutmix_alpha, m.cutmix_alpha, (n,)),
                        jax.random.beta(k_mix, m.mixup_alpha, m.mixup_alpha, (n,)))
    elif m.mixup_alpha > 0:
        cut = jnp.zeros((n,), bool)
        lam = jax.random.beta(k_mix, m.mixup_alpha, m.mixup_alpha, (n,))
    else:
        cut = jnp.ones((n,), bool)
        lam = jax.random.beta(k_cut, m.cutmix_alpha, m.cutmix_alpha, (n,))
    lam = jnp.where(applied, lam.astype(jnp.float32), 1.0)
    cut = cut & applied
    if m.mode == "batch":
        lam, cut = jnp.broadcast_to(lam, (batch_size,)), jnp.broadcast_to(cut, (batch_size,))
    elif m.mode == "pair":
        lam, cut = jnp.concatenate([lam, lam[::-1]]), jnp.concatenate([cut, cut[::-1]])
    return {"lam": lam, "cutmix": cut}


def cutmix_boxes(key: jax.Array, lam: jax.Array, height: int, width: int,
                 mode: str = "batch") -> jax.Array:
    """int32 [B, 4] (y_lo, y_hi, x_lo, x_hi): timm's `rand_bbox` for each row's
    lam, a box of (H sqrt(1 - lam), W sqrt(1 - lam)) around a uniform centre,
    clipped to the image (y_hi = cy + cut_h // 2, the timm of the official
    runs). The centre is drawn per batch / pair / row like lam."""
    b = lam.shape[0]
    n = {"batch": 1, "elem": b, "pair": b // 2}[mode]
    ky, kx = jax.random.split(key)
    cy, cx = jax.random.randint(ky, (n,), 0, height), jax.random.randint(kx, (n,), 0, width)
    if mode == "batch":
        cy, cx = jnp.broadcast_to(cy, (b,)), jnp.broadcast_to(cx, (b,))
    elif mode == "pair":
        cy, cx = jnp.concatenate([cy, cy[::-1]]), jnp.concatenate([cx, cx[::-1]])
    return bbox(lam, cy, cx, height, width)


def bbox(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int) -> jax.Array:
    """timm's `rand_bbox` for given centres: int32 [B, 4] (y_lo, y_hi, x_lo, x_hi)."""
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy, cx = jnp.asarray(cy, jnp.int32), jnp.asarray(cx, jnp.int32)
    return jnp.stack([jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
                      jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)],
                     axis=-1).astype(jnp.int32)


def box_mask(boxes: jax.Array, height: int, width: int) -> jax.Array:
    """bool [B, H, W]: inside (y_lo <= y < y_hi, x_lo <= x < x_hi) of each row's box."""
    y = jnp.arange(height)[None, :, None]
    x = jnp.arange(width)[None, None, :]
    b = boxes[:, :, None, None]
    return (y >= b[:, 0]) & (y < b[:, 1]) & (x >= b[:, 2]) & (x < b[:, 3])


def mix(x: jax.Array, targets: jax.Array, lam: jax.Array, cutmix: jax.Array,
        boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """timm's mixing with the batch's reverse: a cutmix row takes its partner's
    pixels inside its box and lam becomes 1 - box area / image area; a mixup
    row is lam x + (1 - lam) x_partner. Targets [B, K] mix the same way."""
    _, h, w = x.shape[:3]
    partner = x[::-1]
    inside = box_mask(boxes, h, w) & cutmix[:, None, None]
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    lam = jnp.where(cutmix, 1.0 - area.astype(jnp.float32) / (h * w), lam)
    lam_x = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    mixed = jnp.where(cutmix.reshape(lam_x.shape), x, x * lam_x + partner * (1.0 - lam_x))
    mixed = jnp.where(inside[..., None], partner, mixed)
    targets = targets * lam[:, None] + targets[::-1] * (1.0 - lam[:, None])
    return mixed, targets


def erase(key: jax.Array, x: jax.Array, boxes: jax.Array, mode: str = "pixel") -> jax.Array:
    """Fills each (top, left, h, w) box of `boxes` [B, K, 4] (h = 0: none) of the
    normalized images x [B, H, W, C]: `pixel` with N(0, 1) per pixel and
    channel, `rand` one N(0, 1) colour per box, `const` with 0 (timm
    RandomErasing's modes). Later boxes overwrite earlier ones, as in timm."""
    b, h, w, c = x.shape
    for k in range(boxes.shape[1]):  # the few boxes per image (re_count), unrolled
        top, left, bh, bw = (boxes[:, k, i] for i in range(4))
        inside = box_mask(jnp.stack([top, top + bh, left, left + bw], -1), h, w)
        key, sub = jax.random.split(key)
        if mode == "pixel":
            fill = jax.random.normal(sub, x.shape, x.dtype)
        elif mode == "rand":
            fill = jax.random.normal(sub, (b, 1, 1, c), x.dtype)
        else:
            fill = jnp.zeros((), x.dtype)
        x = jnp.where(inside[..., None], fill, x)
    return x


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """The image task's in-step augmentation: `(batch, labels, num_classes, key)
    -> (batch with a normalized float image, soft targets [B, K])`."""

    input_key: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mixing: Mixing
    label_smoothing: float = 0.0
    erase_mode: str = "pixel"

    def __call__(self, batch: dict, labels: jax.Array, num_classes: int, key: jax.Array
                 ) -> tuple[dict, jax.Array]:
        batch = dict(batch)
        boxes = batch.pop("erase_box", None)
        x = normalize_pixels(batch[self.input_key], self.mean, self.std)
        k_erase, k_mix, k_box = jax.random.split(key, 3)
        if boxes is not None:
            x = erase(k_erase, x, boxes, self.erase_mode)
        targets = smooth_one_hot(labels, num_classes, self.label_smoothing)
        if self.mixing.active:
            if x.shape[0] % 2:
                raise ConfigError(f"config.data.batch_size={x.shape[0]}: mixup / cutmix mix "
                                  "each image with the batch's reverse and need an even batch")
            p = sample_params(k_mix, x.shape[0], self.mixing)
            boxes = cutmix_boxes(k_box, p["lam"], x.shape[1], x.shape[2], self.mixing.mode)
            x, targets = mix(x, targets, p["lam"], p["cutmix"], boxes)
        batch[self.input_key] = x
        return batch, targets
