"""Samples to padded, sharded graph batches with static budgets (host numpy).

A sample is a list of per-modality frame arrays `[length, dim]`. A batch is a
stack of `num_shards` independently padded graph batches (one per device of
the mesh's `data` axis, so every leaf has a leading shard axis). Each shard is
a `jraph.GraphsTuple`:

* nodes are grouped **by modality**: modality m owns the rows
  `[offset_m, offset_m + F_m)` (its real frames, graph after graph, then
  padding). The per-modality projection is therefore one dense matmul on a
  static slice, and so is the node-type transform of every MTGAT layer;
* `nodes` holds `modality`, `position` (for the positional encoding), `graph`
  (the graph id, padding rows belong to the last, padding graph) and `mask`;
* `edges` holds `type`, `graph` and `mask`; padding edges are masked out;
* `globals` holds the graph `mask`.

With `layout="dense"` (`config.backend="dense"`) the batcher returns a
`DenseBatch` for the dense MTGAT backend instead: the same flat nodes and
features, and per-graph node blocks with `[N, N]` edge tables instead of
edge lists (`mtagjax.dense_layout`).

Budgets (frames per modality, edges) are rounded up on geometric ladders, so a
long epoch compiles a handful of times instead of once per batch. The number of
edges each pruning keeps is computed here, from the real edge counts, exactly
as the official code computes it (`int(k * keep)`), and shipped as an array.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jraph
import ml_collections
import numpy as np

from mtagjax import config as config_lib
from mtagjax import dense_layout
from mtagjax import graph as graph_lib
from mtagjax.dense_layout import DenseBatch, DenseGroup  # noqa: F401
from mtagjax.layers import PRUNE_SCOPES

LAYOUTS = ("segment", "dense")


class Sample(NamedTuple):
  """One multimodal sequence.

  Attributes:
    features: per modality (in config order) a `[length, dim]` array of real
      frames; a modality may have length 0.
    label: the target (a float for MOSI, `[4]` ints for IEMOCAP) or None.
    positions: optional per-modality `[length]` int positions for the
      positional encoding. When absent they follow `config.pe` (see
      `default_positions`).
  """

  features: Sequence[np.ndarray]
  label: Any = None
  positions: Sequence[np.ndarray] | None = None


class Batch(NamedTuple):
  """A device-ready batch; every leaf has a leading shard axis `S`.

  Attributes:
    graph: the padded graphs, `[S, ...]` leaves (see the module docstring).
    features: per modality `[S, F_m, dim_m]` raw frames, in node order.
    labels: `[S, G, *label_shape]`, zeros for padding graphs; float labels
      in the batcher's dtype, integer ones int32.
    keep_counts: edges kept by each pruning: `[S, L]` (scope "batch", the
      same row in every shard: the count is global), `[S, G, L]` ("graph") or
      `[S, N, L]` ("node").
  """

  graph: jraph.GraphsTuple
  features: tuple[np.ndarray, ...]
  labels: np.ndarray
  keep_counts: np.ndarray

  @property
  def num_graphs(self) -> int:
    """Real graphs in the batch."""
    return int(np.asarray(self.graph.globals["mask"]).sum())


def samples_from_padded(
  arrays: Sequence[np.ndarray], labels: np.ndarray | None = None
) -> list[Sample]:
  """Strips padding from left-padded `[B, T_m, d_m]` arrays, as the official.

  A frame is real when the sum of its absolute values is non-zero, so interior
  all-zero frames are dropped too; positions are the frames' indices in the
  padded array, which is what the official positional encoding uses.

  Args:
    arrays: per modality, `[B, T_m, d_m]` arrays.
    labels: optional `[B, ...]` labels.

  Returns:
    A list of `B` samples with explicit positions.
  """
  arrays = [np.asarray(a) for a in arrays]
  sizes = {a.shape[0] for a in arrays}
  if len(sizes) != 1 or any(a.ndim != 3 for a in arrays):
    raise ValueError(
      "samples_from_padded: every modality must be a [B, T, d] array with "
      f"the same B; got shapes {[a.shape for a in arrays]}"
    )
  # NaN frames count as real (sum is NaN, not 0), as in the official mask.
  masks = [np.abs(a).sum(-1) != 0 for a in arrays]
  out = []
  for b in range(arrays[0].shape[0]):
    idx = [np.flatnonzero(m[b]) for m in masks]
    out.append(
      Sample(
        features=[a[b, i] for a, i in zip(arrays, idx, strict=True)],
        label=None if labels is None else np.asarray(labels[b]),
        positions=idx,
      )
    )
  return out


def default_positions(
  lengths: Sequence[int], config: ml_collections.ConfigDict
) -> list[np.ndarray]:
  """Positional-encoding positions for frames given without positions.

  With `config.pe == "padded"` (official) a sequence of length l is taken to
  sit left-padded in an array of `config.padded_lengths[m]` frames, so its
  frames have positions `T - l, ..., T - 1`. Otherwise positions run
  `0, ..., l - 1` within the modality (the paper).
  """
  if config.pe == "padded":
    out = []
    for m, n in enumerate(lengths):
      total = config.padded_lengths[m]
      if n > total:
        raise ValueError(
          f"modality {config.modalities[m]!r} has {n} frames, more than "
          f"config.padded_lengths[{m}] = {total}; pass explicit positions "
          "or raise the padded length"
        )
      out.append(np.arange(total - n, total, dtype=np.int32))
    return out
  return [np.arange(n, dtype=np.int32) for n in lengths]


def bucket_size(n: int, *, growth: float, minimum: int) -> int:
  """The smallest ladder value `>= n` (ladder: minimum, then x growth, x8)."""
  size = minimum
  while size < n:
    size = max(size + 8, int(math.ceil(size * growth / 8.0)) * 8)
  return size


def keep_schedule(count: np.ndarray, keep: float, num_layers: int):
  """`[..., L]` edges kept after each pruning, `int(k * keep)` layer by layer.

  The official code keeps `int(len(edges) * keep)` of the surviving edges
  each time, in float64 arithmetic; numpy's float64 floor is the same.
  """
  count = np.asarray(count, np.int64)
  out = []
  for _ in range(num_layers):
    count = np.floor(count * float(keep)).astype(np.int64)
    out.append(count)
  return np.stack(out, -1).astype(np.int32)


class GraphBatcher:
  """Builds `Batch`es for one model config, batch size and shard count.

  Args:
    config: the model config (`mtagjax.config.default_config()`).
    batch_size: the largest number of samples a batch will hold; sets the
      per-shard graph budget `ceil(batch_size / num_shards) + 1`.
    num_shards: number of data-parallel shards (devices on the `data` axis).
    dtype: numpy dtype of the features and of float labels (float64 for
      x64 checks); integer labels stay int32.
    sticky_budgets: never shrink the budgets below those of earlier
      batches. Padding never changes results, and with random batches the
      budgets settle within a few batches, so an epoch compiles a handful
      of times. Use one batcher per split (train, eval).
    layout: "segment" (a `Batch`) or "dense" (a `DenseBatch` for the dense
      backend); None follows `config.backend`. Dense batches assign each
      shard's graphs to `config.dense_groups` groups of slots (graphs of
      similar per-modality lengths together), each padded to its own
      per-modality node budgets on the `config.dense_node_growth` ladder
      (sticky as well).

  Bad input raises `ValueError` naming the sample and modality: a wrong
  feature size or number of modalities, NaN or inf features, positions
  out of range, more samples than `batch_size`, a batch over the largest
  bucket. A sample whose modalities are all empty has no graph: by default
  (`config.empty_samples="error"`) that is an error; with `"drop"` it is
  dropped, with its label, and a warning, as the official code silently
  does.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    num_shards: int = 1,
    dtype: Any = np.float32,
    sticky_budgets: bool = True,
    layout: str | None = None,
  ):
    if batch_size < 1 or num_shards < 1:
      raise ValueError(
        f"batch_size ({batch_size}) and num_shards ({num_shards}) must be >= 1"
      )
    if config.prune_scope not in PRUNE_SCOPES:
      raise ValueError(
        f"config.prune_scope={config.prune_scope!r}; expected one of "
        f"{PRUNE_SCOPES}"
      )
    if config.empty_samples not in ("error", "drop"):
      raise ValueError(
        f"config.empty_samples={config.empty_samples!r}; expected 'error' "
        "or 'drop'"
      )
    if layout is None:
      # Saved configs may predate the field: their default is the config
      # module's.
      layout = config.get("backend", config_lib.DEFAULTS.backend)
    if layout not in LAYOUTS:
      raise ValueError(
        f"layout {layout!r} (or config.backend); expected one of {LAYOUTS}"
      )
    self.layout = layout
    self.config = config
    self.batch_size = batch_size
    self.num_shards = num_shards
    self.per_shard = -(-batch_size // num_shards)
    self._dense_nodes: list[list[int]] = []
    if layout == "dense":
      self.num_groups = int(
        config.get("dense_groups", config_lib.DEFAULTS.dense_groups)
      )
      if self.num_groups < 1:
        raise ValueError(f"config.dense_groups={self.num_groups} must be >= 1")
      num_mod = len(config.modalities)
      groups = min(self.num_groups, self.per_shard)
      self._dense_nodes = [[0] * num_mod for _ in range(groups)]
    self.dtype = np.dtype(dtype)
    self.sticky_budgets = sticky_budgets
    self._budgets = ([0] * len(config.modalities), 0)

  @property
  def budgets(self) -> tuple[list[int], int]:
    """The last batch's budgets: (frames per modality, edges) per shard.

    Assignable, so a resumed run can start from the budgets (and hence the
    compiled shapes) it had when it stopped.
    """
    return self._budgets

  @budgets.setter
  def budgets(self, value: tuple[Sequence[int], int]) -> None:
    frames, edges = value
    if len(frames) != len(self.config.modalities):
      raise ValueError(
        f"budgets need {len(self.config.modalities)} frame counts, got "
        f"{len(frames)}"
      )
    self._budgets = ([int(f) for f in frames], int(edges))

  # -- validation ------------------------------------------------------------

  def _check(self, i: int, sample: Sample):
    c = self.config
    feats = list(sample.features)
    if len(feats) != len(c.modalities):
      raise ValueError(
        f"sample {i}: has {len(feats)} modalities, config.modalities has "
        f"{len(c.modalities)} {tuple(c.modalities)}"
      )
    feats = [np.asarray(f) for f in feats]
    for m, (f, dim, name) in enumerate(
      zip(feats, c.feature_dims, c.modalities, strict=True)
    ):
      if f.ndim != 2 or f.shape[1] != dim:
        raise ValueError(
          f"sample {i}, modality {name!r}: expected a [length, {dim}] array "
          f"(config.feature_dims[{m}]), got shape {f.shape}"
        )
      if not np.isfinite(f).all():
        bad = np.argwhere(~np.isfinite(f))[0]
        raise ValueError(
          f"sample {i}, modality {name!r}: non-finite value "
          f"{f[tuple(bad)]} at frame {bad[0]}, feature {bad[1]}; clean the "
          "data first (the official audio reader maps -inf to 0)"
        )
      vocab = config_lib.vocab_sizes(c)
      if vocab[m] and f.size:
        ok = (f == np.round(f)) & (f >= 0) & (f < vocab[m])
        if not ok.all():
          bad = np.argwhere(~ok)[0]
          raise ValueError(
            f"sample {i}, modality {name!r}: token id {f[tuple(bad)]} at "
            f"frame {bad[0]} is not an integer in [0, "
            f"config.vocab_sizes[{m}]={vocab[m]})"
          )
    lengths = [f.shape[0] for f in feats]
    if sample.positions is None:
      try:
        positions = default_positions(lengths, c)
      except ValueError as e:
        raise ValueError(f"sample {i}: {e}") from None
    else:
      positions = [np.asarray(p, np.int64) for p in sample.positions]
      if len(positions) != len(lengths):
        raise ValueError(
          f"sample {i}: has {len(positions)} position arrays for "
          f"{len(lengths)} modalities {tuple(c.modalities)}"
        )
      for m, (p, n) in enumerate(zip(positions, lengths, strict=True)):
        if p.shape != (n,):
          raise ValueError(
            f"sample {i}, modality {c.modalities[m]!r}: positions shape "
            f"{p.shape} does not match its {n} frames"
          )
        if n and (p.min() < 0 or p.max() >= c.max_positions):
          raise ValueError(
            f"sample {i}, modality {c.modalities[m]!r}: positions must lie "
            f"in [0, config.max_positions={c.max_positions}), got "
            f"[{p.min()}, {p.max()}]"
          )
    return feats, lengths, positions

  # -- building --------------------------------------------------------------

  @property
  def dense_budgets(self) -> list[list[int]]:
    """Per dense group, the node budget `N_m` of each modality (layout
    "dense"); assignable."""
    return [list(b) for b in self._dense_nodes]

  @dense_budgets.setter
  def dense_budgets(self, value: Sequence[Sequence[int]]) -> None:
    shape = (len(self._dense_nodes), len(self.config.modalities))
    if np.shape(value) != shape:
      raise ValueError(
        f"dense_budgets needs {shape[0]} groups of {shape[1]} per-modality "
        f"sizes, got shape {np.shape(value)}"
      )
    self._dense_nodes = [[int(v) for v in b] for b in value]

  def __call__(self, samples: Sequence[Sample]) -> Batch | DenseBatch:
    """Validates, pads and shards `samples` into one `Batch`.

    With layout "dense" the result is a `DenseBatch` of the same samples.
    """
    c = self.config
    checked = []
    for i, s in enumerate(samples):
      feats, lengths, positions = self._check(i, s)
      if sum(lengths) == 0:
        if c.empty_samples == "error":
          raise ValueError(
            f"sample {i}: every modality is empty; remove it, or set "
            "config.empty_samples='drop' to drop such samples (as the "
            "official code does) with a warning"
          )
        warnings.warn(
          f"dropping sample {i}: every modality is empty", stacklevel=2
        )
        continue
      checked.append((feats, lengths, positions, s.label))
    if not checked:
      raise ValueError("empty batch: no sample with any frame")
    if len(checked) > self.batch_size:
      raise ValueError(
        f"{len(checked)} samples exceed batch_size={self.batch_size}"
      )
    shards = [
      checked[s * self.per_shard : (s + 1) * self.per_shard]
      for s in range(self.num_shards)
    ]
    built = [self._shard_parts(shard) for shard in shards]
    frames = [
      bucket_size(
        max(b["frames"][m] for b in built), growth=c.node_growth, minimum=8
      )
      for m in range(len(c.modalities))
    ]
    edges = bucket_size(
      max(b["num_edges"] for b in built), growth=c.edge_growth, minimum=64
    )
    if self.layout == "dense":
      # No edge arrays reach the device: keep exactly the real edges.
      edges = max(1, max(b["num_edges"] for b in built))
    if self.sticky_budgets:
      # Budgets only grow: once a large batch has been seen, smaller ones
      # reuse its shapes, so an epoch compiles only while budgets are still
      # growing (the first few batches), not whenever a batch's needs cross
      # a rung.
      frames = [
        max(f, s) for f, s in zip(frames, self._budgets[0], strict=True)
      ]
      if self.layout == "segment":
        edges = max(edges, self._budgets[1])
    if sum(frames) > c.max_nodes or edges > c.max_edges:
      raise ValueError(
        f"batch needs {sum(frames)} nodes and {edges} edges per shard, over "
        f"the largest bucket (config.max_nodes={c.max_nodes}, "
        f"config.max_edges={c.max_edges}); lower the batch size, use more "
        "shards or raise those limits"
      )
    self._budgets = (frames, edges)
    total_edges = sum(b["num_edges"] for b in built)
    proto = checked[0][3]
    if self.layout == "dense":
      return self._dense(built, frames, total_edges, proto)
    return _stack(
      [self._pad(b, frames, edges, total_edges, proto) for b in built]
    )

  def _shard_parts(self, shard):
    """One shard's samples: lengths, per-graph edge lists, frames, labels."""
    c = self.config
    num_mod = len(c.modalities)
    lengths = np.array([x[1] for x in shard], np.int64).reshape(-1, num_mod)
    # Edges stay per graph, in local node ids (modalities concatenated):
    # the segment layout maps them to flat rows, the dense one to blocks.
    edges = [
      graph_lib.build_edges(
        lens, rule=c.alignment, edge_types=c.edge_types, intra=c.intra
      )
      for _, lens, _, _ in shard
    ]
    return dict(
      lengths=lengths,
      frames=lengths.sum(0),
      edges=edges,
      num_edges=int(sum(t.size for _, _, t in edges)),
      feats=[[x[0][m] for x in shard] for m in range(num_mod)],
      positions=[[x[2][m] for x in shard] for m in range(num_mod)],
      labels=[x[3] for x in shard],
    )

  def _nodes(self, parts, frames, total_edges, label_proto) -> Batch:
    """One shard without edge arrays (what both layouts share).

    `graph.edges`, `senders` and `receivers` are None and `n_edge` counts
    real edges only (0 for the padding graph).
    """
    c = self.config
    num_mod = len(c.modalities)
    num_graphs = self.per_shard + 1
    pad_graph = num_graphs - 1
    num_nodes = int(sum(frames))
    lengths = parts["lengths"]
    real = len(parts["labels"])

    modality = np.repeat(np.arange(num_mod), frames).astype(np.int32)
    position = np.zeros(num_nodes, np.int32)
    node_graph = np.full(num_nodes, pad_graph, np.int32)
    node_mask = np.zeros(num_nodes, bool)
    features = []
    for m, offset in enumerate(_offsets(frames)):
      n = int(parts["frames"][m])
      rows = slice(offset, offset + n)
      node_mask[rows] = True
      node_graph[rows] = np.repeat(np.arange(real), lengths[:, m])
      if n:
        position[rows] = np.concatenate(parts["positions"][m])
      f = np.zeros((frames[m], c.feature_dims[m]), self.dtype)
      if n:
        f[:n] = np.concatenate(parts["feats"][m])
      features.append(f)

    n_node = np.zeros(num_graphs, np.int32)
    n_node[:real] = lengths.sum(1)
    n_node[pad_graph] = num_nodes - n_node.sum()
    n_edge = np.zeros(num_graphs, np.int32)
    n_edge[:real] = [t.size for _, _, t in parts["edges"]]
    gmask = np.zeros(num_graphs, bool)
    gmask[:real] = True

    labels = _pad_labels(parts["labels"], num_graphs, label_proto, self.dtype)
    scope = c.prune_scope
    if scope == "batch":
      keep = keep_schedule(total_edges, c.prune_keep, c.num_layers)
    elif scope == "graph":
      keep = keep_schedule(n_edge, c.prune_keep, c.num_layers)
    else:
      indegree = np.zeros(num_nodes, np.int64)
      for rows, (_, receivers, _) in zip(
        _node_rows(lengths, frames), parts["edges"], strict=True
      ):
        indegree[rows] = np.bincount(receivers, minlength=rows.size)
      keep = keep_schedule(indegree, c.prune_keep, c.num_layers)

    graph = jraph.GraphsTuple(
      nodes=dict(
        modality=modality, position=position, graph=node_graph, mask=node_mask
      ),
      edges=None,
      senders=None,
      receivers=None,
      n_node=n_node,
      n_edge=n_edge,
      globals=dict(mask=gmask),
    )
    return Batch(graph, tuple(features), labels, keep)

  def _pad(self, parts, frames, num_edges, total_edges, label_proto):
    """One shard in the segment layout: `_nodes` plus padded edge lists."""
    shard = self._nodes(parts, frames, total_edges, label_proto)
    num_graphs = self.per_shard + 1
    pad_graph = num_graphs - 1
    pad_node = int(sum(frames)) - 1
    e = parts["num_edges"]
    senders = np.full(num_edges, pad_node, np.int32)
    receivers = np.full(num_edges, pad_node, np.int32)
    etype = np.zeros(num_edges, np.int32)
    egraph = np.full(num_edges, pad_graph, np.int32)
    if e:
      rows = _node_rows(parts["lengths"], frames)
      graph_edges = parts["edges"]
      senders[:e] = np.concatenate(
        [r[s] for r, (s, _, _) in zip(rows, graph_edges, strict=True)]
      )
      receivers[:e] = np.concatenate(
        [r[d] for r, (_, d, _) in zip(rows, graph_edges, strict=True)]
      )
      etype[:e] = np.concatenate([t for _, _, t in graph_edges])
      egraph[:e] = np.repeat(
        np.arange(len(graph_edges)), [t.size for _, _, t in graph_edges]
      )
    emask = np.zeros(num_edges, bool)
    emask[:e] = True
    graph = shard.graph._replace(
      edges=dict(type=etype, graph=egraph, mask=emask),
      senders=senders,
      receivers=receivers,
      # Padding edges belong to the padding graph.
      n_edge=np.bincount(egraph, minlength=num_graphs).astype(np.int32),
    )
    return shard._replace(graph=graph)

  def _dense(self, built, frames, total_edges, label_proto) -> DenseBatch:
    """The shards in the dense layout, straight from their edge lists."""
    c = self.config
    num_mod = len(c.modalities)
    stacked = _stack(
      [self._nodes(b, frames, total_edges, label_proto) for b in built]
    )
    # Every shard has `per_shard` slots; missing graphs have no nodes.
    lengths = np.zeros((len(built), self.per_shard, num_mod), np.int64)
    for s, parts in enumerate(built):
      lengths[s, : len(parts["lengths"])] = parts["lengths"]
    # Graphs go where the (sticky) budgets already fit them, if they can.
    floor = self._dense_nodes if self.sticky_budgets else None
    members, needs = dense_layout.group_slots(
      lengths, self.num_groups, c.intra, floor
    )
    budgets = [
      [
        bucket_size(max(int(n), 1), growth=c.dense_node_growth, minimum=8)
        for n in need
      ]
      for need in needs
    ]
    if self.sticky_budgets:
      budgets = [
        [max(n, o) for n, o in zip(new, old, strict=True)]
        for new, old in zip(budgets, self._dense_nodes, strict=True)
      ]
    self._dense_nodes = budgets
    groups = dense_layout.build_groups(
      [b["edges"] for b in built],
      [_node_rows(b["lengths"], frames) for b in built],
      lengths,
      members,
      np.array(budgets),
      c.intra,
    )
    return DenseBatch(*stacked, groups)


def _offsets(frames: Sequence[int]) -> np.ndarray:
  """First flat node row of each modality's block."""
  return np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64)


