"""Evaluation of a run: `python -m jaxddpm --mode evaluate` (floor 4, wiring).

* Bits/dim: `metrics.bpd.bpd_over_split` over config.data.eval_split, with the per-term curve
  (`metrics.bpd.write_bpd_outputs`).
* FID: `metrics.fid.fid_report` (samples of the configured sampler vs. reference statistics).
* In-domain score (`in_domain_report`) for the built-in datasets, where Inception weights are not
  available: a small classifier trained on the train split (cached), the Frechet distance of its
  features on samples vs. the held-out test split, and its confidence on samples. Real train images are
  scored the same way as a reference point.
* Pictures (`write_figures`): a sample grid, progressive generation (predicted x_0 along the chain) and
  interpolation in x_t between real test images (DDPM Fig. 8).

`run(config, workdir)` does all of it for the newest checkpoint and writes its results to
WORKDIR/eval/<report.config_tag>_results.json. Files made of samples are named by `report.sample_tag`
(step, method, sampling steps, seed, count), so other settings never overwrite them.
Bad input (missing weights or statistics file, statistics of another resolution, no checkpoint) raises
FileNotFoundError / ValueError before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np

from jaxddpm import config as config_lib, data, figures, generate, images, parallel
from jaxddpm.core.samplers.grids import make_time_grid
from jaxddpm.metrics import bpd, classifier as classifier_lib, fid, fid_stats, inception, report

__all__ = [
  "METRICS",
  "IN_DOMAIN_DATASETS",
  "validate_eval_config",
  "in_domain_report",
  "in_domain_path",
  "read_images",
  "write_figures",
  "run",
]

METRICS = ("bpd", "fid", "in_domain", "figures", "ode_bpd", "nfe_sweep")  # the last two only on request
IN_DOMAIN_DATASETS = ("digits", "mnist5k")


# ------------------------------------------------------------------------------------------ config
def _metrics(config) -> tuple[str, ...]:
  """config.eval.metrics ("bpd,fid,in_domain,figures", "auto" or "") as a tuple; "auto" = bits/dim,
  figures, and FID when Inception weights are set, else the in-domain score for built-in datasets."""
  spec = config.eval.metrics
  if not isinstance(spec, str):
    raise ValueError(f"config.eval.metrics = {spec!r} is invalid; allowed: 'auto' or a comma-separated "
                     f"subset of {METRICS}")
  if spec.strip() == "auto":
    # the bound (bits/dim) is the discrete chain's; a continuous process's exact likelihood is the PF-ODE's
    out = ["bpd"] if config.diffusion.process == config_lib.DISCRETE else []
    if config.eval.inception_weights:
      out.append("fid")
    elif config.data.name in IN_DOMAIN_DATASETS:
      out.append("in_domain")
    return tuple(out + ["figures"])
  names = tuple(s.strip() for s in spec.split(",") if s.strip())
  bad = [n for n in names if n not in METRICS]
  if bad:
    raise ValueError(f"config.eval.metrics = {spec!r} names unknown metric(s) {bad}; allowed: 'auto' or a "
                     f"comma-separated subset of {METRICS}")
  return names


def validate_eval_config(config) -> tuple[str, ...]:
  """Checks the eval section (no file is read). Returns the metrics to run (see `_metrics`)."""
  e = config.eval

  def positive(field, v, zero_ok=False, none_ok=False):
    if v is None and none_ok:
      return
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
      raise ValueError(f"config.eval.{field} = {v!r} is invalid; allowed: an integer >= {0 if zero_ok else 1}"
                       + (" or None" if none_ok else ""))

  positive("num_examples", e.num_examples, none_ok=True)
  positive("batch_size", e.batch_size)
  positive("seed", e.seed, zero_ok=True)
  positive("fid_num_samples", e.fid_num_samples)
  if e.fid_num_samples < 2:
    raise ValueError(f"config.eval.fid_num_samples = {e.fid_num_samples} is invalid; allowed: an integer >= 2")
  positive("in_domain_num_samples", e.in_domain_num_samples)
  if e.in_domain_num_samples < 2:
    raise ValueError(f"config.eval.in_domain_num_samples = {e.in_domain_num_samples} is invalid; allowed: an "
                     "integer >= 2")
  positive("classifier_steps", e.classifier_steps)
  positive("figure_num_samples", e.figure_num_samples)
  positive("figure_num_snapshots", e.figure_num_snapshots)
  positive("interp_num_pairs", e.interp_num_pairs)
  positive("interp_num_lambdas", e.interp_num_lambdas)
  if e.interp_num_lambdas < 2:
    raise ValueError(f"config.eval.interp_num_lambdas = {e.interp_num_lambdas} is invalid; allowed: an "
                     "integer >= 2 (lambda = 0 and 1 at least)")
  positive("interp_timestep", e.interp_timestep, none_ok=True)
  T = config.diffusion.num_timesteps
  if e.interp_timestep is not None and config.diffusion.process == config_lib.DISCRETE and not 1 <= e.interp_timestep <= T:
    raise ValueError(f"config.eval.interp_timestep = {e.interp_timestep} is invalid; allowed: an integer in "
                     f"[1, {T}] (the paper's t; None = T // 2)")
  splits = data.DATASETS[config.data.name].splits if config.data.name in data.DATASETS else ()
  if e.fid_stats is None and splits and e.fid_stats_split not in splits:
    raise ValueError(f"config.eval.fid_stats_split = {e.fid_stats_split!r} is invalid; allowed: a split of "
                     f"{config.data.name!r}: {splits}")
  if e.fid_stats is not None and e.fid_stats_split not in ("train", "test", "validation", "other"):
    raise ValueError(f"config.eval.fid_stats_split = {e.fid_stats_split!r} is invalid; allowed (the split the "
                     "published statistics were computed on): 'train', 'test', 'validation', 'other'")
  for field in ("use_ema", "bpd_clip_denoised"):
    if not isinstance(e[field], bool):
      raise ValueError(f"config.eval.{field} = {e[field]!r} is invalid; allowed: True or False")
  metrics = _metrics(config)
  if "bpd" in metrics and config.diffusion.process != config_lib.DISCRETE:
    raise ValueError(f"config.eval.metrics asks for 'bpd', the discrete chain's bound, but diffusion.process = "
                     f"{config.diffusion.process!r}; allowed with a continuous process: 'fid', 'in_domain', "
                     "'figures' (or 'auto')")
  if "fid" in metrics and not e.inception_weights:
    raise ValueError("config.eval.metrics asks for 'fid' but config.eval.inception_weights is not set; "
                     f"{inception.WEIGHTS_HELP}")
  if "ode_bpd" in metrics:
    from jaxddpm import solver_reports  # noqa: PLC0415
    solver_reports.check_ode_config(config)
  if "nfe_sweep" in metrics:
    from jaxddpm.metrics import nfe_sweep  # noqa: PLC0415
    for m in nfe_sweep.parse_list(e.nfe_sweep_methods, str, "nfe_sweep_methods"):
      if m not in config_lib.SAMPLE_METHODS:
        raise ValueError(f"config.eval.nfe_sweep_methods names {m!r}; allowed: {config_lib.SAMPLE_METHODS}")
    if min(nfe_sweep.parse_list(e.nfe_sweep_nfe, int, "nfe_sweep_nfe")) < 1:
      raise ValueError(f"config.eval.nfe_sweep_nfe = {e.nfe_sweep_nfe!r} is invalid; allowed: integers >= 1")
    positive("nfe_sweep_num_samples", e.nfe_sweep_num_samples)
  if ("in_domain" in metrics or "nfe_sweep" in metrics) and config.data.name not in IN_DOMAIN_DATASETS:
    raise ValueError(f"config.eval.metrics asks for 'in_domain', which exists only for the built-in datasets "
                     f"{IN_DOMAIN_DATASETS}, not {config.data.name!r}; use 'fid'")
  return metrics


# ---------------------------------------------------------------------------------------- bits/dim
def _run_bpd(config, model, sched, params, mesh, image_shape, workdir, step) -> dict:
  """Bits/dim of config.data.eval_split (`metrics.bpd`): the summary dict, plus the curve's paths."""
  e, d = config.eval, config.data
  parallel.check_batch_size(e.batch_size, mesh, "eval.batch_size")
  info = data.dataset_info(d.name, d.data_dir, image_size=d.image_size)
  num_split = info.num_examples[d.eval_split]
  it = data.make_eval_iterator(d.name, split=d.eval_split, data_dir=d.data_dir, global_batch_size=e.batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               image_size=d.image_size, num_threads=d.num_threads,
                               prefetch_batches=max(d.prefetch_batches, 1))
  result = bpd.bpd_over_split(report.apply_fn(model), params, sched, it, mesh=mesh, key=jax.random.PRNGKey(e.seed),
                              mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type,
                              clip_denoised=e.bpd_clip_denoised, num_examples=e.num_examples,
                              num_batches=report.eval_num_batches(num_split, e.batch_size, e.num_examples))
  out = {k: result[k] for k in ("bpd", "bpd_stderr", "prior_bpd", "num_examples")}
  out.update(split=d.eval_split, num_timesteps=int(sched.num_timesteps), seed=e.seed, ema=e.use_ema,
             clip_denoised=e.bpd_clip_denoised)
  if report.is_main():
    name = (f"step{int(step):08d}_bpd_{d.eval_split}_n{out['num_examples']}_seed{e.seed}"
            f"{'' if e.use_ema else '_raw'}{'' if e.bpd_clip_denoised else '_noclip'}")
    paths = bpd.write_bpd_outputs(result, report.eval_dir(workdir), step, name=name,
                                  title=f"{d.name}:{d.eval_split}, step {step}, {out['num_examples']} examples")
    out.update(paths)
    print(f"bits/dim ({d.name}:{d.eval_split}, {out['num_examples']} examples, step {step}): "
          f"{out['bpd']:.4f} +- {out['bpd_stderr']:.4f} (prior {out['prior_bpd']:.2e}); per-term curve "
          f"{paths['csv']}", flush=True)
  return out


