"""The node-block layout of the `dense` backend (host numpy).

`mtagjax.batching.GraphBatcher(config, layout="dense")` builds the segment
layout's shards first (real edges only) and turns them into a `DenseBatch`
here: each shard's graphs are sorted by size into groups of slots, every
graph of a group padded to the group's node budget `N`, with an `[N, N]`
table of edge types indexed `[receiver, sender]` and the index each edge has
in the segment layout (the tie order of pruning, and the map back to edge
lists: `to_edge_list`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jraph
import numpy as np


class DenseGroup(NamedTuple):
  """Graphs of similar size, each padded to one node block of `N` rows.

  Every leaf has leading axes `[S, B]` (shards, graph slots of the group).
  Inside a block, a graph's nodes are in the sample's local order (modality
  after modality, time order within each), the order `graph.build_edges`
  numbers them in; padding rows come last.

  Attributes:
    rows: `[S, B, N]` row of each block node in the flat node arrays of
      `DenseBatch.graph.nodes` and `features` (0 on padding).
    node_mask: `[S, B, N]` real nodes.
    graph: `[S, B]` graph index of each slot (the padding graph for empty
      slots).
    edge_type: `[S, B, N, N]` int8 (int16 past 127 types) type of the edge
      receiver <- sender, indexed `[receiver, sender]`; -1 where none.
    edge_id: `[S, B, N, N]` int32 index of that edge in the segment layout,
      counted over all shards (shard-major); -1 where none. It is the tie
      order of pruning and maps dense values back to edge lists.
  """

  rows: np.ndarray
  node_mask: np.ndarray
  graph: np.ndarray
  edge_type: np.ndarray
  edge_id: np.ndarray


class DenseBatch(NamedTuple):
  """A `Batch` in the layout of the `dense` backend (`mtagjax.dense`).

  Attributes:
    graph: as `Batch.graph` without edge arrays (`edges`, `senders`,
      `receivers` are None): nodes in the flat modality-major layout,
      `n_node`, `n_edge` and the graph mask.
    features: per modality `[S, F_m, dim_m]`, as in `Batch`.
    labels: `[S, G, *label_shape]`, as in `Batch`.
    keep_counts: as in `Batch` (node scope: indexed by flat node row).
    groups: the node blocks, largest graphs first.
  """

  graph: jraph.GraphsTuple
  features: tuple[np.ndarray, ...]
  labels: np.ndarray
  keep_counts: np.ndarray
  groups: tuple[DenseGroup, ...]

  @property
  def num_graphs(self) -> int:
    """Real graphs in the batch."""
    return int(np.asarray(self.graph.globals["mask"]).sum())

  @property
  def num_edges(self) -> int:
    """Real edges in the batch (all shards)."""
    return int(np.asarray(self.graph.n_edge).sum())


def group_slots(shards, num_groups: int):
  """Sorts each shard's graphs by size into `num_groups` groups of slots.

  Args:
    shards: segment-layout shards (`Batch`es without a shard axis), each
      with `G - 1` graph slots plus a padding graph.
    num_groups: wanted groups (at most one per slot).

  Returns:
    `(slots, order, sizes, needs)`: the slot ranks of each group, each
    shard's graphs largest first, each shard's node counts, and the largest
    graph of each group over the shards (its smallest possible budget).
  """
  per_shard = int(np.asarray(shards[0].graph.n_node).shape[0]) - 1
  slots = np.array_split(np.arange(per_shard), min(num_groups, per_shard))
  order, sizes = [], []
  for shard in shards:
    n_node = np.asarray(shard.graph.n_node[:per_shard])
    n_node = np.where(shard.graph.globals["mask"][:per_shard], n_node, 0)
    order.append(np.argsort(-n_node, kind="stable"))
    sizes.append(n_node)
  needs = [
    max(
      int(size[rank[s]].max(initial=0))
      for size, rank in zip(sizes, order, strict=True)
    )
    for s in slots
  ]
  return slots, order, sizes, needs


def build(
  shards,
  real_edges: Sequence[int],
  slot_groups: Sequence[np.ndarray],
  order: Sequence[np.ndarray],
  sizes: Sequence[np.ndarray],
  budgets: Sequence[int],
  num_types: int,
) -> DenseBatch:
  """Segment-layout shards (real edges first) to one `DenseBatch`.

  Args:
    shards: segment-layout shards, as for `group_slots`.
    real_edges: real edge count of each shard.
    slot_groups, order, sizes: from `group_slots`.
    budgets: node budget `N` of each group (at least its need).
    num_types: number of edge types (int8 tables up to 127).

  Returns:
    The `DenseBatch`.
  """
  if sum(real_edges) >= 2**31:
    raise ValueError(
      f"{sum(real_edges)} edges exceed the int32 edge ids of the dense "
      "layout; lower the batch size"
    )
  num_shards = len(shards)
  per_shard = len(sizes[0])
  pad_graph = per_shard
  type_dtype = np.int8 if num_types <= 127 else np.int16
  groups = [
    DenseGroup(
      rows=np.zeros((num_shards, len(slots), n), np.int32),
      node_mask=np.zeros((num_shards, len(slots), n), bool),
      graph=np.full((num_shards, len(slots)), pad_graph, np.int32),
      edge_type=np.full((num_shards, len(slots), n, n), -1, type_dtype),
      edge_id=np.full((num_shards, len(slots), n, n), -1, np.int32),
    )
    for slots, n in zip(slot_groups, budgets, strict=True)
  ]
  edge_offset = 0
  for s, shard in enumerate(shards):
    g = shard.graph
    node_graph = np.asarray(g.nodes["graph"])
    real = np.asarray(g.nodes["mask"])
    rows = np.flatnonzero(real)
    # Rows are modality-major; a graph's local order is by modality, then
    # by row: a stable sort on (graph, modality) gives it.
    local_order = rows[
      np.lexsort(
        (rows, np.asarray(g.nodes["modality"])[rows], node_graph[rows])
      )
    ]
    # Position within its own graph: rank minus the graph's first rank.
    local = np.zeros(real.shape[0], np.int64)
    ranks = np.arange(local_order.size)
    graph_of = node_graph[local_order]
    graph_start = np.searchsorted(graph_of, graph_of, side="left")
    local[local_order] = ranks - graph_start
    group_of = np.zeros(per_shard + 1, np.int64)
    slot_of = np.zeros(per_shard + 1, np.int64)
    for k, slots in enumerate(slot_groups):
      graphs = order[s][slots]
      group_of[graphs] = k
      slot_of[graphs] = np.arange(len(slots))
      groups[k].graph[s] = np.where(sizes[s][graphs] > 0, graphs, pad_graph)
    ng = node_graph[rows]
    for k, grp in enumerate(groups):
      sel = (group_of[ng] == k) & (sizes[s][ng] > 0)
      r = rows[sel]
      grp.rows[s, slot_of[ng[sel]], local[r]] = r
      grp.node_mask[s, slot_of[ng[sel]], local[r]] = True
    e = real_edges[s]
    eg = np.asarray(g.edges["graph"][:e])
    recv = np.asarray(g.receivers[:e])
    send = np.asarray(g.senders[:e])
    etype = np.asarray(g.edges["type"][:e])
    ids = edge_offset + np.arange(e, dtype=np.int64)
    for k, grp in enumerate(groups):
      sel = group_of[eg] == k
      b, i, j = slot_of[eg[sel]], local[recv[sel]], local[send[sel]]
      grp.edge_type[s, b, i, j] = etype[sel]
      grp.edge_id[s, b, i, j] = ids[sel]
    edge_offset += e
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *shards)
  real_graph = stacked.graph.globals["mask"]
  n_edge = np.where(real_graph, stacked.graph.n_edge, 0).astype(np.int32)
  graph = stacked.graph._replace(
    edges=None, senders=None, receivers=None, n_edge=n_edge
  )
  return DenseBatch(
    graph,
    stacked.features,
    stacked.labels,
    stacked.keep_counts,
    tuple(groups),
  )


def to_edge_list(
  values: Sequence[np.ndarray], edge_ids: Sequence[np.ndarray], num_edges: int
) -> np.ndarray:
  """Scatters per-group dense entries back to a flat edge list (numpy).

  Args:
    values: per group `[S, B, N, N, ...]` values (attention heads last, or
      masks).
    edge_ids: per group the matching `[S, B, N, N]` edge ids (`-1`: none).
    num_edges: total real edges of the batch (all shards).

  Returns:
    `[num_edges, ...]` in segment order (shard-major, then edge index).
  """
  out = None
  for v, ids in zip(values, edge_ids, strict=True):
    v, ids = np.asarray(v), np.asarray(ids)
    sel = ids >= 0
    if out is None:
      out = np.zeros((num_edges, *v.shape[ids.ndim :]), v.dtype)
    out[ids[sel]] = v[sel]
  return out
