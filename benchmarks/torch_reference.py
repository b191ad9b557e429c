"""The PyTorch reference for jaxddpm's CPU benchmarks, measured on this machine. Run:
  python benchmarks/torch_reference.py [--help]          (needs `pip install torch==2.13.0`; not a jaxddpm dependency)

jaxddpm's benchmarks (benchmarks/model.py, benchmarks/train.py) compare against a PyTorch implementation of the DDPM
UNet. This script exists to measure that PyTorch reference in the same run conditions as jaxddpm's benchmarks (same
machine, same load, same thread count, same timing method: best of a few repeats after a warm-up, wall and process
CPU time) instead of quoting numbers from another machine. The network below is a PyTorch transcription of
jaxddpm/models/unet.py (NCHW instead of NHWC): the same layers in the same order and under the same names, and the
same parameter counts (asserted: cifar10 35,746,307, small32 652,195). Weights use PyTorch's default initialisation,
which does not change the work done.

Parts (`--parts`, comma-separated, default all):
  peak   float32 matmul peak: best GFLOP/s of n x n matmuls, n in (1024, 2048), as `matmul_peak` in model.py.
  cifar  the cifar10 preset (35.7M parameters, 32x32x3), eval mode under torch.inference_mode(): forward at
         `--batches` (8,32); FLOPs = 2 x MACs of every conv, linear and attention matmul (FlopCounterMode);
         GFLOP/s and fraction of the matmul peak (per wall second, and per process-CPU second).
  small  the small32 preset (652K parameters) at batch `--small_batch` (16): `--steps` (100) sampling-like steps
         x <- x - 0.01 * model(x, t), t counting down, under inference_mode; wall time of the whole loop.
  train  for each of `--train_presets` (cifar10,small32) and `--train_batches` (8,32): images/s of a full DDPM
         training step (t ~ U{0..999}, eps ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with linear betas
         1e-4..0.02 over 1000 steps, MSE against eps, backward, clip_grad_norm_(1.0), Adam(2e-4) step, EMA update
         with decay 0.9999), and the forward+backward alone (gradient of mean((model(x, 500) - x)^2), dropout on,
         as in train.py), with their ratio.
Each part prints a line per measurement as it goes; `--json` prints one JSON line with everything at the end.

Full run, as jaxddpm's benchmarks run: `python benchmarks/torch_reference.py --json` (about 4-5 minutes on a quiet
2-core machine). `--threads N` sets torch.set_num_threads (default os.cpu_count()).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

# The two jaxddpm presets this script supports (jaxddpm/models/presets.py), their input shape (C, H, W) and their
# parameter counts (exact, checked against the Flax model in tests/test_unet.py).
PRESETS = {
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                    num_groups=32),
    "small32": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=8),
}
INPUT_SHAPES = {"cifar10": (3, 32, 32), "small32": (3, 32, 32)}
PARAM_COUNTS = {"cifar10": 35_746_307, "small32": 652_195}


# ---------------------------------------------------------------------------------------------------------------------
# The model: jaxddpm/models/unet.py in PyTorch.

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """[sin(t w_i), cos(t w_i)] with w_i = max_period^(-i / (dim/2 - 1)), i < dim/2 (+ a zero column if dim is odd)."""
  half = dim // 2
  scale = math.log(max_period) / max(half - 1, 1)
  freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
  args = t.to(torch.float32)[:, None] * freqs[None, :]
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
  return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(num_groups: int, channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups, channels, eps=1e-6)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
  """A 3x3 stride-1 conv with 'SAME' padding."""
  return nn.Conv2d(c_in, c_out, 3, padding=1)


class ResnetBlock(nn.Module):
  """h = conv2(dropout(swish(GN2(conv1(swish(GN1(x))) + Dense(swish(temb)))))); out = shortcut(x) + h.

  The shortcut is a 1x1 conv ("NIN", a Dense over channels in jaxddpm) when the channel count changes.
  """

  def __init__(self, c_in: int, c_out: int, temb_ch: int, dropout: float, num_groups: int):
    super().__init__()
    self.norm1 = group_norm(num_groups, c_in)
    self.conv1 = conv3x3(c_in, c_out)
    self.temb_proj = nn.Linear(temb_ch, c_out)
    self.norm2 = group_norm(num_groups, c_out)
    self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
    self.conv2 = conv3x3(c_out, c_out)
    self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

  def forward(self, x, temb):
    h = self.conv1(F.silu(self.norm1(x)))
    h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
    h = self.conv2(self.dropout(F.silu(self.norm2(h))))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  """out = x + W_o softmax(q k^T / sqrt(C / heads)) v over the H*W positions, with q, k, v = W_{q,k,v} GN(x)."""

  def __init__(self, channels: int, num_groups: int, num_heads: int = 1):
    super().__init__()
    self.num_heads = num_heads
    self.norm = group_norm(num_groups, channels)
    self.q = nn.Linear(channels, channels)
    self.k = nn.Linear(channels, channels)
    self.v = nn.Linear(channels, channels)
    self.proj_out = nn.Linear(channels, channels)

  def forward(self, x):
    B, C, H, W = x.shape
    h = self.norm(x).reshape(B, C, H * W).transpose(1, 2)  # [B, HW, C]

    def heads(proj):
      return proj(h).reshape(B, H * W, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, N, HW, C/N]

    h = F.scaled_dot_product_attention(heads(self.q), heads(self.k), heads(self.v))
    h = self.proj_out(h.transpose(1, 2).reshape(B, H * W, C))
    return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
  """A stride-2 3x3 conv with TF/Flax 'SAME' padding (for even sizes: 0 before, 1 after)."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, stride=2)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv = conv3x3(channels, channels)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
  """The DDPM UNet, structured and named as jaxddpm's: blocks["down_0_block_0"], blocks["mid_attn_1"], ...

  forward(x [B, C, H, W] float32, t [B] int) -> [B, C, H, W].
  """

  def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_groups=32, num_heads=1,
               in_channels=3, image_size=32):
    super().__init__()
    self.ch, self.num_levels, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
    temb_ch = 4 * ch
    block = lambda c_in, c_out: ResnetBlock(c_in, c_out, temb_ch, dropout, num_groups)
    attn = lambda c: AttnBlock(c, num_groups, num_heads)
    self.temb_dense0 = nn.Linear(ch, temb_ch)
    self.temb_dense1 = nn.Linear(temb_ch, temb_ch)
    self.conv_in = conv3x3(in_channels, ch)
    self.blocks = nn.ModuleDict()
    skip_ch, c, res = [ch], ch, image_size
    for i, mult in enumerate(ch_mult):
      for j in range(num_res_blocks):
        self.blocks[f"down_{i}_block_{j}"] = block(c, ch * mult)
        c = ch * mult
        if res in attn_resolutions:
          self.blocks[f"down_{i}_attn_{j}"] = attn(c)
        skip_ch.append(c)
      if i != len(ch_mult) - 1:
        self.blocks[f"down_{i}_downsample"] = Downsample(c)
        skip_ch.append(c)
        res //= 2
    self.blocks["mid_block_1"] = block(c, c)
    self.blocks["mid_attn_1"] = attn(c)
    self.blocks["mid_block_2"] = block(c, c)
    for i in reversed(range(len(ch_mult))):
      for j in range(num_res_blocks + 1):
        self.blocks[f"up_{i}_block_{j}"] = block(c + skip_ch.pop(), ch * ch_mult[i])
        c = ch * ch_mult[i]
        if res in attn_resolutions:
          self.blocks[f"up_{i}_attn_{j}"] = attn(c)
      if i != 0:
        self.blocks[f"up_{i}_upsample"] = Upsample(c)
        res *= 2
    assert not skip_ch
    self.norm_out = group_norm(num_groups, c)
    self.conv_out = conv3x3(c, in_channels)

  def forward(self, x, t):
    b = self.blocks
    temb = self.temb_dense1(F.silu(self.temb_dense0(timestep_embedding(t, self.ch))))
    hs = [self.conv_in(x)]
    for i in range(self.num_levels):
      for j in range(self.num_res_blocks):
        h = b[f"down_{i}_block_{j}"](hs[-1], temb)
        if f"down_{i}_attn_{j}" in b:
          h = b[f"down_{i}_attn_{j}"](h)
        hs.append(h)
      if i != self.num_levels - 1:
        hs.append(b[f"down_{i}_downsample"](hs[-1]))
    h = b["mid_block_2"](b["mid_attn_1"](b["mid_block_1"](hs[-1], temb)), temb)
    for i in reversed(range(self.num_levels)):
      for j in range(self.num_res_blocks + 1):
        h = b[f"up_{i}_block_{j}"](torch.cat([h, hs.pop()], dim=1), temb)
        if f"up_{i}_attn_{j}" in b:
          h = b[f"up_{i}_attn_{j}"](h)
      if i != 0:
        h = b[f"up_{i}_upsample"](h)
    assert not hs
    return self.conv_out(F.silu(self.norm_out(h)))


