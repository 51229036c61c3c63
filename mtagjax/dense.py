"""The `dense` MTGAT backend: attention over per-graph node blocks.

The official graph links every cross-modal node pair, so a MOSI-sized graph
is nearly complete and an edge list (`mtagjax.layers`, the `segment` backend)
spends its time gathering and scattering `[E, H, C]` rows. Here each graph
instead owns a padded block of `N` nodes (its nodes in the sample's local
order) and an `[N, N]` table of edge types indexed `[receiver, sender]`
(`-1`: no edge); attention logits and the softmax are elementwise ops over
`[B, H, N, N]` and the aggregation one batched matmul per layer. Graphs come
in a few groups, each with its own `N` (`mtagjax.dense_layout`), and the
layers run as one `lax.scan` (`dense_stack`).

Both backends compute the same function with the same parameters: the layer
subclasses `layers.MTGATConv`, and pruning (`mtagjax.dense_prune`) keeps the
same edges, ties to the lower edge index of the segment layout.

Attention dropout draws its Bernoulli mask from a counter-based hash of the
entry index and a seed taken from the 'dropout' rng: on CPU, JAX's PRNG
costs ~15 ns per value, which for tens of millions of (edge, head) entries
per layer would dominate a training step. Masks therefore differ from the
segment backend's (as they would for any other layout); the distribution is
the same: keep each (edge, head) with probability `1 - rate`, scale by
`1 / (1 - rate)`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtagjax import layers
from mtagjax.dense_prune import prune_dense

Array = jax.Array


# -- dropout -----------------------------------------------------------------


def _fmix32(h: Array) -> Array:
  """MurmurHash3's 32-bit finaliser: a bijective avalanche mix."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_keep_mask(key: Array, shape: Sequence[int], keep_prob: float) -> Array:
  """Bernoulli(`keep_prob`) booleans from a hash of the entry index.

  Two rounds of MurmurHash3's finaliser over `index ^ seed`, compared with
  `keep_prob * 2**32`: one fused elementwise pass, vectorised by XLA, about
  20x cheaper than `jax.random.bernoulli` on CPU. Entries beyond 2**32 would
  repeat the pattern, far above any block this backend builds.

  Args:
    key: a JAX PRNG key (the module's 'dropout' rng).
    shape: mask shape.
    keep_prob: probability of True.

  Returns:
    A boolean array of `shape`.

  References:
    Austin Appleby, MurmurHash3 (public domain), `fmix32`.
  """
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    index = index + iota * jnp.uint32(stride % (1 << 32))
    stride *= shape[axis]
  h = _fmix32(index * jnp.uint32(0x9E3779B9) ^ seed[0])
  h = _fmix32(h ^ seed[1])
  threshold = min(int(round(keep_prob * 2.0**32)), 2**32 - 1)
  return h < jnp.uint32(threshold)


# -- the layer ---------------------------------------------------------------

# The logit of dead entries (no edge, or pruned): exp() of it, shifted by any
# real row maximum, is exactly 0, so the softmax needs no separate mask.
_DEAD = -1e30


def _gather_logits(a_dst: Array, a_src: Array, table: Array) -> Array:
  """`a_dst[i, t_ij] + a_src[j, t_ij]` for every entry of the type table.

  Args:
    a_dst: `[B, H, N, T]` receiver terms per node and type.
    a_src: `[B, H, N, T]` sender terms.
    table: `[B, N, N]` int32 type of each entry, in `[0, T)`.

  Returns:
    `[B, H, N, N]` logits before the LeakyReLU.
  """
  b, heads, n, types = a_dst.shape
  t = table[:, None]
  # Every type is in [0, T) by construction: no bounds checks and no
  # out-of-range fill per entry (~10 % of a MOSI-sized train step on CPU).
  dst = jnp.take_along_axis(a_dst, t, axis=-1, mode="promise_in_bounds")
  # Sender j's row of the flattened [N * T] table, at column t_ij.
  col = jnp.arange(n, dtype=jnp.int32)[None, None, None, :] * types + t
  src = jnp.take_along_axis(
    a_src.reshape(b, heads, n * types),
    col.reshape(b, 1, n * n),
    axis=-1,
    mode="promise_in_bounds",
  )
  return dst + src.reshape(b, heads, n, n)


