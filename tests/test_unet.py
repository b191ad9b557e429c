"""Tests of the DDPM UNet (jaxddpm/models): parameter counts, shapes, conditioning, dropout, precision,
sharding, config validation, and building blocks against float64 numpy references."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxddpm.models import (PRESET_INPUT_SHAPES, PRESETS, AttnBlock, Downsample, ResnetBlock, UNet, Upsample,
                            count_params, make_unet, validate_unet_config)
from jaxddpm.models import timestep_embedding
from jaxddpm.models.presets import UNET_FIELDS

# A tiny network for the tests that compile (8x8, channels 16/32, attention at 4 and in the middle).
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=4)


def _abstract_params(model, shape):
  H, W, C = shape
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, H, W, C)), jnp.zeros((1,), jnp.int32)))


def _random_params(module, *example_inputs, seed=0):
  """Random parameters of sensible scale for `module`, drawn with numpy from the abstract init (no compile;
  the real init zeroes some layers on purpose, which would hide bugs)."""
  abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for path, leaf in leaves:
    n = rng.normal(size=leaf.shape)
    names = [getattr(k, "key", "") for k in path]
    if names[-1] == "scale":
      v = 1.0 + 0.1 * n
    elif names[-1] == "bias":
      v = 0.1 * n
    else:
      if len(leaf.shape) == 3:  # DenseGeneral: q/k/v (C, N, C/N), proj_out (N, C/N, C)
        fan_in = leaf.shape[0] * (leaf.shape[1] if names[-2] == "proj_out" else 1)
      else:
        fan_in = math.prod(leaf.shape) // leaf.shape[-1]
      v = n / math.sqrt(fan_in)
    out.append(jnp.asarray(v, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------------------
# Parameter counts.

def _expected_param_count(*, ch, ch_mult, num_res_blocks, attn_resolutions, image_size, in_ch, out_ch,
                          use_scale_shift_norm=False, resamp_with_conv=True, **_):
  """Closed-form count from the paper's architecture description (independent of the Flax code)."""
  E = 4 * ch
  k = 2 if use_scale_shift_norm else 1
  gn = lambda c: 2 * c
  conv = lambda cin, cout: 9 * cin * cout + cout
  res = lambda cin, cout: (gn(cin) + conv(cin, cout) + k * (E * cout + cout) + gn(cout) + conv(cout, cout)
                           + (cin * cout + cout if cin != cout else 0))
  attn = lambda c: gn(c) + 4 * (c * c + c)
  n = (ch * E + E) + (E * E + E) + conv(in_ch, ch)
  chans, c, size = [ch], ch, image_size
  for i, m in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      n += res(c, ch * m) + (attn(ch * m) if size in attn_resolutions else 0)
      c = ch * m
      chans.append(c)
    if i != len(ch_mult) - 1:
      n += conv(c, c) if resamp_with_conv else 0
      chans.append(c)
      size //= 2
  n += 2 * res(c, c) + attn(c)
  for i in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      n += res(c + chans.pop(), ch * ch_mult[i]) + (attn(ch * ch_mult[i]) if size in attn_resolutions else 0)
      c = ch * ch_mult[i]
    if i != 0:
      n += conv(c, c) if resamp_with_conv else 0
      size *= 2
  return n + gn(c) + conv(c, out_ch)


def test_cifar10_has_exactly_the_official_parameter_count():
  # The official TensorFlow DDPM CIFAR-10 model has 35,746,307 parameters (the paper's "35.7 million").
  params = _abstract_params(make_unet("cifar10"), (32, 32, 3))
  assert count_params(params) == 35_746_307
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_256_presets_have_the_papers_114M_parameters():
  n = count_params(_abstract_params(make_unet("church256"), PRESET_INPUT_SHAPES["church256"]))
  assert round(n / 1e6) == 114  # "our LSUN and CelebA-HQ models have 114 million parameters"
  assert PRESETS["celebahq256"] == PRESETS["church256"] == PRESETS["bedroom256"]


