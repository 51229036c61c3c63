"""MTGAT convolution and attention-based edge pruning (the `segment` backend).

Message passing runs over padded edge lists with `jraph.segment_*`; padded and
pruned edges are switched off by a boolean mask, never removed, so shapes stay
static. Every function accepts either one graph or a stack of shards with a
leading axis (the data-parallel layout of `mtagjax.batching`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

Array = jax.Array

PRUNE_SCOPES = ("batch", "graph", "node")

# PyG's softmax adds this to the denominator; kept for fidelity (it also makes
# a node without incoming edges aggregate exactly zero instead of NaN).
SOFTMAX_EPS = 1e-16


def segment_softmax(
  logits: Array, segment_ids: Array, num_segments: int, mask: Array
) -> Array:
  """Softmax of `logits` `[E, H]` over the edges of each segment (target).

  Masked edges get weight 0 and do not enter the normaliser. A segment whose
  edges are all masked has max `-inf`; it is replaced by 0 so that nothing
  turns into NaN, and its (empty) sum stays 0.

  References:
    PyTorch Geometric `utils.softmax` (max shift, `+1e-16` in the
    denominator), used by the official MTGATConv.
  """
  m = mask[:, None]
  fill = jnp.finfo(logits.dtype).min
  masked = jnp.where(m, logits, fill)
  seg_max = jraph.segment_max(masked, segment_ids, num_segments)
  seg_max = jnp.where(jnp.isfinite(seg_max), seg_max, 0.0)
  # The shift cancels mathematically, so no gradient flows through it.
  seg_max = jax.lax.stop_gradient(seg_max)
  # Zero the exponent of masked edges *before* exp: exp of a huge value
  # would give inf there and a NaN gradient through `where`.
  shifted = jnp.where(m, masked - seg_max[segment_ids], 0.0)
  ex = jnp.exp(shifted) * m
  denom = jraph.segment_sum(ex, segment_ids, num_segments) + SOFTMAX_EPS
  return ex / denom[segment_ids]


def _type_transform(
  x: Array,
  kernel: Array,
  node_type: Array,
  type_blocks: Sequence[int] | None,
) -> Array:
  """`x_n @ kernel[type_n]`; one matmul per type when nodes come in blocks."""
  if type_blocks is not None:
    parts, start = [], 0
    for t, n in enumerate(type_blocks):
      parts.append(x[start : start + n] @ kernel[t])
      start += n
    return jnp.concatenate(parts, axis=0)
  every = jnp.einsum("nd,tdo->nto", x, kernel)
  return jnp.take_along_axis(every, node_type[:, None, None], axis=1)[:, 0]


def _mtgat(
  x: Array,
  node_type: Array,
  senders: Array,
  receivers: Array,
  edge_type: Array,
  edge_mask: Array,
  keep: Array | None,
  *,
  kernel: Array,
  att_src: Array,
  att_dst: Array,
  bias: Array,
  negative_slope: float,
  dropout_rate: float,
  type_blocks: Sequence[int] | None,
) -> tuple[Array, Array]:
  """One graph's MTGAT layer; see `MTGATConv`."""
  num_nodes = x.shape[0]
  num_types, heads, channels = att_src.shape
  h = _type_transform(x, kernel, node_type, type_blocks)
  h = h.reshape(num_nodes, heads, channels)
  # Per node and per edge type first, then gather (node, type) per edge: the
  # official code also computes all types, but per edge ([E, 27, H]).
  a_src = jnp.einsum("nhc,thc->nth", h, att_src)
  a_dst = jnp.einsum("nhc,thc->nth", h, att_dst)
  logits = a_src[senders, edge_type] + a_dst[receivers, edge_type]
  logits = jax.nn.leaky_relu(logits, negative_slope)
  # Attention in at least float32 whatever the compute dtype.
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  alpha = segment_softmax(logits, receivers, num_nodes, edge_mask)
  weights = alpha
  if keep is not None:
    weights = jnp.where(keep, alpha / (1.0 - dropout_rate), 0.0)
  messages = weights.astype(h.dtype)[:, :, None] * h[senders]
  out = jraph.segment_sum(messages, receivers, num_nodes)
  out = out.reshape(num_nodes, heads * channels) + bias
  return out, alpha


