"""Launching: the environments `lcm_jax.sharding.distributed_launch_args` recognises (and the
ones it refuses), and the scripts in launch/, run with fake `python`, `gcloud`, `sbatch`,
`srun` and `scontrol` that record what they were given.

Each script is run for real against the fakes and with --dry-run: the argument list the
trainer receives must be exactly the one the user gave (no empty argument when there is
none; spaces and quotes intact), and the commands a dry run prints must be the commands the
real run executes (parsed back by bash), without executing anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from lcm_jax.errors import LcmJaxError
from lcm_jax.sharding import distributed_launch_args
from tests.helpers import REPO

LAUNCH = os.path.join(REPO, "launch")
# Extra arguments: none, and ones with spaces, both quotes, a brace pattern, a $ and a backslash.
NO_ARGS: list[str] = []
HARD_ARGS = ["--config.data.path=/data/my laion/{00000..00009}.tar", "--config.sample_prompts=(\"a cat's hat\",)",
             "--config.teacher=$HOME/te\\acher"]
WORKDIR = "/shared/runs/my run"


# ---------------------------------------------------------------------------------------
# Launch environments.

def test_explicit_jax_variables():
  env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed_launch_args(env) == {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}
  assert distributed_launch_args({**env, "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"})["local_device_ids"] == [0, 1, 2, 3]
  assert distributed_launch_args({**env, "JAX_NUM_PROCESSES": "1"}) is None
  with pytest.raises(LcmJaxError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set"):
    distributed_launch_args({"JAX_COORDINATOR_ADDRESS": "h0:1234"})
  with pytest.raises(LcmJaxError, match="JAX_LOCAL_DEVICE_IDS='0;1'"):
    distributed_launch_args({**env, "JAX_LOCAL_DEVICE_IDS": "0;1"})


def test_torchrun_and_kubernetes_variables():
  pytorch_job = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "4", "RANK": "3"}
  assert distributed_launch_args(pytorch_job) == {
      "coordinator_address": "job-master-0:23456", "num_processes": 4, "process_id": 3}
  # torchrun: its own store holds MASTER_PORT; one process per GPU takes the GPU of its local rank.
  torchrun = {**pytorch_job, "TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
  assert distributed_launch_args(torchrun) == {
      "coordinator_address": "job-master-0:23457", "num_processes": 4, "process_id": 3, "local_device_ids": [1]}
  assert distributed_launch_args({**torchrun, "JAX_COORDINATOR_PORT": "40000"})["coordinator_address"] == (
      "job-master-0:40000")
  assert distributed_launch_args({**pytorch_job, "WORLD_SIZE": "1", "RANK": "0"}) is None
  with pytest.raises(LcmJaxError, match="WORLD_SIZE and RANK and MASTER_PORT must be set"):
    distributed_launch_args({"MASTER_ADDR": "h", "WORLD_SIZE": "2", "RANK": "0"})
  with pytest.raises(LcmJaxError, match=r"RANK=4 is not in \[0, WORLD_SIZE=4\)"):
    distributed_launch_args({**pytorch_job, "RANK": "4"})


def test_managed_environments_leave_the_addresses_to_jax():
  assert distributed_launch_args({}) is None
  assert distributed_launch_args({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
  assert distributed_launch_args({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "3"}) == {}
  assert distributed_launch_args({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}) == {}
  assert distributed_launch_args({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert distributed_launch_args({"TPU_WORKER_HOSTNAMES": "h0,h1"}) == {}
  assert distributed_launch_args({"TPU_PROCESS_ADDRESSES": "h0:1,h1:1"}) == {}
  assert distributed_launch_args({"MEGASCALE_COORDINATOR_ADDRESS": "h0"}) == {}


@pytest.mark.parametrize("env", [
    {"WORLD_SIZE": "4", "RANK": "0"},  # torchrun-style without MASTER_ADDR
    {"LOCAL_RANK": "1"},
    {"LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "0"},
    {"RANK": "2"},
    {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},  # without a coordinator
    {"OMPI_COMM_WORLD_SIZE": "4"},  # Open MPI 5 (no orte hnp uri)
    {"PMI_SIZE": "2"},  # MPICH / Intel MPI
    {"SLURM_NTASKS": "2"},  # no job id
])
def test_several_processes_without_a_way_to_join_them_are_refused(env):
  with pytest.raises(LcmJaxError, match="says this is one of several processes, but nothing says how to join"):
    distributed_launch_args(env)


def test_single_process_variables_are_not_refused():
  for env in ({"WORLD_SIZE": "1", "RANK": "0"}, {"LOCAL_RANK": "0"}, {"LOCAL_WORLD_SIZE": "1"}, {"RANK": "x"}):
    assert distributed_launch_args(env) is None, env


@pytest.mark.slow
def test_trainer_refuses_to_start_as_one_of_several_processes_it_cannot_join(tmp_path):
  r = subprocess.run([sys.executable, "-m", "lcm_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path}/w",
                      "--config.teacher=/nonexistent", "--config.data.path=/nonexistent"],
                     cwd=REPO, env={**os.environ, "WORLD_SIZE": "2", "RANK": "1"}, capture_output=True, text=True,
                     timeout=300)
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2 and len(lines) == 1, r.stderr
  assert lines[0].startswith("error: WORLD_SIZE=2 says this is one of several processes"), lines[0]
  assert not os.path.exists(f"{tmp_path}/w")


# ---------------------------------------------------------------------------------------
# The scripts, against fakes.

FAKE = """#!{python}
# A fake {name}: records its arguments, stdin, working folder and launch variables.
import json, os, subprocess, sys, time
record = {{"argv": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: v for k, v in os.environ.items() if k.startswith(("JAX_", "TPU_", "CUDA_", "XLA_", "SLURM_"))}}}}
if "{name}" == "sbatch":
  record["stdin"] = sys.stdin.read()
