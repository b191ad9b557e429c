"""One command for an accelerator (issue 12): python benchmarks/accelerator.py [--quick] [--out DIR]

Prints one table (and writes it as accelerator.json / accelerator.md to --out):
- matmul peak in bfloat16 and float32 (default precision: TF32 on NVIDIA GPUs), measured in this run;
- the CIFAR-10 UNet train step at batch 128 in bfloat16 and float32 with a fixed batch (ms, images/s,
  step / forward+backward), its model FLOPs counted from the architecture (every convolution and matmul
  of the forward pass in the jaxpr, 2 FLOPs per multiply-add; a train step is 3x the forward), and
  their rate as a fraction of the measured matmul peak of the same dtype;
- the main job's network (digits8, batch 128) step and step / forward+backward;
- the sampler at batch 256 for 100 ancestral steps (images/s, ratio to 100 forward passes);
- next() of the training input pipeline at batch 128: digits, mnist5k with flips, CIFAR-10-shaped tfds
  mock data with flips;
- the training loop through the real input pipeline and device prefetching vs the fixed-batch step: the
  CIFAR-10 network on mock CIFAR-10 (target >= 0.95) and a network small enough that the host matters
  (channels 8, 8x8 digits);
- the main job through the command line (`python -m jaxddpm --config configs/digits.py`): wall time, and
  training steps/s between the first and the last console line (compile excluded).
Each stage runs in its own process under a timeout; a stage that fails or times out is reported as such
and the others still run. `--quick` (CPU, <= 2 minutes on a quiet 2-core machine): digits8 instead of the CIFAR-10 UNet, small
batches, few steps, a 200-step CLI run; its figures only show that the script works.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL = dict(cifar_preset="cifar10", cifar_batch=128, steps=20, digits_batch=128, sample_batch=256,
            sample_steps=100, mock_examples=50_000, input_batches=200, loop_steps=100, cli_steps=2000,
            matmul=8192, stage_timeout=240)
QUICK = dict(cifar_preset="digits8", cifar_batch=16, steps=3, digits_batch=32, sample_batch=8, sample_steps=10,
             mock_examples=1_000, input_batches=50, loop_steps=20, cli_steps=100, matmul=1024, stage_timeout=150)
# --quick: unoptimised XLA code compiles in half the time; its figures only show that the script works
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ---- helpers used inside a stage's process ---------------------------------------------------------------

def _setup_jax():
  """jax (on a CPU the parent has set one device per core through XLA_FLAGS, as `python -m jaxddpm` does)."""
  import jax  # noqa: PLC0415
  return jax


def _timed(fn, n: int, rounds: int = 3) -> float:
  """Best over rounds of the mean time of n calls of fn (fn returns something to block on)."""
  import jax  # noqa: PLC0415
  jax.block_until_ready(fn())
  best = math.inf
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = fn()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / n)
  return best


def forward_flops(model, params, x, t) -> int:
  """2 x multiply-adds of every convolution and dot_general in the forward pass's jaxpr."""
  import jax  # noqa: PLC0415
  jaxpr = jax.make_jaxpr(lambda p, x, t: model.apply({"params": p}, x, t))(params, x, t).jaxpr

  def count(jp) -> int:
    total = 0
    for eqn in jp.eqns:
      out = eqn.outvars[0].aval
      if eqn.primitive.name == "conv_general_dilated":
        rhs, spec = eqn.invars[1].aval, eqn.params["dimension_numbers"].rhs_spec
        total += 2 * math.prod(out.shape) * rhs.shape[spec[1]] * math.prod(rhs.shape[d] for d in spec[2:])
      elif eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        total += 2 * math.prod(out.shape) * math.prod(eqn.invars[0].aval.shape[d] for d in lc)
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            total += count(inner)
    return total
  return count(jaxpr)


