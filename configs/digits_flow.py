"""Flow matching (rectified flow) on scikit-learn's 8x8 digits: the main job's model and budget (about ten
CPU-minutes), the linear path alpha = 1 - t, sigma = t, the network predicting the velocity u = eps - x
with the plain u-MSE (Lipman et al. 2023, Liu et al. 2023), sampled by Euler on the probability-flow ODE.

python -m jaxddpm --config configs/digits_flow.py --workdir runs/digits_flow
"""
import importlib.util
import os

# the main job's config (configs/digits.py), loaded by path: configs/ is a folder of files, not a package
_spec = importlib.util.spec_from_file_location("digits", os.path.join(os.path.dirname(__file__), "digits.py"))
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)


def get_config():
  c = digits.get_config()
  c.diffusion.process = "flow"
  c.diffusion.mean_type = "u"        # the network's output: the flow velocity
  c.diffusion.weighting = "none"     # the MSE of that output: the flow-matching loss
  c.diffusion.var_type = "fixed_small"
  c.sample.method = "euler"
  c.sample.timesteps = "100"         # Euler steps (network calls) per sample
  return c