with open(os.path.join(os.environ["FAKE_OUT"], f"{name}-{{time.monotonic_ns()}}-{{os.getpid()}}.json"), "w") as f:
  json.dump(record, f)
{behaviour}
"""
BEHAVIOUR = {
    "python": "",
    "gcloud": """
if "describe" in sys.argv:
  print("10.0.0.1;10.0.0.2")
elif "ssh" in sys.argv:  # runs the command as a worker would, in its home folder
  command = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--command="))
  sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["HOME"]).returncode)
""",
    "sbatch": 'print("Submitted batch job 1234")',
    "scontrol": 'print("node1\\nnode2")',
    "srun": """
args = sys.argv[1:]
command = args[next(i for i, a in enumerate(args) if not a.startswith("--")):]  # after srun's own options
for task in range(int(os.environ["SLURM_NTASKS"])):
  env = {**os.environ, "SLURM_PROCID": str(task), "SLURM_LOCALID": "0"}
  subprocess.run(command, env=env, check=True)
""",
}


@pytest.fixture
def fakes(tmp_path):
  """(environment with the fakes first on PATH, folder of their records, a worker's home)."""
  bin_dir, out, home = tmp_path / "bin", tmp_path / "records", tmp_path / "home"
  for d in (bin_dir, out, home / "lcm-jax" / ".venv" / "bin"):
    d.mkdir(parents=True)
  for name, behaviour in BEHAVIOUR.items():
    path = bin_dir / name
    path.write_text(FAKE.format(python=sys.executable, name=name, behaviour=behaviour))
    path.chmod(0o755)
  os.symlink(bin_dir / "python", home / "lcm-jax" / ".venv" / "bin" / "python")  # what SETUP=1 would make
  keep = ("LANG", "LC_ALL", "TMPDIR")
  env = {k: os.environ[k] for k in keep if k in os.environ}
  env.update(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_OUT=str(out), HOME=str(home), PYTHON=str(bin_dir / "python"))
  return env, out, home


def records(out, name: str, expect: int, timeout_s: float = 30) -> list[dict]:
  """The fake `name`'s records in the order written (waiting for detached runs)."""
  deadline = time.monotonic() + timeout_s
  while True:
    found = sorted(p for p in os.listdir(out) if p.startswith(name + "-"))
    if len(found) >= expect or time.monotonic() > deadline:
      break
    time.sleep(0.1)
  assert len(found) == expect, (name, found)
  return [json.load(open(os.path.join(out, p))) for p in found]


def launch(script: str, args: list[str], env: dict, dry_run: bool) -> list[list[str]]:
  """Runs launch/<script> (with --dry-run first if asked); returns the commands it printed,
  each parsed back into its words by bash."""
  r = subprocess.run(["bash", os.path.join(LAUNCH, script), *(["--dry-run"] if dry_run else []), *args],
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  commands = [line[2:] for line in r.stderr.splitlines() if line.startswith("+ ")]
  return [shell_words(c.split(" <<'END_OF_INPUT'")[0]) for c in commands]


def shell_words(command: str) -> list[str]:
  """The words bash makes of `command` (no expansion happens in these quoted commands)."""
  r = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, text=True, check=True)
  return r.stdout.split("\0")[:-1]


def trainer_argv(config: str, workdir: str, extra: list[str]) -> list[str]:
  return ["-m", "lcm_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]


@pytest.mark.parametrize("extra", [NO_ARGS, HARD_ARGS], ids=["no_args", "hard_args"])
@pytest.mark.parametrize("script", ["gpu_single.sh", "local_multi_gpu.sh"])
def test_one_machine_scripts(script, extra, fakes):
  env, out, _ = fakes
  env = {**env, "GPUS": "0,1"}
  printed = launch(script, ["configs/sd21_base_512.py", WORKDIR, *extra], env, dry_run=True)
  assert not os.listdir(out)  # a dry run runs nothing
  real = launch(script, ["configs/sd21_base_512.py", WORKDIR, *extra], env, dry_run=False)
  assert printed == real and len(real) == 1
  (ran,) = records(out, "python", 1)
  assert ran["argv"] == trainer_argv("configs/sd21_base_512.py", WORKDIR, extra)
  assert real[0][0] == "env" and real[0][-len(ran["argv"]) - 1:] == [env["PYTHON"], *ran["argv"]]
  assert ran["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
  assert ran["env"]["CUDA_VISIBLE_DEVICES"] == ("0" if script == "gpu_single.sh" else "0,1")


@pytest.mark.parametrize("extra", [NO_ARGS, HARD_ARGS], ids=["no_args", "hard_args"])
def test_tpu_pod(extra, fakes):
  env, out, home = fakes
  env = {**env, "PROJECT": "my-project"}
  args = ["my-v4-32", "us-central2-b", "configs/sd21_768.py", str(home / "shared runs" / "sd"), *extra]
  printed = launch("tpu_pod.sh", args, env, dry_run=True)
  assert not os.listdir(out)
  real = launch("tpu_pod.sh", args, env, dry_run=False)
  gcloud = records(out, "gcloud", 2)
  assert [g["argv"] for g in gcloud] == [r[1:] for r in real]  # printed = executed, word for word
  assert [r[:5] for r in real] == [["gcloud", "compute", "tpus", "tpu-vm", w] for w in ("describe", "ssh")]
  assert "--worker=all" in real[1] and "--project=my-project" in real[1]
  # The dry run cannot know the workers' addresses: the same command with a placeholder.
  assert printed[0] == real[0] and printed[1] == [w.replace("10.0.0.1,10.0.0.2", "WORKER_IPS") for w in real[1]]
  (ran,) = records(out, "python", 1)  # started detached by the worker's shell
  assert ran["argv"] == trainer_argv("configs/sd21_768.py", args[3], extra)
  assert ran["cwd"] == str(home / "lcm-jax") and ran["env"]["TPU_WORKER_HOSTNAMES"] == "10.0.0.1,10.0.0.2"
  assert os.path.isfile(os.path.join(args[3], "logs", f"{socket.gethostname()}.log"))


def test_tpu_pod_setup_installs_the_data_extras(fakes):
  env, out, _ = fakes
  printed = launch("tpu_pod.sh", ["t", "z", "c.py", "/w"],
                   {**env, "SETUP": "1", "REPO_URL": "https://example.com/lcm-jax.git", "HOSTS": "h0,h1"}, dry_run=True)
  assert len(printed) == 2  # setup, then training; HOSTS given, so no describe
  setup = printed[0][-1]
  assert setup.startswith("--command=") and "git clone https://example.com/lcm-jax.git lcm-jax" in setup
  assert "pip install -q -e '.[tpu,gcs]'" in setup
  assert "TPU_WORKER_HOSTNAMES=h0,h1" in printed[1][-1]
  r = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "t", "z", "c.py", "/w"],
                     env={**env, "SETUP": "1"}, capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.strip() == "error: SETUP=1 needs REPO_URL, the repository to clone on every worker"


@pytest.mark.parametrize("per", ["gpu", "node"])
@pytest.mark.parametrize("extra", [NO_ARGS, HARD_ARGS], ids=["no_args", "hard_args"])
def test_gpu_slurm(per, extra, fakes, tmp_path):
  env, out, _ = fakes
  env = {**env, "PER": per, "PARTITION": "gpu", "TIME": "48:00:00"}
  workdir = str(tmp_path / "shared runs" / "sd")
  args = ["2", "4", "configs/sd21_base_512.py", workdir, *extra]
  printed = launch("gpu_slurm.sh", args, env, dry_run=True)
  assert not os.listdir(out)
  real = launch("gpu_slurm.sh", args, env, dry_run=False)
  (job,) = records(out, "sbatch", 1)
  assert printed == real and real[0][1:] == job["argv"]
  assert job["argv"] == ["--job-name=lcm-jax", "--nodes=2", f"--ntasks-per-node={4 if per == 'gpu' else 1}",
                         "--gpus-per-node=4", f"--output={workdir}/logs/%x-%j.log", "--partition=gpu", "--time=48:00:00"]
  # Run the batch script as SLURM would, with 2 tasks (fake srun and scontrol).
  tasks = {**env, "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "2"}
  subprocess.run(["bash", "-c", job["stdin"]], env=tasks, check=True, timeout=60)
  ran = records(out, "python", 2)
  for r in ran:
    assert r["argv"] == trainer_argv("configs/sd21_base_512.py", workdir, extra)
  if per == "node":
    assert sorted(r["env"]["JAX_PROCESS_ID"] for r in ran) == ["0", "1"]
    for r in ran:
      assert r["env"]["JAX_COORDINATOR_ADDRESS"] == f"node1:{1234 % 4096 + 61440}"
      assert r["env"]["JAX_NUM_PROCESSES"] == "2" and r["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  else:  # JAX's SLURM detection does the rest
    assert all("JAX_COORDINATOR_ADDRESS" not in r["env"] for r in ran)


@pytest.mark.parametrize("script, args, message", [
    ("gpu_single.sh", ["c.py"], "usage: launch/gpu_single.sh"),
    ("local_multi_gpu.sh", [], "usage: launch/local_multi_gpu.sh"),
    ("tpu_pod.sh", ["t", "z", "c.py"], "usage: launch/tpu_pod.sh"),
    ("gpu_slurm.sh", ["2", "4", "c.py"], "usage: launch/gpu_slurm.sh"),
    ("gpu_slurm.sh", ["two", "4", "c.py", "/w"], "NODES must be a positive integer, got 'two'"),
    ("gpu_slurm.sh", ["2", "0", "c.py", "/w"], "GPUS_PER_NODE must be a positive integer, got '0'"),
])
def test_bad_arguments_give_one_error_line(script, args, message, fakes):
  env, out, _ = fakes
  r = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args], env=env, capture_output=True,
                     text=True)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: " + message), r.stderr
  r = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_slurm.sh"), "1", "1", "c", "w"], env={**env, "PER": "core"},
                     capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr == "error: PER must be gpu or node, got 'core'\n"
  assert not os.listdir(out)  # nothing ran


def test_scripts_are_executable_and_documented():
  scripts = sorted(f for f in os.listdir(LAUNCH) if f.endswith(".sh") and f != "common.sh")
  assert scripts == ["gpu_single.sh", "gpu_slurm.sh", "local_multi_gpu.sh", "tpu_pod.sh"]
  readme = open(os.path.join(LAUNCH, "README.md")).read()
  for script in scripts:
    assert os.access(os.path.join(LAUNCH, script), os.X_OK), script
    assert f"`{script}`" in readme, script
