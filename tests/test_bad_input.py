"""Bad configurations and command lines fail before anything is compiled, name the culprit, and leave the
workdir exactly as it was (issues 5 and 7).

The table runs in-process through `experiment.prepare` (what every mode calls first) on a workdir that
holds a real checkpoint, with a listener on JAX's backend-compile event: no compilation may happen and
the workdir's files must hash the same afterwards. A few cases run through the real command line, with an
empty persistent compilation cache that must stay empty.
"""
import shutil
import sys

import jax
import numpy as np
import pytest

import runner

sys.path.insert(0, str(runner.REPO / "configs"))
import test as test_config  # noqa: E402
sys.path.pop(0)

from jaxddpm import experiment  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return runner.session_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint_source(tmp_path_factory):
  """A committed checkpoint of configs/test.py (the session's reference run, step 4)."""
  wd, r = runner.reference_run(tmp_path_factory)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd / "checkpoints" / "4"


@pytest.fixture
def workdir(tmp_path, checkpoint_source):
  wd = tmp_path / "wd"
  shutil.copytree(checkpoint_source, wd / "checkpoints" / "4")
  return wd


class CompileCounter:
  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


@pytest.fixture
def compiles():
  counter = CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter)
  yield counter
  jax.monitoring.unregister_event_duration_listener(counter)


def _set(**fields):
  def apply(c):
    for key, value in fields.items():
      section, name = key.split("__")
      c[section][name] = value
  return apply


def _add_unknown(c):
  c.training.unlock()
  c.training.batch_sise = 64