def make_model(preset: str, channels_last: bool = False) -> UNet:
  """The preset's UNet, its parameter count checked against jaxddpm's."""
  C, H, _ = INPUT_SHAPES[preset]
  model = UNet(**PRESETS[preset], in_channels=C, image_size=H)
  n = count_params(model)
  assert n == PARAM_COUNTS[preset], f"{preset}: {n:,} parameters, jaxddpm has {PARAM_COUNTS[preset]:,}"
  return model.to(memory_format=torch.channels_last) if channels_last else model


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Measurement helpers.

def best_time(fn, repeats: int, warmup: int = 1):
  """Best wall time and best process CPU time (all threads) of fn() over `repeats` calls, after `warmup` calls."""
  for _ in range(warmup):
    fn()
  wall = cpu = float("inf")
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
  return wall, cpu


def _register_cpu_attention_flops():
  """FlopCounterMode knows the CUDA attention kernels only; count the CPU flash kernel SDPA uses here the same way."""
  aten = torch.ops.aten
  fwd, bwd = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
  if fwd in flop_counter.flop_registry:
    return

  @flop_counter.register_flop_formula(fwd)
  def _fwd(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)

  @flop_counter.register_flop_formula(bwd)
  def _bwd(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape)


def count_flops(fn) -> float:
  """FLOPs of fn(): 2 x MACs of its convolutions, matmuls and attention (forward and, if any, backward)."""
  _register_cpu_attention_flops()
  with flop_counter.FlopCounterMode(display=False) as counter:
    fn()
  return float(counter.get_total_flops())


