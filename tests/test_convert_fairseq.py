"""fairseq data2vec 2.0 image checkpoints -> params + ema_params.

The state dict is built with fairseq's key layout and random tensors
(tests/convert_helpers.py); the reference forward is written directly in torch
from those tensors (not from our code), including MAE's sin-cos table.
"""

import pytest

# The `convert` extra (torch, transformers) is optional; CI installs it (.ci/run),
# so these run there. Without it, the module is reported as skipped, by name.
pytest.importorskip("torch", reason="needs the convert extra: pip install torch transformers")
pytest.importorskip("transformers", reason="needs the convert extra")

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2v_jax import modalities
from d2v_jax.convert import ConversionError, from_fairseq
from d2v_jax.models.decoder import ConvDecoder

from convert_helpers import (CH, DEC_DIM, DEC_G, DEC_K, DEC_LAYERS, DEPTH, DIM, HEADS, I, PATCH,
                             SIDE, fairseq_checkpoint, fp16_run_file, half_file,
                             mae_sincos, with_omegaconf)


def reference_encoder(sd, blocks_prefix, image, front=I):
    """fairseq Data2VecMultiModel(features_only) for a post-LN image model, in torch:
    the prenet blocks (context_encoder.blocks.*) run after the embedding
    LayerNorm, then the main blocks."""
    w = lambda k: sd[k]
    x = F.conv2d(image, w(f"{I}local_encoder.proj.weight"), w(f"{I}local_encoder.proj.bias"),
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = x + w(front + "fixed_positional_encoder.positions")
    x = torch.cat([w(front + "extra_tokens").expand(x.shape[0], -1, -1), x], 1)
    x = F.layer_norm(x, (DIM,), w(front + "context_encoder.norm.weight"),
                     w(front + "context_encoder.norm.bias"), 1e-6)
    b, t, _ = x.shape
    prefixes = [k[:-len("attn.qkv.weight")] for k in sd
                if k.startswith(front + "context_encoder.blocks.") and k.endswith("attn.qkv.weight")]
    prefixes += [k[:-len("attn.qkv.weight")] for k in sd
                 if k.startswith(blocks_prefix) and k.endswith("attn.qkv.weight")
                 and k[len(blocks_prefix):].split(".")[0].isdigit()]
    for pre in prefixes:  # dicts keep insertion order: block 0, 1, ...
        p = lambda n: w(pre + n)
        qkv = F.linear(x, p("attn.qkv.weight"), p("attn.qkv.bias"))
        q, k, v = qkv.reshape(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5, -1)
        a = (att @ v).transpose(1, 2).reshape(b, t, DIM)
        x = F.layer_norm(x + F.linear(a, p("attn.proj.weight"), p("attn.proj.bias")), (DIM,),
                         p("norm1.weight"), p("norm1.bias"), 1e-6)
        h = F.linear(F.gelu(F.linear(x, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
                     p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = F.layer_norm(x + h, (DIM,), p("norm2.weight"), p("norm2.bias"), 1e-6)
    return x.numpy()


def reference_decoder(sd, x):
    """fairseq Decoder2d: grouped conv -> LN over channels -> GELU (+ residual)."""
    b = x.shape[0]
    h = x.transpose(1, 2).reshape(b, DIM, SIDE, SIDE)
    res = h
    for i in range(DEC_LAYERS):
        h = F.conv2d(h, sd[f"{I}decoder.blocks.{i}.0.weight"], sd[f"{I}decoder.blocks.{i}.0.bias"],
                     padding=DEC_K // 2, groups=DEC_G)
        h = F.gelu(F.layer_norm(h.transpose(1, 3), (DEC_DIM,)).transpose(1, 3))
        if res.shape[1] == h.shape[1]:
            h = h + res
        res = h
    h = h.reshape(b, DEC_DIM, -1).transpose(1, 2)
    return F.linear(h, sd[f"{I}decoder.proj.weight"], sd[f"{I}decoder.proj.bias"]).numpy()


def _encode(config, params, image):
    model = modalities.build_model(config)
    batch = {"image": np.transpose(image.numpy(), (0, 2, 3, 1))}
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, batch, method="encode"))(params))


def test_student_teacher_and_decoder_match_an_independent_forward():
    ckpt = fairseq_checkpoint("full")
    config, params, ema_params = from_fairseq(ckpt)
    assert (config.model.dim, config.model.depth, config.model.num_heads) == (DIM, DEPTH, HEADS)
    assert config.model.image_size == PATCH * SIDE and config.decoder.groups == DEC_G
    sd, ema = ckpt["model"], ckpt["model"]["_ema"]
    image = torch.randn(2, CH, PATCH * SIDE, PATCH * SIDE)
    # Student and teacher through one compilation (same shapes).
    got = _encode(config, params, image)
    np.testing.assert_allclose(got, reference_encoder(sd, "blocks.", image), atol=1e-4)
    got_t = _encode(config, ema_params, image)
    np.testing.assert_allclose(got_t, reference_encoder(ema, "blocks.", image), atol=1e-4)
    assert np.abs(got_t - got).max() > 1e-2  # the teacher really is the _ema tensors
    # Decoder on a random input grid.
    x = torch.randn(2, SIDE * SIDE, DIM)
    d = config.decoder
    dec = ConvDecoder((SIDE, SIDE), d.dim, DIM, d.kernel, d.layers, d.groups, d.residual,
                      conv_impl=d.conv_impl)
    out = dec.apply({"params": params["decoder"]}, x.numpy())
    np.testing.assert_allclose(np.asarray(out), reference_decoder(sd, x), atol=1e-4)


def test_encoder_only_ema_layout_and_loud_failures():
    ckpt = fairseq_checkpoint("encoder_only")
    config, params, ema_params = from_fairseq(ckpt)
    ema = ckpt["model"]["_ema"]
    np.testing.assert_array_equal(ema_params["encoder"]["blocks"]["attn"]["qkv"]["kernel"][1],
                                  ema["1.attn.qkv.weight"].numpy().T)
    # The teacher shares the student's front-end in this layout.
    np.testing.assert_array_equal(ema_params["frontend"]["cls_token"],
                                  params["frontend"]["cls_token"])
    extra = dict(ckpt["model"], **{f"{I}decoder.extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match="decoder.extra.weight"):
        from_fairseq({"model": extra, "cfg": ckpt["cfg"]})
    missing = {k: v for k, v in ckpt["model"].items() if k != "blocks.1.norm2.bias"}
    with pytest.raises(ConversionError, match="blocks.1.norm2.bias"):
        from_fairseq({"model": missing, "cfg": ckpt["cfg"]})
    with pytest.raises(ConversionError, match="num_heads"):
        from_fairseq(ckpt["model"])
    bad_pos = dict(ckpt["model"])
    bad_pos[f"{I}fixed_positional_encoder.positions"] = torch.zeros(1, SIDE * SIDE, DIM)
    with pytest.raises(ConversionError, match="sin-cos"):
        from_fairseq(bad_pos, num_heads=HEADS)


@pytest.mark.slow  # compiles our encoder (~5 s on 2 shared cores)
def test_released_base_layout_prenet_blocks_and_cfg():
    """The released base: 2 prenet blocks + main blocks; top-K and masking from cfg."""
    cfg = {"depth": 3, "average_top_k_layers": 3, "instance_norm_target_layer": True,
           "layer_norm_targets": True, "clone_batch": 16, "ema_decay": 0.9998,
           "ema_end_decay": 0.99999, "ema_anneal_end_step": 100000, "cls_loss": 0.01,
           "modalities": {"image": {"prenet_depth": 2, "mask_prob": 0.8,
                                    "mask_prob_adjust": 0.07, "mask_length": 3}}}
    ckpt = fairseq_checkpoint("full", prenet=2, depth=3, cfg=cfg)
    config, params, ema_params = from_fairseq(ckpt)
    assert config.model.depth == 5 and config.target.top_k == 3
    assert (config.target.layer_norm, config.target.final_norm) == ("instance", "layer")
    k = config.masking
    assert (k.num_clones, k.ratio, k.prob_adjust, k.block_size) == (16, 0.8, 0.07, 3)
    assert (config.ema.start, config.ema.end, config.ema.anneal_steps) == (0.9998, 0.99999,
                                                                             100000)
    sd, ema = ckpt["model"], ckpt["model"]["_ema"]
    # The prenet blocks are our blocks 0 and 1, the main blocks 2..4.
    qkv = params["encoder"]["blocks"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(qkv[1], sd[f"{I}context_encoder.blocks.1.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(qkv[2], sd["blocks.0.attn.qkv.weight"].numpy().T)
    image = torch.randn(2, CH, PATCH * SIDE, PATCH * SIDE)
    np.testing.assert_allclose(_encode(config, params, image),
                               reference_encoder(sd, "blocks.", image), atol=1e-4)
    np.testing.assert_allclose(_encode(config, ema_params, image),
                               reference_encoder(ema, "blocks.", image), atol=1e-4)


def test_large_recipe_top_k_counts_main_blocks():
    """ViT-L: 24 main blocks, no prenet, average_top_k_layers=18 (not our base 10)."""
    ckpt = fairseq_checkpoint("full", depth=24, cfg={"depth": 24, "average_top_k_layers": 18})
    config, _, _ = from_fairseq(ckpt)
    assert (config.model.depth, config.target.top_k) == (24, 18)
    bad = fairseq_checkpoint("full", prenet=2, depth=3, cfg={"average_top_k_layers": 4})
    with pytest.raises(ConversionError, match="counts main blocks, but there are 3"):
        from_fairseq(bad)


# ----------------------------------------------------------------------------- file precisions
def test_precision_of_a_file_is_read_from_its_values():
    """float32 tensors holding float16 (or bfloat16) values are recognised as
    such, by comparison with torch's own rounding; the check of a derived table
    allows one unit in the last place of that precision, and no more."""
    from d2v_jax.convert.common import close_at_precision, describe_precision, precision_of
    torch.manual_seed(0)
    exact = torch.randn(64, 32)
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        rounded = exact.to(dtype)
        assert precision_of(rounded.float().numpy(), "float32") == name
        assert precision_of(rounded.float().numpy(), name) == name
        assert close_at_precision(rounded.float().numpy(), exact.numpy(), name)
        # Four units in the last place away (the bit pattern + 4): not the same table.
        moved = (rounded.view(torch.int16) + 4).view(dtype).float().numpy()
        assert not close_at_precision(moved, exact.numpy(), name)
    assert precision_of(exact.numpy(), "float32") == "float32"
    assert not close_at_precision(exact.half().float().numpy(), exact.numpy(), "float32")
    assert describe_precision({"a": exact.half().float(), "b": torch.zeros(3)}) == (
        "float16 values stored as float32")
    assert describe_precision({"a": exact, "n": torch.arange(3)}) == "float32"
    assert describe_precision({"a": exact.half()}) == "float16"


@pytest.mark.slow  # compiles our encoder once for every file variant (same shapes)
def test_every_precision_fairseq_saves_converts_and_matches():
    """float32; an fp16 run's file (float16-rounded student in float32, float32
    teacher); a state dict left in float16 / bfloat16; with a dict or an
    omegaconf cfg. Each converts; params are the file's values as float32;
    student and teacher outputs equal the independent forward, which uses the
    exact sin-cos table that our model computes (fairseq's fp32 run would use
    the file's rounded table: the gap is reported, and small). A table that is
    not sin-cos is refused at every precision."""
    base = fairseq_checkpoint("full")
    files = {"float32": base, "fp16_run": with_omegaconf(fp16_run_file(base)),
             "float16": half_file(base, torch.float16),
             "bfloat16": with_omegaconf(half_file(base, torch.bfloat16))}
    image = torch.randn(2, CH, PATCH * SIDE, PATCH * SIDE)
    exact_table = torch.from_numpy(mae_sincos(DIM, SIDE)).float()[None]
    key = f"{I}fixed_positional_encoder.positions"
    encode = None
    for name, ckpt in files.items():
        config, params, ema_params = from_fairseq(ckpt)
        sd = {k: v.float() for k, v in ckpt["model"].items() if k != "_ema"}
        ema = {k: v.float() for k, v in ckpt["model"]["_ema"].items()}
        w = params["encoder"]["blocks"]["mlp"]["fc1"]["kernel"][1]
        np.testing.assert_array_equal(w, sd["blocks.1.mlp.fc1.weight"].numpy().T)
        if encode is None:
            model = modalities.build_model(config)
            encode = jax.jit(lambda p, b: model.apply({"params": p}, b, method="encode"))
        batch = {"image": np.transpose(image.numpy(), (0, 2, 3, 1))}
        for ours, tensors in ((params, sd), (ema_params, ema)):
            got = np.asarray(encode(ours, batch))
            want = reference_encoder({**tensors, key: exact_table}, "blocks.", image)
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)
        gap = np.abs(np.asarray(encode(params, batch))
                     - reference_encoder(sd, "blocks.", image)).max()
        assert gap < (1e-4 if name == "float32" else 2e-3), (name, gap)
        # The same file with the table's two halves swapped (rows <-> columns).
        bad = dict(ckpt["model"])
        table = bad[key]
        bad[key] = torch.cat([table[..., DIM // 2:], table[..., :DIM // 2]], -1)
        with pytest.raises(ConversionError, match="sin-cos.*precision"):
            from_fairseq({"model": bad, "cfg": ckpt["cfg"]})
