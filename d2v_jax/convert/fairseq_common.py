"""Pieces shared by the fairseq layouts (modalities/<m>/fairseq.py).

The mappings are tables: `(our path, fairseq name, kind)` rows read by `read`,
so a renamed parameter on either side is a one-row change. Kinds:

  linear  torch Linear [out, in]        -> flax Dense {kernel [in, out], bias}
  norm    torch LayerNorm               -> flax LayerNorm {scale, bias}
  qkv     three torch Linears (q, k, v) -> our fused qkv Dense ([q | k | v])
  conv1d  torch Conv1d [out, in/G, k]   -> [k, in/G, out] (+ bias when stored)
  conv2d  torch Conv2d [out, in/G, h, w]-> [h, w, in/G, out] (+ bias when stored)
  tensor  any tensor, as stored
"""

from __future__ import annotations

import ast
from typing import Any, Iterator, Mapping

import ml_collections
import numpy as np

from d2v_jax.convert.common import ConversionError, StateReader, check_tree, qkv, stack
from d2v_jax.targets import FINAL_NORMS
from d2v_jax import modalities
from d2v_jax.train_state import ema_subtree

# Buffers fairseq saves that carry no weights.
FAIRSEQ_IGNORE_SUFFIXES = (".version", "._float_tensor")

# data2vec 2.0 `AltBlock` (fused qkv) -> our `layers.Block`.
ALT_BLOCK = (
    (("attn", "qkv"), "attn.qkv", "linear"),
    (("attn", "proj"), "attn.proj", "linear"),
    (("mlp", "fc1"), "mlp.fc1", "linear"),
    (("mlp", "fc2"), "mlp.fc2", "linear"),
    (("norm1",), "norm1", "norm"),
    (("norm2",), "norm2", "norm"),
)

