"""What every mode of a run (train, sample, evaluate) shares: the checked config turned into model,
schedule, optimizer, abstract train state and checkpoint manager, all before anything is compiled."""
from __future__ import annotations

import functools
import json

import jax

from jaxddpm import checkpoint, config as config_lib, data, parallel, training
from jaxddpm.models.unet import UNet
from jaxddpm.core.process import make_process
from jaxddpm.schedule import make_schedule


def make_diffusion(config):
  """The process the config trains and samples: DDPM's discrete `Schedule` (diffusion.process = "ddpm")
  or the named continuous `Process`."""
  d = config.diffusion
  if d.process == config_lib.DISCRETE:
    return make_schedule(d.schedule, d.num_timesteps)
  return make_process(d.process)


def _model_and_optimizer(config, image_shape):
  """(model, optimizer, learning-rate schedule): what the train state's shapes need, no device arrays."""
  model = UNet(**config_lib.unet_kwargs(config, image_shape))
  o = config.optim
  optimizer = training.make_optimizer(lr=o.lr, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip, b1=o.b1,
                                      b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  return model, optimizer, training.learning_rate_schedule(o.lr, o.warmup_steps)


def build(config, image_shape):
  """(model, schedule, optimizer, learning-rate schedule) of a validated config."""
  model, optimizer, lr_fn = _model_and_optimizer(config, image_shape)
  return model, make_diffusion(config), optimizer, lr_fn


def abstract_state(config, model, optimizer, image_shape):
  """The train state's shapes and dtypes (traced only: nothing is compiled or computed)."""
  init = functools.partial(training.init_train_state, model=model, optimizer=optimizer, image_shape=image_shape)
  return jax.eval_shape(lambda: init(jax.random.PRNGKey(config.training.seed)))


def run_meta(config, image_shape, abstract) -> dict:
  """What a checkpoint was trained for: parameter shapes and the diffusion it must be sampled with."""
  shapes = {jax.tree_util.keystr(p): list(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]}
  d = config.diffusion
  if d.process == config_lib.DISCRETE:  # recorded as before, so older checkpoints stay compatible
    diffusion = {k: d[k] for k in ("schedule", "num_timesteps", "mean_type", "var_type")}
  else:
    diffusion = {k: d[k] for k in ("process", "mean_type")}
  return {"format": 1, "image_shape": list(image_shape), "param_shapes": shapes,
          "diffusion": diffusion,
          "model": json.loads(config.model.to_json()), "dataset": config.data.name}


def check_compatible(workdir: str, manager, meta: dict) -> None:
  """Refuses (ValueError, before anything is compiled or written) a workdir whose checkpoints hold
  another model or diffusion."""
  for step in sorted(manager.all_steps(), reverse=True):
    old = checkpoint.read_meta(manager, step)
    if old is None:
      continue
    old_process = (old.get("diffusion") or {}).get("process", config_lib.DISCRETE)
    new_process = meta["diffusion"].get("process", config_lib.DISCRETE)
    if old_process != new_process:
      raise ValueError(
          f"workdir {workdir} holds checkpoints (step {step}) trained with diffusion.process={old_process!r}, "
          f"but this config has diffusion.process={new_process!r}: sample and evaluate it with "
          f"--config.diffusion.process={old_process} (and the config it was trained with), or use another "
          "--workdir; nothing was changed.")
    for key in ("image_shape", "param_shapes", "diffusion"):
      if old.get(key) != meta[key]:
        raise ValueError(
            f"workdir {workdir} holds checkpoints (step {step}) of an incompatible run: their {key} differs "
            f"from this config's (old: {str(old.get(key))[:200]}, new: {str(meta[key])[:200]}). Use another "
            "--workdir or the config it was trained with; nothing was changed.")
    return


def prepare(config, workdir: str):
  """Everything checked before compiling: config, dataset, image shape, batch size, workdir.

  Compiles nothing and writes nothing: the checkpoint manager it returns is read-only (train opens a
  writing one once these checks have passed).
  """
  config_lib.validate(config)
  image_shape = data.dataset_info(config.data.name, config.data.data_dir,
                                  image_size=config.data.image_size).image_shape
  config_lib.validate(config, image_shape)
  mesh = parallel.data_mesh()
  parallel.check_batch_size(config.training.batch_size, mesh)
  model, optimizer, lr_fn = _model_and_optimizer(config, image_shape)
  abstract = abstract_state(config, model, optimizer, image_shape)
  meta = run_meta(config, image_shape, abstract)
  # read-only: refusing a workdir (or sampling from a live one) must not change it; train opens its own
  manager = checkpoint.make_manager(workdir, keep=config.training.keep_checkpoints, read_only=True)
  check_compatible(workdir, manager, meta)
  sched = make_diffusion(config)  # the first device arrays
  return image_shape, mesh, model, sched, optimizer, lr_fn, abstract, meta, manager
