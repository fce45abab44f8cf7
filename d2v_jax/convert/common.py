"""Pieces shared by the Hugging Face and fairseq converters."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax import modalities, optim
from d2v_jax.config import load_config
from d2v_jax.convert.heads import apply_head
from d2v_jax.train_state import TrainState, ema_subtree, init_params

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments")


class ConversionError(ValueError):
    """A checkpoint that cannot be mapped exactly (names the key or field)."""


# -- Hugging Face helpers shared by the modalities' mappings (modalities/*/hf.py)
# Buffers HF recomputes; they carry no weights.
HF_IGNORE = ("relative_position_index", "position_ids", "token_type_ids")


def hf_require(cond: bool, field: str, msg: str) -> None:
    """A config value our model cannot reproduce -> ConversionError naming it."""
    if not cond:
        raise ConversionError(f"Hugging Face config {field}: {msg}")


def qkv(r: StateReader, q: str, k: str, v: str, dim: int) -> dict[str, np.ndarray]:
    """Separate q/k/v Linears -> our fused qkv Dense ([q | k | v] on the output
    axis). A missing k bias (BEiT) is 0: it adds q.b_k, the same for every key,
    which the softmax cancels."""
    kernel = np.concatenate([r.get(f"{n}.weight", (dim, dim)).T for n in (q, k, v)], axis=1)
    bias = [r.get(f"{n}.bias", (dim,)) if f"{n}.bias" in r else np.zeros(dim, np.float32)
            for n in (q, k, v)]
    return {"kernel": kernel, "bias": np.concatenate(bias)}


def split_qkv(qkv: Mapping[str, np.ndarray], dim: int):
    w = np.asarray(qkv["kernel"])
    b = np.asarray(qkv["bias"]) if "bias" in qkv else np.zeros(3 * dim, np.float32)
    return [(w[:, i * dim:(i + 1) * dim].T, b[i * dim:(i + 1) * dim]) for i in range(3)]


def linear_out(dense: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"weight": np.asarray(dense["kernel"]).T, "bias": np.asarray(dense["bias"])}


def norm_out(norm: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"weight": np.asarray(norm["scale"]), "bias": np.asarray(norm["bias"])}


def set_model(config: ml_collections.ConfigDict, **fields) -> None:
    with config.unlocked():
        for k, v in fields.items():
            config.model[k] = v


def base_config(modality: str, arg: str) -> ml_collections.ConfigDict:
    """The experiment config a converted model starts from (then overridden)."""
    path = os.path.join(EXPERIMENTS, f"{modality}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"convert: experiment file {path!r} not found (the converter "
                                f"builds configs from the repository's experiments/)")
    return load_config(f"{path}:{arg}")


def dtype_name(t: Any) -> str:
    """The stored dtype of a torch tensor or array ('float16', 'bfloat16', ...)."""
    dtype = t.dtype if hasattr(t, "dtype") else np.asarray(t).dtype
    return str(dtype).removeprefix("torch.")


def precision_of(stored: np.ndarray, stored_dtype: str) -> str:
    """The precision a file's floats were last rounded to: the stored dtype,
    or, for float32 tensors, 'float16' / 'bfloat16' when every value is
    exactly a half-precision number. That is what a fairseq `common.fp16`
    run saves: the student lives in float16 and `Trainer.save_checkpoint`
    casts it back to float32 (`utils.move_to_cpu`)."""
    if stored_dtype in ("float16", "bfloat16") or stored_dtype != "float32":
        return stored_dtype
    x = np.asarray(stored, np.float32)
    # The coarser format first: bfloat16 values are (nearly always) float16
    # values too, while float16's extra mantissa bits are rarely all zero.
    as_bf16 = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    if np.array_equal(as_bf16, x):
        return "bfloat16"
    if np.array_equal(x.astype(np.float16).astype(np.float32), x):
        return "float16"
    return "float32"


def describe_precision(state: Mapping[str, Any]) -> str:
    """What precision a state dict's float tensors hold, taken together
    (`precision_of`), in words: e.g. a fairseq fp16 run saves its student as
    float16 values in float32 tensors."""
    floats = [(to_numpy(v), dtype_name(v)) for v in state.values()
              if hasattr(v, "dtype") and "float" in dtype_name(v)]
    if not floats:
        return "none (no float tensors)"
    stored = sorted({d for _, d in floats})
    if stored != ["float32"]:
        return " + ".join(stored)
    values = precision_of(np.concatenate([a.ravel() for a, _ in floats]), "float32")
    return "float32" if values == "float32" else f"{values} values stored as float32"


def close_at_precision(stored: np.ndarray, computed: np.ndarray, precision: str) -> bool:
    """`stored` equals `computed` up to rounding to `precision`: within one unit
    in the last place of that precision at each value (float16: 2^-10 of the
    value's binade, bfloat16: 2^-7), or 1e-5 for float32. A table of other
    values (not the same function) is far outside this."""
    stored = np.asarray(stored, np.float64)
    computed = np.asarray(computed, np.float64)
    if stored.shape != computed.shape:
        return False
    bits = {"float16": 10, "bfloat16": 7}.get(precision)
    if bits is None:
        return bool(np.allclose(stored, computed, rtol=0, atol=1e-5))
    binade = 2.0 ** np.floor(np.log2(np.maximum(np.abs(computed), 2.0 ** -14)))
    return bool(np.all(np.abs(stored - computed) <= binade * 2.0 ** -bits))


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor or array -> float32/int numpy (a copy, detached)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        t = t.numpy()
    return np.array(t, copy=True)


class StateReader:
    """Reads a flat {name: tensor} dict and fails on unused or missing keys."""

    def __init__(self, state: Mapping[str, Any], where: str, ignore: tuple[str, ...] = ()):
        self.state = {k: v for k, v in state.items() if not any(s in k for s in ignore)}
        self.used: set[str] = set()
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def dtype(self, key: str) -> str:
        """The dtype the file stores `key` in (`get` returns float32 for every float)."""
        if key not in self.state:
            raise ConversionError(f"{self.where}: missing tensor {key!r}")
        return dtype_name(self.state[key])

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.state:
            raise ConversionError(f"{self.where}: missing tensor {key!r}")
        value = to_numpy(self.state[key])
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(f"{self.where}: tensor {key!r} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(shape)}")
        self.used.add(key)
        return value

    def linear(self, prefix: str) -> dict[str, np.ndarray]:
        """torch Linear (weight [out, in]) -> flax Dense {kernel [in, out], bias}."""
        out = {"kernel": self.get(prefix + ".weight").T}
        if prefix + ".bias" in self.state:
            out["bias"] = self.get(prefix + ".bias")
        return out

    def norm(self, prefix: str) -> dict[str, np.ndarray]:
        return {"scale": self.get(prefix + ".weight"), "bias": self.get(prefix + ".bias")}

    def finish(self) -> None:
        unused = sorted(set(self.state) - self.used)
        if unused:
            raise ConversionError(f"{self.where}: {len(unused)} tensor(s) not mapped: "
                                  f"{unused[:20]}")


def stack(per_layer: list[Any]) -> Any:
    """[tree of layer 0, tree of layer 1, ...] -> one tree with a leading layer
    axis, the layout of `nn.scan` blocks."""
    return jax.tree.map(lambda *xs: np.stack(xs), *per_layer)


def unstack(tree: Any, depth: int) -> list[Any]:
    return [jax.tree.map(lambda x: np.asarray(x)[i], tree) for i in range(depth)]


def expected_params(config: ml_collections.ConfigDict) -> Any:
    """Shapes of the full student params for `config` (no compute)."""
    model = modalities.build_model(config)
    rngs = {k: jax.random.key(i) for i, k in enumerate(("params", "dropout", "noise"))}
    batch = modalities.dummy_batch(config, 1)
    shapes = jax.eval_shape(lambda: model.init(rngs, batch, method="student"))
    return nn.unbox(shapes)["params"]


def check_tree(params: Any, expected: Any, where: str) -> None:
    """`params` must have exactly the paths and shapes of `expected`."""
    got = {jax.tree_util.keystr(k): tuple(np.shape(v))
           for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    problems += [f"{k}: shape {got[k]} != {want[k]}" for k in got
                 if k in want and got[k] != want[k]]
    if problems:
        raise ConversionError(f"{where}: params do not fit the config: {problems[:20]}")


def make_train_state(config: ml_collections.ConfigDict, params: Any, ema_params: Any = None,
                     seed: int | None = None):
    """A step-0 TrainState holding converted weights, for `save_checkpoint` and
    `--init_from`. Subtrees the checkpoint lacks (pretraining heads, decoder) are
    freshly initialised from `seed` (default `config.seed`); the teacher is
    `ema_params`, or a copy of the student's teacher subtrees."""
    rng = jax.random.PRNGKey(config.seed if seed is None else seed)
    fresh = jax.jit(lambda r: nn.unbox(init_params(config, r)))(rng)
    merged = {**fresh, **params}
    check_tree(merged, fresh, "make_train_state")
    merged = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), merged)
    teacher = ema_params if ema_params is not None else ema_subtree(merged, config)
    check_tree(teacher, ema_subtree(fresh, config), "make_train_state ema_params")
    teacher = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), teacher)
    tx, _ = optim.make_optimizer(config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=merged, ema_params=teacher,
                      opt_state=tx.init(merged))


