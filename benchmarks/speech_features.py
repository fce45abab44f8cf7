r"""Does a pretrained speech encoder's output still change along an utterance?

CTC reads one frame at a time: an encoder whose output is nearly the same at
every frame of an utterance gives it nothing to spell with, however good the
pretraining loss looks. For the first `--num_clips` clips of a manifest this
prints, for the conv feature extractor and for the encoder's final output, the
within-utterance variance (over frames, averaged over channels), the effective
rank of the centred frames (exp of the entropy of the squared singular values)
and the mean |value|, for the pretraining run and for a random init of the same
architecture.

  python benchmarks/speech_features.py --workdir runs/le_asr_pc/pretrain \
      [--manifest <test.tsv>] [--which student|teacher] [--num_clips 3]

Without `--manifest`: the packaged sentence set's test clips (a voice the
pretraining never heard).
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

from d2v_jax import modalities  # noqa: E402
from d2v_jax.finetune.backbone import load_pretrained  # noqa: E402
from d2v_jax.modalities.audio import files, sentence_set  # noqa: E402
from d2v_jax.train_state import create_train_state  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Audio pretraining work dir.")
_MANIFEST = flags.DEFINE_string("manifest", "", "fairseq manifest of clips to read.")
_WHICH = flags.DEFINE_enum("which", "student", ["student", "teacher"], "Which weights.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 3, "Clips to read.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random-init reference.")


def frame_stats(x: np.ndarray) -> dict[str, float]:
    """[T, D] frames -> within-utterance variance, effective rank, mean |x|."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(0)
    s2 = np.linalg.svd(centred, compute_uv=False) ** 2
    p = s2 / max(s2.sum(), 1e-30)
    return {"within_var": float(x.var(0).mean()),
            "eff_rank": float(np.exp(-(p * np.log(p + 1e-30)).sum())),
            "mean_abs": float(np.abs(x).mean())}


def main(argv):
    del argv
    manifest = _MANIFEST.value or os.path.join(sentence_set.ensure_sentence_set(), "test.tsv")
    man = files.read_manifest(manifest)
    params, config = load_pretrained(_WORKDIR.value, _WHICH.value)
    model = modalities.build_model(config)
    arms = {"pretrained": params,
            "random init": create_train_state(config, jax.random.PRNGKey(_SEED.value)).params}
    features = jax.jit(lambda p, b: model.apply({"params": p}, b, method="features"))
    encode = jax.jit(lambda p, b: model.apply({"params": p}, b, method="encode"))
    rows = {(arm, part): [] for arm in arms for part in ("conv features", "encoder output")}
    for i in range(min(_NUM_CLIPS.value, len(man))):
        wav = files.load_audio(man, i, int(config.data.sample_rate))
        if config.data.normalize:
            wav = files.normalize(wav)
        batch = {"audio": wav[None]}
        for arm, p in arms.items():
            rows[arm, "conv features"].append(frame_stats(features(p, batch)[0]))
            rows[arm, "encoder output"].append(frame_stats(encode(p, batch)[0]))
    print(f"{_WORKDIR.value} ({_WHICH.value}), {min(_NUM_CLIPS.value, len(man))} clips of "
          f"{manifest}\n")
    print("| weights | part | within-utterance variance | effective rank | mean abs |")
    print("|---|---|---|---|---|")
    for (arm, part), stats in rows.items():
        mean = {k: np.mean([s[k] for s in stats]) for k in stats[0]}
        print(f"| {arm} | {part} | {mean['within_var']:.4g} | {mean['eff_rank']:.1f} | "
              f"{mean['mean_abs']:.3f} |")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
