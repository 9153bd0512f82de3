"""Device mesh, parameter-sharding rules and multi-host start-up.

The mesh has two axes:

* `"data"`: pure data parallelism; every device on it holds whole copies of the parameters.
* `"fsdp"`: fully sharded data parallelism (ZeRO-3 style); large parameters, their Adam
  moments and the EMA target are split over it, and each step gathers them as needed.

The batch is split over both axes, so `data * fsdp` devices each see `B / (data * fsdp)`
examples. Which parameters are split is decided by an ordered rule table (big_vision
style): the first regular expression that matches a parameter's '/'-joined path picks its
rule. Shardings are computed from shapes alone, so they work on the `jax.ShapeDtypeStruct`
tree from `jax.eval_shape` before any parameter exists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lcm_jax.errors import LcmJaxError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)

# Rule names a table may use (a `PartitionSpec` may also be given directly).
REPLICATED = "replicated"
FSDP = "fsdp"

# First match wins; regexes are searched (not anchored) in paths such as
# "params/down_blocks_0/resnets_1/conv1/kernel".
DEFAULT_RULES: tuple[tuple[str, str | PartitionSpec], ...] = (
    # Biases, norm scales and embedding tables are small or needed whole by every device.
    (r"(^|/)(bias|scale|embedding)$", REPLICATED),
    # Conv [kh, kw, in, out] and Dense [in, out] kernels hold almost all UNet parameters.
    (r"(^|/)kernel$", FSDP),
    # LoRA adapters (lcm_jax.lora): the whole trained state of a LoRA run, split like kernels.
    (r"(^|/)lora_[AB]$", FSDP),
    (r".*", REPLICATED),
)

# Below this many elements a parameter is replicated whatever its rule: gathering it would
# cost more in latency than the memory saved (2**14 fp32 elements = 64 KiB).
DEFAULT_MIN_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp") mesh over `devices` (default: all devices of every process).

  Args:
    data: size of the data-parallel axis; -1 takes all devices left after `fsdp`.
    fsdp: size of the parameter-sharding axis; -1 takes all devices left after `data`.
    devices: the devices to arrange; their count must be `data * fsdp`.

  Raises:
    LcmJaxError if the sizes are not positive (or -1) or do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {DATA_AXIS: data, FSDP_AXIS: fsdp}
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise LcmJaxError(f"mesh axis {name!r} must be a positive integer or -1, got {size!r}")
  if data == -1 and fsdp == -1:
    raise LcmJaxError("only one of the mesh axes 'data' and 'fsdp' may be -1")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if n % known:
      raise LcmJaxError(f"cannot fill a mesh with {known} devices on one axis: "
                        f"{n} devices are not a multiple of {known}")
    data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
  if data * fsdp != n:
    raise LcmJaxError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                      f"but there are {n}; pass -1 for one axis to use all of them")
  # Auto axes: shardings are hints that XLA's partitioner propagates (GSPMD), so model code
  # stays free of sharding annotations. `jax.make_mesh` orders devices for the topology
  # (ICI neighbours along "fsdp", the faster-communicating inner axis).
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ("data", "fsdp"); [B, ...] with B % devices == 0."""
  return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def path_string(path: Sequence[Any]) -> str:
  """A `jax.tree_util` key path as 'a/b/c' (dict keys, attribute names, list indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def fsdp_partition_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
  """Splits one dimension of `shape` over "fsdp": the last (output channels) if it divides
  evenly, otherwise the largest that does; replicated if none does or fsdp_size is 1."""
  shape = tuple(shape)
  if fsdp_size == 1 or not shape:
    return PartitionSpec()
  last = len(shape) - 1
  # Output channels first: a split there keeps each shard's matmul/conv whole over its input.
  order = [last] + sorted(range(last), key=lambda d: -shape[d])
  for dim in order:
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP_AXIS
      return PartitionSpec(*spec)
  return PartitionSpec()


def partition_spec_for(path: str, shape: Sequence[int], fsdp_size: int,
                       rules: Sequence[tuple[str, str | PartitionSpec]] = DEFAULT_RULES,
                       min_size: int = DEFAULT_MIN_SIZE) -> PartitionSpec:
  """The `PartitionSpec` of one parameter, from the first rule whose regex matches `path`."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  for pattern, rule in rules:
    if re.search(pattern, path):
      if isinstance(rule, PartitionSpec):
        return rule
      if rule == REPLICATED:
        return PartitionSpec()
      if rule == FSDP:
        return fsdp_partition_spec(shape, fsdp_size)
      raise LcmJaxError(f"unknown sharding rule {rule!r} for pattern {pattern!r}; "
                        f"use {REPLICATED!r}, {FSDP!r} or a PartitionSpec")
  # A table without a catch-all leaves the rest replicated rather than failing mid-run.
  return PartitionSpec()