@pytest.mark.parametrize("name,variant", [(n, {}) for n in sorted(PRESETS)] + [
    ("cifar10", {"use_scale_shift_norm": True, "resamp_with_conv": False, "num_heads": 4}),
    ("small16", {"use_scale_shift_norm": True, "out_channels": 2}),
    ("digits8", {"resamp_with_conv": False, "out_channels": 2}),
])
def test_output_shape_and_parameter_count(name, variant):
  """Every preset (and some variants): abstract init + apply; counts equal the closed form."""
  H, W, C = PRESET_INPUT_SHAPES[name]
  cfg = {**PRESETS[name], **variant}
  model = make_unet(name, **variant)
  x = jax.ShapeDtypeStruct((2, H, W, C), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)

  def init_apply(x, t):
    params = model.init(jax.random.key(0), x, t)
    return params, model.apply(params, x, t)

  params, out = jax.eval_shape(init_apply, x, t)
  out_ch = cfg.get("out_channels") or C
  assert out.shape == (2, H, W, out_ch) and out.dtype == jnp.float32
  assert count_params(params) == _expected_param_count(**cfg, image_size=H, in_ch=C, out_ch=out_ch)


def test_small_presets_are_small():
  for name in ("digits8", "small16", "mnist28", "mnist32", "small32"):
    assert count_params(_abstract_params(make_unet(name), PRESET_INPUT_SHAPES[name])) < 2_000_000, name
  assert count_params(_abstract_params(make_unet("small32"), (32, 32, 3))) == _expected_param_count(
      **PRESETS["small32"], image_size=32, in_ch=3, out_ch=3)


# ----------------------------------------------------------------------------------------------------------
# Shapes and dtypes (abstract evaluation only: nothing big is compiled).

def test_bfloat16_model_keeps_float32_params_and_output_shape():
  model = make_unet("cifar10", dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(model.apply, params, x, t).dtype == jnp.float32


def test_config_fields_match_the_module():
  fields = {f.name for f in dataclasses.fields(UNet)} - {"parent", "name"}
  assert fields == set(UNET_FIELDS)
  model = make_unet("cifar10", num_heads=4)
  assert UNet(**model.config()) == model


# ----------------------------------------------------------------------------------------------------------
# Behaviour of a tiny network.

@pytest.fixture(scope="module")
def tiny():
  model = UNet(**TINY)
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  return model, _random_params(model, x[:1], jnp.zeros((1,), jnp.int32)), x


@pytest.fixture(scope="module")
def tiny_apply(tiny):
  return jax.jit(tiny[0].apply)


def test_initialisation_follows_the_original():
  """Final convs start at zero (so the initial output is 0); other kernels ~ U with var 2/(fan_in+fan_out)."""
  model = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=8)
  x, t = jax.random.normal(jax.random.key(1), (2, 4, 4, 1)), jnp.array([3, 700])
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t)  # rbg: init compiles ~3x faster
  np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(params, x, t)), 0.0)
  p = params["params"]
  for block in ("down_0_block_0", "mid_block_1", "up_0_block_1"):
    np.testing.assert_array_equal(p[block]["conv2"]["kernel"], 0.0)
    assert float(jnp.std(p[block]["conv1"]["kernel"])) > 0
  np.testing.assert_array_equal(p["mid_attn_1"]["proj_out"]["kernel"], 0.0)
  np.testing.assert_array_equal(p["conv_out"]["kernel"], 0.0)
  k = np.asarray(p["temb_dense1"]["kernel"], np.float64)  # 128 x 128
  assert abs(k.var() / (2.0 / 256) - 1) < 0.1 and np.abs(k).max() <= math.sqrt(3 * 2.0 / 256)
  np.testing.assert_array_equal(p["temb_dense1"]["bias"], 0.0)
  np.testing.assert_array_equal(p["down_0_block_0"]["norm1"]["scale"], 1.0)


