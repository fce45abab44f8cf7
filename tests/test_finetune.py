"""Fine-tuning and linear probes: label fractions, the fixed test split, metrics
against independent implementations, layer-wise lr decay, the frozen probe and
initialization from a pretraining checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score, mean_absolute_error, mean_squared_error

from d2v_jax import finetune
from d2v_jax.api import save_checkpoint
from d2v_jax.config import load_config, parse_overrides
from d2v_jax.data import splits as labeled

from helpers import FINETUNE, IMAGE, ROOT, TINY_IMAGE, init_state
from helpers import finetune_config as _ft_config
from helpers import flat as _flat

# A 2-block, 32-wide ViT: every test here compiles it at most a few times.
TINY_BACKBONE = {**TINY_IMAGE, "model.depth": 2, "target.top_k": 2, "decoder.dim": 16}


def _imbalanced_labels(rng):
    # 7 classes, one with only 3 examples: a plain random subset would often miss it.
    sizes = [400, 250, 120, 80, 40, 10, 3]
    return rng.permutation(np.repeat(np.arange(len(sizes)), sizes))


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2, 0.5, 1.0])
def test_label_subset_keeps_every_class_and_the_exact_count(fraction):
    labels = _imbalanced_labels(np.random.default_rng(0))
    pool, test = labeled.split_test(labels, 0.2, seed=3)
    subset = labeled.label_subset(labels, pool, fraction, seed=1)
    assert len(subset) == round(fraction * len(pool))
    assert set(np.unique(labels[subset])) == set(np.unique(labels))
    assert len(np.unique(subset)) == len(subset) and np.isin(subset, pool).all()
    # Stratified: each class gets floor or ceil of its proportional share, except
    # that classes with a share below one get one, taken from the largest shares.
    share = np.bincount(labels[pool]) * len(subset) / len(pool)
    got = np.bincount(labels[subset], minlength=len(share))
    raised = int(np.sum(share < 1))
    assert np.all(got <= np.maximum(np.ceil(share), 1))
    assert np.all(got >= np.floor(share) - raised)
    if raised == 0:
        assert np.all(np.abs(got - share) < 1)
    # Fixed by the seed; another seed draws other examples.
    np.testing.assert_array_equal(subset, labeled.label_subset(labels, pool, fraction, seed=1))
    if fraction < 0.5:
        assert not np.array_equal(subset, labeled.label_subset(labels, pool, fraction, seed=2))


def test_allocate_sums_exactly_with_a_floor_of_one():
    counts = labeled.allocate(np.array([400, 250, 120, 80, 40, 10, 3]), 9)
    assert counts.sum() == 9 and counts.min() == 1
    # Hamilton gives [4, 3, 1, 1, 0, 0, 0]; the three empty classes take one each
    # from the classes furthest above their share (0.51, 0.01, then -0.49 above).
    np.testing.assert_array_equal(counts, [3, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"cannot keep every one of 7 classes with 5"):
        labeled.allocate(np.array([400, 250, 120, 80, 40, 10, 3]), 5)


def test_split_test_is_disjoint_stratified_and_fixed_by_split_seed():
    labels = _imbalanced_labels(np.random.default_rng(0))
    pool, test = labeled.split_test(labels, 0.2, seed=3)
    assert len(test) == round(0.2 * len(labels))
    assert len(np.intersect1d(pool, test)) == 0 and len(pool) + len(test) == len(labels)
    np.testing.assert_allclose(np.bincount(labels[test]), np.bincount(labels) * 0.2, atol=1)
    np.testing.assert_array_equal(test, labeled.split_test(labels, 0.2, seed=3)[1])
    assert not np.array_equal(test, labeled.split_test(labels, 0.2, seed=4)[1])
    # Regression targets: a uniform split.
    y = np.random.default_rng(1).normal(size=101).astype(np.float32)
    pool, test = labeled.split_test(y, 0.3, seed=0, stratify=False)
    assert len(test) == 30 and len(pool) == 71


def test_label_fraction_too_small_names_the_field():
    labels = np.repeat(np.arange(10), 20)
    with pytest.raises(ValueError, match=r"config\.data\.label_fraction=0\.02 keeps 4 .* 10 classes"):
        labeled.label_subset(labels, np.arange(200), 0.02, seed=0)
    with pytest.raises(ValueError, match=r"config\.data\.test_fraction"):
        labeled.split_test(labels, 1.5, seed=0)


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 6))  # class 5 is never a label but is predicted
    logits[np.arange(150), labels[:150]] += 3.0
    m = finetune.classification_metrics(logits, labels)
    preds = logits.argmax(-1)
    assert m["accuracy"] == pytest.approx(np.mean(preds == labels))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0))
    log_softmax = np.asarray(jax.nn.log_softmax(logits))
    assert m["loss"] == pytest.approx(-np.mean(log_softmax[np.arange(300), labels]), rel=1e-6)
    y, p = rng.normal(size=200), rng.normal(size=200)
    r = finetune.regression_metrics(p, y)
    assert r["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)))
    assert r["mae"] == pytest.approx(mean_absolute_error(y, p))


def test_evaluate_averages_the_test_time_views():
    """Several views of the same test rows: regression averages the predictions;
    classification scores the normalized geometric mean of the views' softmax
    probabilities, computed here directly with numpy."""
    rng = np.random.default_rng(1)
    n, views, classes = 7, 3, 4
    outs = rng.normal(size=(views, n, classes))
    labels = rng.integers(0, classes, n)

    def batches(task):  # batches of 4 rows, the last padded (valid marks the real rows)
        per_view = []
        for v in range(views):
            view = []
            for start in range(0, n, 4):
                rows = np.arange(start, start + 4) % n
                view.append({"view": np.full(4, v), "row": rows, "label": labels[rows],
                             "valid": np.arange(start, start + 4) < n})
            per_view.append(view)
        return per_view

    def predict(params, batch_stats, b):
        out = outs[b["view"], b["row"]]
        return out if task == "classification" else out[:, 0]

    task = "regression"
    r = finetune.evaluate(predict, finetune.FinetuneState(0, {}, {}, {}), batches(task), task)
    mean = outs[:, :, 0].mean(0)
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean((mean - labels) ** 2)))
    task = "classification"
    c = finetune.evaluate(predict, finetune.FinetuneState(0, {}, {}, {}), batches(task), task)
    probs = np.exp(outs) / np.exp(outs).sum(-1, keepdims=True)
    geo = np.prod(probs, axis=0) ** (1 / views)
    geo /= geo.sum(-1, keepdims=True)
    assert c["accuracy"] == pytest.approx(np.mean(geo.argmax(-1) == labels))
    assert c["loss"] == pytest.approx(-np.mean(np.log(geo[np.arange(n), labels])))
    one = finetune.evaluate(predict, finetune.FinetuneState(0, {}, {}, {}),
                            batches(task)[:1], task)  # one view: the plain metrics
    assert one == pytest.approx(finetune.classification_metrics(outs[0], labels), rel=1e-12)


def test_layer_decay_scales_each_scanned_block():
    depth, decay = 3, 0.5
    params = {"backbone": {"frontend": {"cls_token": jnp.ones(4)},
                           "encoder": {"blocks": {"fc": {"kernel": jnp.ones((depth, 4, 4)),
                                                         "bias": jnp.ones((depth, 4))}}},
                           "rel_pos_bias": {"table": jnp.ones((5, 2))}},
              "head": {"kernel": jnp.ones((4, 2))}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
    updates = {}
    for d in (1.0, decay):
        config = _ft_config(**{"optim.layer_decay": d, "optim.weight_decay": 0.0, "optim.lr": 1.0,
                               "optim.warmup_steps": 0, "optim.schedule": "constant"})
        tx, _ = finetune.make_optimizer(config, params, depth, steps=10)
        updates[d], _ = tx.update(grads, tx.init(params), params)
    ratio = jax.tree.map(lambda a, b: np.asarray(a / b), updates[decay], updates[1.0])
    blocks = ratio["backbone"]["encoder"]["blocks"]["fc"]
    # Block i (0-based) of L: decay^(L - i); the front-end one step further down.
    np.testing.assert_allclose(blocks["kernel"][:, 0, 0], [decay ** 3, decay ** 2, decay], rtol=1e-6)
    np.testing.assert_allclose(blocks["bias"][:, 0], [decay ** 3, decay ** 2, decay], rtol=1e-6)
    np.testing.assert_allclose(ratio["backbone"]["frontend"]["cls_token"], decay ** 4, rtol=1e-6)
    np.testing.assert_allclose(ratio["backbone"]["rel_pos_bias"]["table"], 1.0)  # layer_decay_top
    np.testing.assert_allclose(ratio["head"]["kernel"], 1.0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A pretraining work dir with a tiny model whose EMA differs from the student."""
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    config = load_config(f"{IMAGE}:tiny_v2", TINY_BACKBONE)
    state = init_state(config, jax.random.PRNGKey(7))
    state = state.replace(ema_params=jax.tree.map(lambda x: x + 0.5, state.ema_params),
                          step=jnp.asarray(3, jnp.int32))
    save_checkpoint(workdir, state, config)  # at state.step = 3
    return workdir, jax.device_get(state)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_init_from_checkpoint_starts_from_those_exact_weights(tiny_checkpoint, which):
    workdir, saved = tiny_checkpoint
    config = _ft_config(**{"init.params": which, "data.label_fraction": 0.01})
    run = finetune.prepare(config, workdir)
    assert run.backbone_config.model.dim == 32  # the architecture came from the checkpoint
    source = dict(saved.params)
    if which == "teacher":
        source.update(saved.ema_params)
    got = _flat(run.state.params["backbone"])
    want = _flat({k: source[k] for k in run.state.params["backbone"]})
    assert got.keys() == want.keys() and len(got) > 5
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The pretraining-only decoder is not part of the fine-tuned model.
    assert "decoder" in saved.params and "decoder" not in run.state.params["backbone"]


