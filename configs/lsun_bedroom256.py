"""DDPM on LSUN bedroom (2.4M steps) at 256x256: the paper's recipe (see `jaxddpm.config.ddpm256_config`).

Prepare the tfds dataset first (on TPU usually in a GCS data_dir: --config.data.data_dir=gs://...).
"""
from jaxddpm.config import ddpm256_config


def get_config():
  return ddpm256_config("lsun/bedroom", "bedroom256", num_steps=2_400_000, eval_split="validation")
