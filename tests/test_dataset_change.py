"""Fine-tuning on another dataset, allowed explicitly (issue 16, item 6).

The session's reference checkpoint (digits, step 4) is trained on for 2 more steps on mnist5k (same 8x8x1
images) with `training.allow_dataset_change=True`, through the real command line: the run says so, reads
mnist5k from its start (the digits iterator position is not carried over), and its checkpoint records the
new dataset, so that resuming it needs no flag while going back to digits is refused. (Refusal without
the flag: tests/test_bad_input.py.)
"""
import json
import shutil
import sys

import pytest

import runner

sys.path.insert(0, str(runner.REPO / "configs"))
import test as test_config  # noqa: E402
sys.path.pop(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return runner.session_data_dir(tmp_path_factory)


def test_fine_tune_on_another_dataset_with_the_flag(tmp_path, tmp_path_factory, data_dir):
  from jaxddpm import experiment  # noqa: PLC0415
  ref, r = runner.reference_run(tmp_path_factory)
  assert r.returncode == 0, r.stderr[-3000:]
  wd = tmp_path / "wd"
  shutil.copytree(ref / "checkpoints" / "4", wd / "checkpoints" / "4")
  assert json.loads((wd / "checkpoints" / "4" / "data" / "metadata").read_text()) == runner.iterator_state(4)
  cache = runner.shared_dir(tmp_path_factory, "jax_cache")
  r = runner.run(runner.command(wd, data_dir, "training.num_steps=6", "data.name=mnist5k",
                                "training.allow_dataset_change=True"), runner.env(cache))
  assert r.returncode == 0, r.output[-3000:]
  assert f"resumed from step 4 in {wd} on new data ('mnist5k', split 'train', read from its start)" in r.stdout
  assert runner.checkpoint_steps(wd) == [4, 6]
  step6 = wd / "checkpoints" / "6"
  assert json.loads((step6 / "meta" / "metadata").read_text())["dataset"] == "mnist5k"
  # two batches of mnist5k from its start, not the digits position 4 + 2
  assert json.loads((step6 / "data" / "metadata").read_text()) == runner.iterator_state(2)
  c = test_config.get_config()
  c.data.data_dir, c.data.name = data_dir, "mnist5k"
  experiment.prepare(c, str(wd))  # the newest checkpoint is mnist5k's now: no flag needed
  c.data.name = "digits"
  with pytest.raises(ValueError, match=r"trained on other data: dataset: 'mnist5k' -> 'digits'"):
    experiment.prepare(c, str(wd))
