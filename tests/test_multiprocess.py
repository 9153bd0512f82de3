"""Multi-process training with real processes: two JAX processes on localhost (gloo, 2 CPU
devices each) against one process with 4 devices, all through `python -m lcm_jax.train`.

Four runs of the tiny LCD model on an image folder of 8 records, global batch 4, learning rate
1e-3 and EMA 0.9 (one update moves the weights by ~1e-3, so a skipped or doubled update is
far beyond the 1e-5 bound):

* "single": one process, 4 devices, 3 steps, a checkpoint at every step;
* "pair": two processes, 2 devices each; process 1 (not the one that logs) gets SIGTERM
  before its first step, so both must agree to stop after step 2 and save one checkpoint;
* "resumed": the pair's checkpoint restored in one process with 4 devices, to step 3;
* "lcf": LCF from the single run's workdir on 4 devices (data 2 x fsdp 2): the init UNet is
  restored straight into the mesh's shardings.

The runs go through `python -m tests.test_multiprocess` (the `__main__` below): it runs the
trainer's own `__main__` and records the batches each process trains on (the `on_batch` hook),
and sends the SIGTERM at a fixed step, so the test does not depend on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")
RECORDS, BATCH, STEPS = 8, 4, 3
LR, BOUND = 1e-3, 1e-5
RUN_TIMEOUT_S = 900  # per run; a hung collective fails the test instead of the suite
# Compilation dominates these runs: less LLVM optimisation compiles the tiny step ~30% faster
# (every run uses the same flags, so the comparisons are unaffected).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Launch variables of the test's own environment must not leak into the runs.
LAUNCH_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "MASTER_ADDR", "MASTER_PORT",
                    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID", "SLURM_NTASKS",
                    "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES", "XLA_FLAGS")


def caption(i: int) -> str:
  return f"photo {i}"


def write_images(folder: str) -> str:
  """RECORDS small random PNGs of different sizes, captions "photo 0" ... (all distinct)."""
  from PIL import Image
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    for i in range(RECORDS):
      pixels = (rng.random((18 + 2 * i, 24, 3)) * 255).astype(np.uint8)
      Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
      f.write(json.dumps({"file_name": f"{i}.png", "text": caption(i)}) + "\n")
  return folder


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir: str, flags: list[str], *, devices: int, env: dict | None = None) -> subprocess.Popen:
  """One trainer process (through this module's recording `__main__`) in its own session;
  its output goes to files beside the workdir (a pipe nobody reads could block it)."""
  base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
  base.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}", JAX_PLATFORMS="cpu",
              LCM_TEST_RECORDS=workdir + "_records", **(env or {}))
  command = [sys.executable, "-m", "tests.test_multiprocess", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
             *flags]
  name = f"{workdir}_{base.get('JAX_PROCESS_ID', '0')}_{time.monotonic_ns()}"
  with open(name + ".out", "w") as stdout, open(name + ".err", "w") as stderr:
    proc = subprocess.Popen(command, cwd=REPO, env=base, stdout=stdout, stderr=stderr, start_new_session=True)
  proc.output_files = (name + ".out", name + ".err")
  return proc


def finish(procs: list[subprocess.Popen], timeout_s: float = RUN_TIMEOUT_S) -> list[dict]:
  """Waits for every process, killing all of them at the deadline or on any error, and
  returns per process: returncode, stdout, stderr and when it exited."""
  deadline = time.monotonic() + timeout_s
  exited = [None] * len(procs)
  try:
    while None in exited:
      for i, p in enumerate(procs):
        if exited[i] is None and p.poll() is not None:
          exited[i] = time.monotonic()
      if time.monotonic() > deadline:
        pytest.fail(f"the run did not finish in {timeout_s}s")
      time.sleep(0.2)
  finally:
    for p in procs:  # reaped on every path; anything still running is killed with its children
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  results = []
  for p, t in zip(procs, exited):
    with open(p.output_files[0]) as out, open(p.output_files[1]) as err:
      results.append({"returncode": p.returncode, "stdout": out.read(), "stderr": err.read(), "exited": t})
  return results


def succeeded(result: dict) -> str:
  assert result["returncode"] == 0, result["stderr"][-3000:]
  return result["stdout"]


def read_records(workdir: str, process: int) -> list[tuple[int, list[str]]]:
  """(step, captions of the process's batch) for every step it trained, in order."""
  with open(f"{workdir}_records.{process}") as f:
    return [(r["step"], r["captions"]) for r in map(json.loads, f)]


def unet(workdir: str, which: str, step: int):
  from lcm_jax import workdir as workdir_lib
  return workdir_lib.load_unet(workdir, which, step)[1]


def max_difference(a, b) -> float:
  import jax
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def compilation_cache(request, root) -> str:
  """JAX's persistent compilation cache for these runs, kept between test sessions in pytest's
  cache folder (entries are keyed by the program, flags and JAX version), so that a second
  session compiles only what a cache cannot give: process 1 of the pair (JAX writes and keys
  entries per process, and only process 0 writes)."""
  cache = getattr(request.config, "cache", None)
  return str(cache.mkdir("lcm_jax_multiprocess_jax_cache") if cache is not None else root / "jax_cache")


@pytest.fixture(scope="module")
def runs(request, tiny_pipeline, tmp_path_factory):
  """The four runs (module docstring); returns their workdirs and process results."""
  root = tmp_path_factory.mktemp("multiprocess")
  teacher = tiny_pipeline("sd1")
  flags = [f"--config.teacher={teacher}", f"--config.data.path={write_images(str(root / 'images'))}",
           f"--config.compilation_cache_dir={compilation_cache(request, root)}", f"--config.batch_size={BATCH}",
           f"--config.num_train_steps={STEPS}", f"--config.optimizer.lr={LR}", "--config.ema_decay=0.9",
           "--config.log_every=100", "--config.keep_checkpoints=10"]
  out = {name: str(root / name) for name in ("single", "pair", "lcf")}
  started = time.perf_counter()
  out["single_run"] = finish([start(out["single"], flags + ["--config.checkpoint_every=1"], devices=4)])[0]
  succeeded(out["single_run"])
  port = free_port()
  pair = [start(out["pair"], flags + ["--config.checkpoint_every=100"], devices=2,
                env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                     "JAX_PROCESS_ID": str(p), **({"LCM_TEST_SIGTERM_AT_STEP": "0"} if p == 1 else {})})
          for p in range(2)]
  out["pair_run"] = finish(pair)
  out["pair_checkpoints"] = checkpoint_steps(out["pair"])
  out["pair_records"] = [read_records(out["pair"], p) for p in range(2) if os.path.exists(f"{out['pair']}_records.{p}")]
  if out["pair_checkpoints"]:  # else nothing to resume: the pair's test says why
    out["resumed_run"] = finish([start(out["pair"], flags + ["--config.checkpoint_every=100"], devices=4)])[0]
  lcf = [f for f in flags if not f.startswith("--config.teacher=")]
  out["lcf_run"] = finish([start(out["lcf"], lcf + ["--config.mode=lcf", "--config.teacher=",
                                                     f"--config.init_from={out['single']}", "--config.num_train_steps=2",
                                                     "--config.mesh.data=2", "--config.mesh.fsdp=2"], devices=4)])[0]
  print(f"multi-process runs in {time.perf_counter() - started:.1f}s")
  return out


def checkpoint_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if os.path.isdir(folder) else []


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs):
  p0, p1 = runs["pair_run"]
  out0, out1 = succeeded(p0), succeeded(p1)
  assert "received SIGTERM" in out1 and "received SIGTERM" not in out0  # only process 1 was signalled
  assert "stopped at step 2 with a checkpoint" in out0  # process 0 logs for both
  assert abs(p0["exited"] - p1["exited"]) < 60, "one process outlived the other"
  # Both trained steps 1 and 2 only, and saved their data position at step 2: one checkpoint.
  assert [[s for s, _ in records] for records in runs["pair_records"]] == [[0, 1], [0, 1]]
  assert runs["pair_checkpoints"] == [2]
  data_files = os.listdir(os.path.join(runs["pair"], "checkpoints", "2", "data"))
  assert sorted(f for f in data_files if f.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_two_processes_train_like_one_process_with_four_devices(runs):
  for which in ("online", "ema"):
    assert max_difference(unet(runs["pair"], which, 2), unet(runs["single"], which, 2)) <= BOUND, which
  # The bound is tight: one update moves the weights by far more than it.
  assert max_difference(unet(runs["single"], "online", 2), unet(runs["single"], "online", 1)) > 50 * BOUND


def test_processes_read_disjoint_slices_of_the_same_global_batches(runs):
  """Process p reads the p-th half of every global batch of the one-process run: two steps of
  batch 4 are one epoch of the 8 records, each read once."""
  single, halves = read_records(runs["single"], 0), runs["pair_records"]
  read = []
  for step in range(2):
    assert halves[0][step][1] + halves[1][step][1] == single[step][1], step
    read += halves[0][step][1] + halves[1][step][1]
  assert sorted(read) == sorted(caption(i) for i in range(RECORDS))
  assert single[0][1] != single[1][1]


def test_the_two_process_checkpoint_continues_in_one_process(runs):
  assert "resumed_run" in runs, "the pair left no checkpoint"
  out = succeeded(runs["resumed_run"])
  assert re.search(r"^resumed .*at step 2", out, re.MULTILINE), out
  assert checkpoint_steps(runs["pair"]) == [2, 3]
  for which in ("online", "ema"):
    assert max_difference(unet(runs["pair"], which, 3), unet(runs["single"], which, 3)) <= BOUND, which
  # The one process trained on global batch 2, where the pair's data position stood.
  assert read_records(runs["pair"], 0)[-1] == read_records(runs["single"], 0)[2]


def test_lcf_from_a_workdir_on_four_devices(runs):
  """The student starts from the workdir's EMA UNet, sharded over the mesh: two Adam steps of
  lr 1e-3 move no weight by more than ~2e-3 from it (another start would be far off)."""
  succeeded(runs["lcf_run"])
  assert checkpoint_steps(runs["lcf"]) == [2]
  start_params = unet(runs["single"], "ema", 3)
  moved = max_difference(unet(runs["lcf"], "online", 2), start_params)
  assert 0 < moved <= 3 * LR, moved


# ---------------------------------------------------------------------------------------
# The recording trainer the runs above start.

def record_batches(path_prefix: str, tokenizer_dir: str, sigterm_at: int | None):
  """An `on_batch` hook: appends {step, captions of the batch} to `path_prefix.<process>`;
  sends this process SIGTERM before the step `sigterm_at` (a preemption at a known point)."""
  import jax

  from lcm_jax.tokenizer import load_tokenizer, tokenize
  names = [caption(i) for i in range(RECORDS)]
  lookup = {tuple(row): name for row, name in zip(tokenize(load_tokenizer(tokenizer_dir), names).tolist(), names)}

  def on_batch(step: int, batch) -> None:
    captions = [lookup[tuple(row)] for row in np.asarray(batch["input_ids"]).tolist()]
    with open(f"{path_prefix}.{jax.process_index()}", "a") as f:  # jax is initialised by now
      f.write(json.dumps({"step": step, "captions": captions}) + "\n")
    if step == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)

  return on_batch


def main() -> None:
  """`python -m lcm_jax.train` with the recording hook (LCM_TEST_RECORDS, LCM_TEST_SIGTERM_AT_STEP)."""
  import runpy

  from lcm_jax import training
  flag = lambda name: next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--config.{name}=")), "")
  tokenizer_dir = os.path.join(flag("teacher") or os.path.join(flag("init_from"), "model"), "tokenizer")
  sigterm_at = os.environ.get("LCM_TEST_SIGTERM_AT_STEP")
  on_batch = record_batches(os.environ["LCM_TEST_RECORDS"], tokenizer_dir,
                            None if sigterm_at is None else int(sigterm_at))
  train = training.train
  training.train = lambda config, workdir, **kwargs: train(config, workdir, on_batch=on_batch, **kwargs)
  sys.argv[0] = "lcm_jax.train"
  runpy.run_module("lcm_jax.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