def _train_setup(preset: str, dtype: str, batch: int, **overrides):
  import jax, jax.numpy as jnp, numpy as np  # noqa: E401, PLC0415
  from jaxddpm import make_schedule, parallel, training  # noqa: PLC0415
  from jaxddpm.models import presets  # noqa: PLC0415
  from jaxddpm.models.unet import UNet  # noqa: PLC0415
  shape = presets.PRESET_INPUT_SHAPES[preset]
  model = UNet(**dict(presets.PRESETS[preset], dtype=jnp.dtype(dtype), out_channels=shape[-1], **overrides))
  opt = training.make_optimizer(lr=2e-4, warmup_steps=5000, grad_clip=1.0)
  mesh = parallel.data_mesh()
  rep = parallel.replicated(mesh)
  # Random parameters drawn with numpy into the abstract state (jit(model.init) compiles for ~20 s on a GPU:
  # every initializer is its own threefry computation); optimizer state zero, as after init.
  abstract = jax.eval_shape(functools.partial(training.init_train_state, model=model, optimizer=opt,
                                              image_shape=shape), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  draw = lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype)
  state = abstract.replace(params=jax.tree.map(draw, abstract.params),
                           opt_state=jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract.opt_state),
                           step=np.zeros((), np.int32), rng=np.zeros((2,), np.uint32),
                           nonfinite_streak=np.zeros((), np.int32), nonfinite_total=np.zeros((), np.int32))
  state = jax.device_put(state.replace(ema_params=jax.tree.map(np.copy, state.params)), rep)
  step_fn = functools.partial(training.train_step, model=model, optimizer=opt, schedule=make_schedule("linear", 1000),
                              mean_type="eps", var_type="fixed_large", loss_type="mse", ema=0.9999,
                              learning_rate=training.learning_rate_schedule(2e-4, 5000))
  p_step = training.jit_train_step(step_fn, mesh)
  x = np.random.default_rng(0).uniform(-1, 1, (batch,) + shape).astype(np.float32)
  return model, mesh, state, p_step, parallel.global_batch({"image": x}, mesh), shape


def stage_matmul(cfg):
  jax = _setup_jax()
  import jax.numpy as jnp  # noqa: PLC0415
  n, out = cfg["matmul"], {}
  for dtype in ("bfloat16", "float32"):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    out[f"matmul_{dtype}_tflops"] = 2 * n**3 / _timed(lambda: f(a), 5 if n > 2048 else 3) / 1e12
  return out


def stage_step(cfg, preset, dtype, batch):
  jax = _setup_jax()
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxddpm import parallel  # noqa: PLC0415
  model, mesh, state, p_step, b, shape = _train_setup(preset, dtype, batch)
  t0 = time.perf_counter()
  state, m = p_step(state, b)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  holder = [state]

  def step():
    holder[0], metrics = p_step(holder[0], b)
    return metrics

  rep = parallel.replicated(mesh)

  def fwd_bwd(params, xb, key):
    def loss(p):
      out = model.apply({"params": p}, xb, jnp.full((xb.shape[0],), 500, jnp.int32), train=True,
                        rngs={"dropout": key})
      return jnp.mean(jnp.square(out.astype(jnp.float32) - xb))
    return jax.grad(loss)(params)

  g = jax.jit(fwd_bwd, in_shardings=(rep, parallel.batch_sharded(mesh), rep))
  params, key = jax.tree.map(jnp.copy, holder[0].params), jax.random.PRNGKey(1)
  t_step = _timed(step, cfg["steps"])
  t_fb = _timed(lambda: g(params, b["image"], key), cfg["steps"])
  flops = 3 * forward_flops(model, params, b["image"][:1], jnp.zeros((1,), jnp.int32)) * batch
  return {"preset": preset, "dtype": dtype, "batch": batch, "step_ms": 1e3 * t_step,
          "images_per_s": batch / t_step, "step_over_fwd_bwd": t_step / t_fb, "train_tflop": flops / 1e12,
          "tflops": flops / t_step / 1e12, "compile_s": compile_s}


