"""Benchmark the compiled sampler's per-step overhead (issue 3). Run: python benchmarks/sampling.py [--help]

For a small UNet (`make_unet("small32")`, 652K parameters, 32x32x3) at a fixed batch, on this CPU:

  ratio = time(full scan sampler over K steps) / (K * time(one jitted model_fn call at the same batch))

The limit is 1.0 (sampling cannot be cheaper than its network evaluations); the target is <= 1.05.
The sampler's own per-step cost (noise and update, measured with a free model) gives an implied ratio
1 + overhead / model call that a busy machine cannot blur.
Compile times (of the single model call and of the whole sampler) are reported separately, and the
ratio both in wall time and in process CPU time (the latter is robust to other processes on a shared
machine). The sampler
is `jaxddpm.sampling.make_sampler` (jit with NamedSharding over a 1-D ("data",) mesh, here one device)
and runs every method (ancestral with fixed_large, DDIM eta = 0, DDIM eta = 1; with --process NAME a
continuous process of `jaxddpm.make_process` over K uniform steps, where euler (the PF-ODE), heun,
dpm_solver_pp(_3m), euler_maruyama and pc run too). A method making n network calls over the K steps is
compared with n model calls: ratio = time(sampler) / (n / K * time(K model calls)). Timings are the best of
`--repeats` interleaved rounds (each: a few single model calls, then one run of each sampler).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import sampling
from jaxddpm.core.process import make_process
from jaxddpm.schedule import make_schedule


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="small32", help="jaxddpm.models preset")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=50, help="K: the schedule's T (sampling over all of it)")
  p.add_argument("--methods", default="ancestral,ddim0,ddim1",
                 help="any of ancestral,ddim0,ddim1,euler,heun,dpm_solver_pp,dpm_solver_pp_3m,euler_maruyama,pc "
                      "(euler, euler_maruyama and pc need --process other than ddpm)")
  p.add_argument("--process", default="ddpm", help="'ddpm' (the discrete chain) or a continuous process name")
  p.add_argument("--repeats", type=int, default=5, help="timed repetitions (best is reported)")
  p.add_argument("--json", action="store_true", help="print one JSON line of results at the end")
  return p.parse_args()


def _model(preset):
  """(apply_fn(params, x, t), params, (H, W, C), parameter count) for the UNet preset."""
  from jaxddpm.models import PRESET_INPUT_SHAPES, count_params, make_unet  # noqa: PLC0415
  net = make_unet(preset)
  hwc = PRESET_INPUT_SHAPES[preset]
  params = net.init(jax.random.key(0), jnp.zeros((1,) + hwc), jnp.zeros((1,), jnp.int32))["params"]
  # The UNet's last conv starts at zero (its output would be 0): give every parameter a random value so
  # the sampler does real work on non-trivial activations.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
  return (lambda p, x, t: net.apply({"params": p}, x, t)), params, hwc, count_params(params)


def main():
  args = _parse()
  apply_fn, params, hwc, n_params = _model(args.preset)
  shape = (args.batch,) + hwc
  K = args.steps
  discrete = args.process == "ddpm"
  schedule = make_schedule("linear", K) if discrete else make_process(args.process)
  steps_kw = {} if discrete else {"timesteps": K}
  key = jax.random.key(0)
  print(f"jax {jax.__version__}, devices {jax.devices()}, preset {args.preset} ({n_params:,} params), "
        f"batch {args.batch}, image {hwc}, K = {K} steps, process {args.process}")

  # One jitted model_fn call, with the same replicated placement the sampler uses.
  mesh = sampling.data_mesh()
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.device_put(jax.random.normal(jax.random.key(2), shape), rep)
  t = jax.device_put(jnp.full((args.batch,), K // 2, jnp.int32) if discrete
                     else jnp.full((args.batch,), 500.0, jnp.float32), rep)
  params = jax.device_put(params, rep)
  t0 = time.perf_counter()
  model_call = jax.jit(apply_fn).lower(params, x, t).compile()
  compile_model = time.perf_counter() - t0
  model_call(params, x, t).block_until_ready()

  cfgs = {"ancestral": dict(method="ancestral"), "ddim0": dict(method="ddim", eta=0.0),
          "ddim1": dict(method="ddim", eta=1.0)}
  for m in ("euler", "heun", "dpm_solver_pp", "dpm_solver_pp_3m", "euler_maruyama", "pc"):
    cfgs[m] = dict(method=m) if discrete else dict(method=m, var_type="fixed_small")
  cfgs = {k: dict(v, **steps_kw) for k, v in cfgs.items()}
  samplers, compile_s, nfe = {}, {}, {}
  for name in args.methods.split(","):
    s = sampling.make_sampler(apply_fn, schedule, shape, **cfgs[name])
    nfe[name] = s.nfe
    t0 = time.perf_counter()
    compiled = s.jitted.lower(*s.place(params, key, 0)).compile()
    compile_s[name] = time.perf_counter() - t0
    placed = s.place(params, key, 0)
    jax.block_until_ready(compiled(*placed))
    samplers[name] = (compiled, placed)

  # Interleave `repeats` rounds; each round times K single model calls one after the other (each blocked
  # on, so nothing overlaps) and then one full run of each sampler. Kept: the best round of each, in wall
  # time and in process CPU time (CPU time is less sensitive to other processes on a shared machine).
  def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return np.array([time.perf_counter() - w, time.process_time() - c])

  inf = np.array([np.inf, np.inf])
  t_block, t_single, t_sampler = inf, inf, {n: inf for n in samplers}
  for _ in range(args.repeats):
    calls = [timed(lambda: model_call(params, x, t).block_until_ready()) for _ in range(K)]
    t_block = np.minimum(t_block, np.sum(calls, axis=0))
    t_single = np.minimum(t_single, np.min(calls, axis=0))
    for name, (compiled, placed) in samplers.items():
      t_sampler[name] = np.minimum(t_sampler[name], timed(lambda: jax.block_until_ready(compiled(*placed))))

  t_model = t_block / K
  print(f"model_fn call: {1e3 * t_model[0]:.2f} ms wall, {1e3 * t_model[1]:.2f} ms CPU (mean over K calls); "
        f"best single call {1e3 * t_single[0]:.2f} ms wall; compile {compile_model:.2f} s")
  results = {"process": args.process, "preset": args.preset, "batch": args.batch, "steps": K, "params": n_params,
             "model_ms": 1e3 * t_model[0], "model_cpu_ms": 1e3 * t_model[1],
             "model_best_single_ms": 1e3 * t_single[0], "model_compile_s": compile_model}
  for name in samplers:
    ratio, cpu_ratio = t_sampler[name] / (t_block * nfe[name] / K)
    strict = t_sampler[name][0] / (nfe[name] * t_single[0])
    print(f"{name:10s} sampler: {t_sampler[name][0]:.3f} s for {K} steps, {nfe[name]} network calls = "
          f"{1e3 * t_sampler[name][0] / nfe[name]:.2f} ms/call; ratio {ratio:.3f} wall, {cpu_ratio:.3f} CPU "
          f"(target <= 1.05; {strict:.3f} against the best single call); compile {compile_s[name]:.2f} s")
    results[name] = {"sampler_s": t_sampler[name][0], "nfe": nfe[name], "ratio": ratio, "cpu_ratio": cpu_ratio,
                     "ratio_vs_best_single_call": strict, "compile_s": compile_s[name]}
  # The sampler's own per-step cost, measured with a free model (x * p): noise drawing and the update.
  # Small absolute times, best of many runs: robust on a busy machine. implied ratio = 1 + overhead / model.
  free = lambda p, x, t: x * p
  for name in samplers:
    s = sampling.make_sampler(free, schedule, shape, **cfgs[name])
    placed = s.place(jnp.float32(0.5), key, 0)
    jax.block_until_ready(s.jitted(*placed))
    total = min(timed(lambda: jax.block_until_ready(s.jitted(*placed)))[0] for _ in range(5 * args.repeats))
    over = total / nfe[name]
    implied = 1.0 + over / t_single[0]
    print(f"{name:10s} sampler overhead with a free model: {1e3 * over:.3f} ms/network call -> implied ratio "
          f"{implied:.4f} against the best single call")
    results[name].update(overhead_ms_per_call=1e3 * over, implied_ratio=implied)
  if args.json:
    print(json.dumps(results))
  return results


if __name__ == "__main__":
  main()