# (id, change to configs/test.py, text the message must contain). 8 devices in the test session.
CASES = [
    ("unknown_dataset", _set(data__name="imagenet"), "config.data.name"),
    ("unknown_field", _add_unknown, "batch_sise"),
    ("batch_not_divisible_by_devices", _set(training__batch_size=12), "training.batch_size"),
    ("batch_zero", _set(training__batch_size=0), "training.batch_size"),
    ("image_size_model_cannot_take", _set(data__image_size=7), "cannot take"),
    ("groups_do_not_divide_channels", _set(model__num_groups=5), "config.model"),
    ("negative_learning_rate", _set(optim__lr=-1e-4), "config.optim.lr"),
    ("eta_with_ancestral", _set(sample__method="ancestral", sample__eta=0.5), "config.sample.eta"),
    ("negative_eta_ddim", _set(sample__method="ddim", sample__eta=-0.1), "config.sample.eta"),
    ("unknown_sampler", _set(sample__method="euler"), "config.sample.method"),
    ("hybrid_with_fixed_variance", _set(diffusion__loss_type="hybrid"), "config.diffusion.var_type"),
    ("mse_with_learned_variance", _set(diffusion__var_type="learned"), "config.diffusion.loss_type"),
    ("unknown_schedule", _set(diffusion__schedule="exponential"), "config.diffusion.schedule"),
    ("zero_timesteps", _set(diffusion__num_timesteps=0), "config.diffusion.num_timesteps"),
    ("bad_sample_timesteps_spec", _set(sample__timesteps="ddimX"), "config.sample.timesteps"),
    ("more_sample_timesteps_than_T", _set(sample__timesteps="50"), "config.sample.timesteps"),
    ("unknown_mean_type", _set(diffusion__mean_type="score"), "config.diffusion.mean_type"),
    ("unknown_split", _set(data__split="validation"), "config.data.split"),
    ("unknown_preset", _set(model__preset="resnet50"), "config.model.preset"),
    ("float16_activations", _set(model__dtype="float16"), "config.model.dtype"),
    ("zero_steps", _set(training__num_steps=0), "config.training.num_steps"),
    ("zero_checkpoint_every", _set(training__checkpoint_every=0), "config.training.checkpoint_every"),
    ("negative_seed", _set(training__seed=-1), "config.training.seed"),
    ("zero_nonfinite_streak", _set(training__max_nonfinite_streak=0), "config.training.max_nonfinite_streak"),
    ("adam_b1_one", _set(optim__b1=1.0), "config.optim.b1"),
    ("ema_decay_above_one", _set(optim__ema_decay=1.5), "config.optim.ema_decay"),
    ("negative_grad_clip", _set(optim__grad_clip=-1.0), "config.optim.grad_clip"),
    # numbers that are 0, 1 or inf in float32, where the train step uses them (issue 16)
    ("adam_eps_zero_in_float32", _set(optim__eps=1e-50), "config.optim.eps = 1e-50"),
    ("adam_eps_below_sqrt_tiny", _set(optim__eps=1e-25), "config.optim.eps"),
    ("lr_zero_in_float32", _set(optim__lr=1e-50), "config.optim.lr"),
    ("first_warmup_lr_zero_in_float32", _set(optim__lr=1e-36, optim__warmup_steps=1000), "config.optim.lr"),
    ("ema_decay_one_in_float32", _set(optim__ema_decay=0.99999999), "config.optim.ema_decay"),
    ("ema_decay_one", _set(optim__ema_decay=1.0), "config.optim.ema_decay"),
    ("adam_b2_one_in_float32", _set(optim__b2=0.999999999), "config.optim.b2"),
    ("grad_clip_inf_in_float32", _set(optim__grad_clip=1e39), "config.optim.grad_clip"),
    ("grad_clip_zero_in_float32", _set(optim__grad_clip=1e-46), "config.optim.grad_clip"),
    ("weight_decay_subnormal", _set(optim__weight_decay=1e-40), "config.optim.weight_decay"),
    ("eta_inf", _set(sample__method="ddim", sample__eta=float("inf")), "config.sample.eta"),
    ("min_snr_gamma_zero", _set(diffusion__weighting="min_snr", diffusion__min_snr_gamma=0.0),
     "config.diffusion.min_snr_gamma"),
    ("p2_weight_inf_in_float32", _set(diffusion__weighting="p2", diffusion__p2_k=1e-3, diffusion__p2_gamma=20.0),
     "config.diffusion.p2_gamma"),
    ("zero_image_size", _set(data__image_size=0), "config.data.image_size"),
    ("negative_cpu_devices", _set(system__cpu_devices=-1), "config.system.cpu_devices"),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_fails_before_compiling_and_changes_nothing(change, expected, data_dir, workdir, compiles):
  c = test_config.get_config()
  c.data.data_dir = data_dir
  change(c)
  before = runner.tree_digest(workdir)
  with pytest.raises(ValueError) as e:
    experiment.prepare(c, str(workdir))
  assert expected in str(e.value), str(e.value)
  assert compiles.count == 0
  assert runner.tree_digest(workdir) == before


def test_the_table_is_large_and_each_case_is_bad_on_its_own(data_dir, workdir):
  """The unchanged config passes (and leaves the workdir alone), so each failure above comes from its
  one change."""
  assert len(CASES) >= 20
  c = test_config.get_config()
  c.data.data_dir = data_dir
  before = runner.tree_digest(workdir)
  experiment.prepare(c, str(workdir))
  assert runner.tree_digest(workdir) == before


def test_float32_edge_values_are_accepted(data_dir):
  """The limits themselves pass: the smallest normal float32, the largest float32 below 1, sqrt(tiny)."""
  from jaxddpm import config as config_lib  # noqa: PLC0415
  tiny, below_one = float(np.finfo(np.float32).tiny), float(np.nextafter(np.float32(1), np.float32(0)))
  assert np.float32(below_one) < 1 and np.float32(tiny) > 0 and np.float32(np.sqrt(tiny)) ** 2 > 0
  c = test_config.get_config()
  c.data.data_dir = data_dir
  c.optim.eps, c.optim.lr, c.optim.warmup_steps = float(np.sqrt(np.float64(tiny))) * 1.0001, tiny * 2, 2
  c.optim.ema_decay = c.optim.b1 = c.optim.b2 = below_one
  c.optim.grad_clip, c.optim.weight_decay = float(np.finfo(np.float32).max), tiny
  config_lib.validate(c)


# the message lists each field that differs as old -> new (issue 16)
INCOMPATIBLE = [
    ("wider_model", _set(model__ch=32), "param_shapes['conv_in']['kernel']: [3, 3, 1, 16] -> [3, 3, 1, 32]"),
    ("other_image_size", _set(data__image_size=16, model__attn_resolutions=(8,)),
     "image_shape: [8, 8, 1] -> [16, 16, 1]"),
    ("other_T", _set(diffusion__num_timesteps=50), "diffusion.num_timesteps: 20 -> 50"),
    ("other_schedule", _set(diffusion__schedule="linear"), "diffusion.schedule: 'cosine' -> 'linear'"),
    ("learned_variance", _set(diffusion__var_type="learned_range", diffusion__loss_type="hybrid"),
     "param_shapes['conv_out']['kernel']: [3, 3, 16, 1] -> [3, 3, 16, 2]"),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in INCOMPATIBLE], ids=[c[0] for c in INCOMPATIBLE])
