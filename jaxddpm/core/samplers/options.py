"""The stepper-specific options of the sampler (EDM's churn for "heun", the corrector of "pc"), checked
once, before anything is traced: one table of names and defaults per stepper, next to the checks.

Options travel in `SamplerConfig.options` as sorted (name, value) pairs (hashable: one compiled program
per choice); steppers read them with `base.option`.
"""
from __future__ import annotations

import math
import numbers

from jaxddpm.core.samplers import heun, sde

# method -> {option: default}; a method not listed takes no options
STEPPER_OPTIONS = {"heun": heun.OPTIONS, "pc": sde.PC_OPTIONS}
# steppers that use only the denoiser at grid times, and so also run on the discrete chain, where the
# network's "x_prev" output (a posterior mean, not a denoiser) does not fit them
ODE_ON_GRID = ("heun", "dpm_solver_pp", "dpm_solver_pp_3m")


def _number(method, name, v, lo, lo_open=False, integer=False, inf_ok=False):
  ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and (inf_ok or math.isfinite(v))
  ok = ok and not math.isnan(v) and (v > lo if lo_open else v >= lo)
  if integer:
    ok = ok and isinstance(v, numbers.Integral)
  if not ok:
    kind = "an integer" if integer else "a number"
    raise ValueError(f"{method} option {name} = {v!r} is invalid; allowed: {kind} {'>' if lo_open else '>='} {lo}")


def check_options(method: str, options, discrete: bool, mean_type: str) -> tuple:
  """The validated options of `method` as sorted (name, value) pairs (ValueError naming the option)."""
  if method in ODE_ON_GRID and discrete and mean_type == "x_prev":
    raise ValueError(f"method={method!r} needs a denoiser; mean_type='x_prev' (a posterior mean) only works "
                     "with 'ancestral' and 'ddim'")
  options = dict(options or {})
  allowed = STEPPER_OPTIONS.get(method, {})
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"unknown sampler option(s) {unknown} for method={method!r}; allowed: "
                     f"{sorted(allowed) if allowed else 'none'}")
  if method == "heun":
    for k in ("s_churn", "s_tmin", "s_noise"):
      if k in options:
        _number(method, k, options[k], 0.0)
    if "s_tmax" in options:
      _number(method, "s_tmax", options["s_tmax"], 0.0, inf_ok=True)
    if options.get("s_churn", 0.0) > 0 and discrete:
      raise ValueError("heun option s_churn > 0 needs a continuous process (the churned time is off the "
                       "discrete chain's grid); use s_churn = 0 on diffusion.process='ddpm'")
  if method == "pc":
    if "snr" in options:
      _number(method, "snr", options["snr"], 0.0, lo_open=True)
    if "corrector_steps" in options:
      _number(method, "corrector_steps", options["corrector_steps"], 0, integer=True)
  out = {k: float(v) for k, v in options.items()}
  if "corrector_steps" in out:
    out["corrector_steps"] = int(options["corrector_steps"])
  return tuple(sorted(out.items()))