def test_output_depends_on_t(tiny, tiny_apply):
  _, params, x = tiny
  apply = tiny_apply
  t = jnp.full((16,), 10, jnp.int32)
  a, b, c = apply(params, x, t), apply(params, x, t + 500), apply(params, x, t)
  np.testing.assert_array_equal(a, c)
  assert float(jnp.mean(jnp.abs(a - b))) > 1e-2 * float(jnp.mean(jnp.abs(a)))
  # each sample only depends on its own t: changing t of sample 0 leaves the others unchanged
  d = apply(params, x, t.at[0].set(900))
  np.testing.assert_allclose(d[1:], a[1:], rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(d[0] - a[0]))) > 1e-3


def test_dropout_only_when_training():
  model = UNet(**{**TINY, "dropout": 0.3})
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  t = jnp.array([0, 10, 100, 999])
  params = _random_params(model, x, t)
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a = apply(params, x, t, rngs={"dropout": jax.random.key(5)})
  eval_b = apply(params, x, t, rngs={"dropout": jax.random.key(6)})
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = apply(params, x, t, train=True, rngs={"dropout": jax.random.key(5)})
  train_b = apply(params, x, t, train=True, rngs={"dropout": jax.random.key(6)})
  train_a2 = apply(params, x, t, train=True, rngs={"dropout": jax.random.key(5)})
  np.testing.assert_array_equal(train_a, train_a2)
  assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3
  assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-3


def test_bfloat16_forward_matches_float32(tiny, tiny_apply):
  _, params, x = tiny
  t = jnp.arange(16) * 60
  out32 = tiny_apply(params, x, t)
  out16 = jax.jit(UNet(**TINY, dtype=jnp.bfloat16).apply)(params, x, t)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 3e-2  # bfloat16 has an 8-bit mantissa (eps 2^-8 = 0.4%), accumulated over ~15 layers
  assert rel > 1e-5  # and the computation really ran in bfloat16


def test_remat_gives_the_same_values_and_gradients():
  cfg = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4)
  x, t = jax.random.normal(jax.random.key(1), (2, 4, 4, 1)), jnp.array([3, 700])
  params = _random_params(UNet(**cfg), x, t)

  def loss(p, model):
    return jnp.mean(jnp.square(model.apply(p, x, t, train=True)))

  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, UNet(**cfg))))(params)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, UNet(**cfg, remat=True))))(params)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_sharded_batch_over_8_devices_matches_one_device(tiny):
  model, params, x = tiny
  assert jax.device_count() == 8
  t = jnp.arange(16) * 60
  single = jax.jit(model.apply)(jax.device_put(params, jax.devices()[0]), jax.device_put(x, jax.devices()[0]),
                                jax.device_put(t, jax.devices()[0]))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params_r = jax.device_put(params, rep)
  f = jax.jit(model.apply, in_shardings=(rep, data, data), out_shardings=data)
  out = f(params_r, jax.device_put(x, data), jax.device_put(t, data))
  assert out.sharding.is_equivalent_to(data, out.ndim)
  assert len(out.addressable_shards) == 8
  np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Configuration errors name the field, before anything is compiled.

GOOD = dict(image_size=32, in_channels=3, **PRESETS["cifar10"])


@pytest.mark.parametrize("change,field", [
    (dict(image_size=36), "image_size"),                      # not divisible by 2**3
    (dict(attn_resolutions=(12,)), "attn_resolutions"),       # never occurs (32, 16, 8, 4)
    (dict(num_groups=24), "num_groups"),                      # does not divide 128
    (dict(num_heads=3), "num_heads"),                         # does not divide 256
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(ch=0), "ch"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(ch_mult=(1, 0)), "ch_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(out_channels=0), "out_channels"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(param_dtype=jnp.float16), "param_dtype"),
    (dict(remat=1), "remat"),
    (dict(in_channels=0), "in_channels"),
    (dict(chanels=64), "chanels"),                            # unknown field
])
def test_bad_config_raises_naming_the_field(change, field):
  with pytest.raises(ValueError, match=field):
    validate_unet_config(**{**GOOD, **change})


