"""The training loop's input path: device prefetching (bitwise the same training as a plain loop, the
checkpointed iterator state that of the batches consumed), and the config fields that steer it."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runner
from jaxddpm import data, make_schedule, parallel, training


class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x, t, *, train=False):
    h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(jnp.sin(t[:, None] / 10.0 * jnp.arange(1, 5)))[:, None, None]
    return nn.Conv(1, (3, 3))(nn.swish(h))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return runner.session_data_dir(tmp_path_factory)


def test_prefetching_loop_trains_bitwise_like_a_plain_loop(data_dir):
  mesh = parallel.data_mesh()  # 8 fake CPU devices
  model, sched = TinyNet(), make_schedule("linear", 50)
  opt = training.make_optimizer(lr=1e-3, warmup_steps=2, grad_clip=1.0)
  state0 = jax.device_get(training.init_train_state(jax.random.PRNGKey(0), model, opt, (8, 8, 1)))
  step_fn = functools.partial(training.train_step, model=model, optimizer=opt, schedule=sched, mean_type="eps",
                              var_type="fixed_large", loss_type="mse", ema=0.9)
  rep = parallel.replicated(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state0)
  batch_spec = {"image": jax.ShapeDtypeStruct((16, 8, 8, 1), np.float32, sharding=parallel.batch_sharded(mesh))}
  p_step = training.jit_train_step(step_fn, mesh).lower(abstract, batch_spec).compile(
      compiler_options=runner.FAST_COMPILE)
  make_it = lambda: data.make_train_iterator("digits", data_dir=data_dir, global_batch_size=16, seed=4,
                                             num_threads=1, prefetch_batches=2)
  steps = 6
  plain, it = jax.device_put(state0, rep), make_it()
  states = []
  for _ in range(steps):
    plain, _ = p_step(plain, parallel.global_batch({"image": next(it)["image"]}, mesh))
    states.append(it.get_state())
  fetched, it2 = jax.device_put(state0, rep), make_it()
  batches = parallel.prefetch_to_devices(it2, mesh, size=3)
  for i in range(steps):
    batch, data_state = next(batches)
    assert data_state == states[i]  # the state of the batches consumed, not of those prefetched
    fetched, _ = p_step(fetched, batch)
  assert it2.get_state() != states[-1]  # the host iterator did run ahead
  runner.assert_trees_equal(jax.device_get(plain), jax.device_get(fetched), "prefetching loop vs plain loop")
  with pytest.raises(ValueError, match="size"):
    next(parallel.prefetch_to_devices(it2, mesh, size=0))


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators():
  from jaxddpm import config as config_lib  # noqa: PLC0415
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("cifar10_config", runner.REPO / "configs" / "cifar10.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.model.dtype == "auto" and jax.default_backend() == "cpu"
  assert config_lib.unet_kwargs(c, (32, 32, 3))["dtype"] == jnp.float32  # what training, sampling, eval build
  for backend, dtype in (("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16), ("cpu", jnp.float32)):
    assert config_lib.resolve_dtype("auto", backend) == dtype
  assert config_lib.resolve_dtype("bfloat16", "cpu") == jnp.bfloat16  # an explicit choice is kept


@pytest.mark.parametrize("field, value", [
    ("model.dtype", "float16"), ("model.dtype", "Auto"), ("data.num_threads", -1),
    ("data.num_threads", 1000), ("data.prefetch_batches", 0), ("data.prefetch_batches", True),
    ("data.prefetch_batches", 65)])
def test_bad_dtype_threads_or_prefetch_refused_naming_the_field(field, value):
  """config.validate runs before anything is built or compiled (experiment.prepare)."""
  from jaxddpm import config as config_lib  # noqa: PLC0415
  c = config_lib.base_config()
  section, name = field.split(".")
  with c.unlocked():
    c[section][name] = value
  with pytest.raises(ValueError, match=rf"config\.{field} = .*allowed"):
    config_lib.validate(c)
