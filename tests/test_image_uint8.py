"""Images reach the device as uint8 and are normalized there: the
host pipeline's batches are uint8, and the model's on-device normalization
gives the same inputs, representations and loss as the old host float path
(numpy `(x / 255 - mean) / std` on the same uint8 pixels)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from d2v_jax import modalities
from d2v_jax.config import load_config
from d2v_jax.modalities.image.model import normalize_pixels
from d2v_jax.train_step import make_train_step

from helpers import IMAGE, TINY_IMAGE, init_state

# ImageNet statistics (the base configs'), so every channel is scaled differently.
RGB = {"model.channels": 3, "data.mean": (0.485, 0.456, 0.406), "data.std": (0.229, 0.224, 0.225)}


def numpy_normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
    """The reference, written from the definition in float64."""
    x = pixels.astype(np.float64) / 255.0
    return ((x - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)).astype(np.float32)


def test_normalize_pixels_matches_the_definition():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)  # the ends of the range
    got = np.asarray(jax.jit(lambda x: normalize_pixels(x, RGB["data.mean"], RGB["data.std"]))(pixels))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, numpy_normalize(pixels, RGB["data.mean"], RGB["data.std"]),
                               rtol=0, atol=2e-6)
    assert got[0, 0, 0, 2] == pytest.approx((1 - 0.406) / 0.225, abs=1e-6)
    # Float input counts as already normalized: passed through untouched.
    floats = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(normalize_pixels(floats, (0.5,), (0.5,))), floats)


@pytest.mark.parametrize("arg,overrides", [("tiny_v1", {}), ("tiny_v2", RGB)])
def test_uint8_batch_equals_the_host_float_path(arg, overrides):
    """The pipeline's uint8 batch through the model and the train step equals the
    same pixels normalized on the host (the float32 batches of a host-side normalization)."""
    config = load_config(f"{IMAGE}:{arg}", {**TINY_IMAGE, "data.batch_size": 2,
                                             "masking.num_clones": 2, **overrides})
    model = modalities.build_model(config)
    state = init_state(config, jax.random.PRNGKey(0), model=model)
    batch = modalities.dummy_batch(config, 2)
    assert batch["image"].dtype == np.uint8  # init and tracing see the pipeline's dtype
    rng = np.random.default_rng(1)
    batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
    for b in range(2):
        for j in range(config.masking.num_clones):
            batch["mask"][b, j] = rng.permutation(batch["mask"][b, j])
    old = {**batch, "image": numpy_normalize(batch["image"], config.data.mean, config.data.std)}

    encode = jax.jit(lambda p, b: model.apply({"params": p}, b, method="encode"))
    h_new, h_old = encode(state.params, batch), encode(state.params, old)
    np.testing.assert_allclose(np.asarray(h_new), np.asarray(h_old), rtol=1e-5, atol=1e-5)
    assert float(np.abs(np.asarray(h_new)).mean()) > 0.1  # not a degenerate comparison

    step = jax.jit(make_train_step(config))
    key = jax.random.PRNGKey(2)
    _, m_new = step(state, batch, key)
    _, m_old = step(state, old, key)
    assert float(m_new["loss"]) == pytest.approx(float(m_old["loss"]), rel=1e-5)
    assert float(m_new["grad_norm"]) == pytest.approx(float(m_old["grad_norm"]), rel=1e-4)


def test_pretrain_transform_emits_uint8_rgb(tmp_path):
    """The folder recipe (jitter, crop, flip) stays uint8 end to end."""
    from PIL import Image

    from d2v_jax.modalities.image.sources import make_source
    from d2v_jax.modalities.image.transforms import PretrainTransform

    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    config = load_config(f"{IMAGE}:tiny_v1", {**RGB, "data.source": "image_folder",
                                              "data.path": str(tmp_path),
                                              "data.color_jitter": (0.4, 0.4, 0.4), "data.flip": True,
                                              "data.holdout_fraction": 0.0})
    from d2v_jax.data.rng import AUG_STREAM, example_rng
    from d2v_jax.modalities.image import transforms as T

    t = PretrainTransform(config)
    pil_source = make_source(config, as_pil=True)  # what the pipeline reads
    flips = 0
    for epoch in range(8):
        out = t(pil_source[0], epoch)
        assert out["image"].dtype == np.uint8 and out["image"].shape == (32, 32, 3)
        assert out["image"].flags["C_CONTIGUOUS"]
        # The public array functions in the recipe's order, on the decoded array.
        rng = example_rng(config.seed, epoch, 0, AUG_STREAM)
        image = T.color_jitter(rng, make_source(config)[0]["image"], 0.4, 0.4, 0.4)
        crop = T.random_resized_crop(rng, image, 32, t.crop_scale, t.crop_ratio)
        want = T.maybe_flip(rng, crop)
        flips += want is not crop
        np.testing.assert_array_equal(out["image"], want)
    assert 0 < flips < 8  # both branches of the flip were compared


def test_image_masks_fast_path_draws_the_reference_masks():
    """image_masks' hoisted inverse-block loop (pipeline speed) makes the same
    calls on the generator as one inverse_block_mask per clone: equal masks."""
    from d2v_jax.modalities.image import masking

    for seed in range(20):
        for grid, ratio, size in (((14, 14), 0.8, 3), ((5, 7), 0.5, 2), ((4, 4), 1.0, 1)):
            cfg = {"kind": "inverse_block", "num_clones": 4, "ratio": ratio, "block_size": size,
                   "prob_adjust": 0.07}
            got = masking.image_masks(np.random.default_rng(seed), grid, cfg)
            rng = np.random.default_rng(seed)
            want = [masking.inverse_block_mask(rng, grid, ratio, block_size=size).reshape(-1)
                    for _ in range(4)]
            np.testing.assert_array_equal(got, np.stack(want))
            assert (got.sum(1) == masking.num_masked_inverse(grid, ratio)).all()


def test_folder_source_as_pil_gives_the_same_pixels(tmp_path):
    """The pretraining pipeline reads decoded PIL images (no full-size array
    copy); the pixels are the array source's."""
    from PIL import Image

    from d2v_jax.modalities.image.sources import ImageFolderSource

    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(tmp_path / "a" / "y.png")
    arrays = ImageFolderSource(tmp_path, channels=3)
    pils = ImageFolderSource(tmp_path, channels=3, as_pil=True)
    for i in range(2):
        pil = pils[i]["image"]
        assert isinstance(pil, Image.Image) and pil.mode == "RGB"  # the gray PNG converted
        np.testing.assert_array_equal(np.asarray(pil), arrays[i]["image"])
