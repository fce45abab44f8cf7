r"""The PyTorch peer: the same data2vec 1.0 image step with Hugging Face's
`Data2VecVisionModel`, timed like `step_bench.py`, one JSON line out.

    python benchmarks/peer_torch.py --config experiments/image.py:tiny_v1 --batch 32 [--compile]

The step, as users of the HF / BEiT code would write it, with the shapes and
hyper-parameters of the same experiment config (SPEC 2-4, 7):
- the teacher, a copy of the student in eval mode, runs under `no_grad` on the
  full image with `output_hidden_states=True`; its top-K block outputs (CLS
  dropped) are normalized per block (`target.layer_norm`: layer / instance),
  averaged, then `target.final_norm`-ed;
- the student runs on the same image with `bool_masked_pos` (the learned mask
  token), final LayerNorm, a Linear(D, D) head; smooth-L1 (`loss.beta`) summed
  over D, times 1/sqrt(D), averaged over the masked patches;
- backward, gradient clipping (`optim.clip_norm`), AdamW (`fused=True` on CUDA;
  no decay on 1-D params and the relative position bias table), and the EMA
  update of the teacher in float32 (`torch._foreach_lerp_`).

bf16 autocast on CUDA, float32 on CPU (as step_bench's `--dtype auto`); SDPA
attention (`attn_implementation="sdpa"`, the relative position bias passed as
the additive mask). `--compile` wraps the loss computation (teacher, student,
targets, loss; AOTAutograd compiles its backward) in `torch.compile`.

FLOPs and MFU use `d2v_jax.flops` on the same config (the same model up to
HF's separate q/k/v projections, which cost the same), so both JSON lines are
comparable field by field.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import d2v_jax
from d2v_jax import errors, flops
from d2v_jax.config import set_field

PEAK_FLOPS = (("h200", 989e12), ("h100", 989e12), ("a100", 312e12))  # bf16 dense


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build(config):
    from transformers import Data2VecVisionConfig, Data2VecVisionModel
    m = config.model
    if config.modality != "image" or config.version != "v1":
        raise SystemExit(f"peer_torch: the peer is the 1.0 image step; got "
                         f"{config.modality} {config.version}")
    hf = Data2VecVisionConfig(
        hidden_size=m.dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(m.dim * m.mlp_ratio), hidden_act="gelu",
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attn_dropout,
        image_size=m.image_size, patch_size=m.patch_size, num_channels=m.channels,
        use_mask_token=True, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=True,
        layer_scale_init_value=m.layer_scale_init, drop_path_rate=m.drop_path,
        use_mean_pooling=False,  # keep the final LayerNorm on the sequence (BEiT pre-training)
        layer_norm_eps=m.norm_eps)
    hf._attn_implementation = "sdpa"
    student = Data2VecVisionModel(hf, add_pooling_layer=False)
    impl = student.config._attn_implementation
    if impl != "sdpa":
        raise SystemExit(f"peer_torch: HF chose attention {impl!r}, not sdpa")
    return student


def norm(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """x [B, N, D] float32: 'layer' over D, 'instance' over N per channel, or none."""
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    if kind == "instance":
        return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
    if kind == "none":
        return x
    raise SystemExit(f"peer_torch: target norm {kind!r} not supported (layer|instance|none)")


def measured_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="experiments/image.py:tiny_v1")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the loss computation")
    p.add_argument("--peak_tflops", type=float, default=None)
    args = p.parse_args(argv)

    config = d2v_jax.load_config(args.config)
    if args.batch is not None:
        set_field(config, "data.batch_size", args.batch)
    b, m, t, lc = config.data.batch_size, config.model, config.target, config.loss
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(config.seed)

    student = build(config).to(device)
    head = torch.nn.Linear(m.dim, m.dim).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student.train()

    decay, no_decay = [], []
    for name, prm in list(student.named_parameters()) + [("head." + n, q) for n, q in
                                                          head.named_parameters()]:
        skip = prm.ndim <= 1 or any(k in name for k in config.optim.no_decay)
        (no_decay if skip else decay).append(prm)
    o = config.optim
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, fused=cuda)
    params = list(student.parameters())
    ema_params = list(teacher.parameters())
    scale = lc.scale if lc.scale is not None else 1.0 / math.sqrt(m.dim)
    tau = config.ema.start
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)

    def loss_fn(images, mask):
        with torch.no_grad(), torch.autocast(**amp):
            hidden = teacher(images, output_hidden_states=True).hidden_states
            blocks = [norm(h[:, 1:].float(), t.layer_norm, t.eps) for h in hidden[-t.top_k:]]
            y = norm(sum(blocks) / len(blocks), t.final_norm, t.eps)
        with torch.autocast(**amp):
            x = student(images, bool_masked_pos=mask).last_hidden_state
            pred = head(x[:, 1:]).float()
        per = F.smooth_l1_loss(pred, y, reduction="none", beta=lc.beta).sum(-1) * scale
        return (per * mask).sum() / mask.sum().clamp(min=1)

    step_loss = torch.compile(loss_fn) if args.compile else loss_fn

    def train_step(images, mask):
        loss = step_loss(images, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + list(head.parameters()), o.clip_norm)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - tau)
        return loss

    n = (m.image_size // m.patch_size) ** 2
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        images = torch.from_numpy(rng.standard_normal(
            (b, m.channels, m.image_size, m.image_size)).astype(np.float32)).to(device)
        scores = rng.random((b, n))
        k = config.masking.num_masked
        mask = torch.from_numpy(scores < np.sort(scores, axis=-1)[:, k:k + 1]).to(device)
        batches.append((images, mask))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    log(f"peer_torch: {args.config} batch {b} on {device} compile={args.compile}")
    t0 = time.perf_counter()
    for i in range(max(args.warmup, 1)):
        loss = train_step(*batches[i % 4])
        sync()
        if i == 0:
            first_step_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t1 = time.perf_counter()
        loss = train_step(*batches[i % 4])
        sync()
        times.append(time.perf_counter() - t1)
    loss = float(loss.detach())
    if not math.isfinite(loss):
        raise SystemExit(f"peer_torch: non-finite loss {loss}")

    if cuda:
        kind = torch.cuda.get_device_name().lower()
        found = [v for k, v in PEAK_FLOPS if k in kind]
        peak = args.peak_tflops * 1e12 if args.peak_tflops else (found[0] if found else float("nan"))
        peak_source = "table: bf16 dense"
        kind_name = torch.cuda.get_device_name()
    else:
        peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_matmul_peak()
        peak_source = "measured float32 matmul (torch CPU, 2048^3)"
        kind_name = "cpu"
    count = flops.step_flops(config, b)
    tt = np.asarray(times)
    step_s = float(np.median(tt))
    result = {
        "bench": "torch_hf" + ("_compiled" if args.compile else "_eager"),
        "device_kind": kind_name,
        "platform": device.type,
        "device_count": 1,
        "config": args.config,
        "dtype": "bfloat16 (autocast)" if cuda else "float32",
        "global_batch": b,
        "clones": 1,
        "tokens_per_example": count.tokens,
        "steps": args.steps,
        "step_time_s": {"median": step_s, "p10": float(np.percentile(tt, 10)),
                        "p90": float(np.percentile(tt, 90)), "min": float(tt.min()),
                        "mean": float(tt.mean())},
        "first_step_s": first_step_s,
        "samples_per_s": b / step_s,
        "tokens_per_s": b * count.tokens["teacher"] / step_s,
        "model_flops_per_step": count.model,
        "model_tflops_per_s": count.model / step_s / 1e12,
        "peak_tflops_per_device": peak / 1e12,
        "peak_source": peak_source,
        "mfu": count.model / step_s / peak,
        "loss": loss,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    # A user error (bad config key or value) is one `error:` line, exit 2 (d2v_jax/errors.py).
    # main returns its result dict (for callers); the exit code is 0 on success.
    sys.exit(errors.run(lambda: main() and 0, debug=errors.debug_requested(sys.argv)))