# ---------------------------------------------------------------------------------------- in-domain
def read_images(config, split: str, indices=None, image_shape=None):
  """uint8 images [N, H, W, C] and int labels [N] of a split (all, or the given indices), resized to the
  run's image size the way the training pipeline does (`data.resize_image`)."""
  d = config.data
  src = data.data_source(d.name, split, d.data_dir)
  spec = data.DATASETS[d.name]
  indices = range(len(src)) if indices is None else indices
  ims, labels = [], []
  for i in indices:
    rec = src[int(i)]
    im = np.asarray(rec["image"], np.uint8)
    im = im[..., None] if im.ndim == 2 else im
    if image_shape is not None and im.shape != tuple(image_shape):
      im = data.resize_image(im, image_shape[0], spec.upscale)
    ims.append(im)
    labels.append(int(rec[spec.label_key]) if spec.label_key else 0)
  return np.stack(ims), np.asarray(labels, np.int64)


def _classifier_path(config, image_shape) -> str:
  root = config.data.data_dir or data.default_data_dir()
  return os.path.join(root, "classifiers", f"{config.data.name}_{image_shape[0]}x{image_shape[1]}.npz")


def _load_classifier(config, image_shape, train_images, train_labels):
  """Train (or load the cached) classifier; with several processes, process 0 trains and writes first."""
  path = _classifier_path(config, image_shape)
  kw = dict(steps=config.eval.classifier_steps, name=f"{config.data.name}-classifier")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    if report.is_main():
      classifier_lib.load_or_train_classifier(path, train_images, train_labels, **kw)
    multihost_utils.sync_global_devices("jaxddpm.evaluate.classifier")
  return classifier_lib.load_or_train_classifier(path, train_images, train_labels, **kw), path


