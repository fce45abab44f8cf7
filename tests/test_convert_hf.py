"""Hugging Face <-> d2v_jax conversion.

Tiny randomly initialised transformers models built from configs (no
downloads), with every weight perturbed so that zero-initialised tensors (layer
scale, relative position table, biases) matter. Checks: our last hidden state
matches HF's within 1e-4 (float32), padding included; ours -> HF (saved,
reloaded with from_pretrained) -> ours is exact; bad input fails naming the key.
"""

import pytest

# The `convert` extra (torch, transformers) is optional; CI installs it (.ci/run),
# so these run there. Without it, the module is reported as skipped, by name.
pytest.importorskip("torch", reason="needs the convert extra: pip install torch transformers")
pytest.importorskip("transformers", reason="needs the convert extra")

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import (Data2VecAudioConfig, Data2VecAudioForCTC, Data2VecAudioModel,
                          Data2VecTextConfig, Data2VecTextForSequenceClassification,
                          Data2VecTextModel, Data2VecVisionConfig,
                          Data2VecVisionForImageClassification, Data2VecVisionModel)

from d2v_jax.convert import ConversionError, from_huggingface, to_huggingface

from convert_helpers import VISION, assert_same_params, hidden, perturbed

ATOL = 1e-4


def round_trip(enc, hf_class, tmp_path):
    """ours -> HF -> save_pretrained -> from_pretrained -> ours (bit-exact,
    the task head included)."""
    hf = to_huggingface(enc.config, enc.params, enc.head, enc.task)
    assert type(hf) is hf_class
    hf.save_pretrained(tmp_path)
    loaded = hf_class.from_pretrained(tmp_path).eval()
    back = from_huggingface(loaded)
    assert_same_params(enc.params, back.params)
    assert back.task == enc.task
    if enc.head is not None:
        assert_same_params(enc.head, back.head)
    return loaded


def test_vision_matches_hf_and_round_trips(tmp_path):
    torch.manual_seed(0)
    hf = perturbed(Data2VecVisionModel(Data2VecVisionConfig(**VISION), add_pooling_layer=False))
    pixels = torch.randn(2, 3, 16, 16)
    ref = hidden(hf, pixel_values=pixels)
    enc = from_huggingface(hf)
    out = enc(pixel_values=pixels)
    assert out.shape == ref.shape == (2, 1 + 16, 32)
    np.testing.assert_allclose(out, ref, atol=ATOL)
    m = enc.config.model
    assert (m.depth, m.dim, m.layer_scale_init, m.rel_pos_bias) == (2, 32, 0.1, "shared")
    # HF has no key bias: ours maps to k bias 0.
    qkv_bias = enc.params["encoder"]["blocks"]["attn"]["qkv"]["bias"]
    assert np.all(qkv_bias[:, 32:64] == 0) and np.abs(qkv_bias[:, :32]).min() > 0
    loaded = round_trip(enc, Data2VecVisionModel, tmp_path)
    np.testing.assert_allclose(hidden(loaded, pixel_values=pixels), ref, atol=1e-6)
    # A k bias (softmax-invariant) is dropped on export without changing outputs.
    params = jax.tree.map(np.array, enc.params)
    params["encoder"]["blocks"]["attn"]["qkv"]["bias"][:, 32:64] = 0.5
    changed = enc.__class__(enc.config, params)
    np.testing.assert_allclose(changed(pixel_values=pixels), ref, atol=ATOL)
    np.testing.assert_allclose(hidden(to_huggingface(enc.config, params), pixel_values=pixels),
                               ref, atol=ATOL)


def test_vision_fails_loudly():
    torch.manual_seed(0)
    hf = Data2VecVisionModel(Data2VecVisionConfig(**VISION), add_pooling_layer=False)
    state = dict(hf.state_dict())
    with pytest.raises(ConversionError, match="encoder.layer.1.extra.weight"):
        from_huggingface({**state, "encoder.layer.1.extra.weight": torch.zeros(2)}, hf.config)
    del state["encoder.layer.1.lambda_2"]
    with pytest.raises(ConversionError, match="encoder.layer.1.lambda_2"):
        from_huggingface(state, hf.config)
    with pytest.raises(ConversionError, match="use_relative_position_bias"):
        from_huggingface(hf.state_dict(), Data2VecVisionConfig(
            **{**VISION, "use_relative_position_bias": True}))


def test_text_with_padding_matches_hf_and_round_trips(tmp_path):
    torch.manual_seed(0)
    config = Data2VecTextConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=20, layer_norm_eps=1e-5)
    hf = perturbed(Data2VecTextModel(config, add_pooling_layer=False))
    ids = torch.randint(3, 40, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[1, 5:], mask[1, 5:] = config.pad_token_id, 0  # right padding
    ref = hidden(hf, input_ids=ids, attention_mask=mask)
    enc = from_huggingface(hf)
    assert enc.config.model.max_positions == 20 - config.pad_token_id - 1
    out = enc(input_ids=ids, attention_mask=mask)
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL)
    # Exported with our tokenizer's layout (pad id 0); same real outputs when
    # the padded ids follow it.
    loaded = round_trip(enc, Data2VecTextModel, tmp_path)
    ids0 = ids.clone()
    ids0[1, 5:] = loaded.config.pad_token_id
    np.testing.assert_allclose(hidden(loaded, input_ids=ids0, attention_mask=mask)[real],
                               ref[real], atol=ATOL)