def dense_mtgat(
  x: Array,
  node_type: Array,
  edge_type: Array,
  alive: Array,
  dropout_key: Array | None,
  *,
  kernel: Array,
  att_src: Array,
  att_dst: Array,
  bias: Array,
  negative_slope: float,
  dropout_rate: float,
) -> tuple[Array, Array]:
  """One MTGAT layer over dense blocks (pure function; see `DenseMTGATConv`).

  Args:
    x: `[B, N, D]` node features.
    node_type: `[B, N]` node types.
    edge_type: `[B, N, N]` edge types, indexed `[receiver, sender]`.
    alive: `[B, N, N]` booleans, the edges still present.
    dropout_key: PRNG key for attention dropout, or None (no dropout).
    kernel, att_src, att_dst, bias: the `MTGATConv` parameters.
    negative_slope: LeakyReLU slope.
    dropout_rate: attention dropout rate.

  Returns:
    `(out [B, N, D], alpha [B, H, N, N])`, alpha pre-dropout and zero where
    there is no live edge.
  """
  b, n, _ = x.shape
  num_types, heads, channels = att_src.shape
  h = layers._type_transform(
    x.reshape(b * n, x.shape[-1]), kernel, node_type.reshape(-1), None
  ).reshape(b, n, heads, channels)
  h = h.transpose(0, 2, 1, 3)  # [B, H, N, C]: heads lead the matmuls
  # Attention in at least float32 whatever the compute dtype.
  acc = jnp.promote_types(h.dtype, jnp.float32)
  # Column `num_types` is where dead entries point (any finite value).
  dead = jnp.zeros((b, heads, n, 1), acc)
  a_src = jnp.einsum("bhnc,thc->bhnt", h, att_src).astype(acc)
  a_dst = jnp.einsum("bhnc,thc->bhnt", h, att_dst).astype(acc)
  # Dead entries (no edge, pruned, or alive without a type) point at the
  # dead column, so every index the gathers see is in range.
  live = alive & (edge_type >= 0) & (edge_type < num_types)
  table = jnp.where(live, edge_type, num_types).astype(jnp.int32)
  logits = _gather_logits(
    jnp.concatenate([a_dst, dead], -1),
    jnp.concatenate([a_src, dead], -1),
    table,
  )
  logits = jnp.where(
    table[:, None] < num_types,
    jax.nn.leaky_relu(logits, negative_slope),
    _DEAD,
  )
  # The shift cancels in the ratio; no gradient through it (as PyG). A row
  # without live entries has the dead value as maximum: shift it far
  # above, so that its entries, too, get exactly 0.
  row_max = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  row_max = jnp.where(row_max > 0.1 * _DEAD, row_max, -_DEAD)
  ex = jnp.exp(logits - row_max)
  alpha = ex / (ex.sum(-1, keepdims=True) + layers.SOFTMAX_EPS)
  weights = alpha
  if dropout_key is not None:
    keep = hash_keep_mask(dropout_key, alpha.shape, 1.0 - dropout_rate)
    weights = jnp.where(keep, alpha / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhij,bhjc->bihc", weights.astype(h.dtype), h)
  return out.reshape(b, n, heads * channels) + bias, alpha


class DenseMTGATConv(layers.MTGATConv):
  """`layers.MTGATConv` over dense node blocks; the same parameters.

  Attributes:
    remat: recompute the layer in the backward pass instead of keeping its
      `[B, H, N, N]` intermediates (they would take gigabytes per layer on
      a MOSI-sized batch).

  References:
    Yang et al., MTAG, NAACL 2021, section 3.3; see `layers.MTGATConv`.
  """

  remat: bool = True

  @nn.compact
  def __call__(
    self,
    x: Array,
    *,
    node_type: Array | None = None,
    edge_type: Array | None = None,
    alive: Array | None = None,
    train: bool = False,
    params_only: bool = False,
  ) -> tuple[Array, ...]:
    """Applies the layer to one group of blocks.

    Args:
      x: `[..., B, N, D]` node features (leading axes: shards).
      node_type: `[..., B, N]` node types.
      edge_type: `[..., B, N, N]` int edge types, `-1` where no edge.
      alive: `[..., B, N, N]` booleans, the edges still present (None: all
        edges of `edge_type`).
      train: whether to apply attention dropout (needs a 'dropout' rng).
      params_only: return the parameters `(kernel, att_src, att_dst,
        bias)` in the compute dtype instead (for `dense_stack`, which runs
        the layers in a scan).

    Returns:
      `(out [..., B, N, features], alpha [..., B, heads, N, N])`.
    """
    x, kernel, att_src, att_dst, bias = self.parameters(x)
    if params_only:
      return kernel, att_src, att_dst, bias
    if alive is None:
      alive = edge_type >= 0
    key = None
    if train and self.dropout_rate > 0.0:
      key = self.make_rng("dropout")
    fn = functools.partial(
      dense_mtgat,
      kernel=kernel,
      att_src=att_src,
      att_dst=att_dst,
      bias=bias,
      negative_slope=self.negative_slope,
      dropout_rate=self.dropout_rate,
    )
    lead = x.shape[:-2]  # shard axes, then the group's graphs
    args = (
      x.reshape(-1, *x.shape[-2:]),
      node_type.reshape(-1, node_type.shape[-1]),
      edge_type.reshape(-1, *edge_type.shape[-2:]),
      alive.reshape(-1, *alive.shape[-2:]),
      key,
    )
    if self.remat:
      fn = jax.checkpoint(fn)
    out, alpha = fn(*args)
    return (
      out.reshape(*lead, *out.shape[-2:]),
      alpha.reshape(*lead, *alpha.shape[-3:]),
    )


# -- the layer stack -----------------------------------------------------------


def dense_stack(
  xs: Sequence[Array],
  node_types: Sequence[Array],
  edge_types: Sequence[Array],
  edge_ids: Sequence[Array],
  params: tuple[Array, ...],
  keep_counts: Sequence[Array],
  *,
  dropout_keys: Array | None,
  prune_keys: Array | None,
  prune: bool,
  prune_scope: str,
  negative_slope: float,
  dropout_rate: float,
  remat: bool = True,
) -> tuple[list[Array], dict]:
  """All MTGAT layers and prunings, as one `lax.scan` over the layers.

  A scan lets XLA reuse one layer's `[B, H, N, N]` buffers for the next,
  and with `remat` the backward pass keeps only each layer's inputs (node
  features and alive masks) and recomputes the rest.

  Args:
    xs: per group `[S, B, N, D]` input node features.
    node_types: per group `[S, B, N]`.
    edge_types: per group `[S, B, N, N]` (`-1`: no edge).
    edge_ids: per group `[S, B, N, N]` segment-layout edge ids.
    params: `(kernel, att_src, att_dst, bias)`, each stacked `[L, ...]`.
    keep_counts: per layer (leading `[L]`), as `prune_dense` takes them.
    dropout_keys: `[L]` keys (None: no dropout).
    prune_keys: `[L]` keys for random pruning (None: prune by attention).
    prune: whether to prune after each layer.
    prune_scope: "batch", "graph" or "node".
    negative_slope: LeakyReLU slope.
    dropout_rate: attention dropout rate.
    remat: recompute each layer in the backward pass.

  Returns:
    `(xs, aux)`: the final per-group node features and `aux` with, per
    group, `nodes` `[L+1, S, B, N, D]`, `attention` `[L, S, B, H, N, N]` and
    `edge_mask` `[L+1, S, B, N, N]`.
  """
  num_groups = len(xs)
  alive0 = [t >= 0 for t in edge_types]
  flat = lambda a: a.reshape(-1, *a.shape[2:])  # shards x graphs -> [B]

  def body(carry, inputs):
    xs, alive = carry
    layer_params, keep, dkey, pkey = inputs
    kernel, att_src, att_dst, bias = layer_params
    outs, alphas = [], []
    for g in range(num_groups):
      lead = xs[g].shape[:2]
      key = None if dkey is None else jax.random.fold_in(dkey, g)
      out, alpha = dense_mtgat(
        flat(xs[g]),
        flat(node_types[g]),
        flat(edge_types[g]),
        flat(alive[g]),
        key,
        kernel=kernel,
        att_src=att_src,
        att_dst=att_dst,
        bias=bias,
        negative_slope=negative_slope,
        dropout_rate=dropout_rate,
      )
      outs.append(out.reshape(*lead, *out.shape[1:]))
      alphas.append(alpha.reshape(*lead, *alpha.shape[1:]))
    new_alive = alive
    if prune:
      if pkey is None:
        scores = [a.mean(-3) for a in alphas]
      else:
        scores = [
          jax.random.uniform(jax.random.fold_in(pkey, g), a.shape)
          for g, a in enumerate(alive)
        ]
      new_alive = prune_dense(scores, alive, edge_ids, keep, scope=prune_scope)
    return (outs, new_alive), (outs, alphas, new_alive)

  if remat:
    body = jax.checkpoint(body)
  (final, _), (nodes, attention, masks) = jax.lax.scan(
    body,
    (list(xs), alive0),
    (params, list(keep_counts), dropout_keys, prune_keys),
  )
  aux = dict(
    nodes=tuple(
      jnp.concatenate([x[None], n]) for x, n in zip(xs, nodes, strict=True)
    ),
    attention=tuple(attention),
    edge_mask=tuple(
      jnp.concatenate([a[None], m]) for a, m in zip(alive0, masks, strict=True)
    ),
  )
  return final, aux