def stage_sampler(cfg, preset, dtype):
  jax = _setup_jax()
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxddpm import make_schedule, parallel, sampling  # noqa: PLC0415
  from jaxddpm.models import presets  # noqa: PLC0415
  from jaxddpm.models.unet import UNet  # noqa: PLC0415
  shape = presets.PRESET_INPUT_SHAPES[preset]
  model = UNet(**dict(presets.PRESETS[preset], dtype=jnp.dtype(dtype), out_channels=shape[-1]))
  mesh, batch, k = parallel.data_mesh(), cfg["sample_batch"], cfg["sample_steps"]
  params = jax.jit(lambda key: model.init(key, jnp.zeros((1,) + shape), jnp.zeros((1,), jnp.int32))["params"])(
      jax.random.PRNGKey(0))
  apply = lambda p, x, t: model.apply({"params": p}, x, t)
  sampler = sampling.make_sampler(apply, make_schedule("linear", 1000), (batch,) + shape, timesteps=k, mesh=mesh)
  key = jax.random.PRNGKey(1)
  t_sample = _timed(lambda: sampler(params, key)["samples"], 1, rounds=2)
  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  fwd = jax.jit(apply, in_shardings=(rep, bat, bat))
  x = jax.device_put(jnp.zeros((batch,) + shape), bat)
  t = jax.device_put(jnp.full((batch,), 500, jnp.int32), bat)
  t_fwd = _timed(lambda: fwd(params, x, t), 5)
  return {"preset": preset, "dtype": dtype, "batch": batch, "steps": k, "sample_s": t_sample,
          "images_per_s": batch / t_sample, "over_forwards": t_sample / (k * t_fwd)}


def stage_input(cfg):
  import numpy as np  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415
  from jaxddpm import data  # noqa: PLC0415
  out = {}
  with tempfile.TemporaryDirectory() as d:
    def bench(name, flip):
      it = data.make_train_iterator(name, data_dir=d, global_batch_size=128, random_flip=flip, num_threads=0)
      next(it)
      ts = []
      for _ in range(cfg["input_batches"]):
        t0 = time.perf_counter()
        next(it)
        ts.append(time.perf_counter() - t0)
      return 1e3 * float(np.median(ts))
    out["digits_ms"] = bench("digits", False)
    out["mnist5k_flip_ms"] = bench("mnist5k", True)
    with tfds.testing.mock_data(num_examples=cfg["mock_examples"]):
      out["cifar10_mock_flip_ms"] = bench("cifar10", True)
  return out


def stage_loop(cfg, preset, dtype, batch, dataset, **overrides):
  """Steps/s of the loop fed by the real pipeline + device prefetching, over the fixed-batch step's."""
  jax = _setup_jax()
  import tensorflow_datasets as tfds  # noqa: PLC0415
  from jaxddpm import data, parallel  # noqa: PLC0415
  model, mesh, state, p_step, b, shape = _train_setup(preset, dtype, batch, **overrides)
  holder = [state]

  def fixed():
    holder[0], m = p_step(holder[0], b)
    return m

  n, t_fixed, t_loop = cfg["loop_steps"], [], []
  with tempfile.TemporaryDirectory() as d, tfds.testing.mock_data(num_examples=cfg["mock_examples"]):
    it = data.make_train_iterator(dataset, data_dir=d, global_batch_size=batch, random_flip=shape[-1] == 3,
                                  image_size=shape[0], num_threads=2, prefetch_batches=4)
    batches = parallel.prefetch_to_devices(it, mesh, size=2)

    def looped():
      holder[0], m = p_step(holder[0], next(batches)[0])
      return m
    for _ in range(3):  # alternating rounds: a busy moment of a shared machine hits both
      t_fixed.append(_timed(fixed, n, rounds=1))
      t_loop.append(_timed(looped, n, rounds=1))
  t_fixed, t_loop = min(t_fixed), min(t_loop)
  return {"preset": preset, "overrides": overrides, "dataset": dataset, "batch": batch,
          "fixed_steps_per_s": 1 / t_fixed, "loop_steps_per_s": 1 / t_loop, "loop_over_fixed": t_fixed / t_loop}


