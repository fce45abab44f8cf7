"""notebooks/quickstart.ipynb runs top to bottom (with fewer steps) and its
outputs say what the notebook promises."""

import json
import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from d2v_jax.modalities.image.sources import Mnist5kSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


@pytest.mark.slow  # a Jupyter kernel, pretraining and probes
def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    num_embed = 600
    params[0].source = (f"NUM_STEPS = 20\nBATCH_SIZE = 8\nLABEL_FRACTION = 0.05\n"
                        f"NUM_EMBED = {num_embed}\n"
                        f"WORKDIR = {str(tmp_path / 'run')!r}\nSEED = 0")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss plot and the two PCA panels
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    results = json.loads(re.search(r"RESULTS (\{.*\})", text).group(1))
    assert results["num_steps"] == 20
    assert results["loss_last"] < results["loss_first"]
    # A stratified 5% of the 480 training images of the first 600 digits.
    src = Mnist5kSource()
    y = np.array([src[i]["label"] for i in range(num_embed)])
    rng = np.random.default_rng(0)
    pool = rng.permutation(num_embed)[num_embed // 5:]
    expected = sum(max(1, round(0.05 * np.sum(y[pool] == c))) for c in np.unique(y))
    assert results["num_labels"] == expected and results["num_test"] == num_embed // 5
    for name in ("pretrained", "random init"):
        assert 0.15 < results["accuracy"][name] <= 1.0, results  # above 10-class chance
    assert os.path.exists(tmp_path / "run" / "checkpoints")
