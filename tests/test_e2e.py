"""The training job end to end through `python -m jaxddpm` (issue 5), as real processes.

- a run of configs/test.py writes checkpoints, a TensorBoard event file whose scalars are the console's,
  and a PNG sample grid; its loss goes down on the built-in digits;
- `--mode sample` writes PNG grids that show exactly the samples of its uint8 .npz;
- `tfds.testing.mock_data` drives the real tfds path of cifar10 through the train loop with a tiny model
  (tests/test_data.py checks cifar10 and mnist through the data pipeline).
"""
import json
import shutil
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import runner

STEPS = runner.REFERENCE_STEPS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd, r = runner.reference_run(tmp_path_factory)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, r


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return runner.shared_dir(tmp_path_factory, "jax_cache")


def _events(workdir):
  from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # noqa: PLC0415
  files = sorted(workdir.glob("events.out.tfevents.*"))
  assert len(files) == 1, files
  scalars, images, texts = {}, {}, {}
  for event in LegacyEventFileLoader(str(files[0])).Load():
    for v in event.summary.value:
      if v.HasField("simple_value"):
        scalars.setdefault(v.tag, {})[event.step] = v.simple_value
      elif v.HasField("image"):
        images[(v.tag, event.step)] = v.image
      elif v.HasField("tensor") or v.HasField("metadata"):
        texts[(v.tag, event.step)] = v
  return scalars, images, texts


def test_run_writes_checkpoints_events_and_a_sample_grid(reference):
  wd, r = reference
  # checkpoints: every 4 steps, each with the train state, the iterator position and what it was trained for
  assert runner.checkpoint_steps(wd) == list(range(4, STEPS + 1, 4))
  for step in runner.checkpoint_steps(wd):
    d = wd / "checkpoints" / str(step)
    assert json.loads((d / "data" / "metadata").read_text()) == runner.iterator_state(step)
    meta = json.loads((d / "meta" / "metadata").read_text())
    assert meta["image_shape"] == [8, 8, 1] and meta["dataset"] == "digits"
    assert meta["diffusion"] == {"schedule": "cosine", "num_timesteps": 20, "mean_type": "eps",
                                 "var_type": "fixed_large"}
  assert int(runner.load_state(wd, 8)["step"]) == 8
  # TensorBoard: the console's numbers, per step, plus the config text and the sample grid image
  scalars, images, texts = _events(wd)
  console_loss = runner.console_metric(r.stdout, "loss")
  assert sorted(scalars["loss"]) == list(range(1, STEPS + 1)) == sorted(console_loss)
  for step, value in console_loss.items():
    assert abs(scalars["loss"][step] - value) <= 5e-5
  for tag in ("grad_norm", "lr", "nonfinite_total", "steps_per_sec", "loss_q0", "loss_q3"):
    assert tag in scalars, sorted(scalars)
  assert scalars["lr"][1] == pytest.approx(1e-3 / 2) and scalars["lr"][STEPS] == pytest.approx(1e-3)
  assert ("config", 0) in texts
  # the PNG grid of the EMA samples at the end, also in TensorBoard
  png = wd / "samples" / f"step{STEPS:08d}_ancestral20_seed0_n8.png"
  grid = np.asarray(Image.open(png))
  assert grid.dtype == np.uint8 and grid.ndim == 2 and min(grid.shape) >= 64 and grid.std() > 0
  tb = images[("samples", STEPS)]
  assert (tb.height, tb.width) == grid.shape
  # the loss goes down on the built-in digits
  losses = [console_loss[s] for s in sorted(console_loss)]
  assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses


def test_sample_mode_writes_grids_of_the_npz_samples(reference, cache_dir, tmp_path):
  """--mode sample on a copy of the reference's last checkpoint: 20 samples -> 2 grids of 4x4 and an
  .npz of uint8 [20, 8, 8, 1]; every grid tile is the corresponding sample, nearest-upscaled."""
  wd, _ = reference
  mine = tmp_path / "wd"
  shutil.copytree(wd / "checkpoints" / str(STEPS), mine / "checkpoints" / str(STEPS))
  r = runner.run(runner.command(mine, None, "sample.num_samples=20", "sample.batch_size=10", "sample.grid_cols=4",
                                mode="sample"), runner.env(cache_dir))
  assert r.returncode == 0, r.output[-3000:]
  out = mine / "samples"
  tag = f"step{STEPS:08d}_ancestral20_seed0_n20"
  samples = np.load(out / f"{tag}.npz")["samples"]
  assert samples.dtype == np.uint8 and samples.shape == (20, 8, 8, 1)
  assert len({s.tobytes() for s in samples}) == 20 and samples.std() > 10
  grids = sorted(out.glob(f"{tag}_grid*.png"))
  assert [g.name for g in grids] == [f"{tag}_grid000.png", f"{tag}_grid001.png"]
  for g, chunk in zip(grids, (samples[:16], samples[16:])):
    grid = np.asarray(Image.open(g))
    # layout: tiles of 8 + 1 px padding (1 px border), cells row-major in 4 columns, upscaled by f
    rows = -(-len(chunk) // 4)
    side = rows * 9 + 1, 4 * 9 + 1
    f = grid.shape[0] // side[0]
    assert f >= 1 and grid.shape == (side[0] * f, side[1] * f)
    for i, sample in enumerate(chunk):
      r_, c_ = divmod(i, 4)
      tile = grid[(1 + 9 * r_) * f:(9 + 9 * r_) * f:f, (1 + 9 * c_) * f:(9 + 9 * c_) * f:f]
      np.testing.assert_array_equal(tile, sample[..., 0])


MOCK_RUN = textwrap.dedent("""
    import sys
    import tensorflow_datasets as tfds
    sys.path.insert(0, {configs!r})
    import test as test_config
    from jaxddpm import train

    for name, image_size, workdir in {runs!r}:
      c = test_config.get_config()
      c.data.name, c.data.image_size, c.data.random_flip = name, image_size, name == "cifar10"
      c.model.preset, c.model.ch, c.model.ch_mult, c.model.attn_resolutions = "small32", 8, (1,), ()
      c.model.num_groups = 4
      c.diffusion.num_timesteps = 10
      c.training.batch_size, c.training.num_steps, c.training.checkpoint_every = 4, 2, 2
      c.training.log_every = 1
      c.sample.num_samples, c.sample.batch_size, c.sample.grid_cols = 4, 4, 2
      with tfds.testing.mock_data(num_examples=12):
        train.run(c, workdir)
""")


def test_mock_tfds_cifar10_through_the_train_loop(cache_dir, tmp_path):
  """The real tfds path (tfds.data_source of cifar10, mocked) feeds the train loop: 2 steps, a checkpoint
  of the right image shape, a sample grid in colour."""
  runs = [("cifar10", 32, str(tmp_path / "cifar10"))]
  script = tmp_path / "mock_run.py"
  script.write_text(MOCK_RUN.format(configs=str(runner.REPO / "configs"), runs=runs))
  r = runner.run([sys.executable, str(script)], runner.env(cache_dir))
  assert r.returncode == 0, r.output[-3000:]
  for (name, _, wd), channels in zip(runs, (3,)):
    wd = tmp_path / name
    assert runner.checkpoint_steps(wd) == [2]
    meta = json.loads((wd / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["dataset"] == name and meta["image_shape"] == [32, 32, channels]
    state = runner.load_state(wd, 2)
    assert state["params"]["conv_in"]["kernel"].shape[2] == channels
    assert np.isfinite(state["params"]["conv_out"]["kernel"]).all()
    grid = np.asarray(Image.open(wd / "samples" / "step00000002_ancestral10_seed0_n4.png"))
    assert grid.ndim == (3 if channels == 3 else 2)
