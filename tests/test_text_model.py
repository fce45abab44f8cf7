"""The text model: the teacher sees the full input, padding and masked tokens cannot
leak, the 1.0 loss counts only <mask> positions; and a short end-to-end run."""

import json
import os

import jax
import numpy as np
import pytest

from d2v_jax import metrics, modalities, targets
from d2v_jax.config import load_config
from d2v_jax.modalities.text.tokenizer import MASK_ID, NUM_SPECIAL, PAD_ID
from d2v_jax.train_state import teacher_params
from d2v_jax.train_step import compute_targets, student_loss

from helpers import MOLECULES, TEXT, TINY_TEXT, init_state

T, VOCAB, B = 16, 40, 2

# Two blocks (targets average the top 2) over rows of 16 tokens. TINY_TEXT's
# tokenizer.vocab_size (a BPE target) plays no part: these models get
# model.vocab_size directly or use the SMILES tokenizer.
SMALL = {**TINY_TEXT, "model.depth": 2, "target.top_k": 2, "model.max_positions": T,
         "data.max_len": T, "data.batch_size": B}


def _config(version):
    return load_config(f"{TEXT}:tiny_{version}",
                       {**SMALL, "model.vocab_size": VOCAB, "masking.num_clones": 2})


def _batch(version, seed=0):
    """Two rows: a full one, and one with 10 real tokens then padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(NUM_SPECIAL, VOCAB, (B, T)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[1, 9], tokens[1, 10:] = 2, PAD_ID
    padding = tokens == PAD_ID
    mask = np.zeros((B, 2, T), bool)
    mask[0, :, 1:8] = True  # int(0.48 * 16) = 7
    mask[1, :, 2:6] = True  # int(0.48 * 10) = 4
    mask[:, 1] = np.roll(mask[:, 0], 1, axis=-1)  # a second clone, different positions
    batch = {"tokens": tokens, "padding_mask": padding, "mask": mask}
    if version == "v1":
        batch["inputs"] = np.where(mask, MASK_ID, tokens[:, None]).astype(np.int32)
    return batch


@pytest.fixture(scope="module")
def v2():
    config = _config("v2")
    model = modalities.build_model(config)
    params = init_state(config, jax.random.PRNGKey(0)).params
    teacher = jax.jit(lambda p, b: model.apply({"params": p}, b, method="teacher")["layers"])
    student = jax.jit(lambda p, b: model.apply({"params": p}, b, method="student",
                                               rngs={"noise": jax.random.PRNGKey(3),
                                                     "dropout": jax.random.PRNGKey(4)})["pred"])
    return config, model, params, teacher, student


def test_teacher_sees_the_full_unmasked_input(v2):
    _, _, params, teacher, _ = v2
    batch = _batch("v2")
    ref = teacher(params, batch)
    assert ref.shape == (2, B, T, 32)
    remasked = dict(batch, mask=np.roll(batch["mask"], 3, axis=-1))
    np.testing.assert_array_equal(teacher(params, remasked), ref)  # masks play no part
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][0, 3] = (changed["tokens"][0, 3] + 1 - NUM_SPECIAL) % (VOCAB - NUM_SPECIAL) + NUM_SPECIAL
    assert not np.allclose(teacher(params, changed)[:, 0], ref[:, 0])


def test_padding_and_masked_tokens_do_not_leak(v2):
    _, _, params, teacher, student = v2
    batch = _batch("v2")
    ref_t, ref_s = teacher(params, batch), student(params, batch)
    other = dict(batch, tokens=batch["tokens"].copy())
    other["tokens"][1, 10:] = 7  # junk under the padding mask
    valid = ~batch["padding_mask"][1]
    np.testing.assert_allclose(teacher(params, other)[:, 1][:, valid], ref_t[:, 1][:, valid],
                               atol=1e-5)
    # 2.0 removes masked tokens: their values cannot reach the student's predictions.
    hidden = dict(batch, tokens=batch["tokens"].copy())
    masked_both = batch["mask"][0].all(0)  # masked in every clone of row 0
    hidden["tokens"][0, masked_both] = 9
    np.testing.assert_allclose(student(params, hidden), ref_s, atol=1e-5)
    # ...while a visible token does.
    visible = dict(batch, tokens=batch["tokens"].copy())
    visible["tokens"][0, 12] = 9 if batch["tokens"][0, 12] != 9 else 10
    assert not np.allclose(student(params, visible)[:2], ref_s[:2], atol=1e-5)


@pytest.mark.slow  # compiles the teacher and two students
def test_teacher_never_drops_and_decoder_input_dropout_acts_in_training_only(v2):
    """SPEC 2: the teacher runs deterministically; layer-drop 1 (every block
    skipped in training) leaves it unchanged. The decoder's input dropout
    (fairseq decoder.input_dropout, text 2.0: 0.1) acts only in training."""
    config, _, params, teacher, _ = v2
    noisy = load_config(f"{TEXT}:tiny_v2", {**SMALL, "model.vocab_size": VOCAB,
                                            "masking.num_clones": 2, "model.layerdrop": 1.0,
                                            "decoder.input_dropout": 0.5})
    model = modalities.build_model(noisy)
    batch = _batch("v2")
    t = jax.jit(lambda p, b: model.apply({"params": p}, b, method="teacher")["layers"])
    np.testing.assert_array_equal(t(params, batch), teacher(params, batch))

    def student(m, det):
        return jax.jit(lambda p, b: m.apply(
            {"params": p}, b, method="student", deterministic=det,
            rngs={"noise": jax.random.PRNGKey(3), "dropout": jax.random.PRNGKey(4)})["pred"])

    base = modalities.build_model(config)
    np.testing.assert_allclose(student(model, True)(params, batch),
                               student(base, True)(params, batch), atol=1e-6)
    assert np.abs(student(model, False)(params, batch)
                  - student(base, False)(params, batch)).max() > 1e-3


@pytest.mark.slow
def test_v1_loss_counts_only_positions_given_the_mask_token():
    config = load_config(f"{TEXT}:tiny_v1", {**SMALL, "model.vocab_size": VOCAB})
    model = modalities.build_model(config)
    state = init_state(config, jax.random.PRNGKey(0))
    batch = _batch("v1")
    batch = {k: v[:, :1] if k in ("mask", "inputs") else v for k, v in batch.items()}
    # Corrupt like BERT: position 2 random, position 3 unchanged, the rest of 1..7 <mask>.
    chosen = batch["mask"].copy()
    batch["inputs"][0, 0, 2] = 11 if batch["tokens"][0, 2] != 11 else 12
    batch["inputs"][0, 0, 3] = batch["tokens"][0, 3]
    batch["mask"] = batch["inputs"] == MASK_ID  # the pipeline's loss positions
    assert chosen.sum() - batch["mask"].sum() == 2

    tparams = teacher_params(state.params, state.ema_params, config)
    layers = model.apply({"params": tparams}, batch, method="teacher")
    y = targets.make_targets(layers["layers"], top_k=2, layer_norm="layer", final_norm="none",
                             padding_mask=layers["padding_mask"])
    loss = jax.jit(lambda y: student_loss(model, state.params, batch, y, config,
                                          jax.random.PRNGKey(1))[0])
    ref = loss(y)
    for pos in (2, 3, 12):  # random, unchanged, never chosen: no effect on the loss
        assert float(loss(y.at[0, pos].add(5.0))) == pytest.approx(float(ref), rel=1e-6)
    assert float(loss(y.at[0, 4].add(5.0))) > float(ref) + 0.1  # a <mask> position counts


@pytest.mark.slow  # a short train run
def test_molecules_e2e_trains_with_the_tokenizer_saved_beside_the_run(tmp_path):
    from d2v_jax.train import train_and_evaluate
    workdir = str(tmp_path / "run")
    over = {**SMALL, "model.max_positions": 32, "data.max_len": 32, "masking.num_clones": 2,
            "train.log_every": 2, "train.num_steps": 2, "data.validate_smiles": False,
            "data.prefetch": 1}
    state = train_and_evaluate(load_config(f"{MOLECULES}:tiny_v2", over), workdir)
    assert int(state.step) == 2
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    vocab = saved["model"]["vocab_size"]
    assert saved["tokenizer"]["path"] == os.path.join(workdir, "tokenizer")
    assert state.params["frontend"]["token_embed"]["embedding"].shape == (vocab, 32)
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert np.isfinite(rows[-1]["loss"]) and rows[-1]["target_var"] > 0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_teacher_input_is_the_students_embeddings_after_dropout_in_2_0(version):
    """fairseq 2.0 (ema_encoder_only): the teacher's blocks read the student's
    local features, dropout included; 1.0 embeds again without dropout. The
    train step hands the teacher the student's dropout key."""
    config = load_config(f"{TEXT}:tiny_{version}", {**SMALL, "model.vocab_size": VOCAB,
                                                    "masking.num_clones": 2, "model.dropout": 0.3})
    assert config.ema.teacher_input == ("student" if version == "v2" else "clean")
    model = modalities.build_model(config)
    params = init_state(config, jax.random.PRNGKey(0)).params
    batch = _batch(version)
    key = jax.random.PRNGKey(11)

    @jax.jit
    def run(params, batch):
        d_rng, n_rng = jax.random.split(key)  # as student_loss splits the step's key

        def frontend(method, rngs):
            _, inter = model.apply({"params": params}, batch, method=method, rngs=rngs,
                                   capture_intermediates=True)
            return inter["intermediates"]["frontend"]["__call__"][0]

        return (frontend("student", {"dropout": d_rng, "noise": n_rng}),
                frontend("teacher", {"dropout": d_rng}), frontend("teacher", {}),
                compute_targets(model, params, batch, config, key)[0],
                compute_targets(model, params, batch, config)[0])

    student, teacher, clean, y_step, y_clean = map(np.asarray, run(params, batch))
    if version == "v2":
        np.testing.assert_array_equal(teacher, student)
        assert 0.2 < float((teacher == 0).mean()) < 0.4  # dropout 0.3 on the embeddings
    else:
        np.testing.assert_array_equal(teacher, clean)
    assert not (clean == 0).any()
    assert np.allclose(y_step, y_clean) == (version == "v1")
