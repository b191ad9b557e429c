"""The DDPM UNet (Ho et al. 2020, Appendix B) in Flax linen.

A PixelCNN++-style UNet: Wide-ResNet blocks with group normalisation and swish, a sinusoidal timestep
embedding added inside every residual block, self-attention at chosen resolutions and in the middle,
skip connections concatenated on the way up. Improved DDPM (Nichol & Dhariwal 2021) options: several
attention heads and scale-shift ("AdaGN") conditioning of the second group norm.

This module knows nothing about diffusion: `UNet()(x, t)` maps images x [B, H, W, C] (NHWC) and
timesteps t [B] to an output [B, H, W, out_channels] in float32.

Layout follows the original TensorFlow model (`diffusion_tf/models/unet.py`), so the CIFAR-10 preset has
exactly its 35,746,307 parameters: Dense/Conv kernels use variance scaling (fan_avg, uniform), biases
are zero, and the last conv of every residual block, the attention output projection and the final conv
start at zero.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxddpm.models.presets import UNET_FIELDS, validate_unet_config

Dtype = Any

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal (Transformer) timestep embedding, in float32.

  With d = dim // 2 and frequencies w_i = max_period^(-i / (d - 1)), i = 0..d-1 (as in DDPM):
    emb(t) = [sin(t w_0), ..., sin(t w_{d-1}), cos(t w_0), ..., cos(t w_{d-1})]
  and a zero column appended when dim is odd.

  Args:
    t: [B] timesteps (int or float).
    dim: embedding width, >= 2.
    max_period: the longest period, 10000 as in Vaswani et al. 2017.
  Returns:
    [B, dim] float32.
  """
  if dim < 2:
    raise ValueError(f"timestep_embedding: dim must be >= 2, got {dim}")
  half = dim // 2
  scale = math.log(max_period) / max(half - 1, 1)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GroupNorm(nn.Module):
  """Group normalisation (Wu & He 2018) in float32, eps 1e-6 as in the TF original:

    y = (x - mu_g) / sqrt(sigma_g^2 + eps) * gamma + beta,
  mu_g, sigma_g^2 the mean and variance over H, W and the C/G channels of group g. Both come from one pass
  of per-channel sums of (x - k_g) and (x - k_g)^2, with k_g a value of the group (the mean of its channels
  at the first pixel) so that sigma_g^2 = E[(x - k_g)^2] - E[x - k_g]^2 does not cancel catastrophically when
  |mu_g| >> sigma_g. The per-(sample, channel) affine map y = x a + b is then one fused pass: XLA:CPU runs
  this about twice as fast as a reshape into groups. Parameters "scale" and "bias" [C], as flax's GroupNorm.

  x [B, H, W, C] -> [B, H, W, C] float32.
  """
  num_groups: int
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    G, per = self.num_groups, C // self.num_groups
    gamma = self.param("scale", nn.initializers.ones, (C,), self.param_dtype).astype(jnp.float32)
    beta = self.param("bias", nn.initializers.zeros, (C,), self.param_dtype).astype(jnp.float32)
    x = x.astype(jnp.float32)
    group = lambda v: v.reshape(B, G, per).mean(-1)                                 # [B, C] -> [B, G]
    ungroup = lambda v: jnp.repeat(v, per, axis=-1)                                 # [B, G] -> [B, C]
    k = jax.lax.stop_gradient(ungroup(group(x[:, 0, 0, :])))[:, None, None, :]      # [B, 1, 1, C]
    d = x - k
    m1 = group(jnp.mean(d, axis=(1, 2)))                                            # E[x - k], [B, G]
    m2 = group(jnp.mean(jnp.square(d), axis=(1, 2)))                               # E[(x - k)^2]
    inv = jax.lax.rsqrt(jnp.maximum(m2 - jnp.square(m1), 0.0) + self.epsilon)
    a = ungroup(inv) * gamma                                                        # [B, C]
    b = beta - ungroup(m1) * a
    return d * a[:, None, None, :] + b[:, None, None, :]


def _group_norm(num_groups: int, name: str, param_dtype: Dtype) -> GroupNorm:
  """The UNet's GroupNorm (float32 statistics and output, eps 1e-6)."""
  return GroupNorm(num_groups=num_groups, epsilon=1e-6, param_dtype=param_dtype, name=name)