def _node_rows(lengths: np.ndarray, frames: Sequence[int]) -> list[np.ndarray]:
  """Per graph (`lengths[g]`), the flat row of each `build_edges` node id."""
  # starts[g, m]: first row of graph g inside modality m's block.
  starts = _offsets(frames) + np.cumsum(lengths, 0) - lengths
  return [
    np.concatenate(
      [start + np.arange(n) for start, n in zip(first, lens, strict=True)]
    )
    for first, lens in zip(starts, lengths, strict=True)
  ]


def _pad_labels(
  labels: list, num_graphs: int, proto: Any, dtype: np.dtype
) -> np.ndarray:
  """Stacks labels into `[G, *shape]`; `proto` fixes shape and dtype.

  Float labels take the features' `dtype` (an x64 loss then sees 1.8, not
  float32's 1.7999999523); integer class labels stay int32.
  """
  if proto is None:
    return np.zeros((num_graphs,), dtype)
  proto = np.asarray(proto)
  dtype = dtype if proto.dtype.kind == "f" else np.int32
  out = np.zeros((num_graphs, *proto.shape), dtype)
  for g, x in enumerate(labels):
    x = np.asarray(x)
    if x.shape != proto.shape:
      raise ValueError(
        f"label of graph {g} has shape {x.shape}, expected {proto.shape}"
      )
    out[g] = x
  return out


def _stack(shards: list[Batch]) -> Batch:
  return jax.tree.map(lambda *xs: np.stack(xs), *shards)