def param_partition_specs(abstract_params: Any, fsdp_size: int,
                          rules: Sequence[tuple[str, str | PartitionSpec]] = DEFAULT_RULES,
                          min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """Tree of `PartitionSpec` shaped like `abstract_params` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: partition_spec_for(path_string(path), np.shape(leaf), fsdp_size,
                                            rules, min_size),
      abstract_params)


def param_shardings(abstract_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str | PartitionSpec]] = DEFAULT_RULES,
                    min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """Tree of `NamedSharding` shaped like `abstract_params`; nothing is materialised."""
  specs = param_partition_specs(abstract_params, mesh.shape[FSDP_AXIS], rules, min_size)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


# ---------------------------------------------------------------------------------------
# Multi-host start-up and input.

def distributed_launch_args(environ: Mapping[str, str]) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize` if `environ` describes a
  multi-process launch, else None.

  Recognised, first match wins:
  * explicit `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`
    (+ optional `JAX_LOCAL_DEVICE_IDS`, "0,1,...": the local devices this process drives);
  * the PyTorch convention (torchrun, Kubernetes PyTorchJob/JobSet): `MASTER_ADDR` +
    `MASTER_PORT` + `WORLD_SIZE` + `RANK` (see `torch_launch_args`);
  * SLURM (`SLURM_JOB_ID` and `SLURM_NTASKS` > 1, e.g. tasks of `srun`); Open MPI's `mpirun`
    (`OMPI_COMM_WORLD_SIZE` > 1); multi-host Cloud TPU and GKE (`TPU_WORKER_HOSTNAMES` /
    `TPU_PROCESS_ADDRESSES` naming several hosts, or `MEGASCALE_COORDINATOR_ADDRESS` for
    multislice). For these managed environments JAX's own cluster detection fills in the
    addresses, so the arguments are empty.

  Raises:
    LcmJaxError if several processes are evident (WORLD_SIZE, LOCAL_WORLD_SIZE, SLURM_NTASKS,
    OMPI_COMM_WORLD_SIZE, PMI_SIZE or JAX_NUM_PROCESSES above 1, RANK or LOCAL_RANK above 0)
    but none of the above says how to join them: each process would otherwise train its own
    copy into one workdir.
  """
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    num, pid = _ints(environ, "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", because="JAX_COORDINATOR_ADDRESS is set")
    if num <= 1:
      return None
    return {"coordinator_address": environ["JAX_COORDINATOR_ADDRESS"], "num_processes": num, "process_id": pid,
            **_local_devices(environ)}
  if environ.get("MASTER_ADDR") and _count(environ, "WORLD_SIZE") > 1:
    return torch_launch_args(environ)
  if "SLURM_JOB_ID" in environ and _count(environ, "SLURM_NTASKS") > 1:
    return {}
  if "OMPI_MCA_orte_hnp_uri" in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return {}
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}
  evident = ([f"{v}={environ[v]}" for v in _PROCESS_COUNT_VARIABLES if _count(environ, v) > 1]
             + [f"{v}={environ[v]}" for v in _PROCESS_RANK_VARIABLES if _count(environ, v, default=0) > 0])
  if evident:
    raise LcmJaxError(f"{evident[0]} says this is one of several processes, but nothing says how to join them "
                      "(no JAX_COORDINATOR_ADDRESS, MASTER_ADDR, SLURM job, mpirun or TPU hosts); set "
                      "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or MASTER_ADDR, "
                      "MASTER_PORT, WORLD_SIZE and RANK")
  return None


# Variables launchers set to the number of processes (on all nodes, or on this one).
_PROCESS_COUNT_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "JAX_NUM_PROCESSES", "SLURM_NTASKS",
                            "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# ... and to this process's rank: above 0, there are others.
