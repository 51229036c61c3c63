"""The device mesh of a run and the shardings every task shares.

A run's mesh has two axes, ``data`` and ``fsdp``. Batches are split over
both (the ``fsdp`` devices are data-parallel too, as in ZeRO-3 / FSDP);
parameters stay replicated unless a task splits them over ``fsdp``
(data2vec pretraining does, with ``config.mesh.fsdp > 1``). Runs without an
``fsdp`` field get a size-1 axis, which changes nothing in the program.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")


def make_mesh(config: ml_collections.ConfigDict, split: int) -> Mesh:
  """The (``data``, ``fsdp``) mesh of ``config.mesh``.

  Args:
    config: a run config; ``config.mesh.data`` devices on the data axis
      (-1 = all there are, divided by ``fsdp``), ``config.mesh.fsdp``
      (default 1) on the other.
    split: the size of the leading axis every batch has (the batch size,
      or MTAG's graph shards); it must divide over all the mesh's devices.

  Returns:
    A mesh over the first ``data * fsdp`` devices, with Auto axes (Linen
    dropout breaks under Explicit axes in jax 0.10).

  Raises:
    ValueError: naming the config field, for a layout that asks for more
      devices than exist or that does not divide `split`.
  """
  devices = jax.devices()
  fsdp = int(config.mesh.get("fsdp", 1))
  if fsdp < 1:
    raise ValueError(f"config.mesh.fsdp={fsdp} must be at least 1")
  data = config.mesh.data
  if data == -1:
    data = len(devices) // fsdp
  if data < 1 or data * fsdp > len(devices):
    raise ValueError(
      f"config.mesh.data={config.mesh.data} x config.mesh.fsdp={fsdp} asks "
      f"for more devices than the {len(devices)} there are"
    )
  count = data * fsdp
  if split % count:
    raise ValueError(
      f"config.train.batch_size={split} is not divisible by the {count} "
      f"devices that split it (config.mesh.data={data} x "
      f"config.mesh.fsdp={fsdp})"
    )
  return jax.make_mesh(
    (data, fsdp),
    AXES,
    axis_types=(AxisType.Auto,) * 2,
    devices=devices[:count],
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """One whole copy on every device (states that are not split)."""
  return NamedSharding(mesh, PartitionSpec())


def abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with the shardings of `tree`'s arrays.

  The target a checkpoint restores into: every restored array comes back
  laid out like the one it replaces.
  """
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    tree,
  )