class MTGATConv(nn.Module):
  """Multimodal temporal graph attention (one MTGAT layer).

  Each node type has its own linear transform; each (edge type, head) pair
  has its own attention vectors, `att_src` for the sending node and
  `att_dst` for the receiving one. Scores pass a LeakyReLU, are normalised
  over each node's incoming (unmasked) edges, dropped out, and weight the
  senders' transformed features, which are summed, heads concatenated, plus
  a bias. No activation, residual or normalisation, as in the official code.

  Attributes:
    features: output size (heads x channels per head).
    heads: attention heads.
    num_node_types: node types (modalities).
    num_edge_types: edge types.
    dropout_rate: dropout on the attention weights (training only).
    negative_slope: LeakyReLU slope.
    dtype: compute dtype (None: from inputs and parameters).
    param_dtype: parameter dtype.

  References:
    Yang et al., MTAG, NAACL 2021, section 3.3; the official MTGATConv (the
    layout of `kernel` is (type, in, out), applied as `x @ W`).
  """

  features: int = 64
  heads: int = 4
  num_node_types: int = 3
  num_edge_types: int = 27
  dropout_rate: float = 0.1
  negative_slope: float = 0.2
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def parameters(self, x: Array) -> tuple[Array, ...]:
    """Creates (or fetches) the layer's parameters, promoted with `x`.

    Shared by both backends (`mtagjax.dense` subclasses this module), so one
    parameter tree runs on either.

    Returns:
      `(x, kernel, att_src, att_dst, bias)` in the compute dtype.
    """
    if self.features % self.heads:
      raise ValueError(
        f"features ({self.features}) must be divisible by heads ({self.heads})"
      )
    channels = self.features // self.heads
    glorot = functools.partial(
      nn.initializers.glorot_uniform, in_axis=-2, out_axis=-1, batch_axis=(0,)
    )
    kernel = self.param(
      "kernel",
      glorot(),
      (self.num_node_types, x.shape[-1], self.features),
      self.param_dtype,
    )
    att_shape = (self.num_edge_types, self.heads, channels)
    att_src = self.param("att_src", glorot(), att_shape, self.param_dtype)
    att_dst = self.param("att_dst", glorot(), att_shape, self.param_dtype)
    bias = self.param(
      "bias", nn.initializers.zeros, (self.features,), self.param_dtype
    )
    return nn.dtypes.promote_dtype(
      x, kernel, att_src, att_dst, bias, dtype=self.dtype
    )

  @nn.compact
  def __call__(
    self,
    x: Array,
    *,
    node_type: Array,
    senders: Array,
    receivers: Array,
    edge_type: Array,
    edge_mask: Array | None = None,
    type_blocks: Sequence[int] | None = None,
    train: bool = False,
  ) -> tuple[Array, Array]:
    """Applies the layer.

    Args:
      x: node features `[N, D]`, or `[S, N, D]` for a stack of shards.
      node_type: `[N]` (or `[S, N]`) node types in `[0, num_node_types)`.
      senders: `[E]` (or `[S, E]`) source node of each edge.
      receivers: `[E]` (or `[S, E]`) target node of each edge.
      edge_type: `[E]` (or `[S, E]`) edge types.
      edge_mask: `[E]` (or `[S, E]`) booleans, False for padded or pruned
        edges; None means all edges are real.
      type_blocks: static sizes when nodes are grouped by type (type 0's
        rows, then type 1's, ...): then each type costs one matmul.
      train: whether to apply attention dropout (needs a 'dropout' rng).

    Returns:
      `(out, alpha)`: new node features `[..., N, features]` and the
      pre-dropout attention `[..., E, heads]` (zero on masked edges).
    """
    x, kernel, att_src, att_dst, bias = self.parameters(x)
    if edge_mask is None:
      edge_mask = jnp.ones(senders.shape, bool)
    keep = None
    if train and self.dropout_rate > 0.0:
      keep = jax.random.bernoulli(
        self.make_rng("dropout"),
        1.0 - self.dropout_rate,
        (*senders.shape, self.heads),
      )
    fn = functools.partial(
      _mtgat,
      kernel=kernel,
      att_src=att_src,
      att_dst=att_dst,
      bias=bias,
      negative_slope=self.negative_slope,
      dropout_rate=self.dropout_rate,
      type_blocks=type_blocks,
    )
    args = (x, node_type, senders, receivers, edge_type, edge_mask, keep)
    for _ in range(x.ndim - 2):  # leading shard axes
      fn = jax.vmap(fn, in_axes=(0, 0, 0, 0, 0, 0, None if keep is None else 0))
    return fn(*args)


