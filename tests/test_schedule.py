"""Schedules and respacing against float64 references written from the papers' formulas.

DDPM (Ho et al. 2020) eqs. 4-7 and its code's schedules; Improved DDPM (Nichol & Dhariwal 2021) eq. 17 and
section 4 (respacing); Chen 2023 (sigmoid schedule).
"""
import math

import jax
import numpy as np
import pytest

import jaxddpm as jd

FIELDS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
          "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2", "large_variance", "large_log_variance")


# ------------------------------------------------------------------------------ float64 references
def ref_betas(name, T):
  """beta_t, t = 1..T, written from each paper's definition (not from the library's code)."""
  t = np.arange(1, T + 1, dtype=np.float64)
  start, end = 1e-4 * 1000 / T, 0.02 * 1000 / T
  frac = (t - 1) / max(T - 1, 1)
  if name == "linear":
    return start + (end - start) * frac
  if name == "quadratic":
    return (math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * frac) ** 2
  if name == "const":
    return np.full(T, end)
  if name == "jsd":
    return 1.0 / (T - t + 1)
  if name in ("warmup10", "warmup50"):
    n = int(T * (0.1 if name == "warmup10" else 0.5))
    out = np.full(T, end)
    out[:n] = start + (end - start) * np.arange(n) / max(n - 1, 1)
    return out
  if name == "cosine":  # Improved DDPM eq. 17
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = lambda u: f(u) / f(0.0)
  else:  # sigmoid, Chen 2023 (start -3, end 3, tau 1)
    sg = lambda z: 1 / (1 + np.exp(-z))
    abar = lambda u: (sg(3.0) - sg(6.0 * u - 3.0)) / (sg(3.0) - sg(-3.0))
  return np.array([min(1 - abar(k / T) / abar((k - 1) / T), 0.999) for k in range(1, T + 1)])


def ref_fields(betas):
  """Every Schedule field from DDPM's definitions, with explicit products (no shared code)."""
  T = len(betas)
  ab = np.array([np.prod(1 - betas[:k + 1]) for k in range(T)])
  abp = np.array([1.0] + list(ab[:-1]))
  abn = np.array(list(ab[1:]) + [0.0])
  with np.errstate(divide="ignore"):
    bt = betas * (1 - abp) / (1 - ab)  # eq. 7
    bt2 = bt[1] if T > 1 else betas[0]
    return dict(
        betas=betas, alphas_cumprod=ab, alphas_cumprod_prev=abp, alphas_cumprod_next=abn,
        sqrt_alphas_cumprod=np.sqrt(ab), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ab),
        log_one_minus_alphas_cumprod=np.log(1 - ab), sqrt_recip_alphas_cumprod=1 / np.sqrt(ab),
        sqrt_recipm1_alphas_cumprod=np.sqrt((1 - ab) / ab), posterior_variance=bt,
        posterior_log_variance_clipped=np.log(np.where(np.arange(T) == 0, bt2, bt)),
        posterior_mean_coef1=np.sqrt(abp) * betas / (1 - ab),
        posterior_mean_coef2=np.sqrt(1 - betas) * (1 - abp) / (1 - ab),
        large_variance=np.where(np.arange(T) == 0, bt2, betas),
        large_log_variance=np.log(np.where(np.arange(T) == 0, bt2, betas)))


def ref_space_timesteps(T, spec):
  """The Improved DDPM respacing rule (section 4 and its released code), written independently."""
  if isinstance(spec, str) and spec.startswith("ddim"):
    k = int(spec[4:])
    stride = next(i for i in range(1, T) if len(range(0, T, i)) == k)
    return sorted(range(0, T, stride))
  counts = [int(c) for c in spec.split(",")] if isinstance(spec, str) else (
      [spec] if isinstance(spec, int) else list(spec))
  steps, start = set(), 0
  for i, c in enumerate(counts):
    size = T // len(counts) + (1 if i < T % len(counts) else 0)
    stride = 1 if c <= 1 else (size - 1) / (c - 1)
    pos = 0.0
    for _ in range(c):
      steps.add(start + round(pos))
      pos += stride
    start += size
  return sorted(steps)


def assert_fields_close(s, ref, rtol=1e-6):
  for k in FIELDS:
    got = np.asarray(getattr(s, k), np.float64)
    assert getattr(s, k).dtype == np.float32, k
    np.testing.assert_allclose(got, ref[k], rtol=rtol, atol=1e-30, err_msg=k)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", jd.SCHEDULES)
