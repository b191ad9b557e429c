"""Sample quality against the number of network calls (floor 3): the in-domain score of n samples for
each sampler at each NFE budget, beside the configured sampler's (the full chain), as JSON, CSV and a
PNG with NFE on a log axis. Used by `--mode evaluate` (metric "nfe_sweep").

A method's number of steps for a budget is the largest N whose network calls (`engine.nfe`: Heun's last
step is one call, pc makes 1 + corrector_steps per step) do not exceed it; every row records the NFE it
really used. Methods that need a continuous process are skipped on the discrete chain (listed as such).
"""
from __future__ import annotations

import csv
import os

import numpy as np

from jaxddpm.core.samplers import engine

FIELDS = ("method", "nfe_budget", "steps", "nfe", "frechet_distance", "mean_max_confidence", "classifier_score",
          "class_entropy")


def parse_list(spec: str, cast, field: str) -> tuple:
  """A comma-separated config field as a tuple (ValueError naming the field)."""
  try:
    out = tuple(cast(s.strip()) for s in str(spec).split(",") if s.strip())
  except ValueError:
    raise ValueError(f"config.eval.{field} = {spec!r} is invalid; allowed: a comma-separated list") from None
  if not out:
    raise ValueError(f"config.eval.{field} = {spec!r} is invalid; allowed: a non-empty comma-separated list")
  return out


def steps_for_budget(method: str, budget: int, process, options=()) -> int | None:
  """The largest N with engine.nfe(method, N) <= budget (None when even one step costs more)."""
  best = None
  for n in range(1, budget + 1):
    if engine.nfe(method, n, process, options) <= budget:
      best = n
  return best


def write_outputs(rows: list[dict], reference: dict, outdir: str, step: int, title: str) -> dict:
  """nfe_sweep_stepN.csv and .png (the Frechet distance against NFE, log x axis, the reference dashed)."""
  from matplotlib.figure import Figure  # noqa: PLC0415
  os.makedirs(outdir, exist_ok=True)
  csv_path = os.path.join(outdir, f"nfe_sweep_step{step}.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows + [reference]:
      w.writerow(r)
  fig = Figure(figsize=(6.0, 4.2), dpi=100)
  ax = fig.add_subplot(1, 1, 1)
  for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
    pts = sorted((r["nfe"], r["frechet_distance"]) for r in rows if r["method"] == method)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=method)
  ax.axhline(reference["frechet_distance"], color="k", ls="--", lw=1,
             label=f"{reference['method']} ({reference['nfe']} NFE)")
  ax.set_xscale("log")
  ax.set_xlabel("network calls per sample (NFE)")
  ax.set_ylabel("in-domain Frechet distance (lower is better)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  png_path = os.path.join(outdir, f"nfe_sweep_step{step}.png")
  fig.savefig(png_path)
  return {"csv": csv_path, "png": png_path}


def sweep(config, sched, score_fn, *, methods, budgets) -> tuple[list[dict], list[str]]:
  """Rows {method, nfe_budget, steps, nfe, score...} for every (method, budget) that fits; score_fn(config)
  -> the in-domain metrics of config's sampler. Returns (rows, skipped methods with the reason)."""
  from jaxddpm import config as config_lib  # noqa: PLC0415
  rows, skipped = [], []
  discrete = sched.is_discrete
  for method in methods:
    if discrete and method in engine.CONTINUOUS_ONLY:
      skipped.append(f"{method} (needs a continuous process)")
      continue
    c = config.copy_and_resolve_references()
    c.sample.method, c.sample.timesteps, c.sample.eta = method, None, 0.0
    opts = tuple(sorted(config_lib.sampler_options(c).items()))
    for budget in budgets:
      steps = steps_for_budget(method, budget, sched, opts)
      if steps is None:
        continue
      c.sample.steps = steps
      score = score_fn(c)
      rows.append(dict(method=method, nfe_budget=budget, steps=steps,
                       nfe=engine.nfe(method, steps, sched, opts), **score))
  return rows, skipped


def reference_row(config, sched, score_fn) -> dict:
  """The configured sampler (the full chain unless config.sample respaces it) as a row."""
  from jaxddpm import config as config_lib  # noqa: PLC0415
  from jaxddpm.core.samplers.grids import make_time_grid  # noqa: PLC0415
  process, grid = make_time_grid(sched, config_lib.sample_timesteps(config), config.sample.grid)
  steps = int(grid.shape[0]) - 1
  n = engine.nfe(config.sample.method, steps, process, tuple(sorted(config_lib.sampler_options(config).items())))
  return dict(method=config.sample.method, nfe_budget=n, steps=steps, nfe=n, **score_fn(config))


def as_array(rows):
  return np.asarray([[r["nfe"], r["frechet_distance"]] for r in rows], np.float64)