def inputs(preset: str, batch: int, channels_last: bool = False, seed: int = 0):
  """Images uniform in [-1, 1] and timesteps in [0, 1000), deterministic."""
  g = torch.Generator().manual_seed(seed)
  x = torch.rand((batch,) + INPUT_SHAPES[preset], generator=g) * 2 - 1
  t = torch.randint(0, 1000, (batch,), generator=g)
  return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), t


def fractions(flops: float, wall: float, cpu: float, peak) -> dict:
  """GFLOP/s, and the fractions of the matmul peak per wall second and per CPU second (None without a peak)."""
  gfs = flops / wall / 1e9
  if peak is None:
    return dict(gflops_per_s=gfs, fraction_of_peak=None, fraction_of_peak_cpu=None)
  return dict(gflops_per_s=gfs, fraction_of_peak=gfs / peak[0], fraction_of_peak_cpu=flops / cpu / 1e9 / peak[1])


def _fmt_fraction(r: dict) -> str:
  if r["fraction_of_peak"] is None:
    return ""
  return f" = {r['fraction_of_peak']:.2f} of peak (wall), {r['fraction_of_peak_cpu']:.2f} (CPU time)"


# ---------------------------------------------------------------------------------------------------------------------
# The parts.

def matmul_peak(repeats: int):
  """Best float32 GFLOP/s of an n x n matmul, n in (1024, 2048): (per wall second, per CPU second)."""
  best, best_cpu = 0.0, 0.0
  g = torch.Generator().manual_seed(0)
  for n in (1024, 2048):
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    reps = max(1, int(0.3e9 / n**3))

    def run():
      for _ in range(reps):
        torch.mm(a, b)

    wall, cpu = best_time(run, repeats + 2)
    best = max(best, 2 * n**3 * reps / wall / 1e9)
    best_cpu = max(best_cpu, 2 * n**3 * reps / cpu / 1e9)
  print(f"float32 matmul peak: {best:.1f} GFLOP/s (wall), {best_cpu:.1f} GFLOP per CPU-second", flush=True)
  return best, best_cpu


