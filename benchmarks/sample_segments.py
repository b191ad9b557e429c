"""What the progress bar of `--mode sample` costs (issue 15). Run: python benchmarks/sample_segments.py [--help]

`--mode sample` runs each batch's reverse chain as a few jitted segments of equal length
(`sampling.make_sampler(...).in_segments`), waiting for each segment to report progress. This compares,
on the main job's network (`digits8`, 8x8x1, random parameters) at the main job's sampling batch:

  ratio = time(chain in S segments, each waited for) / time(the whole chain as one scan)

in wall time and in process CPU time, best of interleaved rounds, and the extra compile time of the
segmented program (its start program and its segment program, against the whole chain's).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import sampling
from jaxddpm.models import PRESET_INPUT_SHAPES, count_params, make_unet
from jaxddpm.schedule import make_schedule


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="digits8")
  p.add_argument("--batch", type=int, default=100, help="the main job's sample.batch_size")
  p.add_argument("--steps", type=int, default=1000, help="K: sampling steps (the main job: 1000)")
  p.add_argument("--segments", type=int, default=10, help="at most this many segments (generate.py: 10)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", action="store_true")
  return p.parse_args()


def main():
  args = _parse()
  net = make_unet(args.preset)
  hwc = PRESET_INPUT_SHAPES[args.preset]
  params = net.init(jax.random.key(0), jnp.zeros((1,) + hwc), jnp.zeros((1,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
  apply_fn = lambda p, x, t: net.apply({"params": p}, x, t)
  schedule = make_schedule("linear", args.steps)
  key = jax.random.PRNGKey(0)
  s = sampling.make_sampler(apply_fn, schedule, (args.batch,) + hwc)
  length = sampling.segment_length(args.steps, args.segments)
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, {args.preset} "
        f"({count_params(params):,} params), batch {args.batch}, K = {args.steps}, "
        f"{args.steps // length} segments of {length}")

  def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return np.array([time.perf_counter() - w, time.process_time() - c])

  whole = lambda: s(params, key, 0)["samples"]
  parts = lambda: s.in_segments(params, key, 0, max_segments=args.segments, on_segment=lambda d, k: None)["samples"]
  compile_whole, compile_parts = timed(whole)[0], timed(parts)[0]  # first calls: compile + one run
  assert np.array_equal(np.asarray(whole()), np.asarray(parts())), "segments changed the samples"
  best = {"whole": np.array([np.inf, np.inf]), "segments": np.array([np.inf, np.inf])}
  for _ in range(args.repeats):
    best["whole"] = np.minimum(best["whole"], timed(whole))
    best["segments"] = np.minimum(best["segments"], timed(parts))
  ratio = best["segments"] / best["whole"]
  out = {"preset": args.preset, "batch": args.batch, "steps": args.steps, "segments": args.steps // length,
         "whole_s": best["whole"][0], "segments_s": best["segments"][0], "ratio_wall": ratio[0],
         "ratio_cpu": ratio[1], "first_call_whole_s": compile_whole, "first_call_segments_s": compile_parts}
  print(f"whole chain {best['whole'][0]:.3f} s wall ({best['whole'][1]:.3f} s CPU); in segments "
        f"{best['segments'][0]:.3f} s wall ({best['segments'][1]:.3f} s CPU); ratio {ratio[0]:.4f} wall, "
        f"{ratio[1]:.4f} CPU; first calls (compile + run) {compile_whole:.2f} s vs {compile_parts:.2f} s")
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