def _conv(features: int, name: str, dtype: Dtype, param_dtype: Dtype, *, kernel=3, stride=1,
          init=default_init) -> nn.Conv:
  """A 'SAME'-padded NHWC convolution with the DDPM initialisation."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", dtype=dtype,
                 param_dtype=param_dtype, kernel_init=init, bias_init=zero_init, name=name)


class ResnetBlock(nn.Module):
  """Wide-ResNet block with timestep conditioning.

    h = conv1(swish(GN1(x))) + Dense(swish(temb))                          (plain)
    h = conv2(dropout(swish(GN2(h))))
  or, with use_scale_shift_norm (Improved DDPM's AdaGN), [s, b] = Dense(swish(temb)) and
    h = conv2(dropout(swish(GN2(conv1(swish(GN1(x)))) * (1 + s) + b)))
  and the output is shortcut(x) + h, where shortcut is a 1x1 Dense ("NIN") when channels change.

  x [B, H, W, C_in], temb [B, E] -> [B, H, W, out_ch].
  """
  out_ch: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool = False):
    dense = lambda n, name, init=default_init: nn.Dense(
        n, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, bias_init=zero_init, name=name)
    h = nn.swish(_group_norm(self.num_groups, "norm1", self.param_dtype)(x))
    h = _conv(self.out_ch, "conv1", self.dtype, self.param_dtype)(h)
    if self.use_scale_shift_norm:
      emb = dense(2 * self.out_ch, "temb_proj")(nn.swish(temb))[:, None, None, :].astype(jnp.float32)
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = _group_norm(self.num_groups, "norm2", self.param_dtype)(h) * (1.0 + scale) + shift
    else:
      h = h + dense(self.out_ch, "temb_proj")(nn.swish(temb))[:, None, None, :].astype(h.dtype)
      h = _group_norm(self.num_groups, "norm2", self.param_dtype)(h)
    h = nn.swish(h)
    if self.dropout > 0.0:
      h = nn.Dropout(rate=self.dropout)(h, deterministic=not train)
    h = _conv(self.out_ch, "conv2", self.dtype, self.param_dtype, init=zero_init)(h)
    if x.shape[-1] != self.out_ch:
      x = dense(self.out_ch, "nin_shortcut")(x)
    return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
  """Self-attention over the H*W positions (Vaswani et al. 2017), residual.

    q, k, v = W_q h, W_k h, W_v h with h = GN(x), split into num_heads heads of C / num_heads
    out = x + W_o softmax(q k^T / sqrt(C / num_heads)) v
  Logits and softmax are float32 (jax.nn.dot_product_attention promotes them); W_o starts at zero.

  x [B, H, W, C] -> [B, H, W, C].
  """
  num_heads: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    head_dim = C // self.num_heads
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=default_init,
        bias_init=zero_init, name=name)
    h = _group_norm(self.num_groups, "norm", self.param_dtype)(x).reshape(B, H * W, C)
    q, k, v = proj("q")(h), proj("k")(h), proj("v")(h)               # [B, HW, N, C/N]
    h = jax.nn.dot_product_attention(q, k, v, implementation="xla")  # [B, HW, N, C/N]
    h = nn.DenseGeneral(C, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=zero_init, bias_init=zero_init, name="proj_out")(h)
    return x.astype(self.dtype) + h.reshape(B, H, W, C)


class Downsample(nn.Module):
  """Halve H and W: a stride-2 3x3 conv, or 2x2 average pooling. [B, H, W, C] -> [B, H/2, W/2, C]."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return _conv(x.shape[-1], "conv", self.dtype, self.param_dtype, stride=2)(x)
    B, H, W, C = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))


class Upsample(nn.Module):
  """Double H and W by nearest-neighbour repetition, then optionally a 3x3 conv.

  [B, H, W, C] -> [B, 2H, 2W, C].
  """
  with_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
    if self.with_conv:
      x = _conv(C, "conv", self.dtype, self.param_dtype)(x)
    return x


