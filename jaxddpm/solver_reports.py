"""The fast-solver reports of `--mode evaluate` (floor 4, wiring): the PF-ODE bits/dim beside the
discrete bound (metric "ode_bpd") and sample quality against NFE (metric "nfe_sweep")."""
from __future__ import annotations

import json
import os

import jax

from jaxddpm import config as config_lib, data, generate
from jaxddpm.core import likelihood
from jaxddpm.metrics import bpd, classifier as classifier_lib, nfe_sweep, report


def ode_options(config) -> dict:
  """`likelihood.LikelihoodConfig` fields from config.eval (validated by `likelihood.check_config`)."""
  e = config.eval
  return dict(mean_type=config.diffusion.mean_type, num_steps=e.ode_steps, solver=e.ode_solver,
              divergence=e.ode_divergence, probe=e.ode_probe, num_probes=e.ode_num_probes)


def check_ode_config(config) -> None:
  """ValueError naming the config.eval field, before anything is compiled."""
  opts = ode_options(config)
  if config.diffusion.process == config_lib.DISCRETE:
    if config.diffusion.mean_type not in likelihood.OUTPUTS:
      raise ValueError(f"config.eval.metrics asks for 'ode_bpd', which needs a denoiser; diffusion.mean_type = "
                       f"{config.diffusion.mean_type!r} allowed: one of {likelihood.OUTPUTS}")
    if config.diffusion.schedule != "linear":
      raise ValueError(f"config.eval.metrics asks for 'ode_bpd' on the discrete chain, which needs "
                       f"diffusion.schedule = 'linear' (its continuous limit is the VP SDE), got "
                       f"{config.diffusion.schedule!r}")
  try:
    likelihood.check_config(**opts)
  except ValueError as e:
    raise ValueError(f"config.eval (ode_steps, ode_solver, ode_divergence, ode_probe, ode_num_probes): {e}") from None


def run_ode_bpd(config, model, sched, params, mesh, workdir, step) -> dict:
  """PF-ODE bits/dim of config.data.eval_split (see `metrics.bpd.ode_bpd_over_split`); prints one line."""
  e, d = config.eval, config.data
  if sched.is_discrete:
    process, net_time = likelihood.ddpm_continuous_limit(sched)
  else:
    process, net_time = sched, None
  info = data.dataset_info(d.name, d.data_dir, image_size=d.image_size)
  it = data.make_eval_iterator(d.name, split=d.eval_split, data_dir=d.data_dir, global_batch_size=e.batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               image_size=d.image_size, num_threads=d.num_threads,
                               prefetch_batches=max(d.prefetch_batches, 1))
  n_split = info.num_examples[d.eval_split]
  out = bpd.ode_bpd_over_split(report.apply_fn(model), params, process, it, mesh=mesh,
                               key=jax.random.PRNGKey(e.seed), net_time=net_time, num_examples=e.num_examples,
                               num_batches=report.eval_num_batches(n_split, e.batch_size, e.num_examples),
                               **ode_options(config))
  out.update(split=d.eval_split, seed=e.seed, process=process.name,
             process_params=dict(process.params), ddpm_continuous_limit=bool(sched.is_discrete))
  if report.is_main():
    print(f"PF-ODE bits/dim ({d.name}:{d.eval_split}, {out['num_examples']} examples, step {step}): "
          f"{out['bpd']:.4f} +- {out['bpd_stderr']:.4f} ({out['solver']} x {out['num_steps']} steps = "
          f"{out['nfe']} network calls per example, {out['divergence']} divergence)", flush=True)
  return out


def run_nfe_sweep(config, model, sched, params, mesh, image_shape, workdir, step) -> dict:
  """The in-domain score of config.eval.nfe_sweep_num_samples samples for each sampler of
  config.eval.nfe_sweep_methods at each budget of config.eval.nfe_sweep_nfe, and of config.sample's
  sampler; writes nfe_sweep_stepN.{json,csv,png} under WORKDIR/eval. Returns the summary."""
  from jaxddpm import evaluate  # noqa: PLC0415  (evaluate imports this module lazily)
  e, d = config.eval, config.data
  methods = nfe_sweep.parse_list(e.nfe_sweep_methods, str, "nfe_sweep_methods")
  budgets = nfe_sweep.parse_list(e.nfe_sweep_nfe, int, "nfe_sweep_nfe")
  n = e.nfe_sweep_num_samples
  train_x, train_y = evaluate.read_images(config, d.split, image_shape=image_shape)
  test_split = d.eval_split if d.eval_split != d.split else "test"
  test_x, _ = evaluate.read_images(config, test_split, image_shape=image_shape)
  clf, _ = evaluate._load_classifier(config, image_shape, train_x, train_y)
  mu, sigma = classifier_lib.classifier_statistics(clf, test_x)

  def score_fn(c):
    samples = generate.sample_uint8(c, model, sched, params, mesh, image_shape, n, seed=e.seed)["samples"]
    s = classifier_lib.in_domain_score(clf, samples, mu, sigma)
    if report.is_main():
      print(f"nfe sweep: {c.sample.method} steps {config_lib.sample_timesteps(c)}: frechet "
            f"{s['frechet_distance']:.2f}", flush=True)
    return s

  rows, skipped = nfe_sweep.sweep(config, sched, score_fn, methods=methods, budgets=budgets)
  reference = nfe_sweep.reference_row(config, sched, score_fn)
  result = {"rows": rows, "reference": reference, "skipped": skipped, "num_samples": n, "seed": e.seed,
            "step": step, "real_frechet_distance": classifier_lib.in_domain_score(
                clf, train_x[:min(n, len(train_x))], mu, sigma)["frechet_distance"]}
  if report.is_main():
    outdir = report.eval_dir(workdir)
    result.update(nfe_sweep.write_outputs(rows, reference, outdir, step,
                                          f"{d.name}, step {step}, {n} samples, seed {e.seed}"))
    path = os.path.join(outdir, f"nfe_sweep_step{step}.json")
    with open(path, "w") as f:
      json.dump(result, f, indent=2, default=float)
    result["json"] = path
    print(f"wrote the quality-vs-NFE sweep {result['png']}", flush=True)
  return result
