"""A tiny run for tests and smoke checks: digits, a few steps, a small T."""
from jaxddpm.config import base_config


def get_config():
  c = base_config()
  c.data.name = "digits"
  c.data.image_size = 8
  c.data.random_flip = False
  c.data.prefetch_batches = 1
  c.data.num_threads = 1
  c.model.preset = "digits8"
  c.model.ch = 16
  c.model.num_groups = 4
  c.diffusion.num_timesteps = 20
  c.diffusion.schedule = "cosine"
  c.training.batch_size = 16
  c.training.num_steps = 6
  c.training.log_every = 2
  c.training.checkpoint_every = 2
  c.training.keep_checkpoints = 10
  c.training.sample_every = 1000
  c.training.eval_at_end = False  # the in-domain score is tested in test_evaluate.py
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.optim.ema_decay = 0.9
  c.sample.num_samples = 8
  c.sample.batch_size = 8
  c.sample.grid_cols = 4
  return c