def stage_cli(cfg):
  steps = cfg["cli_steps"]
  with tempfile.TemporaryDirectory() as d:
    cmd = [sys.executable, "-m", "jaxddpm", "--config", str(REPO / "configs" / "digits.py"), f"--workdir={d}/wd",
           f"--config.data.data_dir={d}/data", f"--config.training.num_steps={steps}", "--verbosity=-1"]
    if steps < 2000:  # --quick: fewer log lines, a small final grid, no in-domain score
      cmd += [f"--config.training.log_every={steps // 4}", "--config.training.eval_at_end=False",
              "--config.sample.num_samples=8", "--config.sample.batch_size=8", "--config.sample.grid_cols=4"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get(
                             "PYTHONPATH"), str(REPO)]))))
    lines = []
    for line in p.stdout:
      lines.append((time.perf_counter() - t0, line.rstrip()))
    rc = p.wait()
  wall = time.perf_counter() - t0
  logged = [(t, int(s.split()[1].split("/")[0])) for t, s in lines if s.startswith("step ")]
  out = {"returncode": rc, "wall_s": wall, "steps": steps, "console": [s for _, s in lines][-12:]}
  if len(logged) >= 2:
    (t_a, s_a), (t_b, s_b) = logged[0], logged[-1]
    out.update(first_log_s=t_a, train_steps_per_s=(s_b - s_a) / (t_b - t_a))
  return out


def stages(cfg):
  """name -> (function, args). The CIFAR-10 network computes in bfloat16 and float32."""
  c, bs = cfg["cifar_preset"], cfg["cifar_batch"]
  return {
      "matmul": (stage_matmul, ()),
      "cifar_bf16": (stage_step, (c, "bfloat16", bs)),
      "cifar_fp32": (stage_step, (c, "float32", bs)),
      "digits8": (stage_step, ("digits8", "float32", cfg["digits_batch"])),
      "sampler": (stage_sampler, (c, "bfloat16")),
      "input": (stage_input, ()),
      "loop_cifar": (stage_loop, (c, "bfloat16", bs, "cifar10" if c != "digits8" else "digits")),
      "loop_small": (stage_loop, ("digits8", "float32", 128, "digits"), {"ch": 8, "num_groups": 4}),
      "cli": (stage_cli, ()),
  }


# ---- the parent: stages in subprocesses, one table -------------------------------------------------------

def _f(x, nd=2):
  return "-" if x is None else f"{x:,.{nd}f}"


