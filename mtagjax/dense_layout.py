"""The block layout of the `dense` backend (host numpy).

`mtagjax.batching.GraphBatcher(config, layout="dense")` builds the flat
nodes as for the segment layout and, here, the edge tables of a
`DenseBatch` straight from each graph's edge list (no padded edge list is
built). Each shard's graphs are assigned to groups of slots; inside a group
every graph is padded, modality by modality, to the group's per-modality
node budgets `N_m`, and its edges are stored per (receiver modality r,
sender modality s) block:

- cross-modal blocks (r != s) are dense `[N_r, N_s]` tables indexed
  `[receiver, sender]`: the official graph links every cross-modal pair;
- intra-modal blocks (r == s) are bands `[N_r, 3]` with columns (self,
  next, previous), the only intra edges with `intra="adjacent"` (the
  official setting), or dense `[N_r, N_r]` with `intra="all_to_all"`.

Intra-modal pairs without an edge, about half of a graph's node pairs on
MOSI-sized samples, are thus never stored or computed. Each entry holds a
*code*, the index of its edge type in the block's per-graph list of at most
`TYPES_PER_BLOCK` types (a cross block of one graph only has the current,
past and future types of one direction), so the layer picks among three
precomputed terms instead of gathering from all edge types. Every entry
also keeps the index its edge has in the segment layout (the tie order of
pruning, and the map back to edge lists: `to_edge_list`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jraph
import numpy as np

# Distinct edge types one block of one graph can hold: the graph builder's
# current / past / future relations.
TYPES_PER_BLOCK = 3
# The band columns of intra-modal blocks: sender offset from the receiver.
BAND_OFFSETS = (0, 1, -1)
INTRA_MODES = ("adjacent", "all_to_all")


def block_pairs(num_modalities: int, intra: str) -> list[tuple[int, int, bool]]:
  """`(receiver, sender, is_band)` of each block, in block order.

  Receiver modality major, then sender modality; intra-modal blocks are
  bands with `intra="adjacent"`, dense with `"all_to_all"`.
  """
  m = num_modalities
  return [
    (r, s, r == s and intra == "adjacent") for r in range(m) for s in range(m)
  ]


@flax.struct.dataclass
class DenseGroup:
  """Graphs padded to one set of per-modality node budgets.

  Every array has leading axes `[S, B]` (shards, graph slots of the group).
  Modality m's nodes of a graph are in time order at positions `0..n_m-1`
  of its `N_m` rows; padding rows follow. Blocks come in the order of
  `pairs()`: receiver modality major, then sender modality.

  Attributes:
    rows: per modality `[S, B, N_m]` row of each node in the flat node
      arrays of `DenseBatch.graph.nodes` and `features` (0 on padding).
    node_mask: per modality `[S, B, N_m]` real nodes.
    graph: `[S, B]` graph index of each slot (the padding graph for empty
      slots).
    code: per block `[S, B, N_r, W]` int8 index of each entry's edge type
      in `types` (-1: no edge). `W` is `N_s` for dense blocks and 3 for
      bands (columns: sender at offsets `BAND_OFFSETS`).
    types: per block `[S, B, TYPES_PER_BLOCK]` int32 edge type of each code
      (0 for unused codes).
    edge_id: per block `[S, B, N_r, W]` int32 index of the entry's edge in
      the segment layout, counted over all shards (shard-major); -1 where
      none. It is the tie order of pruning and maps dense values back to
      edge lists.
    intra: "adjacent" (intra-modal blocks are bands) or "all_to_all" (they
      are dense); static.
  """

  rows: tuple[np.ndarray, ...]
  node_mask: tuple[np.ndarray, ...]
  graph: np.ndarray
  code: tuple[np.ndarray, ...]
  types: tuple[np.ndarray, ...]
  edge_id: tuple[np.ndarray, ...]
  intra: str = flax.struct.field(pytree_node=False, default="adjacent")

  @property
  def num_modalities(self) -> int:
    return len(self.rows)

  def pairs(self) -> list[tuple[int, int]]:
    """`(receiver, sender)` modality of each block, in block order."""
    return [(r, s) for r, s, _ in block_pairs(self.num_modalities, self.intra)]

  def is_band(self, r: int, s: int) -> bool:
    """Whether block `(r, s)` is a band (intra-modal, `intra="adjacent"`)."""
    return r == s and self.intra == "adjacent"

  def edge_types(self) -> list[np.ndarray]:
    """Per block, the edge type of each entry (-1: none); host numpy."""
    out = []
    for code, types in zip(self.code, self.types, strict=True):
      code, types = np.asarray(code), np.asarray(types)
      lead = np.indices(code.shape[:2])
      full = types[lead[0][..., None, None], lead[1][..., None, None], code]
      out.append(np.where(code >= 0, full, -1))
    return out

  def senders(self) -> list[np.ndarray]:
    """Per block, the sender's position in its modality (host numpy)."""
    out = []
    for (r, s), code in zip(self.pairs(), self.code, strict=True):
      n_r, w = np.shape(code)[-2:]
      i = np.arange(n_r)[:, None]
      if self.is_band(r, s):
        out.append(np.broadcast_to(i + np.array(BAND_OFFSETS), (n_r, w)))
      else:
        out.append(np.broadcast_to(np.arange(w)[None], (n_r, w)))
    return out