def test_good_configs_pass_validation():
  for name, cfg in PRESETS.items():
    H, _, C = PRESET_INPUT_SHAPES[name]
    validate_unet_config(image_size=H, in_channels=C, **cfg)
  validate_unet_config(**{**GOOD, "num_heads": 4, "use_scale_shift_norm": True, "dtype": jnp.bfloat16})


def test_make_unet_validates():
  with pytest.raises(ValueError, match="preset"):
    make_unet("cifar100")
  with pytest.raises(ValueError, match="attn_resolutions"):
    make_unet("cifar10", attn_resolutions=(64,))
  with pytest.raises(ValueError, match="image_size"):
    make_unet("cifar10", image_size=36)             # not divisible by 2**3
  with pytest.raises(ValueError, match="num_groups"):
    make_unet(None, ch=48, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
  assert make_unet("cifar10", ch_mult=[1, 2]).ch_mult == (1, 2)


def test_module_rejects_bad_input_shapes(tiny):
  model, params, _ = tiny
  with pytest.raises(ValueError, match="image_size"):
    model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="t must"):
    model.apply(params, jnp.zeros((2, 8, 8, 3)), jnp.zeros((3,), jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# Building blocks against float64 numpy references.

def _np_group_norm(x, scale, bias, groups, eps=1e-6):
  B, H, W, C = x.shape
  g = x.reshape(B, H * W, groups, C // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(B, H, W, C) * scale + bias


def _np_swish(x):
  return x / (1.0 + np.exp(-x))


def _np_conv3x3(x, w, b, stride=1):
  B, H, W, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(xp[:, i:i + H, j:j + W, :] @ w[i, j] for i in range(3) for j in range(3)) + b
  # 'SAME' with stride 2 on an even size pads (0, 1), as in TensorFlow: centres at odd positions.
  return out[:, 1::stride, 1::stride] if stride == 2 else out


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("groups", [1, 8, 32])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_group_norm_matches_numpy_and_its_gradient_matches_finite_differences(groups, offset):
  """The one-pass GroupNorm against the float64 two-pass formula, also far from zero mean (offset 300,
  std 2: E[x^2] - E[x]^2 in float32 without the shift would be off by ~0.05 there), and its VJP against
  central differences in float64 of the numpy formula."""
  from jaxddpm.models.unet import GroupNorm
  rng = np.random.default_rng(groups)
  x = (rng.normal(size=(3, 4, 4, 32)) * 2 + offset).astype(np.float32)
  scale, bias = rng.uniform(0.5, 2.0, 32).astype(np.float32), rng.normal(size=32).astype(np.float32)
  p = {"params": {"scale": scale, "bias": bias}}
  got = GroupNorm(groups).apply(p, x)
  want = _np_group_norm(x.astype(np.float64), scale, bias, groups)
  np.testing.assert_allclose(got, want, atol=5e-6 * (1 + offset / 100), rtol=1e-5)
  w = rng.normal(size=x.shape)
  g_x, g_p = jax.grad(lambda x, p: jnp.sum(GroupNorm(groups).apply(p, x) * w), argnums=(0, 1))(x, p)
  f = lambda x64, s64=scale.astype(np.float64): np.sum(_np_group_norm(x64, s64, bias, groups) * w)
  x64, h = x.astype(np.float64), 1e-4
  for idx in [(0, 0, 0, 0), (1, 2, 3, 5), (2, 3, 1, 31)]:
    e = np.zeros_like(x64)
    e[idx] = h
    np.testing.assert_allclose(g_x[idx], (f(x64 + e) - f(x64 - e)) / (2 * h), atol=2e-3, rtol=2e-3)
  e = np.zeros(32)
  e[7] = h
  np.testing.assert_allclose(g_p["params"]["scale"][7],
                             (f(x64, scale + e) - f(x64, scale - e)) / (2 * h), rtol=1e-3, atol=1e-3)


def test_timestep_embedding_matches_numpy():
  t = np.array([0, 1, 17, 500, 999])
  for dim in (32, 33, 128):
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    ref = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    if dim % 2:
      ref = np.pad(ref, ((0, 0), (0, 1)))
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.int32), dim))
    assert got.shape == (5, dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=5e-4)  # float32 phase t*w for t ~ 1000


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_block_matches_numpy(num_heads):
  B, H, W, C = 2, 4, 4, 16
  x = np.random.default_rng(0).normal(size=(B, H, W, C))
  block = AttnBlock(num_heads=num_heads, num_groups=4)
  params = _random_params(block, jnp.zeros((1, H, W, C)))
  got = np.asarray(jax.jit(block.apply)(params, jnp.asarray(x, jnp.float32)), np.float64)
  p = _f64(params)["params"]
  h = _np_group_norm(x, p["norm"]["scale"], p["norm"]["bias"], 4).reshape(B, H * W, C)
  d = C // num_heads
  proj = lambda name: (h @ p[name]["kernel"].reshape(C, C) + p[name]["bias"].reshape(C)).reshape(
      B, H * W, num_heads, d)
  q, k, v = proj("q"), proj("k"), proj("v")
  logits = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(d)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("bnqk,bknd->bqnd", w, v).reshape(B, H * W, C)
  ref = x + (a @ p["proj_out"]["kernel"].reshape(C, C) + p["proj_out"]["bias"]).reshape(B, H, W, C)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("cin,cout", [(8, 8), (8, 16)])