def table(r: dict, quick: bool) -> str:
  mm = r.get("matmul") or {}
  rows = ["| what | figure |", "|---|---|"]
  add = lambda k, v: rows.append(f"| {k} | {v} |")
  add("matmul peak bf16 / fp32 (TFLOP/s)", f"{_f(mm.get('matmul_bfloat16_tflops'), 1)} / "
      f"{_f(mm.get('matmul_float32_tflops'), 1)}")
  for name in ("cifar_bf16", "cifar_fp32", "digits8"):
    s = r.get(name)
    if not isinstance(s, dict) or "step_ms" not in s:
      add(name, s)
      continue
    peak = mm.get(f"matmul_{'bfloat16' if s['dtype'] == 'bfloat16' else 'float32'}_tflops")
    frac = f", {s['tflops'] / peak:.0%} of the {s['dtype']} matmul peak" if peak else ""
    add(f"{s['preset']} train step, batch {s['batch']}, {s['dtype']}",
        f"{_f(s['step_ms'])} ms, {_f(s['images_per_s'], 0)} images/s, step / fwd+bwd {_f(s['step_over_fwd_bwd'])}, "
        f"{_f(s['train_tflop'], 3)} TFLOP/step (architecture) = {_f(s['tflops'], 1)} TFLOP/s{frac}; "
        f"compile {_f(s['compile_s'], 0)} s")
  s = r.get("sampler")
  add("sampler" if not isinstance(s, dict) else f"sampler {s['preset']} {s['dtype']}, batch {s['batch']}, "
      f"{s['steps']} steps", s if not isinstance(s, dict) else
      f"{_f(s['sample_s'])} s, {_f(s['images_per_s'], 1)} images/s, {_f(s['over_forwards'], 3)} x {s['steps']} forwards")
  s = r.get("input")
  add("input next() ms, batch 128: digits / mnist5k flips / cifar10 mock flips", s if not isinstance(s, dict) else
      f"{_f(s['digits_ms'], 3)} / {_f(s['mnist5k_flip_ms'], 3)} / {_f(s['cifar10_mock_flip_ms'], 3)}")
  for name in ("loop_cifar", "loop_small"):
    s = r.get(name)
    add(name if not isinstance(s, dict) else f"loop {s['preset']}{s['overrides'] or ''} on {s['dataset']}, batch "
        f"{s['batch']}: loop / fixed-batch steps/s", s if not isinstance(s, dict) else
        f"{_f(s['loop_steps_per_s'], 1)} / {_f(s['fixed_steps_per_s'], 1)} = {_f(s['loop_over_fixed'], 3)}")
  s = r.get("cli")
  add(f"main job CLI (configs/digits.py{', 100 steps' if quick else ''})", s if not isinstance(s, dict) else
      f"rc {s['returncode']}, wall {_f(s['wall_s'], 1)} s, first log line at {_f(s.get('first_log_s'), 1)} s, "
      f"training {_f(s.get('train_steps_per_s'), 1)} steps/s")
  return "\n".join(rows)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="a <= 2-minute CPU run with small sizes")
  p.add_argument("--out", default=None, help="directory for accelerator.json and accelerator.md")
  p.add_argument("--only", default=None, help="comma-separated stage names")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds for all stages: a stage that would start later is skipped, and the last one "
                      "gets only what is left (default: no limit)")
  p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  cfg = QUICK if args.quick else FULL
  if args.stage:  # inside a stage's own process
    fn, fargs, *kw = stages(cfg)[args.stage]
    print("RESULT " + json.dumps(fn(cfg, *fargs, **(kw[0] if kw else {}))), flush=True)
    return
  env = os.environ  # the stages' environment, and this process's for the device line below
  env.update(PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # One persistent compilation cache for all stages: the loop stages reuse the step stages' programs.
  cache = tempfile.mkdtemp(prefix="jaxddpm_accel_cache_")
  env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()  # CPU only
  if args.quick:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()
  names = args.only.split(",") if args.only else list(stages(cfg))
  results, t_all = {"quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, time.perf_counter()
  for name in names:
    t0 = time.perf_counter()
    timeout = cfg["stage_timeout"]
    if args.budget is not None:
      timeout = min(timeout, args.budget - (t0 - t_all))
      if timeout < 20:
        results[name] = "skipped: the --budget was spent"
        continue
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name] + (["--quick"] if args.quick else [])
    try:
      r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
      found = [line[7:] for line in r.stdout.splitlines() if line.startswith("RESULT ")]
      results[name] = json.loads(found[-1]) if found else f"failed (rc {r.returncode}): {r.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
      results[name] = f"timed out after {timeout:.0f} s"
    print(f"[{name}: {time.perf_counter() - t0:.0f} s] {json.dumps(results[name])[:400]}", flush=True)
    if args.out:  # after every stage, so that a run cut short still leaves what it measured
      Path(args.out).mkdir(parents=True, exist_ok=True)
      (Path(args.out) / "accelerator.json").write_text(json.dumps(results, indent=1, default=str))
  if "matmul" not in results:
    results["matmul"] = None
  try:
    import jax  # noqa: PLC0415
    results["device"] = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  except Exception as e:  # noqa: BLE001
    results["device"] = repr(e)
  md = f"Device: {results['device']}; total {time.perf_counter() - t_all:.0f} s\n\n" + table(results, args.quick)
  print(md, flush=True)
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "accelerator.md").write_text(md + "\n")


if __name__ == "__main__":
  main()