@pytest.mark.slow
def test_scratch_backbone_from_a_pretraining_workdir_builds_its_architecture(tiny_checkpoint):
    workdir, saved = tiny_checkpoint
    run = finetune.prepare(_ft_config(**{"backbone": workdir, "data.label_fraction": 0.01}), None)
    # The saved config's overrides (32 wide, 2 blocks), not experiments/image.py's tiny_v2 ...
    assert run.backbone_config.model.dim == 32 and run.backbone_config.model.depth == 2
    got = _flat(run.state.params["backbone"])
    want = _flat({k: saved.params[k] for k in run.state.params["backbone"]})
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape for k in want)
    # ... with fresh weights: no kernel equals the checkpoint's.
    kernels = [k for k in want if k.endswith("['kernel']")]
    assert kernels and not any(np.array_equal(got[k], want[k]) for k in kernels)
    assert finetune.held_out_of_pretraining(run.config, run.backbone_config) is True


@pytest.mark.slow  # a short fine-tuning run
def test_linear_probe_freezes_the_encoder_and_trains_the_head(tiny_checkpoint, tmp_path):
    workdir, _ = tiny_checkpoint
    config = _ft_config("mnist_5k_probe", **{"data.label_fraction": 0.01, "train.num_steps": 4,
                                             "train.log_every": 2, "data.batch_size": 8,
                                             "data.eval_batch_size": 500})
    run = finetune.prepare(config, workdir)
    before = jax.device_get(run.state.params)
    state, results = finetune.train_and_evaluate(config, str(tmp_path), workdir)
    after = jax.device_get(state.params)
    for k, v in _flat(before["backbone"]).items():
        np.testing.assert_array_equal(_flat(after["backbone"])[k], v, err_msg=k)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before["head"]), jax.tree.leaves(after["head"])))
    # results.json: the metric names, the label count, the seed; and the plot.
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["num_labels"] == 40 and saved["num_test"] == 1000 and saved["seed"] == 0
    assert set(saved["metrics"]) == {"accuracy", "macro_f1", "loss"}
    assert 0 <= saved["metrics"]["accuracy"] <= 1 and saved["mode"] == "linear_probe"
    assert saved == json.loads(json.dumps(results))
    assert os.path.getsize(tmp_path / "finetune.png") > 1000


