r"""How predictable are a speech teacher's targets from the frames around them?

The student regresses the teacher's targets at masked frames from the frames it
sees. This fits a ridge regression from the conv features of frames
t-k..t+k (frame t itself left out: it is masked) to the target at frame t, on
80% of the frames of `--batches` pretraining batches, and reports R^2 on the
rest; and, for scale, R^2 from frame t's own features. A low neighbour R^2
means even a perfect student of this capacity class could say little more than
the mean there, whatever the training.

  python benchmarks/speech_target_oracle.py [--config experiments/audio.py:tiny_v2] \
      [--workdir <pretraining run, default: a random init>] [--manifest train.tsv]
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import d2v_jax  # noqa: E402
from d2v_jax import modalities, targets  # noqa: E402
from d2v_jax.finetune.backbone import load_pretrained  # noqa: E402
from d2v_jax.modalities.audio import sentence_set  # noqa: E402
from d2v_jax.train_state import create_train_state  # noqa: E402
from d2v_jax.train_step import compute_targets  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined when run as a script only, so tests can import the
    helpers beside other scripts that define `workdir` / `manifest` too."""
    flags.DEFINE_string("config", "experiments/audio.py:tiny_v2", "Audio experiment.")
    flags.DEFINE_string("workdir", "", "Pretraining run (teacher weights); '' = a random init.")
    flags.DEFINE_string("manifest", "", "Manifest; '' = the sentence set's train.tsv.")
    flags.DEFINE_integer("batches", 4, "Batches of 64 clips.")
    flags.DEFINE_integer("context", 2, "Neighbouring frames on each side.")
    flags.DEFINE_float("ridge", 1.0, "Ridge penalty.")
    flags.DEFINE_bool("position_center", None,
                      "Centre the targets per position (default: the config's).")


def ridge_r2(x: np.ndarray, y: np.ndarray, penalty: float, train_fraction: float = 0.8) -> float:
    """Test R^2 (pooled over outputs) of a ridge fit on the first rows."""
    n = int(train_fraction * len(x))
    mx, my = x[:n].mean(0), y[:n].mean(0)
    a = x[:n] - mx
    w = np.linalg.solve(a.T @ a + penalty * np.eye(a.shape[1]), a.T @ (y[:n] - my))
    resid = y[n:] - ((x[n:] - mx) @ w + my)
    return float(1.0 - (resid ** 2).sum() / ((y[n:] - y[n:].mean(0)) ** 2).sum())


def main(argv):
    del argv
    manifest = FLAGS.manifest or os.path.join(sentence_set.ensure_sentence_set(), "train.tsv")
    if FLAGS.workdir:
        params, config = load_pretrained(FLAGS.workdir, "teacher")
    else:
        config = d2v_jax.load_config(FLAGS.config)
        params = None
    config.data.source, config.data.path, config.data.batch_size = "manifest", manifest, 64
    model = modalities.build_model(config)
    if params is None:
        params = create_train_state(config, jax.random.PRNGKey(config.seed)).params
    features = jax.jit(lambda p, b: model.apply({"params": p}, b, method="features"))
    teacher = jax.jit(lambda p, b: compute_targets(model, p, b, config))
    k, rows = FLAGS.context, {"neighbours": [], "own": [], "target": []}
    batches = iter(d2v_jax.make_dataset(config))
    for _ in range(FLAGS.batches):
        batch = next(batches)
        y, pad = teacher(params, batch)
        center = FLAGS.position_center if FLAGS.position_center is not None else config.target.get(
            "position_center", False)
        if center:
            y = targets.position_center(y, pad)
        y, f = np.asarray(y), np.asarray(features(params, batch))
        pad = np.zeros(y.shape[:2], bool) if pad is None else np.asarray(pad)
        for b in range(y.shape[0]):
            for t in range(k, y.shape[1] - k):
                if not pad[b, t - k:t + k + 1].any():
                    rows["neighbours"].append(np.concatenate(
                        [f[b, t + d] for d in range(-k, k + 1) if d != 0]))
                    rows["own"].append(f[b, t])
                    rows["target"].append(y[b, t])
    x_n, x_o, y = (np.asarray(rows[key]) for key in ("neighbours", "own", "target"))
    print(f"{FLAGS.workdir or 'random init of ' + FLAGS.config}: {len(y)} frames, target "
          f"variance {y.var(0).mean():.3f}")
    print(f"R^2 from the conv features of frames t-{k}..t+{k} without t: "
          f"{ridge_r2(x_n, y, FLAGS.ridge):.3f}")
    print(f"R^2 from frame t's own conv features: {ridge_r2(x_o, y, FLAGS.ridge):.3f}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
