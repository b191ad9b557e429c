"""Converting an untrusted .pth file never runs code from it (issue 16, item 1).

Each crafted file holds a pickle whose `__reduce__` would create a marker file (through os.system,
builtins.open or subprocess) if it were unpickled with plain `pickle.load`. The pickle sits at every
position the two formats have: the zip archive's data.pkl, and each of the five pickles of the legacy
stream (magic number, protocol, sys info, the object, the storage keys). The converter must refuse each
file in one `error:` line with exit code 2, create no marker and write no output.
"""
import builtins
import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile

import pytest

from jaxddpm.metrics import convert

import runner

MAGIC, PROTOCOL = 0x1950a86a20f9469cfc6c, 1001
SYS_INFO = {"protocol_version": PROTOCOL, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


class Evil:
  """Unpickled by plain pickle, this calls fn(*args): the marker file appears."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def payloads(marker):
  return {
      "os.system": Evil(os.system, f"touch {marker}"),
      "builtins.open": Evil(builtins.open, str(marker), "w"),
      "subprocess": Evil(subprocess.call, ["touch", str(marker)]),
  }


def legacy_stream(position: int, evil) -> bytes:
  """A legacy torch file whose pickle number `position` (0..4) is replaced by `evil`."""
  parts = [MAGIC, PROTOCOL, SYS_INFO, collections.OrderedDict(w=1), []]
  parts[position] = evil
  buf = io.BytesIO()
  for p in parts:
    pickle.dump(p, buf, protocol=2)
  return buf.getvalue()


def zip_file(path, evil):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(collections.OrderedDict(w=evil), protocol=2))
    z.writestr("archive/byteorder", "little")


CASES = [(f"legacy{pos}", name) for pos in range(5) for name in ("os.system", "builtins.open", "subprocess")]
CASES += [("zip", name) for name in ("os.system", "builtins.open", "subprocess")]


@pytest.mark.parametrize("where,payload", CASES, ids=[f"{w}-{p}" for w, p in CASES])
def test_crafted_file_is_refused_and_runs_nothing(where, payload, tmp_path, capsys):
  marker, src, dst = tmp_path / "pwned", tmp_path / "weights.pth", tmp_path / "out.npz"
  evil = payloads(marker)[payload]
  if where == "zip":
    zip_file(src, evil)
  else:
    src.write_bytes(legacy_stream(int(where[-1]), evil))
  with pytest.raises(convert.Refused, match="refusing to load global"):
    convert.read_torch_state_dict(src)
  assert convert.main([str(src), str(dst)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "refus" in err and str(src) in err, err
  assert not marker.exists() and not dst.exists()


def test_refused_through_the_command_line(tmp_path):
  """The real `python -m jaxddpm.metrics.convert`: exit 2, one line, no traceback, no marker, no output."""
  marker, src, dst = tmp_path / "pwned", tmp_path / "weights.pth", tmp_path / "out.npz"
  src.write_bytes(legacy_stream(0, payloads(marker)["os.system"]))  # the pickle that used to be plain
  r = subprocess.run([sys.executable, "-m", "jaxddpm.metrics.convert", str(src), str(dst)], capture_output=True,
                     text=True, timeout=120, env=runner.env(tmp_path / "cache"))
  assert r.returncode == 2, r.stderr
  assert r.stdout == "" and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
  assert "refusing to load global posix.system" in r.stderr, r.stderr
  assert not marker.exists() and not dst.exists()


def test_malformed_files_are_one_line_errors(tmp_path, capsys):
  """Garbage, a truncated stream and a key list naming no storage: ValueError, exit 2, one line."""
  good_header = b"".join(pickle.dumps(p, protocol=2) for p in (MAGIC, PROTOCOL, SYS_INFO))
  files = {
      "garbage": b"\x00\xff not a pickle",
      "truncated": good_header[:-3],
      "unknown_key": good_header + pickle.dumps({}, protocol=2) + pickle.dumps(["nope"], protocol=2),
      "keys_not_a_list": good_header + pickle.dumps({}, protocol=2) + pickle.dumps(7, protocol=2),
  }
  for name, raw in files.items():
    src = tmp_path / f"{name}.pth"
    src.write_bytes(raw)
    with pytest.raises(ValueError, match=str(src)):
      convert.read_torch_state_dict(src)
    assert convert.main([str(src), str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(src) in err, (name, err)