@pytest.mark.slow  # a short fine-tuning run
def test_finetune_updates_the_encoder(tiny_checkpoint, tmp_path):
    workdir, saved = tiny_checkpoint
    config = _ft_config(**{"data.label_fraction": 0.01, "train.num_steps": 2,
                           "data.batch_size": 8, "optim.warmup_steps": 0})
    state, results = finetune.train_and_evaluate(config, str(tmp_path), workdir)
    blocks = state.params["backbone"]["encoder"]["blocks"]
    before = saved.params["encoder"]["blocks"]
    assert not np.array_equal(np.asarray(blocks["attn"]["qkv"]["kernel"]),
                              before["attn"]["qkv"]["kernel"])
    assert results["num_labels"] == 40 and results["init_params"] == "student"


@pytest.mark.parametrize("task", ["mnist_5k", "solubility"])
def test_freeze_finetune_updates_holds_the_encoder_of_any_task(task):
    """optim.freeze_finetune_updates = 2: the encoder's updates are exactly zero
    for the first two steps (the head's are not), then the encoder trains."""
    config = _ft_config(task, **{"optim.freeze_finetune_updates": 2, "optim.warmup_steps": 0})
    finetune.validate(config)
    params = {"backbone": {"encoder": {"w": jnp.ones((3,))}}, "head": {"w": jnp.ones((3,))}}
    tx, _ = finetune.make_optimizer(config, params, 2, 10)
    state, grads = tx.init(params), jax.tree.map(jnp.ones_like, params)
    moved = []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        moved.append((bool(jnp.any(updates["backbone"]["encoder"]["w"] != 0)),
                      bool(jnp.all(updates["head"]["w"] != 0))))
    assert moved == [(False, True), (False, True), (True, True)]
    with pytest.raises(ValueError, match=r"config\.optim\.freeze_finetune_updates"):
        finetune.validate(_ft_config(task, **{"optim.freeze_finetune_updates": -1}))


