"""`python -m d2v_jax.convert` on files: HF folder -> our checkpoint
-> HF folder, and a fairseq .pt -> our checkpoint, read back by the checkpoint
code the trainer's --init_from uses."""

import pytest

# The `convert` extra (torch, transformers) is optional; CI installs it (.ci/run),
# so these run there. Without it, the module is reported as skipped, by name.
pytest.importorskip("torch", reason="needs the convert extra: pip install torch transformers")
pytest.importorskip("transformers", reason="needs the convert extra")

import numpy as np
import torch
from transformers import Data2VecVisionConfig, Data2VecVisionModel

from d2v_jax import checkpoint
from d2v_jax.convert import from_fairseq, from_huggingface
from d2v_jax.convert.__main__ import main

from convert_helpers import (VISION, assert_same_params, fairseq_checkpoint, fp16_run_file, hidden,
                             perturbed, with_omegaconf)


@pytest.mark.slow  # a convert CLI run
def test_hf_folder_to_checkpoint_and_back(tmp_path):
    torch.manual_seed(1)
    hf = perturbed(Data2VecVisionModel(Data2VecVisionConfig(**VISION), add_pooling_layer=False))
    hf.save_pretrained(tmp_path / "hf")
    assert main(["hf-to-jax", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    both, config = checkpoint.restore_params(str(tmp_path / "run"),
                                             subtrees=("params", "ema_params"))
    want = from_huggingface(hf).params
    assert_same_params(want, {k: both["params"][k] for k in want})
    assert "head" in both["params"]  # the 1.0 head is freshly initialised
    assert_same_params(both["ema_params"], {k: want[k] for k in both["ema_params"]})
    assert config.model.dim == 32 and config.model.rel_pos_bias == "shared"
    assert main(["jax-to-hf", "--workdir", str(tmp_path / "run"), "--teacher",
                 "--out", str(tmp_path / "hf2")]) == 0
    back = Data2VecVisionModel.from_pretrained(tmp_path / "hf2").eval()
    pixels = torch.randn(1, 3, 16, 16)
    np.testing.assert_allclose(hidden(back, pixel_values=pixels), hidden(hf, pixel_values=pixels),
                               atol=1e-6)


@pytest.mark.slow  # a convert CLI run
def test_fairseq_file_to_checkpoint(tmp_path):
    ckpt = fairseq_checkpoint("full")
    torch.save(ckpt, tmp_path / "d2v2.pt")
    assert main(["fairseq-to-jax", "--checkpoint", str(tmp_path / "d2v2.pt"),
                 "--out", str(tmp_path / "run")]) == 0
    both, config = checkpoint.restore_params(str(tmp_path / "run"),
                                             subtrees=("params", "ema_params"))
    _, params, ema_params = from_fairseq(ckpt)
    assert_same_params(params, both["params"])
    assert_same_params(ema_params, both["ema_params"])
    assert config.version == "v2" and config.decoder.groups == 4


@pytest.mark.slow  # a convert CLI run
def test_fairseq_fp16_run_file_with_omegaconf_cfg(tmp_path, capsys):
    """The file a released recipe's run writes (`common.fp16`: the student's
    float16 values in float32, float32 teacher, an omegaconf cfg, so
    --trust_pickle): converted, the precision said, the params the file's."""
    ckpt = with_omegaconf(fp16_run_file(fairseq_checkpoint("full")))
    torch.save(ckpt, tmp_path / "fp16.pt")
    args = ["fairseq-to-jax", "--checkpoint", str(tmp_path / "fp16.pt"), "--out",
            str(tmp_path / "run")]
    assert main(args) == 2  # the pickled cfg needs --trust_pickle
    assert "--trust_pickle" in capsys.readouterr().err
    assert main(args + ["--trust_pickle"]) == 0
    assert ("student tensors float16 values stored as float32, teacher (_ema) float32"
            in capsys.readouterr().err)
    both, config = checkpoint.restore_params(str(tmp_path / "run"),
                                             subtrees=("params", "ema_params"))
    _, params, ema_params = from_fairseq(ckpt)
    assert_same_params(params, both["params"])
    assert_same_params(ema_params, both["ema_params"])


def test_task_head_file_round_trips(tmp_path):
    from d2v_jax.convert.heads import load_head, save_head
    head = {"dense": {"kernel": np.ones((4, 4), np.float32), "bias": np.arange(4.0)},
            "out_proj": {"kernel": np.full((4, 3), 2.0), "bias": np.zeros(3)}}
    task, back = load_head(save_head(str(tmp_path / "h.npz"), "classification", head))
    assert task == "classification"
    assert_same_params(head, back)


@pytest.mark.slow  # a convert CLI run (text base config init)
def test_fairseq_finetuned_file_keeps_its_head(tmp_path):
    from convert_helpers import text_cls_checkpoint
    from d2v_jax.convert.heads import HEAD_FILE, load_head
    ckpt = text_cls_checkpoint()
    torch.save(ckpt, tmp_path / "cls.pt")
    assert main(["fairseq-to-jax", "--checkpoint", str(tmp_path / "cls.pt"),
                 "--out", str(tmp_path / "run")]) == 0
    task, head = load_head(str(tmp_path / "run" / HEAD_FILE))
    assert task == "classification"
    assert_same_params(from_fairseq(ckpt).head, head)