def test_workdir_of_an_incompatible_model_is_refused(change, expected, data_dir, workdir, compiles):
  c = test_config.get_config()
  c.data.data_dir = data_dir
  change(c)
  before = runner.tree_digest(workdir)
  with pytest.raises(ValueError, match="incompatible run") as e:
    experiment.prepare(c, str(workdir))
  assert expected in str(e.value) and str(workdir) in str(e.value)
  assert compiles.count == 0 and runner.tree_digest(workdir) == before


DATASET_CHANGES = [
    ("other_dataset", _set(data__name="mnist5k"), "dataset: 'digits' -> 'mnist5k'"),  # same 8x8x1 images
    ("other_split", _set(data__split="test"), "dataset_split: 'train' -> 'test'"),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in DATASET_CHANGES], ids=[c[0] for c in DATASET_CHANGES])
def test_workdir_of_another_dataset_is_refused_unless_allowed(change, expected, data_dir, workdir, compiles):
  """The same model on other data is refused like another model (issue 16), unless
  training.allow_dataset_change (fine-tuning); either way nothing is compiled or written."""
  c = test_config.get_config()
  c.data.data_dir = data_dir
  change(c)
  before = runner.tree_digest(workdir)
  with pytest.raises(ValueError, match="trained on other data") as e:
    experiment.prepare(c, str(workdir))
  assert expected in str(e.value) and "allow_dataset_change=True" in str(e.value), str(e.value)
  assert "incompatible" not in str(e.value)
  c.training.allow_dataset_change = True
  experiment.prepare(c, str(workdir))
  assert compiles.count == 0 and runner.tree_digest(workdir) == before


# ---- the real command line ----------------------------------------------------------------------------

CLI = [
    # (id, extra argv, fake devices, use the workdir with a checkpoint, exit code, texts in the output)
    ("typo_in_field", ["--config.training.batch_sise=64"], 1, True, 2, ["batch_sise", "did you mean 'batch_size'"]),
    ("bad_mode", ["--mode=infer"], 1, True, 2, ["--mode", "infer"]),
    ("batch_not_divisible_by_8_devices", ["--config.training.batch_size=12"], 8, True, 2,
     ["training.batch_size = 12", "8"]),
    ("incompatible_workdir", ["--config.model.ch=32"], 1, True, 2, ["incompatible run", "param_shapes"]),
    ("negative_lr", ["--config.optim.lr=-0.1"], 1, True, 2, ["config.optim.lr"]),
    ("other_dataset", ["--config.data.name=mnist5k"], 1, True, 2,
     ["trained on other data: dataset: 'digits' -> 'mnist5k'", "--config.training.allow_dataset_change=True"]),
    ("sample_without_checkpoint", ["--mode=sample"], 1, False, 2, ["no checkpoint"]),
]


@pytest.mark.parametrize("argv,devices,existing,code,texts", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_command_line_fails_fast(argv, devices, existing, code, texts, data_dir, workdir, tmp_path):
  wd = workdir if existing else tmp_path / "empty"
  before = runner.tree_digest(wd)
  cache = tmp_path / "cache"
  r = runner.run(runner.command(wd, data_dir) + argv, runner.env(cache, devices=devices), timeout=120)
  assert r.returncode == code, r.output[-3000:]
  for text in texts:
    assert text in r.output, r.output[-3000:]
  assert runner.tree_digest(wd) == before
  compiled = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
  if "sample_without_checkpoint" in r.output or "--mode=sample" in argv:
    # sampling needs a checkpoint, which it looks for after a valid config built its schedule: that
    # converts the schedule's arrays to float32 on the device (a trivial program), nothing else
    compiled = [n for n in compiled if not n.startswith("jit_convert_element_type-")]
  assert not compiled, f"something was compiled: {compiled}"


def test_command_line_without_workdir(tmp_path):
  cmd = [a for a in runner.command(tmp_path, None) if not a.startswith("--workdir")]
  r = runner.run(cmd, runner.env(tmp_path / "cache"), timeout=120)
  assert r.returncode != 0 and "--workdir is required" in r.output, r.output[-2000:]
  assert list(tmp_path.iterdir()) == []