class DenseBatch(NamedTuple):
  """A `Batch` in the layout of the `dense` backend (`mtagjax.dense`).

  Attributes:
    graph: as `Batch.graph` without edge arrays (`edges`, `senders`,
      `receivers` are None): nodes in the flat modality-major layout,
      `n_node`, `n_edge` and the graph mask.
    features: per modality `[S, F_m, dim_m]`, as in `Batch`.
    labels: `[S, G, *label_shape]`, as in `Batch`.
    keep_counts: as in `Batch` (node scope: indexed by flat node row).
    groups: the groups of graphs.
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

  @property
  def num_entries(self) -> int:
    """Block entries per head and layer, padding included (all groups)."""
    return int(sum(np.prod(np.shape(c)) for g in self.groups for c in g.code))


def block_entries(budgets: np.ndarray, intra: str) -> np.ndarray:
  """Entries one graph of each budget row `[..., M]` stores."""
  budgets = np.asarray(budgets, np.int64)
  total = budgets.sum(-1)
  squares = (budgets**2).sum(-1)
  intra_cost = 3 * total if intra == "adjacent" else squares
  return total**2 - squares + intra_cost


def _max_without(lengths: np.ndarray) -> np.ndarray:
  """`[n, M]` -> `[n, M]` max over the other rows, per column (0 if none)."""
  n = lengths.shape[0]
  if n == 1:
    return np.zeros_like(lengths)
  order = np.sort(lengths, 0)
  top, second = order[-1], order[-2]
  return np.where(lengths == top, second, top)


def assign_groups(
  lengths: np.ndarray,
  slot_counts: Sequence[int],
  intra: str,
  floor: np.ndarray | None = None,
) -> list[np.ndarray]:
  """Graphs to groups of slots, keeping the padded block entries small.

  A group's budgets are the larger of `floor` (budgets it already has) and
  its graphs' largest lengths per modality, and every graph of the group
  pays for them. Graphs start sorted by their own block entries (largest
  first); then the swap between two groups that lowers the total most is
  applied until none does (a local optimum; deterministic). With a floor,
  graphs thus move into groups whose budgets already fit them rather than
  growing others.

  Args:
    lengths: `[P, M]` nodes per modality of each graph slot (0: empty).
    slot_counts: slots of each group, summing to `P`.
    intra: as `DenseGroup.intra`.
    floor: `[groups, M]` budgets the groups have already (None: zeros).

  Returns:
    Per group, the graph indices in its slots.
  """
  lengths = np.asarray(lengths, np.int64)
  if floor is None:
    floor = np.zeros((len(slot_counts), lengths.shape[1]), np.int64)
  floor = np.asarray(floor, np.int64)
  own = block_entries(lengths, intra)
  order = np.argsort(-own, kind="stable")
  bounds = np.cumsum([0, *slot_counts])
  groups = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

  def cost(k, budgets):
    return len(groups[k]) * block_entries(np.maximum(floor[k], budgets), intra)

  for _ in range(4 * len(groups)):
    best = (0, None)
    for a in range(len(groups)):
      for b in range(a + 1, len(groups)):
        ga, gb = groups[a], groups[b]
        if not len(ga) or not len(gb):
          continue
        la, lb = lengths[ga], lengths[gb]
        # Costs after swapping ga[i] with gb[j], for all i, j at once.
        new_a = np.maximum(_max_without(la)[:, None], lb[None])
        new_b = np.maximum(_max_without(lb)[None], la[:, None])
        delta = (
          cost(a, new_a)
          + cost(b, new_b)
          - cost(a, la.max(0))
          - cost(b, lb.max(0))
        )
        i, j = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[i, j] < best[0]:
          best = (int(delta[i, j]), (a, b, i, j))
    if best[1] is None:
      break
    a, b, i, j = best[1]
    groups[a], groups[b] = groups[a].copy(), groups[b].copy()
    groups[a][i], groups[b][j] = groups[b][j], groups[a][i]
  return groups


def group_slots(
  lengths: np.ndarray,
  num_groups: int,
  intra: str,
  floor: np.ndarray | None = None,
):
  """Assigns each shard's graphs to `num_groups` groups of slots.

  Args:
    lengths: `[S, P, M]` real nodes per modality of each shard's `P` graph
      slots (0 for slots without a graph).
    num_groups: wanted groups (at most one per slot).
    intra: as `DenseGroup.intra`.
    floor: `[groups, M]` budgets the groups already have, or None.

  Returns:
    `(members, needs)`: per shard, per group the graph of each slot; and
    `[groups, M]` the largest length per modality of each group over the
    shards (its smallest possible budgets).
  """
  lengths = np.asarray(lengths, np.int64)
  per_shard = lengths.shape[1]
  split = np.array_split(np.arange(per_shard), min(num_groups, per_shard))
  counts = [len(s) for s in split]
  members, needs = [], None
  for shard_lengths in lengths:
    groups = assign_groups(shard_lengths, counts, intra, floor)
    need = np.stack([shard_lengths[g].max(0) for g in groups])
    needs = need if needs is None else np.maximum(needs, need)
    members.append(groups)
  return members, needs


def build_groups(
  edges: Sequence[Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]],
  node_rows: Sequence[Sequence[np.ndarray]],
  lengths: np.ndarray,
  members: Sequence[Sequence[np.ndarray]],
  budgets: np.ndarray,
  intra: str,
) -> tuple[DenseGroup, ...]:
  """Per-graph edge lists to the groups of a `DenseBatch`.

  Args:
    edges: per shard, per graph `(senders, receivers, types)` as
      `mtagjax.graph.build_edges` returns them (local node ids, modalities
      concatenated). Edge ids count them shard-major, then graph by graph,
      which is the segment layout's order of real edges.
    node_rows: per shard, per graph the flat node row of each local node.
    lengths: `[S, P, M]` nodes per modality of each graph slot, as for
      `group_slots`.
    members: from `group_slots`.
    budgets: `[groups, M]` node budget of each group and modality (at least
      its need).
    intra: "adjacent" or "all_to_all", the graph's intra-modal edges.

  Returns:
    The groups.
  """
  if intra not in INTRA_MODES:
    raise ValueError(f"intra {intra!r}; expected one of {INTRA_MODES}")
  total_edges = sum(t.size for shard in edges for _, _, t in shard)
  if total_edges >= 2**31:
    raise ValueError(
      f"{total_edges} edges exceed the int32 edge ids of the dense layout; "
      "lower the batch size"
    )
  budgets = np.asarray(budgets, np.int64)
  lengths = np.asarray(lengths, np.int64)
  num_shards, per_shard, num_mod = lengths.shape
  pad_graph = per_shard
  blocks = block_pairs(num_mod, intra)
  band = np.array([b for _, _, b in blocks])
  # [groups, blocks]: rows and columns (entries per row) of each block.
  height = budgets[:, [r for r, _, _ in blocks]]
  width = np.where(band, 3, budgets[:, [s for _, s, _ in blocks]])
  slots = np.array([len(m) for m in members[0]], np.int64)
  # All blocks of all groups live in one flat buffer per field, so that a
  # graph's edges are written with one scatter; the blocks are views.
  sizes = num_shards * slots[:, None] * height * width
  starts = (np.cumsum(sizes.reshape(-1)) - sizes.reshape(-1)).reshape(
    sizes.shape
  )
  code_buf = np.full(int(sizes.sum()), -1, np.int8)
  id_buf = np.full(int(sizes.sum()), -1, np.int32)
  types = np.zeros(
    (len(slots), len(blocks), num_shards, max(slots), TYPES_PER_BLOCK),
    np.int32,
  )
  rows = [
    [np.zeros((num_shards, n, budgets[k, m]), np.int32) for m in range(num_mod)]
    for k, n in enumerate(slots)
  ]
  masks = [
    [np.zeros((num_shards, n, budgets[k, m]), bool) for m in range(num_mod)]
    for k, n in enumerate(slots)
  ]
  graphs = [np.full((num_shards, n), pad_graph, np.int32) for n in slots]
  first_id = 0
  for sh in range(num_shards):
    counts = [t.size for _, _, t in edges[sh]]
    graph_ids = first_id + np.cumsum(counts) - counts
    first_id += sum(counts)
    for k, mem in enumerate(members[sh]):
      real = lengths[sh, mem].sum(1) > 0
      graphs[k][sh] = np.where(real, mem, pad_graph)
      for b in np.flatnonzero(real):
        g = mem[b]
        lens = lengths[sh, g]
        # A graph's nodes are modality-major, in time order inside each.
        parts = np.split(node_rows[sh][g], np.cumsum(lens)[:-1])
        for m, part in enumerate(parts):
          rows[k][m][sh, b, : lens[m]] = part
          masks[k][m][sh, b, : lens[m]] = True
        blk, row, col, code, held = _graph_entries(lens, *edges[sh][g], intra)
        bi, ti = np.nonzero(held)
        types[k, bi, sh, b, held[bi, ti] - 1] = ti
        # The graph's part of block `blk` starts at `base[blk]`.
        base = starts[k] + (sh * slots[k] + b) * height[k] * width[k]
        flat = base[blk] + row * width[k][blk] + col
        code_buf[flat] = code
        id_buf[flat] = graph_ids[g] + np.arange(blk.size)
  groups = []
  for k, n in enumerate(slots):
    codes, ids = [], []
    for blk in range(len(blocks)):
      shape = (num_shards, n, int(height[k, blk]), int(width[k, blk]))
      view = slice(starts[k, blk], starts[k, blk] + sizes[k, blk])
      codes.append(code_buf[view].reshape(shape))
      ids.append(id_buf[view].reshape(shape))
    groups.append(
      DenseGroup(
        rows=tuple(rows[k]),
        node_mask=tuple(masks[k]),
        graph=graphs[k],
        code=tuple(codes),
        types=tuple(types[k, blk, :, :n] for blk in range(len(blocks))),
        edge_id=tuple(ids),
        intra=intra,
      )
    )
  return tuple(groups)


def _graph_entries(lengths, senders, receivers, etype, intra):
  """Where one graph's edges go in its blocks, and their codes.

  Args:
    lengths: `[M]` nodes per modality.
    senders, receivers, etype: the graph's edges (`graph.build_edges`).
    intra: as `DenseGroup.intra`.

  Returns:
    `(block, row, column, code, held)`: per edge its block (in
    `block_pairs` order), row (the receiver's position in its modality),
    column (the sender's position, or its band column) and code; and
    `[blocks, types]` the code + 1 of each type a block holds (0: none).
  """
  num_mod = len(lengths)
  modality = np.repeat(np.arange(num_mod, dtype=np.int32), lengths)
  position = np.arange(modality.size, dtype=np.int32) - np.repeat(
    (np.cumsum(lengths) - lengths).astype(np.int32), lengths
  )
  rm, sm = modality[receivers], modality[senders]
  row, col = position[receivers], position[senders]
  blk = rm * num_mod + sm
  if intra == "adjacent":
    # Intra edges are few (about 3 per node): fix their columns only.
    same = np.flatnonzero(rm == sm)
    delta = col[same] - row[same]
    if np.any(np.abs(delta) > 1):
      raise ValueError(
        "an intra-modal edge links non-adjacent frames; build dense "
        "batches with the graph's intra setting (config.intra)"
      )
    # Band columns follow `BAND_OFFSETS`: self, next, previous.
    col[same] = np.where(delta < 0, 2, delta)
  # Codes: rank of each type among the types its block holds.
  num_types = int(etype.max()) + 1
  key = blk * num_types + etype
  present = np.zeros((num_mod * num_mod, num_types), bool)
  present.reshape(-1)[key] = True
  if present.sum(-1).max() > TYPES_PER_BLOCK:
    raise ValueError(
      f"a (receiver, sender) modality block of one graph holds "
      f"{present.sum(-1).max()} edge types; the dense layout takes at most "
      f"{TYPES_PER_BLOCK} (the current, past and future relations)"
    )
  held = np.cumsum(present, -1) * present
  code = (held - 1).astype(np.int8).reshape(-1)[key]
  return blk, row, col, code, held


def to_edge_list(
  values: Sequence[np.ndarray], edge_ids: Sequence[np.ndarray], num_edges: int
) -> np.ndarray:
  """Scatters block entries back to a flat edge list (numpy).

  Args:
    values: per block `[S, B, N_r, W, ...]` values (attention heads last,
      or masks), e.g. `flat_blocks` of the model's aux outputs.
    edge_ids: per block the matching `[S, B, N_r, W]` edge ids (`-1`:
      none), e.g. `flat_blocks([g.edge_id for g in batch.groups])`.
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


def flat_blocks(per_group: Sequence[Sequence]) -> list:
  """Per group, per block values -> one list of blocks (group-major)."""
  return [block for group in per_group for block in group]