def test_audio_with_padding_matches_hf_and_round_trips(tmp_path):
    torch.manual_seed(0)
    config = Data2VecAudioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, conv_dim=(16, 16), conv_kernel=(10, 3),
                                 conv_stride=(5, 2), num_conv_pos_embeddings=2,
                                 conv_pos_kernel_size=4, num_conv_pos_embedding_groups=4)
    hf = perturbed(Data2VecAudioModel(config))
    wav = torch.randn(2, 400)
    mask = torch.ones(2, 400, dtype=torch.long)
    wav[1, 250:], mask[1, 250:] = 0, 0
    ref = hidden(hf, input_values=wav, attention_mask=mask)
    enc = from_huggingface(hf)
    assert enc.config.model.pos_conv_zero_pad == "input"
    out = enc(input_values=wav, attention_mask=mask)
    # Positional calls: the first argument is the modality's own input (not
    # pixel_values, where it would silently return garbage).
    np.testing.assert_array_equal(enc(wav, mask), out)
    with pytest.raises(TypeError, match="input_values=..., not \\['pixel_values'\\]"):
        enc(pixel_values=wav)
    with pytest.raises(TypeError, match="at most 2 positional"):
        enc(wav, mask, mask)
    frames = hf._get_feat_extract_output_lengths(mask.sum(1)).numpy()
    assert out.shape == ref.shape and list(frames) == [39, 24]
    real = np.arange(out.shape[1])[None] < frames[:, None]
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL)
    assert np.all(out[~real] == 0)  # ours zeroes padded frames
    loaded = round_trip(enc, Data2VecAudioModel, tmp_path)
    np.testing.assert_allclose(hidden(loaded, input_values=wav, attention_mask=mask)[real],
                               ref[real], atol=ATOL)


AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
             num_conv_pos_embeddings=2, conv_pos_kernel_size=4, num_conv_pos_embedding_groups=4)
TEXT = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=20, layer_norm_eps=1e-5)


@pytest.mark.slow  # three HF task models, a compile each
def test_task_heads_match_hf_and_round_trip(tmp_path):
    """Data2VecAudioForCTC, Data2VecTextForSequenceClassification and
    Data2VecVisionForImageClassification (per-block relative position bias and
    mean pooling, as the released fine-tuned vision models): logits within
    1e-4 of HF; ours -> HF -> ours bit-exact."""
    torch.manual_seed(0)
    # Audio CTC (logits at real frames; ours zeroes padded frames' states).
    hf = perturbed(Data2VecAudioForCTC(Data2VecAudioConfig(**AUDIO, vocab_size=12)))
    wav, mask = torch.randn(2, 400), torch.ones(2, 400, dtype=torch.long)
    wav[1, 250:], mask[1, 250:] = 0, 0
    with torch.no_grad():
        ref = hf(input_values=wav, attention_mask=mask).logits.numpy()
    enc = from_huggingface(hf)
    assert enc.task == "ctc"
    real = np.arange(ref.shape[1])[None] < np.array([39, 24])[:, None]
    np.testing.assert_allclose(enc.logits(wav, mask)[real], ref[real], atol=ATOL)
    round_trip(enc, Data2VecAudioForCTC, tmp_path / "ctc")
    # Text sequence classification (RoBERTa's head on <s>).
    hf = perturbed(Data2VecTextForSequenceClassification(Data2VecTextConfig(**TEXT, num_labels=3)))
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.numpy()
    enc = from_huggingface(hf)
    assert enc.task == "classification"
    np.testing.assert_allclose(enc.logits(ids), ref, atol=ATOL)
    round_trip(enc, Data2VecTextForSequenceClassification, tmp_path / "cls")
    # Vision image classification, fine-tuned layout.
    vision = {**VISION, "use_shared_relative_position_bias": False,
              "use_relative_position_bias": True, "use_mean_pooling": True, "num_labels": 5}
    hf = perturbed(Data2VecVisionForImageClassification(Data2VecVisionConfig(**vision)))
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = hf(pixel_values=pixels).logits.numpy()
        ref_h = hf.data2vec_vision(pixel_values=pixels).last_hidden_state.numpy()
    enc = from_huggingface(hf)
    m = enc.config.model
    assert (m.rel_pos_bias, m.final_norm, enc.task) == ("per_block", False, "image_classification")
    table = enc.params["frontend"]["rel_pos_bias"]["relative_position_bias_table"]
    assert table.shape == (2, 7 * 7 + 3, 4) and np.abs(table[0] - table[1]).max() > 0
    np.testing.assert_allclose(enc(pixels), ref_h, atol=ATOL)
    np.testing.assert_allclose(enc.logits(pixels), ref, atol=ATOL)
    round_trip(enc, Data2VecVisionForImageClassification, tmp_path / "vit")


def test_image_v2_export_names_the_missing_hf_class():
    """jax-to-hf on a 2.0 image model: the reason (no HF class), not a missing subtree."""
    from d2v_jax.config import load_config
    config = load_config("experiments/image.py:tiny_v2")
    with pytest.raises(ConversionError, match="2.0 image models are post-LN and have no HF class"):
        to_huggingface(config, {"frontend": {}, "encoder": {}})
    with pytest.raises(ConversionError, match="head and task together"):
        to_huggingface(load_config("experiments/image.py:tiny_v1"), {}, head={"head": {}})


@pytest.mark.slow  # a python subprocess
def test_core_package_never_imports_torch():
    code = ("import sys, d2v_jax, d2v_jax.train, d2v_jax.finetune, d2v_jax.models; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