class UNet(nn.Module):
  """The DDPM UNet: eps_theta(x_t, t) (or any output with out_channels channels).

  Fields:
    ch: base channel count; level i has ch * ch_mult[i] channels.
    ch_mult: channel multipliers, one per resolution level (len(ch_mult) - 1 downsamplings).
    num_res_blocks: residual blocks per level on the way down (num_res_blocks + 1 on the way up).
    attn_resolutions: absolute spatial sizes (e.g. (16,)) after whose blocks self-attention is applied;
      the middle always has one attention block.
    dropout: dropout rate inside residual blocks (active only with train=True, rng collection 'dropout').
    resamp_with_conv: stride-2 conv / nearest+conv (True) or average pooling / nearest only (False).
    num_heads: attention heads (Improved DDPM); must divide the channels where attention is applied.
    use_scale_shift_norm: AdaGN conditioning (Improved DDPM) instead of adding the embedding.
    out_channels: output channels; None = the input channels (2 * C for a learned variance).
    num_groups: GroupNorm groups; must divide every channel count.
    dtype: computation dtype (float32, or bfloat16 on TPU/GPU); group norm, softmax and the timestep
      embedding stay float32 and the output is float32.
    param_dtype: parameter dtype.
    remat: rematerialise residual blocks in the backward pass (less memory, ~1/3 more compute).

  __call__(x [B, H, W, C] float, t [B] int/float, *, train=False) -> [B, H, W, out_channels] float32.
  """
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  dropout: float
  resamp_with_conv: bool = True
  num_heads: int = 1
  use_scale_shift_norm: bool = False
  out_channels: int | None = None
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def config(self) -> dict:
    """The constructor fields as a dict (the inverse of UNet(**config))."""
    return {f: getattr(self, f) for f in UNET_FIELDS}

  @nn.compact
  def __call__(self, x, t, *, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"UNet: x must be [B, H, W, C] (NHWC), got shape {x.shape}")
    B, H, W, C = x.shape
    if jnp.shape(t) != (B,):
      raise ValueError(f"UNet: t must have shape [B] = ({B},), got {jnp.shape(t)}")
    validate_unet_config(image_size=H, in_channels=C, **self.config())
    if W != H:
      validate_unet_config(image_size=W, in_channels=C, **self.config())
    out_ch = C if self.out_channels is None else self.out_channels
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock

    def res_block(h, out, name):
      return block_cls(out, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                       num_groups=self.num_groups, name=name, **kw)(h, temb, train)

    def attn(h, name):
      return AttnBlock(num_heads=self.num_heads, num_groups=self.num_groups, name=name, **kw)(h)

    # Timestep embedding: sinusoid(ch) -> Dense(4ch) -> swish -> Dense(4ch), float32.
    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(4 * self.ch, param_dtype=self.param_dtype, kernel_init=default_init, name="temb_dense0")(temb)
    temb = nn.Dense(4 * self.ch, param_dtype=self.param_dtype, kernel_init=default_init,
                    name="temb_dense1")(nn.swish(temb))

    # Downsampling path.
    hs = [_conv(self.ch, "conv_in", self.dtype, self.param_dtype)(x.astype(self.dtype))]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = res_block(hs[-1], self.ch * mult, f"down_{i}_block_{j}")
        if h.shape[1] in self.attn_resolutions:
          h = attn(h, f"down_{i}_attn_{j}")
        hs.append(h)
      if i != len(self.ch_mult) - 1:
        hs.append(Downsample(self.resamp_with_conv, name=f"down_{i}_downsample", **kw)(hs[-1]))

    # Middle.
    h = hs[-1]
    h = res_block(h, h.shape[-1], "mid_block_1")
    h = attn(h, "mid_attn_1")
    h = res_block(h, h.shape[-1], "mid_block_2")

    # Upsampling path, concatenating the skip connections.
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[i], f"up_{i}_block_{j}")
        if h.shape[1] in self.attn_resolutions:
          h = attn(h, f"up_{i}_attn_{j}")
      if i != 0:
        h = Upsample(self.resamp_with_conv, name=f"up_{i}_upsample", **kw)(h)
    assert not hs

    # End.
    h = nn.swish(_group_norm(self.num_groups, "norm_out", self.param_dtype)(h))
    h = _conv(out_ch, "conv_out", self.dtype, self.param_dtype, init=zero_init)(h)
    return h.astype(jnp.float32)