# fairseq `TransformerSentenceEncoderLayer` (wav2vec 2.0, data2vec audio 1.0) and
# `TransformerEncoderLayer` (RoBERTa, data2vec text 1.0): separate q/k/v, post-LN.
SEPARATE_QKV_BLOCK = (
    (("attn", "qkv"), ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
    (("attn", "proj"), "self_attn.out_proj", "linear"),
    (("norm1",), "self_attn_layer_norm", "norm"),
    (("mlp", "fc1"), "fc1", "linear"),
    (("mlp", "fc2"), "fc2", "linear"),
    (("norm2",), "final_layer_norm", "norm"),
)


def drop_buffers(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items()
            if not ("." + k).endswith(FAIRSEQ_IGNORE_SUFFIXES)}


def cfg_get(cfg: Any, *path: str, default=None):
    """A field of fairseq's saved cfg (omegaconf or dict), or `default`."""
    node = cfg
    for p in path:
        if node is None:
            return default
        try:
            node = node.get(p) if isinstance(node, Mapping) else getattr(node, p, None)
        except Exception:  # noqa: BLE001 - an omegaconf interpolation (e.g. to
            return default  # optimization.max_update) that this cfg cannot resolve
    return default if node is None else node


def num_blocks(keys, prefix: str) -> int:
    """How many `prefix{i}.` blocks the keys hold (0..n-1, else ConversionError)."""
    ids = {int(k[len(prefix):].split(".")[0]) for k in keys
           if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    if ids != set(range(len(ids))):
        raise ConversionError(f"fairseq state dict: block indices under {prefix!r} are "
                              f"{sorted(ids)}")
    return len(ids)


def _read_one(r: StateReader, name, kind: str, dim: int | None):
    if kind == "linear":
        return r.linear(name)
    if kind == "norm":
        return r.norm(name)
    if kind == "qkv":
        return qkv(r, *name, dim=dim)
    if kind in ("conv1d", "conv2d"):
        w = r.get(name + ".weight")
        out = {"kernel": w.transpose(2, 1, 0) if kind == "conv1d" else w.transpose(2, 3, 1, 0)}
        if name + ".bias" in r:
            out["bias"] = r.get(name + ".bias")
        return out
    if kind == "tensor":
        return r.get(name)
    raise ValueError(f"unknown mapping kind {kind!r}")


def read(r: StateReader, prefix: str, table, dim: int | None = None) -> dict[str, Any]:
    """Reads `table` rows under `prefix` into a nested dict of our names."""
    out: dict[str, Any] = {}
    for path, name, kind in table:
        full = tuple(prefix + n for n in name) if isinstance(name, tuple) else prefix + name
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = _read_one(r, full, kind, dim)
    return out


def blocks(r: StateReader, prefixes: list[str], table, dim: int) -> dict[str, Any]:
    """Blocks under each prefix, in order, stacked as our scanned `encoder`."""
    if not prefixes:
        raise ConversionError("fairseq state dict: no Transformer blocks found")
    return {"blocks": stack([read(r, p, table, dim) for p in prefixes])}


def block_prefixes(state: Mapping[str, Any], *groups: str) -> list[str]:
    """`group{i}.` for every block of every group, in order (prenet blocks
    first, then the main blocks: one stack of ours)."""
    return [f"{g}{i}." for g in groups for i in range(num_blocks(state, g))]


def check_cfg(cfg: Any, checks: list[tuple[tuple[str, ...], Any, Any]], where: str) -> None:
    """Each (cfg path, default, wanted): a cfg value other than `wanted` -> error."""
    for path, default, wanted in checks:
        got = cfg_get(cfg, *path, default=default)
        if got != wanted:
            raise ConversionError(f"{where}: cfg {'.'.join(path)}={got!r}; our model needs "
                                  f"{wanted!r}")


def apply_training_cfg(config: ml_collections.ConfigDict, model_cfg: Any) -> None:
    """The data2vec training fields of fairseq's `cfg.model` that have a
    counterpart here: targets (top-K, norms), loss, EMA schedule, clones."""
    g = lambda k, d=None: cfg_get(model_cfg, k, default=d)
    with config.unlocked():
        t = config.target
        if g("average_top_k_layers") is not None:
            t.top_k = int(g("average_top_k_layers"))
        if g("instance_norm_target_layer"):
            t.layer_norm = "instance"
        elif g("layer_norm_target_layer"):
            t.layer_norm = "layer"
        elif g("batch_norm_target_layer"):
            t.layer_norm = "batch"
        elif g("average_top_k_layers") is not None:
            t.layer_norm = "none"
        final = ("instance" if g("instance_norm_targets") else
                 "layer" if g("layer_norm_targets") else "none")
        if final in FINAL_NORMS and g("average_top_k_layers") is not None:
            t.final_norm = final
        if g("loss_beta") is not None:
            config.loss.beta = float(g("loss_beta"))
        if g("loss_scale") is not None:
            config.loss.scale = float(g("loss_scale"))
        if g("cls_loss") is not None and "cls_weight" in config.loss:
            config.loss.cls_weight = float(g("cls_loss"))
        if g("ema_decay") is not None:
            config.ema.start = float(g("ema_decay"))
        if g("ema_end_decay") is not None:
            config.ema.end = float(g("ema_end_decay"))
        if isinstance(g("ema_anneal_end_step"), int):
            config.ema.anneal_steps = int(g("ema_anneal_end_step"))
        if g("clone_batch") is not None:
            config.masking.num_clones = int(g("clone_batch"))
    if config.target.top_k > config.model.depth:
        raise ConversionError(f"fairseq cfg: average_top_k_layers={config.target.top_k} > "
                              f"the {config.model.depth} blocks of the checkpoint")


class FairseqConversion(tuple):
    """`(config, params, ema_params)` (unpacks as three), plus `head`: the
    fine-tuned task head's params (or None) and `task`: its kind ("ctc",
    "classification", or None). `ema_params` is None when the checkpoint
    holds no teacher (fine-tuned models)."""

    def __new__(cls, config, params, ema_params, head=None, task=None):
        out = super().__new__(cls, (config, params, ema_params))
        out.head, out.task = head, task
        return out

    config = property(lambda self: self[0])
    params = property(lambda self: self[1])
    ema_params = property(lambda self: self[2])

    def __iter__(self) -> Iterator[Any]:
        return iter((self[0], self[1], self[2]))


def split_ema(checkpoint: Mapping[str, Any], ema_key: str = "_ema"):
    """(cfg, state without the teacher, teacher state or None)."""
    cfg = checkpoint.get("cfg") if "model" in checkpoint else None
    state = dict(checkpoint["model"] if "model" in checkpoint else checkpoint)
    ema = state.pop(ema_key, None)
    return cfg, drop_buffers(state), None if ema is None else drop_buffers(ema)


def heads_from(cfg: Any, num_heads: int | None, path: tuple[str, ...]) -> int:
    heads = num_heads or cfg_get(cfg, *path)
    if heads is None:
        raise ConversionError("fairseq state dict: the head count is not stored in the weights; "
                              f"pass num_heads= (or the checkpoint with its cfg: "
                              f"{'.'.join(path)})")
    return int(heads)


def mlp_ratio(hidden: int, dim: int) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise ConversionError(f"fairseq state dict: mlp width {hidden} is not dim * a ratio")
    return ratio


def zeros_like_tree(tree):
    return {k: zeros_like_tree(v) if isinstance(v, dict) else np.zeros_like(v)
            for k, v in tree.items()}


def conv_spec(spec: Any, where: str) -> list[tuple[int, int, int]]:
    """fairseq's `feature_encoder_spec` / `conv_feature_layers` string, e.g.
    "[(512, 10, 5)] + [(512, 3, 2)] * 4", -> [(dim, kernel, stride), ...].
    Only list/tuple literals, + and * are read (never eval)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(ast.dump(node))

    try:
        layers = [tuple(int(v) for v in layer) for layer in ev(ast.parse(str(spec), mode="eval"))]
    except (ValueError, SyntaxError, TypeError) as e:
        raise ConversionError(f"{where}: cannot read the conv spec {spec!r} ({e})") from None
    if not layers or any(len(layer) != 3 for layer in layers):
        raise ConversionError(f"{where}: conv spec {spec!r} is not [(dim, kernel, stride), ...]")
    return layers


# wav2vec 2.0's default extractor (data2vec audio 1.0 and 2.0 use it).
WAV2VEC2_CONV_SPEC = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2"


def conv_extractor(r: StateReader, prefix: str, n: int) -> dict[str, Any]:
    """wav2vec 2.0 `ConvFeatureExtractionModel` in layer_norm mode: per layer
    Sequential(Conv1d (no bias), Dropout, Sequential(TransposeLast,
    Fp32LayerNorm, TransposeLast), GELU) -> our conv_{i} / conv_norm_{i}."""
    out = {}
    for i in range(n):
        out.update(read(r, f"{prefix}{i}.", (((f"conv_{i}",), "0", "conv1d"),
                                             ((f"conv_norm_{i}",), "2.1", "norm"))))
    return out


def extractor_config(state: Mapping[str, Any], prefix: str, spec: Any, where: str):
    """(conv_dims, conv_kernels, conv_strides) from the weights, strides from
    the cfg's spec (the weights do not hold them; default wav2vec 2.0's)."""
    n = num_blocks(state, prefix)
    if f"{prefix}0.2.weight" in state:
        raise ConversionError(f"{where}: {prefix}0.2.weight is a group norm: extractor_mode="
                              "'default' (wav2vec 2.0 base); ours is the layer_norm mode")
    shapes = [tuple(state[f"{prefix}{i}.0.weight"].shape) for i in range(n)]
    layers = conv_spec(spec if spec is not None else WAV2VEC2_CONV_SPEC, where)
    got = [(s[0], s[2]) for s in shapes]
    if [(d, k) for d, k, _ in layers] != got:
        raise ConversionError(f"{where}: conv spec {spec!r} does not fit the weights "
                              f"((dim, kernel) per layer {got}); pass the checkpoint with its cfg")
    return (tuple(d for d, _, _ in layers), tuple(k for _, k, _ in layers),
            tuple(s for _, _, s in layers))


def odd_kernel(k: int, field: str) -> None:
    """fairseq pads even conv kernels as Conv(padding=k//2) + SamePad (drop the
    last frame); our 'SAME' places even windows one frame later."""
    if k % 2 == 0:
        raise ConversionError(f"fairseq cfg {field}={k}: even decoder kernels are padded "
                              "differently from ours (fairseq SamePad); only odd ones map")


def encoder_only_ema(state: Mapping[str, Any], ema: Mapping[str, Any], er: StateReader,
                     dim: int, prenet: str | None = None) -> dict[str, Any] | None:
    """The teacher's blocks when the checkpoint was saved with `ema_encoder_only`
    (its '_ema' holds just the main blocks, `0.attn.qkv.weight`, ...); None for a
    full-model '_ema'. With `prenet` (the modality's prenet block prefix), prenet
    blocks beside an encoder-only '_ema' are an error: the teacher's are not stored."""
    if "0.attn.qkv.weight" not in ema:
        return None
    if prenet is not None and block_prefixes(state, prenet):
        raise ConversionError("fairseq state dict: an encoder-only '_ema' beside prenet "
                              "blocks: the teacher's prenet is not stored")
    return blocks(er, block_prefixes(ema, ""), ALT_BLOCK, dim)


def ema_subset(config: ml_collections.ConfigDict, teacher: Mapping[str, Any],
               expected: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's EMA parameters (`train_state.ema_subtree`: the teacher
    modules minus what `ema.shared` takes from the student), checked.
    `teacher` holds the subtrees the checkpoint's teacher stores; the others
    are the student's (`params`)."""
    full = {k: teacher.get(k, params.get(k)) for k in modalities.teacher_modules(config)}
    out = ema_subtree({k: v for k, v in full.items() if v is not None}, config)
    check_tree(out, ema_subtree(expected, config), "from_fairseq ema_params")
    return out


def split_wrapper(checkpoint: Mapping[str, Any], prefix: str, cfg_path: tuple[str, ...]):
    """A fine-tuning model wrapping a pretrained one under `prefix` (fairseq
    `Wav2VecCtc`: "w2v_encoder.w2v_model.", `Data2VecTextClassificationModel`:
    "model.") -> (the inner checkpoint with its own cfg, the outer tensors:
    the task head)."""
    cfg = checkpoint.get("cfg") if "model" in checkpoint else None
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outer = drop_buffers({k: v for k, v in state.items() if not k.startswith(prefix)})
    inner_cfg = cfg_get(cfg, *cfg_path)
    return {"model": inner, "cfg": None if inner_cfg is None else {"model": inner_cfg}}, outer


def classification_head(r: StateReader, where: str):
    """fairseq's one `classification_heads.<name>.{dense,out_proj}` (RoBERTa's
    head) -> {"dense", "out_proj"}, or None when there is none."""
    names = sorted({k.split(".")[1] for k in r.state if k.startswith("classification_heads.")})
    if len(names) > 1:
        raise ConversionError(f"{where}: {len(names)} classification heads {names}; convert "
                              "one (drop the others' classification_heads.<name>.* keys)")
    if not names:
        return None
    return read(r, f"classification_heads.{names[0]}.", ((("dense",), "dense", "linear"),
                                                          (("out_proj",), "out_proj", "linear")))