def in_domain_path(config, workdir: str, step: int, num_samples: int | None = None,
                   use_ema: bool | None = None) -> str:
  """WORKDIR/eval/<sample_tag>_in_domain.json: where `in_domain_report` writes (seed config.eval.seed)."""
  e = config.eval
  tag = report.sample_tag(config, step, seed=e.seed, num_samples=e.in_domain_num_samples if num_samples is None
                          else num_samples, use_ema=e.use_ema if use_ema is None else use_ema)
  return os.path.join(report.eval_dir(workdir), f"{tag}_in_domain.json")


def in_domain_report(config, model, sched, params, mesh, image_shape, workdir, *, step: int | None = None,
                     num_samples: int | None = None, use_ema: bool | None = None) -> dict:
  """The offline in-domain score of a built-in dataset (digits, mnist5k) for the given parameters.

  A small classifier trained on the train split (cached in DATA_DIR/classifiers/, see
  `metrics.classifier`) scores n = config.eval.in_domain_num_samples samples of config.sample's sampler
  (uint8 as saved, seed config.eval.seed):
    frechet_distance   d^2 between Gaussians of its penultimate features on the samples and on the
                       held-out test split (same formula as FID; lower is better);
    mean_max_confidence  (1/n) sum_i max_y p(y | x_i);  classifier_score  exp(E KL(p(y|x) || p(y)));
    class_entropy      H(p_hat(y)) (log 10 = 2.30 when all classes are equally frequent).
  The same numbers for m = min(n, |train|) real train images ("real_*", a random subset drawn with
  config.eval.seed) give the value a perfect model would reach at this sample size: the Frechet distance
  of n points is biased upwards, so only a comparison at the same count is meaningful; a value below
  the real one is noise, not "better than real". test_accuracy checks the classifier itself.

  Writes `in_domain_path` ({"metrics", "protocol"}) on process 0 and prints one line.
  Every process must call it (sampling is sharded). Returns the metrics dict (plus "path").
  """
  d, e = config.data, config.eval
  if d.name not in IN_DOMAIN_DATASETS:
    raise ValueError(f"config.data.name = {d.name!r}: the in-domain score exists only for {IN_DOMAIN_DATASETS}")
  n = e.in_domain_num_samples if num_samples is None else int(num_samples)
  if n < 2:
    raise ValueError(f"num_samples must be >= 2, got {n}")
  use_ema = e.use_ema if use_ema is None else bool(use_ema)
  train_x, train_y = read_images(config, d.split, image_shape=image_shape)
  test_split = d.eval_split if d.eval_split != d.split else "test"
  test_x, test_y = read_images(config, test_split, image_shape=image_shape)
  clf, clf_path = _load_classifier(config, image_shape, train_x, train_y)
  mu, sigma = classifier_lib.classifier_statistics(clf, test_x)
  samples = generate.sample_uint8(config, model, sched, params, mesh, image_shape, n, seed=e.seed,
                                  desc="in-domain score: sampling")["samples"]
  score = classifier_lib.in_domain_score(clf, samples, mu, sigma)
  m = min(n, len(train_x))
  subset = np.sort(np.random.default_rng(e.seed).choice(len(train_x), size=m, replace=False))
  real = classifier_lib.in_domain_score(clf, train_x[subset], mu, sigma)
  metrics = dict(score)
  metrics.update({f"real_{k}": v for k, v in real.items()})
  metrics["test_accuracy"] = classifier_lib.classifier_accuracy(clf, test_x, test_y)
  metrics["num_samples"] = int(n)
  metrics["num_real"] = int(m)
  protocol = fid_stats.Protocol(
      num_samples=int(n), reference=f"{d.name}:{test_split}", reference_split="test", ema=bool(use_ema),
      seed=int(e.seed), feature_extractor=f"{clf.name} ({(clf.meta or {}).get('fingerprint', '?')})",
      sampler=report.sampler_description(config),
      extra={"classifier": clf_path, "classifier_steps": int(e.classifier_steps), "step": step,
             "image_shape": list(image_shape), "num_reference": int(len(test_x))})
  path = in_domain_path(config, workdir, step or 0, num_samples=n, use_ema=use_ema)
  if report.is_main():
    fid_stats.save_result(path, metrics, protocol)
    print(f"in-domain score of {n} samples{'' if step is None else f' at step {step}'} ({d.name}; in brackets "
          f"{m} real train images, the floor at this count): frechet {score['frechet_distance']:.2f} "
          f"[{real['frechet_distance']:.2f}], confidence {score['mean_max_confidence']:.3f} "
          f"[{real['mean_max_confidence']:.3f}], classifier score {score['classifier_score']:.2f} "
          f"[{real['classifier_score']:.2f}]; classifier test accuracy {metrics['test_accuracy']:.3f} -> {path}",
          flush=True)
  metrics["path"] = path
  return metrics