def topk_mask(
  scores: Array,
  mask: Array,
  keep_counts: Array,
  segment_ids: Array | None = None,
  num_segments: int = 1,
) -> Array:
  """Keeps the `k` best-scoring unmasked edges of every segment.

  Ranking is by descending score; ties go to the lower edge index (a stable
  sort), and masked edges rank last and are never kept. `keep_counts` is an
  array, so changing k does not recompile.

  Args:
    scores: `[E]` edge scores.
    mask: `[E]` booleans, the edges still alive.
    keep_counts: `[num_segments]` (or a scalar with `segment_ids=None`)
      number of edges to keep per segment.
    segment_ids: `[E]` segment of each edge; None means one segment.
    num_segments: number of segments.

  Returns:
    `[E]` booleans: the surviving edges.
  """
  n = scores.shape[0]
  iota = jnp.arange(n, dtype=jnp.int32)
  order_key = jnp.where(mask, -scores, jnp.inf)
  if segment_ids is None:
    _, perm = jax.lax.sort((order_key, iota), num_keys=1, is_stable=True)
    rank = jnp.zeros(n, jnp.int32).at[perm].set(iota)
    return mask & (rank < keep_counts)
  seg_sorted, _, perm = jax.lax.sort(
    (segment_ids, order_key, iota), num_keys=2, is_stable=True
  )
  first = jax.ops.segment_min(iota, seg_sorted, num_segments)
  rank = jnp.zeros(n, jnp.int32).at[perm].set(iota - first[seg_sorted])
  return mask & (rank < jnp.asarray(keep_counts)[segment_ids])


def prune_edges(
  scores: Array,
  edge_mask: Array,
  keep_counts: Array,
  *,
  scope: str = "batch",
  edge_graph: Array | None = None,
  receivers: Array | None = None,
) -> Array:
  """Edge pruning as a mask, over shards `[S, E]` (or one graph, `[E]`).

  Scopes:
    * "batch" (official): one ranking over every edge of every graph of every
      shard; `keep_counts` `[S]` (equal rows) holds the global k.
    * "graph": the top k of each graph; `keep_counts` `[S, G]`.
    * "node" (the paper's Algorithm 1): the top k of each node's incoming
      edges; `keep_counts` `[S, N]`.

  Args:
    scores: `[S, E]` scores (the official: mean over heads of the
      pre-dropout attention).
    edge_mask: `[S, E]` edges alive before this pruning.
    keep_counts: see the scopes.
    scope: "batch", "graph" or "node".
    edge_graph: `[S, E]` graph of each edge (scope "graph").
    receivers: `[S, E]` target of each edge (scope "node").

  Returns:
    The new `[S, E]` edge mask.

  References:
    Yang et al., MTAG, NAACL 2021, section 3.4; the official TopKEdgePooling
    keeps `int(0.8 E)` edges of the whole batch.
  """
  if scores.ndim == 1:
    return prune_edges(
      scores[None],
      edge_mask[None],
      jnp.asarray(keep_counts)[None],
      scope=scope,
      edge_graph=None if edge_graph is None else edge_graph[None],
      receivers=None if receivers is None else receivers[None],
    )[0]
  shards, num_edges = scores.shape
  flat = (scores.reshape(-1), edge_mask.reshape(-1))
  if scope == "batch":
    kept = topk_mask(*flat, jnp.reshape(keep_counts, (shards, -1))[0, 0])
  elif scope in ("graph", "node"):
    ids = edge_graph if scope == "graph" else receivers
    if ids is None:
      raise ValueError(f"scope={scope!r} needs its segment ids")
    ids = jnp.asarray(ids)
    per_shard = keep_counts.shape[1]
    offset = (jnp.arange(shards, dtype=ids.dtype) * per_shard)[:, None]
    kept = topk_mask(
      *flat,
      keep_counts.reshape(-1),
      (ids + offset).reshape(-1),
      shards * per_shard,
    )
  else:
    raise ValueError(f"prune scope {scope!r}; expected one of {PRUNE_SCOPES}")
  return kept.reshape(shards, num_edges)