def test_config_errors_name_the_field(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"config\.mode"):
        finetune.validate(_ft_config(mode="probe"))
    with pytest.raises(ValueError, match=r"config\.optim\.layer_decay"):
        finetune.validate(_ft_config(**{"optim.layer_decay": 1.5}))
    with pytest.raises(ValueError, match="bad config arg"):
        _ft_config("cifar")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune.load_pretrained(os.path.join(tiny_checkpoint[0], "nope"))


def test_held_out_of_pretraining_compares_the_holdout_with_the_test_split():
    ft = load_config("experiments/finetune.py:mnist_5k")
    pre = load_config("experiments/image.py:tiny_v2")
    # The tiny image configs hold out exactly the fine-tune's test split ...
    assert pre.data.holdout_fraction == ft.data.test_fraction and finetune.held_out_of_pretraining(ft, pre)
    # ... and any other split, or none, is reported as seen.
    for override in ({"data.holdout_seed": 1}, {"data.holdout_fraction": 0.0}):
        assert not finetune.held_out_of_pretraining(ft, load_config("experiments/image.py:tiny_v2", override))
    assert not finetune.held_out_of_pretraining(load_config("experiments/finetune.py:mnist_5k",
                                                            {"data.split_seed": 3}), pre)


def test_label_efficiency_scratch_arm_builds_the_pretraining_runs_architecture():
    # benchmarks/arms.py by path (it defines no flags; the benchmark script does).
    import importlib.util
    spec = importlib.util.spec_from_file_location("_arms",
                                                  os.path.join(ROOT, "benchmarks", "arms.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    arms = bench.label_efficiency_arms("/runs/le/pretrain", "train.num_steps=5,head.pool=cls",
                                       "", "optim.layer_decay=1.0")
    assert arms == {
        "pretrained": {"train.num_steps": 5, "head.pool": "cls"},
        "scratch": {"backbone": "/runs/le/pretrain", "train.num_steps": 5, "head.pool": "cls",
                    "optim.layer_decay": 1.0}}
    # An explicit scratch backbone wins.
    arms = bench.label_efficiency_arms("/runs/le/pretrain", "", "",
                                       "backbone=experiments/image.py:tiny_v2")
    assert arms["scratch"]["backbone"] == "experiments/image.py:tiny_v2"
    with pytest.raises(ValueError, match="'seed' is not key=value"):
        parse_overrides("seed")
    # A tuple or a quoted value keeps its commas.
    assert parse_overrides("data.extra_sources=('chembl','freesolv'),a.b=[1, 2],c='x,y',d=3") == {
        "data.extra_sources": ("chembl", "freesolv"), "a.b": [1, 2], "c": "x,y", "d": 3}


def test_benchmark_grid_names_runs_and_reuses_finished_ones(tmp_path, monkeypatch):
    """benchmarks/arms.run_grid: one run per (point, seed, arm) under
    runs/<arm>_<tag><point>_s<seed>; a run whose config.json equals its config and
    that has results.json is reused, not trained again."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_arms",
                                                  os.path.join(ROOT, "benchmarks", "arms.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trained = []

    def fake_train(config, rundir, init_from, pretrained=None):
        trained.append((os.path.basename(rundir), init_from, pretrained))
        os.makedirs(rundir, exist_ok=True)  # a changed config trains over the old run
        with open(os.path.join(rundir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort())
        res = {"metrics": {"accuracy": config.data.label_fraction}, "seed": config.seed,
               "wall_seconds": 10.0 + config.seed}
        with open(os.path.join(rundir, "results.json"), "w") as f:
            json.dump(res, f)
        return None, res

    monkeypatch.setattr(bench.finetune, "train_and_evaluate", fake_train)
    arms = {"pretrained": {}, "scratch": {"backbone": "experiments/image.py:tiny_v2"}}
    seen = []
    args = (arms, f"{FINETUNE}:mnist_5k", "data.label_fraction", [0.05, 0.1], [0, 1],
            str(tmp_path), "/runs/pre", "WEIGHTS")
    runs = bench.run_grid(*args, lambda *a: seen.append(a[:3]), tag="f")
    assert [r[0] for r in trained] == [f"{a}_f{f:g}_s{s}" for f in (0.05, 0.1) for s in (0, 1)
                                       for a in ("pretrained", "scratch")]
    assert {r[1:] for r in trained if r[0].startswith("pretrained")} == {("/runs/pre", "WEIGHTS")}
    assert {r[1:] for r in trained if r[0].startswith("scratch")} == {(None, None)}
    assert [(r["arm"], r["metrics"]["accuracy"], r["seed"]) for r in runs] == seen
    trained.clear()
    assert not any(r["reused"] for r in runs)
    assert bench.reuse_meta(runs)["runs_reused"] == 0 and bench.reuse_note(bench.reuse_meta(runs)) == ""
    again = bench.run_grid(*args, lambda *a: None, tag="f")
    assert trained == [] and all(r["reused"] for r in again)  # all reused
    assert [{**r, "reused": False} for r in again] == runs
    # The table's footnote says the fine-tuning time leaves the reused runs out,
    # and what they took when they ran: 4 runs of seed 0 (10 s) and 4 of seed 1 (11 s).
    meta = bench.reuse_meta(again)
    assert meta == {"num_runs": 8, "runs_reused": 8, "reused_seconds": 84.0}
    assert bench.reuse_note(meta) == (" (8 of 8 runs reused from an earlier invocation: "
                                      "84 s when they ran)")
    # The scratch arm's backbone run dir, spelt relative one time and absolute the
    # next (--init_from runs/x vs the default <abs workdir>/pretrain): the same run.
    os.makedirs(tmp_path / "pre")
    monkeypatch.chdir(tmp_path)
    spelt = {"scratch": {"backbone": "pre"}}
    args = (spelt, f"{FINETUNE}:mnist_5k", "data.label_fraction", [0.05], [0],
            str(tmp_path / "w"), None, None)
    bench.run_grid(*args, lambda *a: None, tag="f")
    assert len(trained) == 1
    again = bench.run_grid({"scratch": {"backbone": str(tmp_path / "pre")}}, *args[1:],
                           lambda *a: None, tag="f")
    assert len(trained) == 1 and again[0]["reused"]
    other = bench.run_grid({"scratch": {"backbone": "experiments/image.py:tiny_v2"}}, *args[1:],
                           lambda *a: None, tag="f")
    assert len(trained) == 2 and not other[0]["reused"]  # another backbone trains again