def bench_cifar(args, peak) -> list[dict]:
  model = make_model("cifar10", args.channels_last).eval()
  print(f"cifar10: {count_params(model):,} parameters, forward, eval mode, inference_mode", flush=True)
  rows = []
  with torch.inference_mode():
    flops_per_image = count_flops(lambda: model(*inputs("cifar10", 1, args.channels_last)))
    for batch in args.batches:
      x, t = inputs("cifar10", batch, args.channels_last)
      wall, cpu = best_time(lambda: model(x, t), args.repeats, args.warmup)
      flops = flops_per_image * batch
      r = dict(batch=batch, kind="forward", ms=wall * 1e3, cpu_ms=cpu * 1e3, gflop=flops / 1e9,
               **fractions(flops, wall, cpu, peak))
      print(f"  batch {batch:3d} forward: {wall * 1e3:9.1f} ms  {flops / 1e9:8.1f} GFLOP  {r['gflops_per_s']:6.1f} "
            f"GFLOP/s{_fmt_fraction(r)}", flush=True)
      rows.append(r)
  return rows


def sample_loop(model, x, steps: int):
  """`steps` sampling-like steps x <- x - 0.01 * model(x, t), t = steps - 1, ..., 0."""
  for i in range(steps):
    x = x - 0.01 * model(x, torch.full((x.shape[0],), steps - 1 - i, dtype=torch.long))
  return x


def bench_small(args, peak) -> dict:
  preset, B, steps = "small32", args.small_batch, args.steps
  model = make_model(preset, args.channels_last).eval()
  with torch.inference_mode():
    x, t = inputs(preset, B, args.channels_last)
    flops = count_flops(lambda: model(x, t)) * steps
    sample_loop(model, x, min(steps, 5))  # warm-up
    wall, cpu = best_time(lambda: sample_loop(model, x, steps), args.small_repeats, warmup=0)
  r = dict(preset=preset, batch=B, steps=steps, seconds=wall, cpu_seconds=cpu, ms_per_step=wall / steps * 1e3,
           params=count_params(model), **fractions(flops, wall, cpu, peak))
  C, H, W = INPUT_SHAPES[preset]
  print(f"{preset}: {r['params']:,} parameters, {steps} steps at batch {B} on {H}x{W}x{C}: {wall:.2f} s "
        f"({r['ms_per_step']:.1f} ms/step, {r['gflops_per_s']:.1f} GFLOP/s{_fmt_fraction(r)})", flush=True)
  return r


