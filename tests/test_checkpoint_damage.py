"""Each kind of damage to the newest checkpoint gives one line that says what is wrong (issue 16, item 4).

Steps 4 and 8 of the session's reference run are copied, step 8 is damaged, and `restore_latest` (as
sampling calls it: nothing is moved) must return step 4 and print exactly one line naming step 8 and the
file or array. The full training run over a truncated file (moved aside, bitwise equal end) is in
tests/test_resume.py.
"""
import contextlib
import io
import shutil
import sys

import numpy as np
import pytest

import runner

sys.path.insert(0, str(runner.REPO / "configs"))
import test as test_config  # noqa: E402
sys.path.pop(0)


def _delete_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()
  return "missing file state/_METADATA"


def _garble_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"format": 1, "image_sha')
  return "file meta/metadata is not valid JSON"


def _truncate_biggest(step_dir):
  f = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
          key=lambda p: p.stat().st_size)
  size = f.stat().st_size
  with open(f, "r+b") as h:
    h.truncate(size // 2)
  return f"cannot be read: file {f.relative_to(step_dir)} is truncated: bytes ["


@pytest.mark.parametrize("damage", [_delete_metadata, _garble_meta, _truncate_biggest],
                         ids=["deleted_METADATA", "bad_meta_json", "truncated_data_file"])
def test_one_line_per_damaged_step(damage, tmp_path, tmp_path_factory):
  from jaxddpm import checkpoint, experiment, parallel  # noqa: PLC0415
  ref, r = runner.reference_run(tmp_path_factory)
  assert r.returncode == 0, r.stderr[-3000:]
  wd = tmp_path / "wd"
  for step in (4, 8):
    shutil.copytree(ref / "checkpoints" / str(step), wd / "checkpoints" / str(step))
  expected = damage(wd / "checkpoints" / "8")
  c = test_config.get_config()
  c.data.data_dir = runner.session_data_dir(tmp_path_factory)
  _, mesh, _, _, _, _, abstract, _, manager = experiment.prepare(c, str(wd))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    state, _, _ = checkpoint.restore_latest(manager, checkpoint.abstract_like(abstract, parallel.replicated(mesh)))
  assert int(np.asarray(state.step.addressable_data(0))) == 4
  lines = out.getvalue().splitlines()
  assert len(lines) == 1, out.getvalue()
  assert lines[0].startswith(f"WARNING: checkpoint {wd / 'checkpoints' / '8'} is damaged (step 8): "), lines
  assert expected in lines[0], lines
  assert "pytree structure" not in lines[0] and len(lines[0]) < 400, lines[0]
