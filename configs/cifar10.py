"""DDPM on CIFAR-10, the paper's recipe (Ho et al. 2020, Appendix B): FID 3.17, NLL <= 3.75 bits/dim.

35.7M-parameter UNet (ch 128, mults 1,2,2,2, 2 blocks, attention at 16x16, dropout 0.1), linear betas
1e-4 -> 0.02 over T = 1000, eps-prediction with L_simple, fixed_large variance for sampling, Adam lr 2e-4
with 5000 warm-up steps, gradient clipping at 1, batch 128, 800k steps, EMA 0.9999, random horizontal
flips. model.dtype "auto": bfloat16 activations on TPU/GPU, float32 on a CPU (parameters, optimizer and
diffusion math are float32 everywhere).
"""
from jaxddpm.config import base_config


def get_config():
  c = base_config()  # the defaults are this recipe
  c.model.dtype = "auto"
  return c
