r"""The paper's ablations at toy scale: Figure 4 (guidance scale) and Figure 3 (solver x skipping step).

    python -m lcm_jax.toy.ablations --figure 4 --lcm workdirs/toy --output docs/toy/figure4
    python -m lcm_jax.toy.ablations --figure 3 --output docs/toy/figure3 --workdir_root workdirs/fig3 \
        --solvers ddim,dpm_solver,dpm_solver_pp --skipping_steps 1,5,20,50 --train_steps 600 --eval_every 200

Figure 4: one trained LCM (w-conditioned), sampled at every w in --omegas and every step count
in --steps from the same initial noise; FID and text alignment (`lcm_jax.toy.metrics`) of each
cell, on --num_samples prompts of the teacher's colours. Writes figure4.json (every number)
and figure4.png (FID and alignment against w, one line per step count).

Figure 3: for each (solver, k) trains the toy LCM (`configs/toy.py`, overriding
`loss.solver`, `loss.skipping_step` and the run's length, a checkpoint every --eval_every
steps) and scores its 4-step samples (EMA target) at every checkpoint. Runs that exist are
resumed, cells that exist are read from the cache, so an interrupted figure resumes.
--train_jobs N trains N runs at a time (each a subprocess; the runs are scored in order as
they finish). The toy step is small and mostly single-threaded on a CPU: on 2 cores two runs
at once go about 1.8x as fast as one after the other. Writes
figure3.json and figure3.png (4-step FID against training steps, one panel per k, one line
per solver).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags, logging

from lcm_jax import cli
from lcm_jax.errors import LcmJaxError
from lcm_jax.toy import METRIC_DIR, TEACHER_DIR, display_path

FLAGS = flags.FLAGS
SOLVER_NAMES = {"ddim": "DDIM", "dpm_solver": "DPM-Solver", "dpm_solver_pp": "DPM-Solver++"}


def define_flags() -> None:
  flags.DEFINE_enum("figure", None, ["3", "4"], "Which figure.")
  flags.DEFINE_string("output", None, "Folder for figure<N>.json and figure<N>.png.")
  flags.DEFINE_string("lcm", "workdirs/toy", "Figure 4: the LCM (a workdir or an LCM pipeline folder).")
  flags.DEFINE_integer("lcm_step", None, "Figure 4: with a workdir --lcm, the checkpoint step (default: the latest).")
  flags.DEFINE_list("omegas", ["1", "2", "4", "6", "8", "10", "14"], "Figure 4: the paper's guidance weights w.")
  flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Figure 4: LCM step counts.")
  flags.DEFINE_integer("num_samples", 1000, "Prompts per cell (one image each).")
  flags.DEFINE_string("workdir_root", "workdirs/fig3", "Figure 3: folder of the training runs.")
  flags.DEFINE_list("solvers", ["ddim", "dpm_solver", "dpm_solver_pp"], "Figure 3: augmented PF-ODE solvers.")
  flags.DEFINE_list("skipping_steps", ["1", "5", "20", "50"], "Figure 3: skipping steps k.")
  flags.DEFINE_integer("train_steps", 600, "Figure 3: training steps of each run.")
  flags.DEFINE_integer("train_jobs", 1, "Figure 3: training runs at a time (subprocesses).")
  flags.DEFINE_integer("eval_every", 200, "Figure 3: score a checkpoint every this many steps.")
  flags.DEFINE_integer("eval_steps", 4, "Figure 3: LCM steps of the scored samples.")
  flags.DEFINE_float("guidance_scale", 9.0, "Figure 3: g = 1 + w of the scored samples (paper: w = 8).")
  flags.DEFINE_list("train_flag", [], "Figure 3: more --config.* flags for every training run.")
  flags.DEFINE_integer("seed", 0, "Seed of the initial latents (image i: (seed, i)).")
  flags.DEFINE_integer("prompt_seed", 1234, "Seed of the prompt set.")
  flags.DEFINE_string("cache_dir", None, "Folder of the cached cells (default: <output>/cells).")


def _evaluation(num_samples: int, cache_dir: str):
  from lcm_jax.eval.table import Evaluation
  from lcm_jax.toy import domain
  from lcm_jax.toy.metrics import make_toy_metrics
  attrs = domain.prompt_set(num_samples, FLAGS.prompt_seed, colours=domain.TRAIN_COLOURS)
  metrics = make_toy_metrics(attrs, METRIC_DIR)
  return Evaluation([a.caption for a in attrs], metrics, cache_dir, batch_size=250, score_batch=500, progress=False)


def _scores(result: dict) -> dict:
  s = result["scores"]
  return {"fid": float(s["fid"]), "alignment": float(s["alignment"])}


def figure4(output: str) -> dict:
  from lcm_jax import figures
  from lcm_jax.eval.table import Cell, SamplerSource
  from lcm_jax.evaluate import build_models
  omegas = [float(w) for w in FLAGS.omegas]
  steps = [int(k) for k in FLAGS.steps]
  model = build_models(None, FLAGS.lcm, lcm_step=FLAGS.lcm_step)["lcm"]
  evaluation = _evaluation(FLAGS.num_samples, FLAGS.cache_dir or os.path.join(output, "cells"))
  cells = [Cell(f"lcm_w{w:g}_{k}", f"w={w:g}", k, SamplerSource(model, "lcm", k, guidance_scale=w + 1.0,
                                                                 seed=FLAGS.seed))
           for w in omegas for k in steps]
  start = time.perf_counter()
  results = evaluation.run(cells, lambda cell, r: print(f"[figure4] {cell.row} {cell.steps} steps: {_scores(r)}",
                                                         flush=True))
  table = {f"{w:g}": {str(k): _scores(results[f"lcm_w{w:g}_{k}"]) for k in steps} for w in omegas}
  record = {"figure": 4, "lcm": FLAGS.lcm, "lcm_step": model.identity.get("step"), "num_samples": FLAGS.num_samples, "omegas": omegas, "steps": steps,
            "seed": FLAGS.seed, "prompt_seed": FLAGS.prompt_seed, "results": table,
            "seconds": round(time.perf_counter() - start, 1),
            "command": "python -m lcm_jax.toy.ablations " + " ".join(sys.argv[1:])}
  # x = w (log2 axis); one line per step count. (w enters the axis as an int label.)
  by_steps = lambda key: {f"{k} steps": {int(w): table[f"{w:g}"][str(k)][key] for w in omegas} for k in steps}
  image = figures.line_plot([("toy FID vs w (lower is better)", by_steps("fid")),
                             ("text alignment vs w (higher is better)", by_steps("alignment"))],
                            x_label="guidance weight w", log_y=(True, False))
  _write(output, "figure4", record, image)
  return record


def _train(workdir: str, solver: str, k: int) -> float | None:
  """Trains (or resumes) one Figure 3 run in a subprocess (`python -m lcm_jax.train`); its
  minutes, or None for a run already finished (its time is in its own train.log)."""
  from lcm_jax import workdir as workdir_lib
  if workdir_lib.is_workdir(workdir) and (workdir_lib.latest_step(workdir) or 0) >= FLAGS.train_steps:
    return None
  command = [sys.executable, "-m", "lcm_jax.train", "--config=configs/toy.py", f"--workdir={workdir}",
             f"--config.teacher={display_path(TEACHER_DIR)}", f"--config.loss.solver={solver}",
             f"--config.loss.skipping_step={k}", f"--config.num_train_steps={FLAGS.train_steps}",
             f"--config.checkpoint_every={FLAGS.eval_every}",
             f"--config.keep_checkpoints={FLAGS.train_steps // FLAGS.eval_every + 1}",
             "--config.sample_every=0", *FLAGS.train_flag]
  print(f"[figure3] {' '.join(command[1:])}", flush=True)
  start = time.perf_counter()
  log = workdir + ".log" if FLAGS.train_jobs > 1 else None
  if log:  # runs side by side: each run's progress to its own file, not interleaved
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    print(f"[figure3] its output: {log}", flush=True)
    with open(log, "a") as out:  # a resumed run appends
      result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
  else:
    result = subprocess.run(command)
  if result.returncode:
    raise LcmJaxError(f"training {workdir} failed (exit {result.returncode})" + (f"; see {log}" if log else ""))
  minutes = (time.perf_counter() - start) / 60
  print(f"[figure3] trained {workdir} in {minutes:.1f} min", flush=True)
  return minutes


def figure3(output: str) -> dict:
  from lcm_jax import figures
  from lcm_jax.eval.table import Cell, SamplerSource
  from lcm_jax.evaluate import build_models
  solvers, ks = list(FLAGS.solvers), [int(k) for k in FLAGS.skipping_steps]
  unknown = [s for s in solvers if s not in SOLVER_NAMES]
  if unknown:
    raise LcmJaxError(f"unknown --solvers {unknown}; choose from {', '.join(SOLVER_NAMES)}")
  if FLAGS.train_steps % FLAGS.eval_every:
    raise LcmJaxError("--train_steps must be a multiple of --eval_every")
  if FLAGS.train_jobs < 1:
    raise LcmJaxError(f"--train_jobs must be >= 1, got {FLAGS.train_jobs}")
  evaluation = _evaluation(FLAGS.num_samples, FLAGS.cache_dir or os.path.join(output, "cells"))
  path = os.path.join(output, "figure3.json")
  record = {"figure": 3, "train_steps": FLAGS.train_steps, "eval_every": FLAGS.eval_every,
            "eval_steps": FLAGS.eval_steps, "guidance_scale": FLAGS.guidance_scale, "num_samples": FLAGS.num_samples,
            "train_flags": list(FLAGS.train_flag), "results": {}, "train_minutes": {},
            "command": "python -m lcm_jax.toy.ablations " + " ".join(sys.argv[1:])}
  checkpoints = list(range(FLAGS.eval_every, FLAGS.train_steps + 1, FLAGS.eval_every))
  runs = [(f"{solver}_k{k}", solver, k) for k in ks for solver in solvers]
  pool = concurrent.futures.ThreadPoolExecutor(FLAGS.train_jobs)
  trained = {name: pool.submit(_train, os.path.join(FLAGS.workdir_root, name), solver, k)
             for name, solver, k in runs}
  for name, solver, k in runs:
    workdir = os.path.join(FLAGS.workdir_root, name)
    try:
      minutes = trained[name].result()
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise
    if minutes is not None:
      record["train_minutes"][name] = round(minutes, 2)
    models = {step: build_models(None, workdir, lcm_step=step)["lcm"] for step in checkpoints}
    cells = [Cell(f"{name}_step{step}", name, step, SamplerSource(models[step], "lcm", FLAGS.eval_steps,
                                                                   guidance_scale=FLAGS.guidance_scale,
                                                                   seed=FLAGS.seed))
             for step in checkpoints]
    results = evaluation.run(cells)
    record["results"][name] = {str(step): _scores(results[f"{name}_step{step}"]) for step in checkpoints}
    print(f"[figure3] {name}: {record['results'][name]}", flush=True)
    os.makedirs(output, exist_ok=True)
    with open(path, "w") as f:  # after every run, so a partial figure is on disk
      json.dump(record, f, indent=2)
  pool.shutdown()
  panels = []
  for k in ks:
    data = {SOLVER_NAMES[s]: {int(step): v["fid"] for step, v in record["results"].get(f"{s}_k{k}", {}).items()}
            for s in solvers}
    panels.append((f"k = {k}: {FLAGS.eval_steps}-step FID", {n: d for n, d in data.items() if d}))
  image = figures.line_plot(panels, x_label="training iterations", log_y=[True] * len(panels))
  _write(output, "figure3", record, image)
  return record


def _write(output: str, name: str, record: dict, image: np.ndarray) -> None:
  from lcm_jax import figures
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, f"{name}.json"), "w") as f:
    json.dump(record, f, indent=2)
  figures.save_png(os.path.join(output, f"{name}.png"), image)
  print(f"[ablations] wrote {output}/{name}.json and {name}.png", flush=True)


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.output is None or FLAGS.figure is None:
    raise LcmJaxError("--figure and --output are required")
  (figure4 if FLAGS.figure == "4" else figure3)(FLAGS.output)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