@functools.lru_cache(maxsize=8)
def _encode_fn(config_json: str):
    """One jitted `encode` per config (converted twins share the compilation)."""
    model = modalities.build_model(ml_collections.ConfigDict(json.loads(config_json)))
    return jax.jit(lambda p, b: model.apply({"params": p}, b, method="encode"))


@dataclasses.dataclass
class Converted:
    """Our config and encoder params; `enc(**hf_inputs)` -> last hidden state.

    `params` holds the subtrees `encode` uses (`frontend`, `encoder`, and
    `context` / `final_norm` where the model has them); the pretraining heads
    are not part of a Hugging Face encoder. Inputs are those HF takes:
    `pixel_values` [B,C,H,W]; `input_values` [B,S] with `attention_mask`;
    `input_ids` [B,T] with `attention_mask` (1 = real).
    """

    config: ml_collections.ConfigDict
    params: Any
    head: Any = None  # a task model's head params (convert.heads), or None
    task: str | None = None  # "ctc", "classification", "image_classification"

    def __post_init__(self):
        self._apply = _encode_fn(json.dumps(self.config.to_dict(), sort_keys=True, default=list))

    def train_state(self, seed: int | None = None):
        """A step-0 TrainState (see `make_train_state`); teacher = student."""
        return make_train_state(self.config, self.params, seed=seed)

    def batch(self, *args, pixel_values=None, input_values=None, input_ids=None,
              attention_mask=None) -> dict[str, np.ndarray]:
        """HF inputs -> our batch dict (the modality's `hf.batch_from_hf`).

        Positional arguments are `(inputs, attention_mask)` where `inputs` is
        this modality's own input (`pixel_values`, `input_values` or
        `input_ids`): a positional call never lands in another modality's slot.
        """
        mapping = importlib.import_module(modalities.get(self.config.modality).hf)
        given = {"pixel_values": pixel_values, "input_values": input_values,
                 "input_ids": input_ids}
        if len(args) > 2:
            raise TypeError(f"a converted {self.config.modality} encoder takes at most 2 "
                            f"positional arguments ({mapping.INPUT}, attention_mask), got "
                            f"{len(args)}")
        if args:
            if given[mapping.INPUT] is not None:
                raise TypeError(f"{mapping.INPUT} given both positionally and by keyword")
            given[mapping.INPUT] = args[0]
        if len(args) == 2:
            if attention_mask is not None:
                raise TypeError("attention_mask given both positionally and by keyword")
            attention_mask = args[1]
        wrong = [k for k, v in given.items() if v is not None and k != mapping.INPUT]
        if wrong:
            raise TypeError(f"a converted {self.config.modality} encoder takes "
                            f"{mapping.INPUT}=..., not {wrong}")
        if given[mapping.INPUT] is None:
            raise ValueError(f"a converted {self.config.modality} encoder takes "
                             f"{mapping.INPUT}=...")
        mask = None if attention_mask is None else to_numpy(attention_mask)
        return mapping.batch_from_hf(to_numpy(given[mapping.INPUT]), mask)

    def __call__(self, *args, pixel_values=None, input_values=None, input_ids=None,
                 attention_mask=None) -> np.ndarray:
        """Last hidden state [B, T, D]; `enc(x)` / `enc(x, attention_mask)` take
        the modality's own input first, or use the HF keyword names."""
        batch = self.batch(*args, pixel_values=pixel_values, input_values=input_values,
                           input_ids=input_ids, attention_mask=attention_mask)
        params = jax.tree.map(jnp.asarray, self.params)
        return np.asarray(self._apply(params, batch))

    def logits(self, *args, **inputs) -> np.ndarray:
        """The task model's logits (the HF task model's `.logits`), from the
        same inputs as `__call__`."""
        if self.head is None:
            raise ValueError("this converted model has no task head (it was a base model)")
        return apply_head(self.task, self.head, self(*args, **inputs), self.config.model.norm_eps)
