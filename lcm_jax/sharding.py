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

  Recognised: explicit `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`;
  SLURM (`SLURM_NTASKS` > 1); Open MPI (`OMPI_COMM_WORLD_SIZE` > 1); multi-host Cloud TPU
  and GKE (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` naming several hosts, or
  `MEGASCALE_COORDINATOR_ADDRESS` for multislice). For the managed environments JAX's own
  cluster detection fills in the addresses, so the arguments are empty.
  """
  def count(name: str) -> int:
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1

  if environ.get("JAX_COORDINATOR_ADDRESS"):
    try:
      num, pid = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise LcmJaxError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and "
                        "JAX_PROCESS_ID must be set to integers too") from e
    return {"coordinator_address": environ["JAX_COORDINATOR_ADDRESS"],
            "num_processes": num, "process_id": pid} if num > 1 else None
  if "SLURM_JOB_ID" in environ and count("SLURM_NTASKS") > 1:
    return {}
  if "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1:
    return {}
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return {}
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}
  return None


def initialize_distributed(environ: Mapping[str, str] | None = None, force: bool = False) -> bool:
  """Calls `jax.distributed.initialize` once when running as one of several processes.

  Must run before anything touches a JAX device. Single-process runs (one host, any number
  of local devices) skip it. On a multi-host Cloud TPU VM whose environment names no hosts,
  pass `force=True` (JAX then reads the TPU metadata server).

  Returns:
    True if this call initialised the distributed runtime.
  """
  if jax.distributed.is_initialized():
    return False
  args = distributed_launch_args(os.environ if environ is None else environ)
  if args is None and not force:
    return False
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