def linear_alphas_bar(num_steps: int = 1000) -> torch.Tensor:
  """DDPM's abar_t = prod_{s <= t} (1 - beta_s), betas linear 1e-4..0.02 (computed in float64, returned float32)."""
  betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
  return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def make_train_step(model, opt, ema, alphas_bar, x0, decay: float = 0.9999):
  """One DDPM training step (L_simple, clipping, Adam, EMA) on the batch x0."""
  params = list(model.parameters())
  sqrt_ab, sqrt_1mab = alphas_bar.sqrt(), (1.0 - alphas_bar).sqrt()

  def step():
    t = torch.randint(0, len(alphas_bar), (x0.shape[0],))
    eps = torch.randn_like(x0)
    x_t = sqrt_ab[t][:, None, None, None] * x0 + sqrt_1mab[t][:, None, None, None] * eps
    loss = F.mse_loss(model(x_t, t), eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_mul_(ema, decay)
      torch._foreach_add_(ema, params, alpha=1.0 - decay)
    return loss

  return step


def make_fwd_bwd(model, x):
  """Gradient of mean((model(x, 500) - x)^2) with dropout on, as train.py's forward+backward alone."""
  params = list(model.parameters())
  t = torch.full((x.shape[0],), 500, dtype=torch.long)
  return lambda: torch.autograd.grad(F.mse_loss(model(x, t), x), params)


def make_optimizer(model, impl: str):
  kw = {"default": {}, "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
  return torch.optim.Adam(model.parameters(), lr=2e-4, **kw)


def bench_train(args, preset: str, batch: int, peak) -> dict:
  model = make_model(preset, args.channels_last).train()
  opt = make_optimizer(model, args.adam)
  ema = [p.detach().clone() for p in model.parameters()]
  x0, _ = inputs(preset, batch, args.channels_last)
  step = make_train_step(model, opt, ema, linear_alphas_bar(), x0)
  t_step, cpu_step = best_time(step, args.train_repeats, args.train_warmup)
  fwd_bwd = make_fwd_bwd(model, x0)
  t_fb, cpu_fb = best_time(fwd_bwd, args.train_repeats, args.train_warmup)
  flops = count_flops(make_fwd_bwd(model, inputs(preset, 1, args.channels_last)[0])) * batch
  fb = fractions(flops, t_fb, cpu_fb, peak)
  r = dict(preset=preset, batch=batch, adam=args.adam, step_s=t_step, step_cpu_s=cpu_step,
           images_per_s=batch / t_step, fwd_bwd_s=t_fb, fwd_bwd_cpu_s=cpu_fb, step_over_fwd_bwd=t_step / t_fb,
           fwd_bwd_gflop=flops / 1e9, **{f"fwd_bwd_{k}": v for k, v in fb.items()})
  print(f"  {preset} batch {batch:3d} train step: {t_step:7.3f} s = {batch / t_step:7.2f} images/s;  fwd+bwd alone "
        f"{t_fb:7.3f} s ({flops / 1e9:.1f} GFLOP, {fb['gflops_per_s']:.1f} GFLOP/s{_fmt_fraction(fb)});  "
        f"step / fwd+bwd = {t_step / t_fb:.3f}", flush=True)
  return r


# ---------------------------------------------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
  return [int(v) for v in s.split(",") if v]


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="peak,cifar,small,train", help="comma-separated subset of peak,cifar,small,train")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  p.add_argument("--repeats", type=int, default=3, help="timed repetitions of peak and cifar (best is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls before the cifar forward timings")
  p.add_argument("--batches", type=_ints, default=[8, 32], help="cifar forward batch sizes")
  p.add_argument("--small_batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=100, help="sampling steps of the small model")
  p.add_argument("--small_repeats", type=int, default=2, help="timed repetitions of the whole sampling loop")
  p.add_argument("--train_presets", default="cifar10,small32")
  p.add_argument("--train_batches", type=_ints, default=[8, 32])
  p.add_argument("--train_repeats", type=int, default=3, help="timed train steps / fwd+bwd (best is reported)")
  p.add_argument("--train_warmup", type=int, default=1, help="untimed train steps / fwd+bwd before timing")
  p.add_argument("--adam", default="default", choices=["default", "foreach", "fused"],
                 help="torch.optim.Adam implementation (default: PyTorch's choice, the for-loop one on CPU)")
  p.add_argument("--channels_last", action="store_true", help="NHWC memory format for the model and inputs")
  p.add_argument("--json", action="store_true", help="print one JSON line of results at the end")
  args = p.parse_args()
  args.parts = [s for s in args.parts.split(",") if s]
  bad = sorted(set(args.parts) - {"peak", "cifar", "small", "train"})
  if bad:
    p.error(f"unknown part(s) {bad}")
  return args


def main():
  args = _parse()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  load = os.getloadavg()
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs), "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, channels_last={args.channels_last}", flush=True)
  res = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(), loadavg_start=load,
             channels_last=args.channels_last)
  peak = matmul_peak(args.repeats) if "peak" in args.parts else None
  res["peak"] = peak
  if "cifar" in args.parts:
    res["cifar"] = bench_cifar(args, peak)
  if "small" in args.parts:
    res["small"] = bench_small(args, peak)
  if "train" in args.parts:
    print(f"train (Adam {args.adam}):", flush=True)
    res["train"] = [bench_train(args, preset, batch, peak)
                    for preset in args.train_presets.split(",") for batch in args.train_batches]
  res["loadavg_end"] = os.getloadavg()
  print(f"load average at the end {res['loadavg_end'][0]:.2f}", flush=True)
  if args.json:
    print(json.dumps(res))


if __name__ == "__main__":
  main()
