"""Loading and validating experiment configs.

An experiment file is a Python file with `get_config(arg)`; `load_config(
"experiments/image.py:tiny_v2")` mirrors what `--config` does on the command
line. `validate` rejects impossible combinations with a message that names the
field, so a typo or a shape that cannot work fails before any compilation.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections

from d2v_jax import modalities
from d2v_jax.data import bad_samples
from d2v_jax.errors import ConfigError, ConfigFileError, check_field, missing_key_error
from d2v_jax.models.layers import ATTENTION_IMPLS, DTYPE_NAMES, REMAT_POLICIES

_NORMS = ("instance", "layer", "batch", "none")
_FINAL_NORMS = ("instance", "layer", "none")


# The checkout holding d2v_jax/ and experiments/.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`path/to/file.py[:arg]` -> locked ConfigDict, with dotted-key overrides.

    A relative path that is not under the working directory is looked up under
    the repository root too, so the experiment names the configs themselves
    use (a fine-tune's `backbone = "experiments/molecules.py:tiny_v2"`) load
    from any directory.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and not os.path.isabs(path):
        in_repo = os.path.join(_REPO_ROOT, path)
        if os.path.isfile(in_repo):
            path = in_repo
        else:
            raise ConfigFileError(f"config file {path!r} does not exist (looked in the working "
                                  f"directory {os.getcwd()} and in {_REPO_ROOT})")
    if not os.path.isfile(path):
        raise ConfigFileError(f"config file {path!r} does not exist")
    mod_spec = importlib.util.spec_from_file_location("_d2v_experiment", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # the experiment file rejects its arg (e.g. an unknown size)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{spec}: {e}") from e
    config.lock()
    for key, value in (overrides or {}).items():
        set_field(config, key, value)
    return config


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """`text` split at each `sep` outside brackets and quotes, so that a tuple
    value keeps its commas: "a=(1,2),b='x,y'" -> ["a=(1,2)", "b='x,y'"]."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_overrides(text: str) -> dict:
    """'a.b=1,c=x,d=(1,2)' -> {'a.b': 1, 'c': 'x', 'd': (1, 2)} (values parsed as
    Python literals when they are; commas inside brackets or quotes stay)."""
    out = {}
    for item in filter(None, (s.strip() for s in _split_top_level(text))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value",
                              hint="overrides are comma-separated key=value pairs, e.g. "
                                   "model.dim=64,train.num_steps=100")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def set_field(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets `a.b.c`; a misspelt field is a ConfigKeyError (a KeyError) naming it
    and the nearest valid keys, never a new key."""
    err = missing_key_error(config, key)
    if err is not None:
        raise err
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    with node.unlocked():
        node[leaf] = value


PROBE_KINDS = ("knn", "linear")  # the online probe's (d2v_jax/probe.py)
PROBE_PARAMS = ("teacher", "student")
PROBE_POOLS = ("mean", "cls")  # FinetuneModel's pooling


def _check_probe(config: ml_collections.ConfigDict) -> None:
    """The `probe` section (d2v_jax/probe.py); absent or task "" = off."""
    p = config.get("probe")
    if p is None or not p.task:
        return
    bad = [k for k in p.kinds if k not in PROBE_KINDS]
    check_field(bool(p.kinds) and not bad, "probe.kinds",
                f"{tuple(p.kinds)}; expected a non-empty subset of {PROBE_KINDS}")
    check_field(p.params in PROBE_PARAMS, "probe.params", f"{p.params!r} not in {PROBE_PARAMS}")
    check_field(p.pool in PROBE_POOLS, "probe.pool", f"{p.pool!r} not in {PROBE_POOLS}")
    check_field(int(p.every) >= 0, "probe.every", f"{p.every} must be >= 0 (0 = off)")
    check_field(int(p.num_train) >= 2 and int(p.num_eval) >= 1, "probe.num_train",
                f"num_train={p.num_train} / num_eval={p.num_eval}: need at least 2 fitted "
                "rows and 1 scored row")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ConfigError (a ValueError) naming the first impossible field: the
    generic checks here, then the modality's (`modalities/<m>/config.py`)."""
    m, t = config.model, config.target
    check_field(config.version in ("v1", "v2"), "version", f"{config.version!r} is not 'v1' or 'v2'")
    check_field(m.dim % m.num_heads == 0, "model.num_heads",
                f"model.dim={m.dim} is not divisible by num_heads={m.num_heads}")
    check_field(1 <= t.top_k <= m.depth, "target.top_k",
                f"{t.top_k} must be in [1, model.depth={m.depth}]")
    check_field(t.layer_norm in _NORMS, "target.layer_norm", f"{t.layer_norm!r} not in {_NORMS}")
    check_field(t.final_norm in _FINAL_NORMS, "target.final_norm",
                f"{t.final_norm!r} not in {_FINAL_NORMS}")
    check_field(config.loss.beta >= 0, "loss.beta", f"{config.loss.beta} < 0")
    e = config.ema
    check_field(0 <= e.start <= 1 and 0 <= e.end <= 1, "ema", f"start={e.start}, end={e.end} not in [0, 1]")
    k = config.masking
    check_field(0 < k.ratio < 1, "masking.ratio", f"{k.ratio} is not in (0, 1)")
    check_field(k.num_clones >= 1, "masking.num_clones", f"{k.num_clones} < 1")
    check_field(config.data.batch_size >= 1, "data.batch_size", f"{config.data.batch_size} < 1")
    bad_samples.settings(config)  # data.on_bad_sample, data.max_bad_fraction
    check_field(config.train.num_steps >= 1, "train.num_steps", f"{config.train.num_steps} < 1")
    check_field(0.0 < config.collapse.max_target_pos_share <= 1.0, "collapse.max_target_pos_share",
                f"{config.collapse.max_target_pos_share} is not in (0, 1]")
    check_field(config.collapse.action in ("warn", "stop"), "collapse.action",
                f"{config.collapse.action!r} is not 'warn' or 'stop'")
    _check_probe(config)
    check_field(m.get("dtype", "float32") in DTYPE_NAMES, "model.dtype",
                f"{m.get('dtype')!r} not in {list(DTYPE_NAMES)}")
    check_field(m.get("remat", "none") in REMAT_POLICIES, "model.remat",
                f"{m.get('remat')!r} not in {sorted(REMAT_POLICIES)}")
    check_field(m.get("attention_impl") in ATTENTION_IMPLS + (None,), "model.attention_impl",
                f"{m.get('attention_impl')!r} not in {list(ATTENTION_IMPLS)}")
    r = config.train
    check_field(r.checkpoint_every >= 0, "train.checkpoint_every", f"{r.checkpoint_every} < 0")
    check_field(r.keep_checkpoints >= 1, "train.keep_checkpoints", f"{r.keep_checkpoints} < 1")
    check_field(r.get("keep_every", 0) >= 0, "train.keep_every", f"{r.get('keep_every')} < 0")
    check_field(r.get("nonfinite", "stop") in ("stop", "skip"), "train.nonfinite",
                f"{r.get('nonfinite')!r} is not 'stop' or 'skip'")
    modalities.get(config.modality).validate(config)
    return config
