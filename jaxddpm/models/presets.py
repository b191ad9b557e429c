"""Named UNet configurations (the papers' models and small CPU-sized ones) and their validation.

`PRESETS[name]` is a dict of `UNet` keyword arguments; `PRESET_INPUT_SHAPES[name]` the (H, W, C) image
shape it was designed for. `make_unet(name, **overrides)` builds the module; `validate_unet_config`
checks a configuration against an image size without tracing or compiling anything.

Parameter counts (exact, in tests/test_unet.py):
  cifar10     35,746,307  (the DDPM paper's 35.7M; the official TF model has the same count)
  celebahq256/church256/bedroom256  113,673,219  (the paper's "114 million")
"""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

# The UNet constructor fields, in order (kept here so validation needs no import of the module).
UNET_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
               "num_heads", "use_scale_shift_norm", "out_channels", "num_groups", "dtype", "param_dtype",
               "remat")
REQUIRED_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")
DEFAULTS = dict(resamp_with_conv=True, num_heads=1, use_scale_shift_norm=False, out_channels=None,
                num_groups=32, dtype=jnp.float32, param_dtype=jnp.float32, remat=False)
ALLOWED_DTYPES = ("float32", "bfloat16", "float16")
ALLOWED_PARAM_DTYPES = ("float32", "bfloat16")

_DDPM_256 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)

PRESETS: dict[str, dict] = {
    # Ho et al. 2020, Appendix B: CIFAR-10, 32x32x3, 35.7M parameters.
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
    # The 256x256 model of the paper (CelebA-HQ, LSUN church / bedroom), about 114M parameters.
    "celebahq256": dict(_DDPM_256),
    "church256": dict(_DDPM_256),
    "bedroom256": dict(_DDPM_256),
    # Small models for CPU: 8x8 grey digits (sklearn), 16x16, 28x28 / 32x32 grey (MNIST).
    "digits8": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=8),
    "small16": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                    num_groups=8),
    "mnist28": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1,
                    num_groups=8),
    "mnist32": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.1,
                    num_groups=8),
    # The small 32x32x3 network of the sampling benchmark (channels 32, 64; one block per level;
    # attention only in the middle): 652,195 parameters.
    "small32": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=8),
}

PRESET_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "cifar10": (32, 32, 3),
    "celebahq256": (256, 256, 3),
    "church256": (256, 256, 3),
    "bedroom256": (256, 256, 3),
    "digits8": (8, 8, 1),
    "small16": (16, 16, 1),
    "mnist28": (28, 28, 1),
    "mnist32": (32, 32, 1),
    "small32": (32, 32, 3),
}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _dtype_name(v) -> str | None:
  try:
    return jnp.dtype(v).name
  except TypeError:
    return None


def _check_fields(cfg: dict) -> dict:
  """Field-by-field checks that need no image size; returns cfg completed with the defaults."""
  unknown = sorted(set(cfg) - set(UNET_FIELDS))
  if unknown:
    raise ValueError(f"unknown UNet field(s) {unknown}; allowed fields are {list(UNET_FIELDS)}")
  missing = [f for f in REQUIRED_FIELDS if f not in cfg]
  if missing:
    raise ValueError(f"missing UNet field(s) {missing}; required fields are {list(REQUIRED_FIELDS)}")
  cfg = {**DEFAULTS, **cfg}
  if not _is_int(cfg["ch"]) or cfg["ch"] < 1:
    raise ValueError(f"ch must be a positive int, got {cfg['ch']!r}")
  cm = cfg["ch_mult"]
  if not isinstance(cm, (tuple, list)) or not cm or not all(_is_int(m) and m >= 1 for m in cm):
    raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {cm!r}")
  if not _is_int(cfg["num_res_blocks"]) or cfg["num_res_blocks"] < 1:
    raise ValueError(f"num_res_blocks must be an int >= 1, got {cfg['num_res_blocks']!r}")
  ar = cfg["attn_resolutions"]
  if not isinstance(ar, (tuple, list)) or not all(_is_int(r) and r >= 1 for r in ar):
    raise ValueError(f"attn_resolutions must be a tuple of positive ints (spatial sizes), got {ar!r}")
  d = cfg["dropout"]
  if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
    raise ValueError(f"dropout must be a float in [0, 1), got {d!r}")
  for f in ("resamp_with_conv", "use_scale_shift_norm", "remat"):
    if not isinstance(cfg[f], bool):
      raise ValueError(f"{f} must be True or False, got {cfg[f]!r}")
  if not _is_int(cfg["num_heads"]) or cfg["num_heads"] < 1:
    raise ValueError(f"num_heads must be an int >= 1, got {cfg['num_heads']!r}")
  oc = cfg["out_channels"]
  if oc is not None and (not _is_int(oc) or oc < 1):
    raise ValueError(f"out_channels must be None (= input channels) or a positive int, got {oc!r}")
  if not _is_int(cfg["num_groups"]) or cfg["num_groups"] < 1:
    raise ValueError(f"num_groups must be a positive int, got {cfg['num_groups']!r}")
  channels = sorted({cfg["ch"]} | {cfg["ch"] * m for m in cm})
  bad = [c for c in channels if c % cfg["num_groups"]]
  if bad:
    ok = [g for g in range(1, cfg["ch"] + 1) if all(c % g == 0 for c in channels)]
    raise ValueError(f"num_groups={cfg['num_groups']} must divide every channel count {channels} "
                     f"(not {bad}); allowed values: {ok}")
  if _dtype_name(cfg["dtype"]) not in ALLOWED_DTYPES:
    raise ValueError(f"dtype must be one of {ALLOWED_DTYPES}, got {cfg['dtype']!r}")
  if _dtype_name(cfg["param_dtype"]) not in ALLOWED_PARAM_DTYPES:
    raise ValueError(f"param_dtype must be one of {ALLOWED_PARAM_DTYPES}, got {cfg['param_dtype']!r}")
  return cfg