@pytest.mark.parametrize("T", [1000, 40])
def test_every_schedule_against_paper_formulas(name, T):
  betas = ref_betas(name, T)
  np.testing.assert_allclose(jd.beta_schedule(name, T), betas, rtol=1e-9, atol=0)
  s = jd.make_schedule(name, T)
  assert s.num_timesteps == T
  np.testing.assert_array_equal(np.asarray(s.timesteps), np.arange(T))
  assert s.timesteps.dtype == np.int32
  assert_fields_close(s, ref_fields(betas))


def test_known_values_linear_1000():
  s = jd.make_schedule("linear", 1000)
  np.testing.assert_allclose(float(s.alphas_cumprod[-1]), 4.0358e-5, rtol=1e-4)
  np.testing.assert_allclose(float(s.posterior_variance[487]), 0.0097916, rtol=1e-5)
  np.testing.assert_allclose(float(s.posterior_variance[999]), 0.0199999, rtol=1e-5)
  assert float(s.betas[0]) == np.float32(1e-4) and float(s.betas[-1]) == np.float32(0.02)
  # Improved DDPM: the linear schedule scales with 1000 / T so that alphabar_T stays about the same.
  s4 = jd.make_schedule("linear", 4000)
  np.testing.assert_allclose(np.asarray(s4.betas)[[0, -1]], [2.5e-5, 5e-3], rtol=1e-6)


def test_continuous_alphabar_schedules_match_their_definition():
  """cosine / sigmoid: alphabar_t itself (not the betas) equals the continuous definition until the clip."""
  T = 1000
  u = np.arange(1, T + 1) / T
  f = lambda v: np.cos((v + 0.008) / 1.008 * np.pi / 2) ** 2
  ab = np.asarray(jd.make_schedule("cosine", T).alphas_cumprod, np.float64)
  np.testing.assert_allclose(ab[:-1], (f(u) / f(0))[:-1], rtol=2e-5)
  assert ab[-1] > 0 and np.isclose(ab[-1] / ab[-2], 1 - 0.999, rtol=1e-4)  # beta_T clipped at 0.999
  sg = lambda z: 1 / (1 + np.exp(-z))
  ab = np.asarray(jd.make_schedule("sigmoid", T).alphas_cumprod, np.float64)
  ref = (sg(3.0) - sg(6 * u - 3)) / (sg(3.0) - sg(-3.0))
  np.testing.assert_allclose(ab[:-1], ref[:-1], rtol=2e-5)


def test_schedule_params():
  betas = jd.beta_schedule("linear", 10, beta_start=0.1, beta_end=0.2)
  np.testing.assert_allclose(betas, 0.1 + 0.1 * np.arange(10) / 9, rtol=1e-12)
  np.testing.assert_allclose(jd.beta_schedule("const", 5, beta=0.3), 0.3, rtol=1e-12)
  f = lambda v: np.cos((v + 0.02) / 1.02 * np.pi / 2) ** 2
  b = jd.beta_schedule("cosine", 50, s=0.02, max_beta=0.5)
  u = np.arange(51) / 50
  np.testing.assert_allclose(b, np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.5), rtol=1e-12)


def test_schedule_from_betas_and_single_step():
  rng = np.random.default_rng(0)
  betas = rng.uniform(1e-3, 0.3, size=17)
  assert_fields_close(jd.schedule_from_betas(betas), ref_fields(betas))
  s1 = jd.schedule_from_betas(np.array([0.4]))  # T = 1: the clipped log-variance falls back to beta_1
  assert_fields_close(s1, ref_fields(np.array([0.4])))


def test_schedule_is_a_pytree():
  s = jd.make_schedule("cosine", 30)
  leaves, treedef = jax.tree.flatten(s)
  assert len(leaves) == len(FIELDS) + 1
  s2 = jax.tree.unflatten(treedef, [2 * x for x in leaves])
  np.testing.assert_allclose(s2.betas, 2 * np.asarray(s.betas))
  out = jax.jit(lambda s: s.alphas_cumprod * 1.0)(s)
  np.testing.assert_array_equal(out, s.alphas_cumprod)


SPECS = [(1000, "250"), (1000, "10,10,10"), (1000, [5, 3, 8]), (1000, "ddim50"), (1000, "ddim25"),
         (1000, 1000), (1000, "1"), (37, "5,7,3"), (100, "ddim10"), (4000, "50"), (10, "10"),
         (7, "2,2,1"), (1001, "3,4"), (999, "ddim333")]


@pytest.mark.parametrize("T,spec", SPECS)
def test_space_timesteps_improved_ddpm_rule(T, spec):
  got = jd.space_timesteps(T, spec)
  want = ref_space_timesteps(T, spec)
  np.testing.assert_array_equal(got, want)
  assert np.all(np.diff(got) > 0) and got[0] == 0 and got[-1] < T


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid", "jsd"])
def test_respace_all_timesteps_is_identity(name):
  s = jd.make_schedule(name, 200 if name != "linear" else 1000)
  r = jd.respace(s, np.arange(s.num_timesteps))
  for k in FIELDS:
    np.testing.assert_allclose(getattr(r, k), getattr(s, k), rtol=2e-6, atol=1e-30, err_msg=k)
  np.testing.assert_array_equal(r.timesteps, s.timesteps)