def test_resnet_block_matches_numpy(scale_shift, cin, cout):
  B, S, E = 2, 4, 12
  rng = np.random.default_rng(1)
  x, temb = rng.normal(size=(B, S, S, cin)), rng.normal(size=(B, E))
  block = ResnetBlock(cout, use_scale_shift_norm=scale_shift, num_groups=4)
  params = _random_params(block, jnp.zeros((1, S, S, cin)), jnp.zeros((1, E)))
  got = np.asarray(jax.jit(block.apply)(params, jnp.asarray(x, jnp.float32), jnp.asarray(temb, jnp.float32)),
                   np.float64)
  p = _f64(params)["params"]
  h = _np_swish(_np_group_norm(x, p["norm1"]["scale"], p["norm1"]["bias"], 4))
  h = _np_conv3x3(h, p["conv1"]["kernel"], p["conv1"]["bias"])
  emb = _np_swish(temb) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"]
  if scale_shift:
    s, b = emb[:, None, None, :cout], emb[:, None, None, cout:]
    h = _np_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"], 4) * (1 + s) + b
  else:
    h = _np_group_norm(h + emb[:, None, None, :], p["norm2"]["scale"], p["norm2"]["bias"], 4)
  h = _np_conv3x3(_np_swish(h), p["conv2"]["kernel"], p["conv2"]["bias"])
  if cin != cout:
    x = x @ p["nin_shortcut"]["kernel"] + p["nin_shortcut"]["bias"]
  np.testing.assert_allclose(got, x + h, rtol=1e-4, atol=1e-4)


def test_resampling_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 4, 8))
  xf = jnp.asarray(x, jnp.float32)
  up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(Upsample(with_conv=False).apply({}, xf), up, rtol=1e-6)
  pooled = x.reshape(2, 2, 2, 2, 2, 8).mean(axis=(2, 4))
  np.testing.assert_allclose(Downsample(with_conv=False).apply({}, xf), pooled, rtol=1e-5, atol=1e-6)
  for cls, ref_in, stride in ((Upsample, up, 1), (Downsample, x, 2)):
    m = cls(with_conv=True)
    params = _random_params(m, xf)
    p = _f64(params)["params"]["conv"]
    ref = _np_conv3x3(ref_in, p["kernel"], p["bias"], stride=stride)
    np.testing.assert_allclose(jax.jit(m.apply)(params, xf), ref, rtol=1e-4, atol=1e-4)
