"""DDPM on LSUN church at 256x256 (Ho et al. 2020, Appendix B): the 114M-parameter UNet (ch 128, mults
1,1,2,2,4,4, 2 blocks, attention at 16x16), lr 2e-5, batch 64, 1.2M steps, EMA 0.9999, random flips,
no dropout. Prepare the tfds dataset first (on TPU, usually in a GCS data_dir). bfloat16 activations.
"""
from jaxddpm.config import base_config


def get_config():
  c = base_config()
  c.data.name = "lsun/church_outdoor"
  c.data.image_size = 256
  c.model.preset = "church256"
  c.model.dtype = "bfloat16"
  c.training.batch_size = 64
  c.data.eval_split = "validation"
  c.training.num_steps = 1_200_000
  c.training.sample_every = 100_000
  c.optim.lr = 2e-5
  c.sample.num_samples = 16
  c.sample.batch_size = 16
  c.sample.grid_cols = 4
  c.eval.batch_size = 16
  return c
