"""What every mode of a run (train, sample, evaluate) shares: the checked config turned into model,
schedule, optimizer, abstract train state and checkpoint manager, all before anything is compiled."""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil

import jax
import numpy as np

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
  """What a checkpoint was trained for: parameter shapes, the diffusion it must be sampled with, and the
  data it was trained on."""
  shapes = {jax.tree_util.keystr(p): list(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]}
  d = config.diffusion
  if d.process == config_lib.DISCRETE:  # recorded as before, so older checkpoints stay compatible
    diffusion = {k: d[k] for k in ("schedule", "num_timesteps", "mean_type", "var_type")}
  else:
    diffusion = {k: d[k] for k in ("process", "mean_type")}
  return {"format": 1, "image_shape": list(image_shape), "param_shapes": shapes,
          "diffusion": diffusion,
          "model": json.loads(config.model.to_json()), "dataset": config.data.name,
          "dataset_split": config.data.split}


# Meta fields that must match to continue from a checkpoint: what the model is (any mode), and what it
# is trained on (the dataset: refused unless config.training.allow_dataset_change, for fine-tuning).
MODEL_FIELDS = ("image_shape", "param_shapes", "diffusion")
DATASET_FIELDS = ("dataset", "dataset_split")


def differences(old, new, name: str = "") -> list[str]:
  """'field: old -> new' for every leaf that differs between two JSON-like values (dicts recursed)."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new), key=str):
      sub = f"{name}.{k}" if name and not str(k).startswith("[") else f"{name}{k}"
      out += differences(old.get(k, "(absent)"), new.get(k, "(absent)"), sub)
    return out
  return [] if old == new else [f"{name}: {old!r} -> {new!r}"]


def _describe(diffs: list[str], limit: int = 6) -> str:
  more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
  return "; ".join(diffs[:limit]) + more


def check_compatible(workdir: str, manager, meta: dict, allow_dataset_change: bool = False) -> None:
  """Refuses (ValueError, before anything is compiled or written) a workdir whose newest readable
  checkpoint holds another model or diffusion, or was trained on another dataset (unless
  allow_dataset_change). The message lists each differing field as old -> new."""
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
    diffs = [d for key in MODEL_FIELDS for d in differences(old.get(key), meta[key], key)]
    if diffs:
      raise ValueError(
          f"workdir {workdir} holds checkpoints (step {step}) of an incompatible run: {_describe(diffs)}. "
          "Use another --workdir or the config it was trained with; nothing was changed.")
    # checkpoints written before the split was recorded are compared on the dataset's name only
    diffs = [d for key in DATASET_FIELDS if key in old for d in differences(old[key], meta[key], key)]
    if diffs and not allow_dataset_change:
      raise ValueError(
          f"workdir {workdir} holds checkpoints (step {step}) trained on other data: {_describe(diffs)}. "
          "Use the data it was trained on, another --workdir, or --config.training.allow_dataset_change=True "
          "to continue training (fine-tune) it on the new data; nothing was changed.")
    return


MIN_FREE_BYTES = 64 * 2 ** 20


def _existing_ancestor(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_workdir(workdir: str) -> None:
  """Refuses (ValueError, writing nothing) a local workdir that is a file, lies under a file, or cannot
  be written by this user (checked with os.access, so that root passes as the kernel lets it)."""
  if "://" in os.fspath(workdir):
    return  # gs:// and friends: the storage layer reports its own errors
  workdir = os.fspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory; use another --workdir")
  base = _existing_ancestor(workdir)
  if not os.path.isdir(base):
    raise ValueError(f"--workdir={workdir} cannot be created: {base} is a file, not a directory")
  if not os.access(base, os.W_OK | os.X_OK):
    what = "is not writable" if base == os.path.abspath(workdir) else f"cannot be created: {base} is not writable"
    raise ValueError(f"--workdir={workdir} {what} by this user (uid {os.getuid()}); use another --workdir or "
                     "fix its permissions")


def check_free_space(workdir: str, abstract=None) -> None:
  """Refuses (ValueError) to start training on a disk with less free space than one checkpoint needs
  (the train state's bytes, at least MIN_FREE_BYTES), before anything is written."""
  if "://" in os.fspath(workdir):
    return
  need = MIN_FREE_BYTES
  if abstract is not None:
    need = max(need, sum(int(np.prod(x.shape)) * getattr(x.dtype, "itemsize", 4) for x in jax.tree.leaves(abstract)))
  try:
    free = shutil.disk_usage(_existing_ancestor(workdir)).free
  except OSError as e:
    raise ValueError(f"--workdir={workdir}: cannot read its disk's free space ({e})") from None
  if free < need:
    raise ValueError(f"--workdir={workdir}: the disk is full ({free / 2 ** 20:.1f} MiB free, a checkpoint needs "
                     f"{need / 2 ** 20:.1f} MiB); free some space or use another --workdir "
                     f"({errno.errorcode[errno.ENOSPC]})")


def prepare(config, workdir: str):
  """Everything checked before compiling: config, dataset, image shape, batch size, workdir.

  Compiles nothing and writes nothing: the checkpoint manager it returns is read-only (train opens a
  writing one once these checks have passed).
  """
  config_lib.validate(config)
  check_workdir(workdir)
  data_dir = config.data.data_dir
  if data_dir and "://" not in data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"config.data.data_dir = {data_dir!r} is a file; allowed: a directory (tfds data_dir) or "
                     "None (the default ~/tensorflow_datasets)")
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
  check_compatible(workdir, manager, meta, allow_dataset_change=config.training.allow_dataset_change)
  sched = make_diffusion(config)  # the first device arrays
  return image_shape, mesh, model, sched, optimizer, lr_fn, abstract, meta, manager