def validate_unet_config(*, image_size: int, in_channels: int, **unet_kwargs) -> None:
  """Raise ValueError naming the field if `UNet(**unet_kwargs)` cannot run on [B, S, S, in_channels].

  Checks every field's type and range, that image_size S is divisible by 2^(len(ch_mult) - 1), that each
  attention resolution is one of the sizes S / 2^i the network visits, that num_groups divides every
  channel count and num_heads the channels of every attention block. Pure Python: nothing is traced.
  """
  if not _is_int(image_size) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  if not _is_int(in_channels) or in_channels < 1:
    raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
  cfg = _check_fields(dict(unet_kwargs))
  cm = tuple(cfg["ch_mult"])
  factor = 2 ** (len(cm) - 1)
  if image_size % factor:
    ok = [n for n in range(1, len(cm) + 1) if image_size % 2 ** (n - 1) == 0]
    raise ValueError(f"image_size={image_size} is not divisible by 2**(len(ch_mult) - 1) = {factor} "
                     f"(ch_mult={cm}); allowed len(ch_mult) for this size: {ok}")
  resolutions = [image_size // 2 ** i for i in range(len(cm))]
  bad = [r for r in cfg["attn_resolutions"] if r not in resolutions]
  if bad:
    raise ValueError(f"attn_resolutions={tuple(cfg['attn_resolutions'])}: resolution(s) {bad} never occur "
                     f"for image_size={image_size}, ch_mult={cm}; allowed values: {resolutions}")
  attn_ch = {cfg["ch"] * cm[-1]} | {cfg["ch"] * m for m, r in zip(cm, resolutions)
                                    if r in cfg["attn_resolutions"]}
  bad = sorted(c for c in attn_ch if c % cfg["num_heads"])
  if bad:
    ok = [n for n in range(1, min(attn_ch) + 1) if all(c % n == 0 for c in attn_ch)]
    raise ValueError(f"num_heads={cfg['num_heads']} must divide the channels of every attention block "
                     f"{sorted(attn_ch)} (not {bad}); allowed values: {ok}")


def make_unet(preset: str | None = None, *, image_size: int | None = None, in_channels: int | None = None,
              **overrides):
  """Build a `UNet` from a named preset (see `PRESETS`) with fields overridden by keyword.

  The fields are always validated; with image_size and in_channels (taken from `PRESET_INPUT_SHAPES`
  when a preset is named and they are not given) the resolution checks run too.
  """
  from jaxddpm.models.unet import UNet  # noqa: PLC0415  (unet imports this module)

  if preset is None:
    cfg = {}
  elif preset in PRESETS:
    cfg = dict(PRESETS[preset])
    shape = PRESET_INPUT_SHAPES[preset]
    image_size = shape[0] if image_size is None else image_size
    in_channels = shape[2] if in_channels is None else in_channels
  else:
    raise ValueError(f"unknown preset {preset!r}; allowed values: {sorted(PRESETS)} or None")
  cfg.update(overrides)
  for f in ("ch_mult", "attn_resolutions"):
    if isinstance(cfg.get(f), list):
      cfg[f] = tuple(cfg[f])
  if image_size is not None and in_channels is not None:
    validate_unet_config(image_size=image_size, in_channels=in_channels, **cfg)
  else:
    _check_fields(cfg)
  return UNet(**cfg)


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree (arrays or jax.ShapeDtypeStruct leaves)."""
  import jax  # noqa: PLC0415

  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
