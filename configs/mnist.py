"""DDPM on tfds MNIST (prepare it with tfds first), 28x28 padded to 32x32."""
from jaxddpm.config import base_config


def get_config():
  c = base_config()
  c.data.name = "mnist"
  c.data.image_size = 32
  c.data.random_flip = False
  c.model.preset = "mnist32"
  c.training.batch_size = 128
  c.training.num_steps = 100_000
  c.training.log_every = 500
  c.training.checkpoint_every = 5000
  c.training.sample_every = 10_000
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 1000
  c.optim.ema_decay = 0.9995
  return c