_PROCESS_RANK_VARIABLES = ("RANK", "LOCAL_RANK")


def _count(environ: Mapping[str, str], name: str, default: int = 1) -> int:
  """An integer variable, `default` when unset or not an integer."""
  try:
    return int(environ.get(name, str(default)))
  except ValueError:
    return default


def _ints(environ: Mapping[str, str], *names: str, because: str) -> list[int]:
  try:
    return [int(environ[n]) for n in names]
  except (KeyError, ValueError):
    raise LcmJaxError(f"{because}, so {' and '.join(names)} must be set to integers too") from None


def torch_launch_args(environ: Mapping[str, str]) -> dict[str, Any]:
  """`jax.distributed.initialize` arguments from the PyTorch launch convention.

  The coordinator is MASTER_ADDR on MASTER_PORT, or on `JAX_COORDINATOR_PORT` if set; under
  torchrun (TORCHELASTIC_RUN_ID set) torchrun's own store holds MASTER_PORT, so the default
  is MASTER_PORT + 1 there. With several processes on a node (LOCAL_WORLD_SIZE > 1, one per
  GPU) each takes the GPU of its LOCAL_RANK; with one, it takes all of the node's GPUs.
  """
  size, rank, port = _ints(environ, "WORLD_SIZE", "RANK", "MASTER_PORT", because="MASTER_ADDR is set")
  if not 0 <= rank < size:
    raise LcmJaxError(f"RANK={rank} is not in [0, WORLD_SIZE={size})")
  if environ.get("JAX_COORDINATOR_PORT"):
    (port,) = _ints(environ, "JAX_COORDINATOR_PORT", because="JAX_COORDINATOR_PORT is set")
  elif environ.get("TORCHELASTIC_RUN_ID"):
    port += 1
  args = {"coordinator_address": f"{environ['MASTER_ADDR']}:{port}", "num_processes": size, "process_id": rank}
  if _count(environ, "LOCAL_WORLD_SIZE") > 1:
    (local_rank,) = _ints(environ, "LOCAL_RANK", because="LOCAL_WORLD_SIZE is above 1")
    args["local_device_ids"] = [local_rank]
  return {**args, **_local_devices(environ)}


def _local_devices(environ: Mapping[str, str]) -> dict[str, list[int]]:
  """`local_device_ids` from JAX_LOCAL_DEVICE_IDS ("0,1,2,3": the local GPUs this process
  drives), if set. Needed where JAX would pick one: inside a SLURM step it gives each process
  the GPU of its SLURM_LOCALID, even a process meant to drive all GPUs of its node."""
  ids = environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
  if not ids:
    return {}
  try:
    return {"local_device_ids": [int(i) for i in ids.split(",")]}
  except ValueError:
    raise LcmJaxError(f"JAX_LOCAL_DEVICE_IDS={ids!r} is not a comma-separated list of device numbers") from None


def initialize_distributed(environ: Mapping[str, str] | None = None, force: bool = False) -> bool:
  """Calls `jax.distributed.initialize` once when running as one of several processes.

  Must run before anything touches a JAX device. Single-process runs (one host, any number
  of local devices) skip it. On a multi-host Cloud TPU VM whose environment names no hosts,
  pass `force=True` (JAX then reads the TPU metadata server). CPU processes exchange their
  collectives over gloo (JAX's default since 0.5; set here for older versions).

  Returns:
    True if this call initialised the distributed runtime.
  Raises:
    LcmJaxError as `distributed_launch_args`.
  """
  if jax.distributed.is_initialized():
    return False
  args = distributed_launch_args(os.environ if environ is None else environ)
  if args is None and not force:
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**(args or {}))
  return True


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  """Examples each process loads per step: global / process_count (must divide evenly)."""
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise LcmJaxError(f"global batch size {global_batch_size} is not divisible by the "
                      f"{process_count} processes")
  return global_batch_size // process_count


def make_global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """Per-process host batches -> global `jax.Array`s with `sharding` (a tree of arrays).

  Each process passes its own [B / process_count, ...] slice (NumPy); the result is the
  [B, ...] array split over the mesh. With one process the local batch is the global one.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
