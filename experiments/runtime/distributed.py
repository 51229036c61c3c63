"""Multi-process runs: starting `jax.distributed` and assembling batches.

One process runs per host. `maybe_initialize_distributed` starts JAX's
distributed runtime when the environment describes a cluster (and does
nothing on one machine). Batches are sharded on their leading axis over the
`data` devices; each process holds a contiguous block of rows
(`process_rows`) and `jax.make_array_from_process_local_data` joins the
blocks into one global array: `from_process_rows` when each process built
only its rows, `from_global` when every process built the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding


def maybe_initialize_distributed(
  environ: Mapping[str, str] | None = None,
) -> bool:
  """Starts multi-process JAX when the environment describes a cluster.

  Asks for it: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``, which are passed on when set), a Slurm step or an
  Open MPI launch of more than one task, or a Cloud TPU slice of several
  hosts. JAX's own cluster detection fills in what is not given. Call it
  before anything else touches the devices.

  Args:
    environ: the environment to read; `os.environ` by default.

  Returns:
    Whether `jax.distributed.initialize` was called.
  """
  env = os.environ if environ is None else environ
  if jax.distributed.is_initialized():
    return False
  many = lambda name: int(env.get(name, "1") or "1") > 1
  asked = (
    "JAX_COORDINATOR_ADDRESS" in env
    or many("SLURM_NTASKS")
    or many("OMPI_COMM_WORLD_SIZE")
    or "," in env.get("TPU_WORKER_HOSTNAMES", "")
  )
  if not asked:
    return False
  kwargs = {}
  if "JAX_NUM_PROCESSES" in env:
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in env:
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d", jax.process_index(), jax.process_count())
  return True


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """The rows ``(lo, hi)`` of the global batch this process's devices hold."""
  slices = sharding.addressable_devices_indices_map((batch_size,)).values()
  starts = [s[0].start or 0 for s in slices]
  stops = [batch_size if s[0].stop is None else s[0].stop for s in slices]
  lo, hi = min(starts), max(stops)
  if sum(b - a for a, b in set(zip(starts, stops, strict=True))) != hi - lo:
    raise ValueError(
      "this process's devices do not hold one contiguous block of the batch"
    )
  return lo, hi


def from_process_rows(
  local: Any, sharding: NamedSharding, global_size: int
) -> Any:
  """Global arrays from the rows `process_rows` names, built by each process.

  Args:
    local: a pytree of numpy arrays whose leading axis holds this process's
      rows of the global batch.
    sharding: the batch sharding (leading axis over the data devices).
    global_size: the global batch's leading size.

  Returns:
    The same pytree of global `jax.Array`s.
  """
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, x, (global_size,) + np.shape(x)[1:]
    ),
    local,
  )


def from_global(batch: Any, sharding: NamedSharding) -> Any:
  """Global arrays from a batch that every process built whole.

  Each process hands over only the rows its devices hold, so no host copies
  more than its share to its devices.
  """
  leaves = jax.tree.leaves(batch)
  size = np.shape(leaves[0])[0]
  lo, hi = process_rows(sharding, size)
  local = jax.tree.map(lambda x: np.asarray(x)[lo:hi], batch)
  return from_process_rows(local, sharding, size)


class ProcessRows(NamedTuple):
  """A batch of which this process built only its own rows.

  Its leading axis holds the rows `process_rows` names; `place` joins the
  processes' slices into global arrays. A plain pytree is a batch every
  process built whole.
  """

  rows: Any
  global_size: int


def place(batch: Any, sharding: NamedSharding) -> Any:
  """A host batch (whole, or `ProcessRows`) as global arrays on `sharding`."""
  if isinstance(batch, ProcessRows):
    return from_process_rows(batch.rows, sharding, batch.global_size)
  return from_global(batch, sharding)