# ------------------------------------------------------------------------------------------- figures
def write_figures(config, model, sched, params, mesh, image_shape, workdir, *, step: int) -> dict:
  """Sample grid, progressive generation and interpolation PNGs under WORKDIR/eval/. Returns the paths.

  One sampler run of config.eval.figure_num_samples samples (config.sample's sampler, seed
  config.eval.seed) with about config.eval.figure_num_snapshots snapshots of the predicted x_0 gives
  the grid and the progressive figure (first min(8, N) samples as rows). The interpolation encodes
  config.eval.interp_num_pairs pairs of test images (0, 1), (2, 3), ... to the paper's
  t = config.eval.interp_timestep (default T // 2) with config.eval.interp_num_lambdas values of lambda.
  """
  e, d = config.eval, config.data
  n = e.figure_num_samples
  K = int(make_time_grid(sched, config_lib.sample_timesteps(config), config.sample.grid)[1].shape[0]) - 1
  every = max(1, math.ceil(K / e.figure_num_snapshots))
  out = generate.sample_uint8(config, model, sched, params, mesh, image_shape, n, seed=e.seed,
                              snapshot_every=every, desc="figures: sampling")
  paths = {}
  outdir = report.eval_dir(workdir)
  tag = report.sample_tag(config, step, seed=e.seed, num_samples=n, use_ema=e.use_ema)
  if report.is_main():
    cols = math.ceil(math.sqrt(n))
    paths["samples"] = images.save_png(os.path.join(outdir, f"{tag}_samples.png"),
                                       generate.grid_png(out["samples"], cols))
    grid = figures.progressive_grid(out["pred_x0_snapshots"][:, :min(8, n)])
    paths["progressive"] = images.save_png(os.path.join(outdir, f"{tag}_progressive_s{out['pred_x0_snapshots'].shape[0]}.png"),
                                           _visible(grid))
  T = config.diffusion.num_timesteps
  t_paper = e.interp_timestep or max(T // 2, 1)
  pairs = e.interp_num_pairs
  test_x, _ = read_images(config, d.eval_split, indices=range(min(2 * pairs, _split_size(config, d.eval_split))),
                          image_shape=image_shape)
  pairs = len(test_x) // 2
  if pairs >= 1 and sched.is_discrete:  # encoding to an entry t and decoding is the discrete chain's figure
    x = images.from_uint8(test_x[:2 * pairs])
    lambdas = np.linspace(0.0, 1.0, e.interp_num_lambdas)
    s = config.sample
    if jax.process_count() > 1:  # a small computation: every process runs it on one local device
      params = jax.device_put(parallel.replicated_to_host(params), jax.local_devices()[0])
    res = figures.interpolate(report.apply_fn(model), params, sched, x[0::2], x[1::2], t_paper - 1, lambdas,
                              jax.random.PRNGKey(e.seed), method=s.method, eta=s.eta,
                              mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type,
                              clip_denoised=s.clip_denoised)
    if report.is_main():
      grid = figures.interpolation_grid(test_x[0::2], test_x[1::2], res["decoded"])
      itag = report.sample_tag(config, step, seed=e.seed, num_samples=pairs, use_ema=e.use_ema)
      paths["interpolation"] = images.save_png(
          os.path.join(outdir, f"{itag}_interpolation_t{t_paper}_x{e.interp_num_lambdas}.png"), _visible(grid))
  if report.is_main():
    print(f"wrote figures {sorted(paths.values())}", flush=True)
  return paths


def _visible(grid):
  """Nearest-neighbour upscaling so that grids of tiny (8x8) images are visible (long side > 256)."""
  factor = max(1, 512 // max(grid.shape[:2]))
  return images.upscale(grid[None], factor)[0] if factor > 1 else grid


def _split_size(config, split):
  d = config.data
  return data.dataset_info(d.name, d.data_dir, image_size=d.image_size).num_examples[split]


# ----------------------------------------------------------------------------------------------- run
def run(config, workdir: str) -> dict:
  """--mode evaluate: bits/dim, FID or the in-domain score, and figures for the newest checkpoint.

  Checks first (ValueError / FileNotFoundError, nothing compiled): the config, the Inception weights
  and statistics files when FID runs, that the workdir has a checkpoint. Then loads the EMA (or, with
  config.eval.use_ema=False, the raw) parameters and writes WORKDIR/eval/results_stepN.json with every
  number and its protocol (WORKDIR/eval/<report.config_tag>_results.json). Returns that dict.
  """
  config_lib.validate(config)
  metrics = validate_eval_config(config)
  d = config.data
  image_shape = data.dataset_info(d.name, d.data_dir, image_size=d.image_size).image_shape
  variables = fid.check_fid_inputs(config, image_shape) if "fid" in metrics else None
  model, sched, mesh, image_shape, params, step = generate.load_params(config, workdir, use_ema=config.eval.use_ema)
  if report.is_main():
    from jaxddpm import logger  # noqa: PLC0415
    logger.open_log_file(workdir)
  results = {"step": step, "workdir": os.fspath(workdir), "dataset": d.name, "ema": bool(config.eval.use_ema),
             "metrics_run": list(metrics)}
  if "bpd" in metrics:
    results["bpd"] = _run_bpd(config, model, sched, params, mesh, image_shape, workdir, step)
  if "fid" in metrics:
    feature_fn = inception.make_inception_feature_fn(variables)
    results["fid"] = fid.fid_report(config, model, sched, params, mesh, image_shape, workdir, step=step,
                                feature_fn=feature_fn)
  if "in_domain" in metrics:
    results["in_domain"] = in_domain_report(config, model, sched, params, mesh, image_shape, workdir, step=step)
  if "ode_bpd" in metrics:
    from jaxddpm import solver_reports  # noqa: PLC0415
    results["ode_bpd"] = solver_reports.run_ode_bpd(config, model, sched, params, mesh, workdir, step)
  if "nfe_sweep" in metrics:
    from jaxddpm import solver_reports  # noqa: PLC0415
    results["nfe_sweep"] = solver_reports.run_nfe_sweep(config, model, sched, params, mesh, image_shape, workdir, step)
  if "figures" in metrics:
    results["figures"] = write_figures(config, model, sched, params, mesh, image_shape, workdir, step=step)
  if "fid" not in metrics and "in_domain" not in metrics and report.is_main():
    print("no sample-quality metric: set --config.eval.inception_weights=PATH (and optionally "
          "--config.eval.fid_stats=PATH) for FID", flush=True)
  results["config"] = json.loads(config.to_json_best_effort())
  path = os.path.join(report.eval_dir(workdir), f"{report.config_tag(config, step)}_results.json")
  if report.is_main():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True, default=_json_default)
    print(f"wrote {path}", flush=True)
  results["path"] = path
  return results


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if dataclasses.is_dataclass(o):
    return dataclasses.asdict(o)
  return str(o)
