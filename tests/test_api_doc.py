"""docs/api.md runs as written, and the API's pieces behave as documented."""

import os
import re

import jax
import numpy as np
import pytest

import d2v_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_blocks(path):
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.slow  # 20 steps of pretraining
def test_api_doc_runs_as_written(monkeypatch, capsys):
    blocks = _code_blocks(os.path.join(ROOT, "docs", "api.md"))
    assert len(blocks) == 3
    monkeypatch.chdir(ROOT)
    namespace = {}
    # As written, but 20 pretraining steps of 8 images instead of the page's 40 of 32
    # (test time).
    assert '{"train.num_steps": 40}' in blocks[0]
    blocks[0] = blocks[0].replace('{"train.num_steps": 40}',
                                  '{"train.num_steps": 20, "data.batch_size": 8}')
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    out = capsys.readouterr().out
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+), step 20", out).groups())
    assert last < first  # 20 steps of pretraining lower the loss
    assert namespace["features"].shape == (256, namespace["config"].model.dim)
    restored, state = namespace["restored"], namespace["state"]
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Pooling as documented: mean over patch tokens (CLS excluded), CLS = position 0.
    config, images = namespace["config"], namespace["images"][:4]
    full = d2v_jax.make_encoder(config, "none")(state.params, images)
    np.testing.assert_allclose(namespace["encode"](state.params, images),
                               np.asarray(full)[:, 1:].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d2v_jax.encode(state.params, images, config=config, pool="cls"),
                               np.asarray(full)[:, 0], rtol=1e-6)


def test_encoder_errors_are_clear(tmp_path):
    config = d2v_jax.load_config(os.path.join(ROOT, "experiments", "image.py:tiny_v2"))
    with pytest.raises(ValueError, match="pool='avg'"):
        d2v_jax.make_encoder(config, "avg")
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        d2v_jax.restore_checkpoint(str(tmp_path), config)
