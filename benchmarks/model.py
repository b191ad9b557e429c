"""Benchmark the DDPM UNet on CPU (issue 4). Run: python benchmarks/model.py [--help]

1. This machine's float32 matmul peak (best of square matmuls), measured in the same run.
2. The CIFAR-10 preset (35.7M parameters) at 32x32x3: forward and forward+backward (loss gradient with
   dropout) at batch 8 and 32; FLOPs from XLA's cost analysis; achieved FLOP/s and its fraction of peak.
   Reference: a well-known PyTorch implementation reaches ~0.75 of matmul peak in forward passes on a
   2-core machine (~0.9 at batch 32).
3. The small preset `small32` (652K parameters: channels 32, 64, one block per level) at 32x32x3, batch 16:
   100 sampling-like steps (x <- x - c * model(x, t)) inside one `lax.scan`. Reference: PyTorch ~9 s,
   plain Flax 16 s on a machine whose matmul peak is ~120-130 GFLOP/s (we also print the reference scaled
   by the ratio of peaks, since the machine running this may differ).

`--flags="..."` sets XLA_FLAGS for this run; `--sweep` compiles the small-preset and CIFAR-10 forward
passes under each XLA option set in SWEEP and times them in interleaved rounds. The machine may be shared:
numbers are the best of a few repetitions, and we also report process CPU time, which other jobs inflate
much less than wall time.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

REF_PEAK_GFLOPS = 125.0      # matmul peak of the machine the PyTorch/Flax references were measured on
REF_TORCH_SMALL_S = 9.0      # PyTorch, 652K-param UNet, 100 steps, batch 16, 32x32x3
REF_FLAX_SMALL_S = 16.0      # plain Flax version of the same
REF_TORCH_FWD_FRACTION = {8: 0.75, 32: 0.9}

# XLA:CPU options compared by --sweep (passed per compilation, so all variants run interleaved in one process).
SWEEP = {
    "default": {},
    "ynn_off (Eigen convs/dots)": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "xnnpack": {"xla_cpu_use_xnnpack": True},
    "onednn": {"xla_cpu_use_onednn": True},
    "fast_math": {"xla_cpu_enable_fast_math": True},
}


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", default="all", choices=["all", "cifar", "small", "peak"])
  p.add_argument("--batches", default="8,32", help="CIFAR-10 batch sizes")
  p.add_argument("--steps", type=int, default=100, help="sampling steps for the small model")
  p.add_argument("--small_preset", default="small32")
  p.add_argument("--small_batch", type=int, default=16)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
  p.add_argument("--flags", default=None, help="XLA_FLAGS for this run")
  p.add_argument("--sweep", action="store_true", help="compare XLA option sets (interleaved, one process)")
  p.add_argument("--json", action="store_true", help="print one JSON line of results at the end")
  p.add_argument("--cpu_devices", type=int, default=os.cpu_count() or 1,
                 help="JAX CPU devices, batch sharded over them as jaxddpm's command line does (default: one "
                      "per core; 1 = the whole batch on one device)")
  return p.parse_args()


def _best_time(fn, repeats, warmup=True):
  """Best wall time and best process CPU time (all threads) of fn() (which must block) over `repeats` calls.

  On a shared machine the CPU time is the steadier figure: other jobs inflate our wall time but not our
  CPU seconds (much); FLOP per CPU-second of the model over that of the matmul is a contention-robust
  fraction of peak.
  """
  if warmup:
    fn()
  wall = cpu = float("inf")
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
  return wall, cpu


def _shardings(jax):
  """(replicated, batch-sharded) over a 1-D "data" mesh of all devices, as jaxddpm trains and samples."""
  from jaxddpm import parallel

  mesh = parallel.data_mesh()
  return parallel.replicated(mesh), parallel.batch_sharded(mesh)


def matmul_peak(jax, jnp, repeats):
  """Best float32 GFLOP/s of an n x n matmul, n in (1024, 2048): (per wall second, per CPU second)."""
  best, best_cpu = 0.0, 0.0
  for n in (1024, 2048):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    reps = max(1, int(0.3e9 / n**3))
    wall, cpu = _best_time(lambda: [f(a, b) for _ in range(reps)][-1].block_until_ready(), repeats + 2)
    best = max(best, 2 * n**3 * reps / wall / 1e9)
    best_cpu = max(best_cpu, 2 * n**3 * reps / cpu / 1e9)
  return best, best_cpu


def bench_cifar(jax, jnp, args, peak):
  from jaxddpm.models import PRESET_INPUT_SHAPES, count_params, make_unet

  dtype = getattr(jnp, args.dtype)
  model = make_unet("cifar10", dtype=dtype)
  H, W, C = PRESET_INPUT_SHAPES["cifar10"]
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, H, W, C)), jnp.zeros((1,), jnp.int32))
  print(f"cifar10: {count_params(params):,} parameters, dtype {args.dtype}")

  def fwd(p, x, t):
    return model.apply(p, x, t)

  def fwd_bwd(p, x, t):
    def loss(p):
      out = model.apply(p, x, t, train=True, rngs={"dropout": jax.random.key(1)})
      return jnp.mean(jnp.square(out - x))
    return jax.value_and_grad(loss)(p)

  rows = []
  rep, bat = _shardings(jax)
  params = jax.device_put(params, rep)
  for batch in [int(b) for b in args.batches.split(",")]:
    x = jax.device_put(jax.random.normal(jax.random.key(2), (batch, H, W, C)), bat)
    t = jax.device_put(jax.random.randint(jax.random.key(3), (batch,), 0, 1000), bat)
    for name, fn in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
      t0 = time.perf_counter()
      compiled = jax.jit(fn, in_shardings=(rep, bat, bat)).lower(params, x, t).compile()
      t_compile = time.perf_counter() - t0
      flops = float(compiled.cost_analysis()["flops"])
      run = lambda: jax.block_until_ready(compiled(params, x, t))
      first, first_cpu = _best_time(run, 1, warmup=False)
      reps = args.repeats if first < 2.0 else (max(1, args.repeats - 1) if first < 5.0 else 0)
      sec, cpu = _best_time(run, reps, warmup=False)
      sec, cpu = min(first, sec), min(first_cpu, cpu)
      gfs, frac_cpu = flops / sec / 1e9, flops / cpu / 1e9 / peak[1]
      ref = f"  (PyTorch ref ~{REF_TORCH_FWD_FRACTION[batch]:.2f})" if name == "forward" and \
          batch in REF_TORCH_FWD_FRACTION else ""
      print(f"  batch {batch:3d} {name:8s}: {sec * 1e3:9.1f} ms  {flops / 1e9:8.1f} GFLOP  {gfs:6.1f} GFLOP/s  "
            f"= {gfs / peak[0]:.2f} of peak (wall), {frac_cpu:.2f} (CPU time){ref}   (compile {t_compile:.1f} s)",
            flush=True)
      rows.append(dict(batch=batch, kind=name, ms=sec * 1e3, cpu_ms=cpu * 1e3, gflop=flops / 1e9,
                       fraction_of_peak=gfs / peak[0], fraction_of_peak_cpu=frac_cpu))
  return rows


def bench_small(jax, jnp, args, peak):
  from jaxddpm.models import PRESET_INPUT_SHAPES, count_params, make_unet

  dtype = getattr(jnp, args.dtype)
  model = make_unet(args.small_preset, dtype=dtype)
  H, W, C = PRESET_INPUT_SHAPES[args.small_preset]
  B, steps = args.small_batch, args.steps
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, H, W, C)), jnp.zeros((1,), jnp.int32))
  n_params = count_params(params)

  rep, bat = _shardings(jax)

  @functools.partial(jax.jit, in_shardings=(rep, bat), out_shardings=bat)
  def sample(p, x):
    def body(x, i):
      t = jnp.full((B,), steps - 1 - i, jnp.int32)
      return x - 0.01 * model.apply(p, x, t), None
    return jax.lax.scan(body, x, jnp.arange(steps))[0]

  params = jax.device_put(params, rep)
  x = jax.device_put(jax.random.normal(jax.random.key(4), (B, H, W, C)), bat)
  t0 = time.perf_counter()
  compiled = sample.lower(params, x).compile()
  t_compile = time.perf_counter() - t0
  one = jax.jit(lambda p, x, t: model.apply(p, x, t)).lower(params, x, jnp.zeros((B,), jnp.int32)).compile()
  flops = float(one.cost_analysis()["flops"]) * steps
  sec, cpu = _best_time(lambda: jax.block_until_ready(compiled(params, x)), max(1, args.repeats - 1))
  scale = REF_PEAK_GFLOPS / peak[0] * steps / 100  # the references are for 100 steps
  frac_cpu = flops / cpu / 1e9 / peak[1]
  print(f"{args.small_preset}: {n_params:,} parameters, {steps} steps at batch {B} on {H}x{W}x{C}: {sec:.2f} s "
        f"({sec / steps * 1e3:.1f} ms/step, {flops / sec / 1e9:.1f} GFLOP/s = {flops / sec / 1e9 / peak[0]:.2f} of "
        f"peak (wall), {frac_cpu:.2f} (CPU time); compile {t_compile:.1f} s)")
  print(f"  reference PyTorch {REF_TORCH_SMALL_S:.0f} s / plain Flax {REF_FLAX_SMALL_S:.0f} s at ~{REF_PEAK_GFLOPS:.0f}"
        f" GFLOP/s peak; scaled to this machine's peak: PyTorch {REF_TORCH_SMALL_S * scale:.1f} s, Flax "
        f"{REF_FLAX_SMALL_S * scale:.1f} s -> ours / PyTorch = {sec / (REF_TORCH_SMALL_S * scale):.2f}", flush=True)
  # Contention-robust estimate: the CPU-time fraction of peak applied to the reference machine's peak.
  est = flops / (frac_cpu * REF_PEAK_GFLOPS * 1e9)
  print(f"  at {REF_PEAK_GFLOPS:.0f} GFLOP/s peak with this run's CPU-time efficiency: ~{est:.1f} s (PyTorch "
        f"{REF_TORCH_SMALL_S * steps / 100:.1f} s)", flush=True)
  return dict(seconds=sec, cpu_seconds=cpu, ms_per_step=sec / steps * 1e3, params=n_params,
              vs_torch_scaled=sec / (REF_TORCH_SMALL_S * scale), est_seconds_at_ref_peak=est,
              fraction_of_peak_cpu=frac_cpu)


def sweep(jax, jnp, args):
  """Forward of the small preset (batch 16) and of cifar10 (batch 8) under each XLA option set in SWEEP,
  compiled side by side and timed in interleaved rounds (so load changes hit all variants alike)."""
  from jaxddpm.models import PRESET_INPUT_SHAPES, make_unet

  for preset, batch, rounds in ((args.small_preset, args.small_batch, 4 * args.repeats), ("cifar10", 8, args.repeats)):
    model = make_unet(preset)
    H, W, C = PRESET_INPUT_SHAPES[preset]
    x = jax.random.normal(jax.random.key(2), (batch, H, W, C))
    t = jnp.arange(batch, dtype=jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x[:1], t[:1])
    lowered = jax.jit(model.apply).lower(params, x, t)
    compiled = {}
    for name, opts in SWEEP.items():
      try:
        compiled[name] = lowered.compile(compiler_options=opts)
        jax.block_until_ready(compiled[name](params, x, t))
      except Exception as e:  # noqa: BLE001  (an option this XLA build rejects)
        print(f"  {name}: rejected ({str(e).splitlines()[0][:100]})")
    best = {name: (float("inf"), float("inf")) for name in compiled}
    for _ in range(rounds):
      for name, c in compiled.items():
        w, u = _best_time(lambda: jax.block_until_ready(c(params, x, t)), 1, warmup=False)
        best[name] = (min(best[name][0], w), min(best[name][1], u))
    w0, u0 = best["default"]
    print(f"{preset} forward, batch {batch}, best of {rounds} interleaved rounds:")
    for name, (w, u) in best.items():
      print(f"  {name:28s} wall {w * 1e3:8.1f} ms ({w / w0:4.2f}x)   CPU {u * 1e3:8.1f} ms ({u / u0:4.2f}x)  "
            f"{SWEEP[name]}", flush=True)


def main():
  args = _parse()
  if args.flags is not None:
    os.environ["XLA_FLAGS"] = args.flags
  import jax
  import jax.numpy as jnp

  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.sweep:
    return sweep(jax, jnp, args)

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
  peak = matmul_peak(jax, jnp, args.repeats)
  print(f"float32 matmul peak: {peak[0]:.1f} GFLOP/s (wall), {peak[1]:.1f} GFLOP per CPU-second", flush=True)
  res = dict(peak=peak)
  if args.what in ("all", "cifar"):
    res["cifar"] = bench_cifar(jax, jnp, args, peak)
  if args.what in ("all", "small"):
    res["small"] = bench_small(jax, jnp, args, peak)
  if args.json:
    print(json.dumps(res))


if __name__ == "__main__":
  main()