@pytest.mark.parametrize("name,spec", [("linear", "ddim50"), ("cosine", "10,20,5"), ("sigmoid", "37"),
                                       ("quadratic", [1, 1, 1, 1])])
def test_respace_kept_steps(name, spec):
  T = 1000
  s = jd.make_schedule(name, T)
  kept = jd.space_timesteps(T, spec)
  r = jd.respace(s, kept)
  ab = ref_fields(ref_betas(name, T))["alphas_cumprod"]
  assert r.num_timesteps == len(kept)
  np.testing.assert_array_equal(r.timesteps, kept)
  np.testing.assert_allclose(r.alphas_cumprod, ab[kept], rtol=5e-6)
  # Improved DDPM: beta_k = 1 - alphabar_{tau_k} / alphabar_{tau_{k-1}}, and all other fields follow eq. 4-7.
  new_betas = 1 - ab[kept] / np.append(1.0, ab[kept[:-1]])
  assert_fields_close(r, ref_fields(new_betas), rtol=5e-6)


def test_respace_composes():
  s = jd.make_schedule("cosine", 300)
  a = jd.space_timesteps(300, "60")
  b = np.array([0, 3, 7, 20, 59])
  r1, r2 = jd.respace(jd.respace(s, a), b), jd.respace(s, a[b])
  np.testing.assert_array_equal(r1.timesteps, a[b])
  for k in FIELDS:
    np.testing.assert_allclose(getattr(r1, k), getattr(r2, k), rtol=2e-6, atol=1e-30, err_msg=k)


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda: jd.make_schedule("linaer", 10), r"schedule name must be one of .*'linear'.*'cosine'.*'linaer'"),
    (lambda: jd.make_schedule("linear", 0), r"num_timesteps must be an integer >= 1, got 0"),
    (lambda: jd.make_schedule("cosine", -3), r"num_timesteps must be an integer >= 1"),
    (lambda: jd.make_schedule("cosine", 2.5), r"num_timesteps must be an integer >= 1"),
    (lambda: jd.make_schedule("linear", 10), r"betas must lie in \(0, 1\)"),  # 1000/T scaling: beta_end 2
    (lambda: jd.make_schedule("cosine", 10, beta_end=0.1), r"allowed: \['max_beta', 's'\]"),
    (lambda: jd.schedule_from_betas([0.1, 0.0, 0.2]), r"betas must lie in \(0, 1\)"),
    (lambda: jd.schedule_from_betas([0.1, -0.1]), r"betas must lie in \(0, 1\)"),
    (lambda: jd.schedule_from_betas([0.1, 1.0, 0.2]), r"betas must lie in \(0, 1\)"),
    (lambda: jd.schedule_from_betas([0.1, 1.5]), r"betas must lie in \(0, 1\)"),
    (lambda: jd.schedule_from_betas([0.1, np.nan]), r"betas must lie in \(0, 1\)"),
    (lambda: jd.schedule_from_betas(np.full((2, 3), 0.1)), r"betas must be a 1-D array"),
    (lambda: jd.schedule_from_betas([]), r"betas must be a 1-D array of length T >= 1"),
    (lambda: jd.schedule_from_betas([0.1, 0.2], timesteps=[0]), r"timesteps must have shape \(2,\)"),
    (lambda: jd.space_timesteps(0, "1"), r"num_timesteps must be an integer >= 1"),
    (lambda: jd.space_timesteps(10, "abc"), r"'K', 'K1,K2,...' or 'ddimK'"),
    (lambda: jd.space_timesteps(10, "ddim7"), r"no integer stride gives exactly 7"),
    (lambda: jd.space_timesteps(10, "ddimx"), r"'ddimK' needs an integer K"),
    (lambda: jd.space_timesteps(10, "11"), r"cannot take 11 steps from a section of 10"),
    (lambda: jd.space_timesteps(10, "0"), r"every section count must be >= 1"),
    (lambda: jd.space_timesteps(3, "1,1,1,1"), r"4 sections but only 3 timesteps"),
    (lambda: jd.respace(jd.make_schedule("cosine", 10), [0, 5, 5]), r"strictly increasing integers in \[0, 10\)"),
    (lambda: jd.respace(jd.make_schedule("cosine", 10), [0, 10]), r"strictly increasing integers in \[0, 10\)"),
    (lambda: jd.respace(jd.make_schedule("cosine", 10), []), r"timesteps must be a non-empty 1-D array"),
])
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
