"""score_sde's VP SDE (beta linear 0.1 -> 20 in continuous time) on scikit-learn's 8x8 digits, the main
job's model and budget; eps-prediction with L_simple, t ~ U(1e-5, 1); sampled by the ancestral sampler
on the continuous posterior over 200 log-SNR-uniform steps.

python -m jaxddpm --config configs/digits_vp.py --workdir runs/digits_vp
"""
import importlib.util
import os

# the main job's config (configs/digits.py), loaded by path: configs/ is a folder of files, not a package
_spec = importlib.util.spec_from_file_location("digits", os.path.join(os.path.dirname(__file__), "digits.py"))
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)


def get_config():
  c = digits.get_config()
  c.diffusion.process = "vp"
  c.diffusion.mean_type = "eps"
  c.diffusion.var_type = "fixed_small"
  c.sample.method = "ancestral"
  c.sample.timesteps = "200"
  c.sample.grid = "logsnr"
  return c
