"""The one train step on a continuous process, and the config / checkpoint boundary of `diffusion.process`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runner
import jaxddpm
from jaxddpm import experiment, training

import sys  # noqa: E402
sys.path.insert(0, str(runner.REPO / "configs"))
import test as test_config  # noqa: E402
sys.path.pop(0)


class LinearInZ(nn.Module):
  """u(z, t) = a(t) z + b(t) with a, b from a small MLP of t: the optimal velocity for Gaussian data is
  of this form (x_hat is linear in z for Gaussian x)."""

  @nn.compact
  def __call__(self, x, t, train=False):
    h = nn.tanh(nn.Dense(32)(jnp.asarray(t, jnp.float32)[:, None] / 1000.0))
    a = nn.Dense(x.shape[-1])(h)[:, None, None, :]
    b = nn.Dense(x.shape[-1])(h)[:, None, None, :]
    return a * x + b


def test_train_step_learns_flow_matching_on_gaussian_data():
  """train_step with a flow `Process` (u output, t ~ U(t_eps, 1)) fits x ~ N(mu, s^2 I); Euler on the
  PF-ODE of the trained model then reproduces mu and s (Monte Carlo, 4000 samples)."""
  mu, s = np.array([0.5, -0.3], np.float32), 0.2
  flow = jaxddpm.make_process("flow")
  model = LinearInZ()
  opt = training.make_optimizer(lr=1e-2, warmup_steps=0, grad_clip=1.0)
  state = training.init_train_state(jax.random.PRNGKey(0), model, opt, (1, 1, 2))
  step = jax.jit(lambda st, b: training.train_step(st, b, model=model, optimizer=opt, schedule=flow, mean_type="u",
                                                   var_type="fixed_small", loss_type="mse", ema=0.9))
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(400):
    x = mu + s * rng.standard_normal((256, 1, 1, 2)).astype(np.float32)
    state, metrics = step(state, {"image": jnp.asarray(x)})
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-50:]) < 0.7 * np.mean(losses[:10])
  assert set(metrics) >= {"loss_q0", "loss_q3", "grad_norm"}
  params = state.params
  out = jaxddpm.sample(lambda z, t: model.apply({"params": params}, z, t), flow, (4000, 1, 1, 2),
                       jax.random.PRNGKey(1), method="euler", timesteps=50, mean_type="u", clip_denoised=False)
  x = np.asarray(out["samples"]).reshape(-1, 2)
  np.testing.assert_allclose(x.mean(0), mu, atol=0.03)
  np.testing.assert_allclose(x.std(0), s, rtol=0.15)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return runner.session_data_dir(tmp_path_factory)


def _flow(c):
  c.diffusion.process, c.diffusion.mean_type, c.diffusion.var_type = "flow", "u", "fixed_small"


BAD = [  # (change of configs/test.py, field the message names)
    (lambda c: setattr(c.diffusion, "process", "rectified"), "config.diffusion.process"),
    (lambda c: setattr(c.diffusion, "mean_type", "u"), "config.diffusion.mean_type"),       # u on the discrete chain
    (lambda c: (_flow(c), setattr(c.diffusion, "mean_type", "x_prev")), "config.diffusion.mean_type"),
    (lambda c: (_flow(c), setattr(c.diffusion, "loss_type", "kl")), "config.diffusion.loss_type"),
    (lambda c: (_flow(c), setattr(c.diffusion, "weighting", "bogus")), "config.diffusion.weighting"),
    (lambda c: (_flow(c), setattr(c.diffusion, "t_sampling", "bogus")), "config.diffusion.t_sampling"),
    (lambda c: (_flow(c), setattr(c.sample, "timesteps", "10,10")), "config.sample.timesteps"),
    (lambda c: setattr(c.sample, "grid", "logsnr"), "config.sample.grid"),                  # grid on the discrete chain
    (lambda c: (_flow(c), setattr(c.sample, "grid", "karras")), "config.sample.grid"),
    (lambda c: (_flow(c), setattr(c.sample, "method", "euler"), setattr(c.sample, "eta", 1.0)), "config.sample.eta"),
    (lambda c: (_flow(c), setattr(c.eval, "metrics", "bpd")), "'bpd'"),
]


def test_bad_process_configs_name_the_field(data_dir):
  for change, field in BAD:
    c = test_config.get_config()
    c.data.data_dir = data_dir
    change(c)
    with pytest.raises(ValueError) as e:
      jaxddpm.config.validate(c)
    assert field in str(e.value), (field, str(e.value))
  c = test_config.get_config()
  _flow(c)
  c.sample.method, c.sample.timesteps, c.sample.grid = "euler", "10", "edm"
  jaxddpm.config.validate(c)  # the good one passes


def test_sampling_refuses_a_checkpoint_of_another_process(tmp_path_factory, data_dir):
  """The session's reference checkpoint is DDPM's discrete chain: a flow config refuses its workdir
  before compiling, with a message naming both processes."""
  wd, r = runner.reference_run(tmp_path_factory)
  assert r.returncode == 0, r.stderr[-3000:]
  c = test_config.get_config()
  c.data.data_dir = data_dir
  _flow(c)
  with pytest.raises(ValueError, match=r"trained with diffusion.process='ddpm'.*diffusion.process='flow'"):
    experiment.prepare(c, str(wd))
  assert experiment.run_meta(c, (8, 8, 1), experiment.abstract_state(
      c, *experiment._model_and_optimizer(c, (8, 8, 1))[:2], (8, 8, 1)))["diffusion"] == {"process": "flow",
                                                                                          "mean_type": "u"}
