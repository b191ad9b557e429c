"""`--mode evaluate` and its pieces: bits/dim over a split, streamed FID statistics, the run's outputs and errors.

References: the entropy of 8-bit Gaussian data (the bound of the exact denoiser must lie just above it),
`calc_bpd_loop` of the whole split in one batch (the split-level bound must not depend on batching, device
count or padding), numpy feature statistics of `sample_batched` samples, and the CLI's exit code.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from scipy import stats

import jaxddpm as jd
from jaxddpm import checkpoint, data, evaluate, experiment, sampling
from jaxddpm.metrics import bpd, fid, fid_stats, frechet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mesh_of(n):
  return Mesh(np.asarray(jax.devices()[:n]), ("data",))


def u8(x):
  """Reference quantisation: clip(rint((x + 1) * 127.5), 0, 255) in float64."""
  return np.clip(np.rint((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------- bits/dim of Gaussian data
def gaussian_coefs(T):
  b = np.asarray(jd.beta_schedule("linear", T), np.float64)
  ab = np.cumprod(1.0 - b)
  abp = np.append(1.0, ab[:-1])
  return b, ab, abp


def test_bpd_over_split_gaussian_data_exact_denoiser_reaches_entropy():
  """x0 ~ N(mu, sd^2) per pixel, quantised to 8 bits. The exact reverse process of Gaussian data is
  p(x_{t-1} | x_t) = N(E[x_{t-1} | x_t], Var(x_{t-1} | x_t)) (joint Gaussian: Var = V' - alpha_t V'^2 / V_t with
  V' = Var x_{t-1}, V_t = Var x_t); its bound is a cross-entropy, so E[bound] >= H (entropy of the 8-bit data),
  and the gap is the small discretisation/decoder gap (< 0.02 bits/dim, see test_losses). The split is fed
  as padded batches with garbage in the padding, which must be masked out."""
  T, mu, sd, N, B = 1000, 0.1, 0.25, 400, 96
  b, ab, abp = gaussian_coefs(T)
  Vt = ab * sd ** 2 + 1 - ab
  Vp = abp * sd ** 2 + 1 - abp
  log_var = np.log(Vp - (1 - b) * Vp ** 2 / Vt)  # Var(x_{t-1} | x_t), t = 1..T
  a = jnp.asarray(np.sqrt(ab), jnp.float32)
  s = jnp.asarray(np.sqrt(1 - ab), jnp.float32)
  lv = jnp.asarray(log_var, jnp.float32)

  def apply_fn(params, x, t):
    at, st = a[t][:, None, None, None], s[t][:, None, None, None]
    eps = st * (x - at * params["mu"]) / (at ** 2 * params["sd"] ** 2 + st ** 2)  # E[eps | x_t]
    return jnp.concatenate([eps, jnp.broadcast_to(lv[t][:, None, None, None], x.shape)], -1)

  rng = np.random.default_rng(0)
  x0 = u8(rng.normal(mu, sd, (N, 4, 4, 1))).astype(np.float32) / 127.5 - 1

  def batches():
    for start in range(0, N, B):
      img = np.full((B, 4, 4, 1), 0.7, np.float32)  # padding: garbage, masked out
      idx = np.full((B,), -1, np.int32)
      k = min(B, N - start)
      img[:k], idx[:k] = x0[start:start + k], np.arange(start, start + k)
      yield {"image": img, "index": idx, "mask": idx >= 0, "label": np.zeros((B,), np.int32)}

  res = bpd.bpd_over_split(apply_fn, {"mu": jnp.float32(mu), "sd": jnp.float32(sd)}, jd.make_schedule("linear", T),
                           batches(), mesh=mesh_of(8), key=jax.random.key(3), var_type="learned",
                           progress=False)
  levels = np.arange(256) / 127.5 - 1
  edges = np.concatenate([[-np.inf], levels[:-1] + 1 / 255, [np.inf]])
  P = np.diff(stats.norm(mu, sd).cdf(edges))
  H = -np.sum(P[P > 0] * np.log2(P[P > 0]))
  se = res["bpd_stderr"]
  assert res["num_examples"] == N
  assert 0.01 < se < 0.1, se  # a per-image spread of ~0.5 bits/dim over 400 images
  assert H - 4 * se < res["bpd"] < H + 0.02 + 4 * se, (res["bpd"], H, se)
  # The parts add up, and the prior of T = 1000 linear steps is negligible.
  np.testing.assert_allclose(res["terms_bpd"].sum() + res["prior_bpd"], res["bpd"], rtol=1e-5)
  assert res["terms_bpd"].shape == (T,) and 0 < res["prior_bpd"] < 1e-4


# --------------------------------------------------------------- invariance: devices, batch, padding
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("data"))
  data.dataset_info("digits", d)  # builds the built-in dataset once
  return d


def toy_apply(params, x, t):
  """A non-trivial deterministic 'denoiser' with parameters (per-pixel weights, a per-t bias)."""
  return jnp.tanh(params["w"] * x + params["b"][t][:, None, None, None])


TOY_PARAMS = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(8, 8, 1)), jnp.float32),
              "b": jnp.asarray(np.linspace(-0.5, 0.5, 20), jnp.float32)}


def test_bpd_same_for_1_or_8_devices_and_any_batch_size(data_dir):
  """Bits/dim of the first 20 digits of the test split with the real eval iterator: 1 device / batch 4 and
  8 devices / batch 16 (padding and the num_examples cut differ) both equal the bound of the same 20
  images computed by calc_bpd_loop in one batch with their split indices as example ids."""
  sched = jd.make_schedule("cosine", 20)
  key = jax.random.key(5)
  n = 20
  results = []
  for devices, bs in [(1, 4), (8, 16)]:
    it = data.make_eval_iterator("digits", split="test", data_dir=data_dir, global_batch_size=bs, num_threads=0)
    results.append(bpd.bpd_over_split(toy_apply, TOY_PARAMS, sched, it, mesh=mesh_of(devices), key=key,
                                      num_examples=n, num_batches=math.ceil(n / bs), progress=False))
  src = data.data_source("digits", "test", data_dir)
  x0 = np.stack([src[i]["image"] for i in range(n)]).astype(np.float32) / 127.5 - 1
  ref = jax.jit(lambda x: jd.calc_bpd_loop(sched, lambda x, t: toy_apply(TOY_PARAMS, x, t), x, key,
                                           example_ids=jnp.arange(n)))(x0)
  ref = {k: np.asarray(v, np.float64) for k, v in ref.items()}
  for r in results:
    assert r["num_examples"] == n
    np.testing.assert_allclose(r["bpd"], ref["total_bpd"].mean(), rtol=2e-5)
    np.testing.assert_allclose(r["bpd_stderr"], ref["total_bpd"].std(ddof=1) / math.sqrt(n), rtol=1e-3)
    np.testing.assert_allclose(r["prior_bpd"], ref["prior_bpd"].mean(), rtol=2e-5)
    np.testing.assert_allclose(r["terms_bpd"], ref["vb"].mean(0), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(r["x0_mse"], ref["x0_mse"].mean(0), rtol=2e-5, atol=1e-7)
  assert ref["total_bpd"].std() > 0.01  # the examples differ, so a wrong subset would show


def test_write_bpd_outputs_csv(tmp_path):
  T = 5
  terms = np.array([3.0, 0.5, 0.25, 0.125, 0.0625])
  res = {"prior_bpd": 0.01, "terms_bpd": terms, "x0_mse": np.linspace(0.001, 0.5, T), "eps_mse": np.ones(T)}
  paths = bpd.write_bpd_outputs(res, str(tmp_path), step=7)
  rows = [line.split(",") for line in open(paths["csv"]).read().splitlines()]
  assert rows[0][:3] == ["term", "t", "bpd"] and rows[1][0] == "L_T"
  body = rows[2:]
  assert [r[0] for r in body] == [f"L_{i}" for i in range(T - 1, -1, -1)]
  assert [int(r[1]) for r in body] == list(range(T, 0, -1))
  np.testing.assert_allclose([float(r[2]) for r in body], terms[::-1])
  # rate at t = prior + sum of the terms L_{s-1} for s > t; distortion = 127.5 sqrt(mse)
  for r in body:
    t = int(r[1])
    np.testing.assert_allclose(float(r[5]), 0.01 + terms[t:].sum(), rtol=1e-7)
    np.testing.assert_allclose(float(r[6]), 127.5 * math.sqrt(res["x0_mse"][t - 1]), rtol=1e-7)
  assert os.path.getsize(paths["png"]) > 1000


# -------------------------------------------------------------------------------- FID statistics
class ToyModel:
  """Stands in for the UNet in fid_report: .apply({"params": p}, x, t, train=False)."""

  def apply(self, variables, x, t, train=False):
    del train
    return toy_apply(variables["params"], x, t)


def small_config(data_dir, **eval_overrides):
  spec = importlib.util.spec_from_file_location("configs_test", os.path.join(REPO, "configs", "test.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.data_dir = data_dir
  c.model.ch_mult = (1,)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = ()
  c.model.ch = 8
  for k, v in eval_overrides.items():
    c.eval[k] = v
  return c


def test_fid_report_reference_cache_and_protocol(data_dir, tmp_path):
  """fid_report with a pixel feature extractor: the reference statistics of the train split are computed,
  cached (pytorch-fid keys mu, sigma) and reused; the FID equals the Frechet distance of independently
  computed statistics; the protocol is written with the number."""
  c = small_config(data_dir, fid_num_samples=10, fid_stats_split="train", stats_dir=str(tmp_path / "stats"),
                   batch_size=16, seed=4)
  feature_fn = lambda u: u.reshape(u.shape[0], -1).astype(np.float64) / 255.0
  sched = jd.make_schedule("cosine", 20)
  workdir = str(tmp_path / "w")
  out = fid.fid_report(c, ToyModel(), sched, TOY_PARAMS, mesh_of(8), (8, 8, 1), workdir, step=3,
                       feature_fn=feature_fn, feature_extractor="pixels")
  src = data.data_source("digits", "train", data_dir)
  real = np.stack([src[i]["image"] for i in range(len(src))])
  mu_r, sigma_r = frechet.feature_statistics(feature_fn(real))
  cached = [f for f in os.listdir(tmp_path / "stats") if f.endswith(".npz")]
  assert len(cached) == 1
  mu_c, sigma_c = fid_stats.load_statistics(tmp_path / "stats" / cached[0])
  np.testing.assert_allclose(mu_c, mu_r, atol=1e-10)
  np.testing.assert_allclose(sigma_c, sigma_r, atol=1e-10)
  samples = sampling.sample_batched(toy_apply, TOY_PARAMS, sched, (10, 8, 8, 1), jax.random.PRNGKey(4))["samples"]
  mu_s, sigma_s = frechet.feature_statistics(feature_fn(u8(samples)))
  np.testing.assert_allclose(out["fid"], frechet.frechet_distance(mu_s, sigma_s, mu_r, sigma_r), rtol=1e-9)
  saved = json.load(open(out["path"]))
  assert saved["metrics"]["fid"] == pytest.approx(out["fid"])
  p = saved["protocol"]
  assert (p["num_samples"], p["reference_split"], p["ema"], p["seed"], p["feature_extractor"]) == \
      (10, "train", True, 4, "pixels")
  assert "to_uint8" in p["quantisation"] and p["sampler"]["method"] == "ancestral"
  # A second report reuses the cache: a file of other statistics in its place changes the FID.
  fid_stats.save_statistics(tmp_path / "stats" / cached[0], mu_r + 1.0, sigma_r, image_shape=[8, 8, 1],
                            feature_extractor="pixels")
  again = fid.fid_report(c, ToyModel(), sched, TOY_PARAMS, mesh_of(8), (8, 8, 1), workdir, step=3,
                         feature_fn=feature_fn, feature_extractor="pixels")
  np.testing.assert_allclose(again["fid"], frechet.frechet_distance(mu_s, sigma_s, mu_r + 1.0, sigma_r), rtol=1e-9)


# ------------------------------------------------------------------------------------- two hosts
WORKER = r"""
import os, sys, json
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
import numpy as np, jax.numpy as jnp
import jaxddpm as jd
from jaxddpm import parallel
from jaxddpm.metrics import bpd, fid, frechet
exec(sys.argv[4])  # MP_HELPERS of the test: the model, the data and the features

x, params, sched = mp_data(), mp_params(), jd.make_schedule("cosine", 10)
start, stop = pid * MP_N // 2, (pid + 1) * MP_N // 2  # each host reads its own part of the split

def batches():
  for s in range(start, stop, MP_B):
    img, idx = np.zeros((MP_B, 4, 4, 1), np.float32), np.full((MP_B,), -1, np.int32)
    k = min(MP_B, stop - s)
    img[:k], idx[:k] = x[s:s + k], np.arange(s, s + k)
    yield {"image": img, "index": idx, "mask": idx >= 0}

nb = max(-(-((p + 1) * MP_N // 2 - p * MP_N // 2) // MP_B) for p in range(2))
mesh = parallel.data_mesh()
res = bpd.bpd_over_split(mp_apply, params, sched, batches(), mesh=mesh, key=jax.random.PRNGKey(0),
                         num_batches=nb, progress=False)
ms = fid.sample_feature_moments(mp_apply, params, sched, (4, 4, 1), 11, mp_features, mesh=mesh,
                                key=jax.random.PRNGKey(1), batch_size=4, progress=False)
mu, sigma = frechet.moments_statistics(ms)
json.dump({"bpd": res["bpd"], "n": res["num_examples"], "terms": res["terms_bpd"].tolist(), "count": ms.count,
           "mu": mu.tolist(), "sigma": sigma.tolist()}, open(out, "w"))
"""
MP_HELPERS = """
MP_N, MP_B = 13, 4


def mp_apply(params, x, t):
  return jnp.tanh(params["w"] * x + params["b"][t][:, None, None, None])


def mp_params():
  return {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 4, 1)), jnp.float32),
          "b": jnp.asarray(np.linspace(-0.5, 0.5, 10), jnp.float32)}


def mp_data():
  return (np.random.default_rng(2).integers(0, 256, (MP_N, 4, 4, 1)) / 127.5 - 1).astype(np.float32)


def mp_features(u):  # a large mean tests the precision of merging moments across hosts
  return u.reshape(u.shape[0], -1)[:, :5].astype(np.float64) * 1.5 + 1000.0
"""
exec(MP_HELPERS)  # the same definitions here and in the worker processes


def test_two_hosts_bpd_and_sample_statistics(tmp_path, port):
  """Two processes x 2 devices, each reading its own half of 13 examples: both report the bits/dim of
  calc_bpd_loop over all 13 in one batch, and the sample feature statistics of sample_batched."""
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(tmp_path / f"o{i}.json"), MP_HELPERS], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), [log[-3000:] for log in logs]
  outs = [json.load(open(tmp_path / f"o{i}.json")) for i in range(2)]
  sched = jd.make_schedule("cosine", 10)
  params = mp_params()
  ref = jd.calc_bpd_loop(sched, lambda x, t: mp_apply(params, x, t), mp_data(), jax.random.PRNGKey(0),
                         example_ids=jnp.arange(MP_N))
  samples = sampling.sample_batched(mp_apply, params, sched, (11, 4, 4, 1), jax.random.PRNGKey(1),
                                    mesh=mesh_of(1))["samples"]
  mu, sigma = frechet.feature_statistics(mp_features(u8(samples)))
  for o in outs:
    assert o["n"] == MP_N and o["count"] == 11
    np.testing.assert_allclose(o["bpd"], float(np.mean(np.asarray(ref["total_bpd"], np.float64))), rtol=2e-5)
    np.testing.assert_allclose(o["terms"], np.asarray(ref["vb"], np.float64).mean(0), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(o["mu"], mu, rtol=1e-12)
    np.testing.assert_allclose(o["sigma"], sigma, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------- bad input
def test_bad_eval_config(data_dir):
  with pytest.raises(ValueError, match=r"config.eval.metrics = 'bpd,nll' names unknown metric\(s\) \['nll'\]"):
    evaluate.validate_eval_config(small_config(data_dir, metrics="bpd,nll"))
  with pytest.raises(ValueError, match="asks for 'fid' but config.eval.inception_weights is not set"):
    evaluate.validate_eval_config(small_config(data_dir, metrics="fid"))
  with pytest.raises(ValueError, match="fid_stats_split = 'validation' is invalid"):
    evaluate.validate_eval_config(small_config(data_dir, fid_stats_split="validation"))
  with pytest.raises(ValueError, match="interp_timestep = 21 is invalid"):
    evaluate.validate_eval_config(small_config(data_dir, interp_timestep=21))
  c = small_config(data_dir, metrics="in_domain")
  c.data.name = "cifar10"
  with pytest.raises(ValueError, match="'in_domain', which exists only for the built-in datasets"):
    evaluate.validate_eval_config(c)
  assert evaluate.validate_eval_config(small_config(data_dir)) == ("bpd", "in_domain", "figures")
  assert evaluate.validate_eval_config(small_config(data_dir, inception_weights="w.npz")) == ("bpd", "fid", "figures")


def test_run_bad_input_errors(data_dir, tmp_path):
  """Missing weights file, statistics of another resolution, a workdir without checkpoint: clear errors,
  raised before anything is compiled."""
  empty = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"FID Inception weights file not found: .*missing.npz.*convert"):
    evaluate.run(small_config(data_dir, inception_weights=str(tmp_path / "missing.npz")), empty)
  stats32 = str(tmp_path / "stats32.npz")
  fid_stats.save_statistics(stats32, np.zeros(2048), np.zeros((2048, 2048)), image_shape=[32, 32, 3])
  with pytest.raises(ValueError, match=r"computed on images of shape \[32, 32, 3\].*\[8, 8, 1\]: another resolution"):
    evaluate.run(small_config(data_dir, inception_weights=str(tmp_path / "missing.npz"), fid_stats=stats32), empty)
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty.*train first"):
    evaluate.run(small_config(data_dir), empty)


def test_cli_no_checkpoint_exits_2(data_dir, tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "jaxddpm", "--mode", "evaluate", "--config",
                      os.path.join(REPO, "configs", "test.py"), "--workdir", str(tmp_path / "w"),
                      f"--config.data.data_dir={data_dir}"], capture_output=True, text=True, timeout=300,
                     env=env, cwd=REPO)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "error: no checkpoint in" in r.stderr


# ------------------------------------------------------------------------------------ end to end
def write_checkpoint(config, workdir, step=3):
  """A checkpoint with random parameters written directly (no training, nothing compiled)."""
  image_shape, mesh, model, sched, optimizer, lr_fn, abstract, meta, manager = experiment.prepare(config, workdir)
  rng = np.random.default_rng(0)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "params" in name and np.issubdtype(s.dtype, np.floating):
      return (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
    return np.zeros(s.shape, s.dtype)

  state = jax.tree_util.tree_map_with_path(leaf, abstract)
  state = state.replace(step=np.asarray(step, np.int32))
  checkpoint.save(manager, step, state, {}, meta)
  manager.wait_until_finished()
  return image_shape


def test_run_end_to_end(data_dir, tmp_path):
  """--mode evaluate in-process on a checkpoint of a tiny UNet: every output exists and is consistent."""
  c = small_config(data_dir, num_examples=12, batch_size=8, in_domain_num_samples=8, classifier_steps=10,
                   figure_num_samples=4, figure_num_snapshots=5, interp_num_pairs=2, interp_num_lambdas=3)
  workdir = str(tmp_path / "w")
  write_checkpoint(small_config(data_dir), workdir)
  res = evaluate.run(c, workdir)
  assert res["step"] == 3 and res["metrics_run"] == ["bpd", "in_domain", "figures"]
  assert os.path.dirname(res["path"]) == os.path.join(workdir, "eval")
  assert re.fullmatch(r"step00000003_[0-9a-f]{8}_results\.json", os.path.basename(res["path"])), res["path"]
  saved = json.load(open(res["path"]))
  b = saved["bpd"]
  assert b["num_examples"] == 12 and b["split"] == "test" and b["ema"] is True and math.isfinite(b["bpd"])
  terms = np.loadtxt(b["csv"], delimiter=",", skiprows=2, usecols=2)
  np.testing.assert_allclose(terms.sum() + b["prior_bpd"], b["bpd"], rtol=1e-5)
  idm = saved["in_domain"]
  assert idm["num_samples"] == 8 and 0 <= idm["mean_max_confidence"] <= 1 and idm["frechet_distance"] >= 0
  assert os.path.isfile(os.path.join(data_dir, "classifiers", "digits_8x8.npz"))
  from PIL import Image
  figs = saved["figures"]
  prog = np.asarray(Image.open(figs["progressive"]))
  # 4 rows of samples, 5 snapshot columns (T = 20, every 4th step), 8x8 cells + 1 px gaps, upscaled
  f = prog.shape[0] // (4 * 9 + 1)
  assert prog.shape[:2] == (f * (4 * 9 + 1), f * (5 * 9 + 1))
  interp = np.asarray(Image.open(figs["interpolation"]))
  f = interp.shape[0] // (2 * 9 + 1)
  assert interp.shape[:2] == (f * (2 * 9 + 1), f * ((3 + 2) * 9 + 1))
  # The interpolation's first and last columns are the real test images 0..3, upscaled by f.
  src = data.data_source("digits", "test", data_dir)
  cell = lambda r, col: interp[f * (1 + 9 * r):f * (1 + 9 * r + 8):f, f * (1 + 9 * col):f * (1 + 9 * col + 8):f]
  for r in range(2):
    np.testing.assert_array_equal(cell(r, 0), src[2 * r]["image"][..., 0])
    np.testing.assert_array_equal(cell(r, 4), src[2 * r + 1]["image"][..., 0])
