"""The default main job: a DDPM on scikit-learn's 8x8 digits, about ten minutes on 2 CPU cores.

python -m jaxddpm --config configs/digits.py --workdir runs/digits
"""
from jaxddpm.config import base_config


def get_config():
  c = base_config()
  c.data.name = "digits"
  c.data.image_size = 8
  c.data.random_flip = False  # a flipped digit is not a digit
  c.model.preset = "digits8"
  c.training.batch_size = 128
  c.training.num_steps = 2000
  c.training.log_every = 100
  c.training.checkpoint_every = 500
  c.training.sample_every = 2000
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.ema_decay = 0.999
  c.sample.num_samples = 100
  c.sample.batch_size = 100
  c.sample.grid_cols = 10
  c.eval.in_domain_num_samples = 100  # scored at the end of training (1000 sampling steps each)
  return c
