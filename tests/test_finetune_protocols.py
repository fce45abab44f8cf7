"""The fine-tuning machinery the official protocols need, each piece against
an independent computation from the official description: fairseq's
polynomial_decay and cosine warm-up, layer-wise lr decay of the blocks only
(data2vec 2.0) or with the front-end and per-block tables (BEiT), weight decay
on every parameter (fairseq's plain adam), RoBERTa's classification head,
BEiT's shared relative position table copied into every block, the encoder's
drop path in training, and a short run of the ImageNet protocol."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.finetune import optim as ft_optim
from d2v_jax.finetune.model import FinetuneModel, load_backbone_into

from helpers import finetune_config, make_image_folder, tiny_config


def test_polynomial_schedule_is_fairseqs_polynomial_decay():
    config = finetune_config("glue_rte")
    sched = ft_optim.make_schedule(config, 2036)
    lr, w, total = 2e-5, 122, 2036
    for k in (1, 60, 122, 500, 1500, 2035):
        # polynomial_decay_schedule.py: warm-up k / w x lr, then
        # (lr - end) * (1 - (k - w) / (total - w)) ** power + end
        want = k / w * lr if k <= w else lr * (1 - (k - w) / (total - w))
        assert float(sched(k)) == pytest.approx(want, rel=1e-5)


def test_cosine_warms_up_from_min_lr_as_fairseq():
    config = finetune_config("imagenet_v2")
    sched = ft_optim.make_schedule(config, 250_200)
    lr, min_lr, w, total = 1e-3, 1e-6, 16_000, 250_200
    for k in (0, 8000, 16_000, 100_000, 250_199):
        # cosine_lr_scheduler.py: warmup_init_lr = min_lr, linear to lr, then
        # min_lr + 0.5 (lr - min_lr)(1 + cos(pi (k - w) / (total - w)))
        want = (min_lr + k * (lr - min_lr) / w if k < w else
                min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * (k - w) / (total - w))))
        assert float(sched(k)) == pytest.approx(want, rel=1e-4)


def _params(depth=3):
    return {"backbone": {"frontend": {"patch_embed": {"kernel": np.ones((2, 2, 3, 4))},
                                      "rel_pos_bias": {"relative_position_bias_table":
                                                       np.ones((depth, 5, 2))}},
                         "encoder": {"blocks": {"mlp": {"kernel": np.ones((depth, 4, 4))}},
                                     "norm": {"scale": np.ones(4)}}},
            "head": {"kernel": np.ones((4, 2)), "bias": np.ones(2)}}


def test_layer_decay_of_the_blocks_only_and_of_per_block_tables():
    d, L = 0.65, 3
    # fairseq data2vec 2.0: num_layers = L + 1, block i gets decay ** (num_layers - (i + 1));
    # everything outside the blocks keeps lr x 1.
    s = ft_optim.layer_scales(_params(L), L, d, top=(), frontend=False)
    blocks = np.asarray(s["backbone"]["encoder"]["blocks"]["mlp"]["kernel"]).ravel()
    np.testing.assert_allclose(blocks, [d ** ((L + 1) - (i + 1)) for i in range(L)], rtol=1e-6)
    assert s["backbone"]["frontend"]["patch_embed"]["kernel"] == 1.0
    assert s["head"]["kernel"] == 1.0
    # BEiT: LayerDecayValueAssigner(decay ** (L + 1 - i)), patch_embed at layer 0, block i's
    # relative_position_bias_table at layer i + 1.
    s = ft_optim.layer_scales(_params(L), L, d, top=(), frontend=True, per_block=("rel_pos_bias",))
    assert s["backbone"]["frontend"]["patch_embed"]["kernel"] == pytest.approx(d ** (L + 1))
    table = np.asarray(s["backbone"]["frontend"]["rel_pos_bias"]["relative_position_bias_table"])
    np.testing.assert_allclose(table.ravel(), [d ** (L + 1 - (i + 1)) for i in range(L)], rtol=1e-6)


@pytest.mark.parametrize("scope,decays_bias", [("all", True), ("matrices", False)])
def test_weight_decay_scope(scope, decays_bias):
    config = finetune_config("glue_rte", **{"optim.decay_scope": scope, "optim.warmup_steps": 0})
    params = jax.tree.map(jnp.asarray, {"backbone": {"dense": {"kernel": np.ones((2, 2)),
                                                               "bias": np.ones(2)}}})
    tx, sched = ft_optim.make_optimizer(config, params, depth=1, steps=10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    lr = float(sched(0))
    # decoupled decay (fairseq's adam): p -= lr * wd * p, only the decay term with zero grads
    assert float(updates["backbone"]["dense"]["kernel"][0, 0]) == pytest.approx(-lr * 0.1)
    assert float(updates["backbone"]["dense"]["bias"][0]) == pytest.approx(
        -lr * 0.1 if decays_bias else 0.0)


def _tiny_text_model(kind="roberta", **kw):
    bconfig = tiny_config("text", "tiny_v2", **{"model.vocab_size": 40, "tokenizer.path": "x",
                                                "model.dropout": 0.1})
    model = FinetuneModel(bconfig, 3, pool="cls", norm="none", kind=kind, init_kind="torch_linear",
                          **kw)
    batch = {"tokens": jnp.asarray(np.arange(2 * 6).reshape(2, 6) % 30 + 5, jnp.int32),
             "padding_mask": jnp.zeros((2, 6), bool)}
    return model, batch


def test_roberta_head_on_the_first_position_with_torch_linear_init():
    model, batch = _tiny_text_model()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
    dim = 32
    dense, out = params["dense"], params["out_proj"]
    for layer, fan_in in ((dense, dim), (out, dim)):  # nn.Linear: U(+-1/sqrt(fan_in))
        for leaf in (layer["kernel"], layer["bias"]):
            assert float(jnp.abs(leaf).max()) <= 1 / np.sqrt(fan_in)
            assert float(jnp.abs(leaf).max()) > 0.5 / np.sqrt(fan_in)
    h = jax.jit(lambda p: model.apply({"params": p}, batch,
                                      method=lambda m, b: m.backbone.encode(b)))(params)
    x = np.asarray(h[:, 0], np.float64)
    want = np.tanh(x @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]))
    want = want @ np.asarray(out["kernel"]) + np.asarray(out["bias"])
    logits = jax.jit(lambda p: model.apply({"params": p}, batch))(params)
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5)


def test_stochastic_encoder_drops_in_training_only():
    model, batch = _tiny_text_model(stochastic_encoder=True)
    plain, _ = _tiny_text_model(stochastic_encoder=False)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
    run = lambda m, key, train: np.asarray(jax.jit(
        lambda p, k: m.apply({"params": p}, batch, train=train, rngs={"dropout": k}))(params, key))
    a, b = run(model, jax.random.PRNGKey(1), True), run(model, jax.random.PRNGKey(2), True)
    assert not np.allclose(a, b)  # the backbone's dropout 0.1 acts
    np.testing.assert_array_equal(run(model, jax.random.PRNGKey(1), False),
                                  run(plain, jax.random.PRNGKey(2), True))


def test_shared_relative_position_table_goes_into_every_block():
    L = 3
    want = {"backbone": {"frontend": {"rel_pos_bias": {"relative_position_bias_table":
                                                       jnp.zeros((L, 5, 2))}}}}
    table = np.arange(10.0).reshape(5, 2)
    got = load_backbone_into(want, {"frontend": {"rel_pos_bias": {
        "relative_position_bias_table": table}}})
    out = np.asarray(got["backbone"]["frontend"]["rel_pos_bias"]["relative_position_bias_table"])
    assert out.shape == (L, 5, 2) and all(np.array_equal(out[i], table) for i in range(L))


@pytest.mark.slow  # a short run of the ImageNet 2.0 protocol (tiny ViT, RGB folders)
def test_imagenet_v2_protocol_runs_on_train_and_val_folders(tmp_path):
    from d2v_jax.finetune.__main__ import main as finetune_main

    train = make_image_folder(tmp_path / "train", n=6, size=20, classes=("a", "b", "c"))
    val = make_image_folder(tmp_path / "val", n=2, size=20, seed=1, classes=("a", "b", "c"))
    backbone = tmp_path / "tiny_image.py"
    backbone.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                        "import helpers\n\ndef get_config(arg=None):\n"
                        "    return helpers.tiny_config('image', 'tiny_v2', **{"
                        "'model.image_size': 16, 'model.channels': 3, "
                        "'data.mean': (0.485, 0.456, 0.406), 'data.std': (0.229, 0.224, 0.225)})\n")
    work = tmp_path / "run"
    argv = ["finetune", "--config=experiments/finetune.py:imagenet_v2", f"--workdir={work}",
            f"--config.data.path={train}", f"--config.data.test_path={val}",
            f"--config.backbone={backbone}:tiny", "--config.data.batch_size=6",
            "--config.train.num_steps=3", "--config.optim.warmup_steps=1"]
    assert finetune_main(argv) == 0
    r = json.load(open(work / "results.json"))
    assert r["num_labels"] == 18 and r["num_test"] == 6 and r["class_names"] == ["a", "b", "c"]
    assert 0 <= r["metrics"]["accuracy"] <= 1


def test_a_test_folder_of_other_classes_is_refused(tmp_path):
    from d2v_jax.errors import DataError
    from d2v_jax.modalities.image.labeled import labeled_parts

    train = make_image_folder(tmp_path / "train", n=2, size=8, classes=("a", "b"))
    val = make_image_folder(tmp_path / "val", n=2, size=8, classes=("a", "c"))
    config = finetune_config("imagenet_v2", **{"data.path": train, "data.test_path": val})
    with pytest.raises(DataError, match=r"test_path=.*val.*class folders differ.*\['c'\]"):
        labeled_parts(config, tiny_config("image"))
    ok = make_image_folder(tmp_path / "val2", n=3, size=8, classes=("a", "b"))
    source, labels, names, _, _ = labeled_parts(
        finetune_config("imagenet_v2", **{"data.path": train, "data.test_path": ok}),
        tiny_config("image"))
    assert names == ["a", "b"] and labels.tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    assert source.splits["test"].tolist() == list(range(4, 10))
    assert source[5]["index"] == 5 and source[5]["image"].shape == (8, 8, 1)
