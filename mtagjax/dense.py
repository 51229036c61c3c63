"""The `dense` MTGAT backend: attention over per-modality node blocks.

The official graph links every cross-modal node pair, so a MOSI-sized graph
is nearly complete across modalities and an edge list (`mtagjax.layers`, the
`segment` backend) spends its time gathering and scattering `[E, H, C]`
rows. Here each graph's nodes are padded modality by modality, and its edges
live in one table per (receiver modality, sender modality) block
(`mtagjax.dense_layout`): dense `[N_r, N_s]` across modalities, a band of
(self, next, previous) within one. Attention logits are selects among three
precomputed terms per entry, the softmax runs over each receiver's row of
blocks, and the aggregation is one batched matmul per cross block. Graphs
come in a few groups, each with its own budgets, and the layers run as one
`lax.scan` (`dense_stack`).

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
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtagjax import dense_layout, layers
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

  MurmurHash3's finaliser over the seeded, scrambled entry index, compared
  with `keep_prob * 2**32`: one fused elementwise pass, vectorised by XLA,
  far cheaper than `jax.random.bernoulli` on CPU. Entries beyond 2**32 would
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
  # The flat entry index plus a seed-derived offset, in Horner form over
  # per-axis ranges that already hold the seed: nothing here is free of the
  # seed, so nothing is loop-invariant inside the layer scan. (From a
  # seed-free iota, JAX would hoist the full-size index out of the scan as
  # a residual of the recomputed layer, and the backward pass would read a
  # u32 array per block instead of computing it in the fused pass.)
  index = jnp.zeros((), jnp.uint32)
  for axis, size in enumerate(shape):
    ranged = jnp.arange(size, dtype=jnp.uint32) + seed[1]
    ranged = ranged.reshape(
      [size if a == axis else 1 for a in range(len(shape))]
    )
    index = index * jnp.uint32(size % (1 << 32)) + ranged
  # Scrambled by an odd multiplier (a bijection), then one avalanche mix.
  # A second round cost ~0.1 s of a MOSI-sized train step on CPU and
  # changed no statistic the tests check (rate, pairs at strides 1 to
  # 2**18, different keys: all within sampling noise).
  h = _fmix32(index * jnp.uint32(0x9E3779B9) ^ seed[0])
  threshold = min(int(round(keep_prob * 2.0**32)), 2**32 - 1)
  return h < jnp.uint32(threshold)


# -- the layer ---------------------------------------------------------------

# The logit of dead entries (no edge, or pruned): exp() of it, shifted by any
# real row maximum, is exactly 0, so the softmax needs no separate mask.
_DEAD = -1e30


def _shift(a: Array, offset: int, axis: int) -> Array:
  """`out[i] = a[i + offset]` along `axis`, zero where out of range."""
  if offset == 0:
    return a
  n = a.shape[axis]
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, offset) if offset > 0 else (-offset, 0)
  kept = (
    jax.lax.slice_in_dim(a, offset, n, axis=axis)
    if offset > 0
    else jax.lax.slice_in_dim(a, 0, n + offset, axis=axis)
  )
  return jnp.pad(kept, pad)


def _select(code: Array, terms: Sequence[Array]) -> Array:
  """`terms[code]` per entry (`code` outside the range: the last term)."""
  out = terms[-1]
  for k in range(len(terms) - 2, -1, -1):
    out = jnp.where(code == k, terms[k], out)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_terms(num: int, dst: Array, src: Array, code: Array) -> Array:
  """`dst[i, c_ij] + src[j, c_ij]` over a dense block (`c`: the code).

  Args:
    num: number of codes K.
    dst: `[B, H, N_r, K]` receiver terms per code.
    src: `[B, H, N_s, K]` sender terms per code.
    code: `[B, N_r, N_s]` code per entry (outside `[0, K)`: the last).
  """
  terms = [dst[..., k, None] + src[:, :, None, :, k] for k in range(num)]
  return _select(code[:, None], terms)


def _cross_terms_fwd(num, dst, src, code):
  return _cross_terms(num, dst, src, code), code


def _cross_terms_bwd(num, code, g):
  # Per code one row sum (receiver terms) and one column sum (sender terms)
  # of the cotangent on that code's entries. Written out, each code costs
  # one select instead of the chain autodiff makes of the nested selects
  # (7.3 -> 5.3 ms for one [4, 4, 400, 400] block on CPU, measured with
  # another job running).
  code = code[:, None]
  parts = []
  for k in range(num):
    if k < num - 1:
      on = code == k
    else:  # the last term also takes out-of-range codes, as in `_select`
      on = functools.reduce(
        jnp.logical_and, [code != j for j in range(k)], jnp.ones((), bool)
      )
    parts.append(jnp.where(on, g, jnp.zeros((), g.dtype)))
  d_dst = jnp.stack([p.sum(-1) for p in parts], -1)
  d_src = jnp.stack([p.sum(-2) for p in parts], -1)
  return d_dst, d_src, None


_cross_terms.defvjp(_cross_terms_fwd, _cross_terms_bwd)


def _block_logits(a_dst, a_src, code, types, band: bool):
  """Attention logits of one block, before the LeakyReLU.

  `a_dst[i, t] + a_src[j, t]` with `t` the entry's type: each entry picks
  one of `K` terms by its code (elementwise selects, no gather over the
  entries; their gradient is a row and a column sum per code).

  Args:
    a_dst: `[B, H, N_r, T]` receiver terms per node and edge type.
    a_src: `[B, H, N_s, T]` sender terms.
    code: `[B, N_r, W]` int8 code of each entry.
    types: `[B, K]` edge type of each code.
    band: whether the block is a band (columns: senders at `BAND_OFFSETS`
      from the receiver, in the receiver's modality).

  Returns:
    `[B, H, N_r, W]` logits.
  """
  # Types come from the batch: keep the small gathers in range whatever
  # they hold (the layout only writes types below T).
  pick = jnp.clip(types, 0, a_dst.shape[-1] - 1)[:, None, None, :]
  dst = jnp.take_along_axis(a_dst, pick, -1, mode="promise_in_bounds")
  src = jnp.take_along_axis(a_src, pick, -1, mode="promise_in_bounds")
  code = code[:, None]  # [B, 1, N_r, W]
  num = types.shape[-1]
  if band:
    # [B, H, N_r, 3 columns, K]: the sender term of each band column.
    src = jnp.stack(
      [_shift(src, o, axis=2) for o in dense_layout.BAND_OFFSETS], 3
    )
    terms = [dst[..., k : k + 1] + src[..., k] for k in range(num)]
    return _select(code, terms)
  return _cross_terms(num, dst, src, code[:, 0])


def dense_mtgat(
  xs: Sequence[Array],
  codes: Sequence[Array],
  types: Sequence[Array],
  alive: Sequence[Array],
  dropout_key: Array | None,
  *,
  intra: str,
  kernel: Array,
  att_src: Array,
  att_dst: Array,
  bias: Array,
  negative_slope: float,
  dropout_rate: float,
) -> tuple[list[Array], list[Array]]:
  """One MTGAT layer over modality blocks (pure; see `DenseMTGATConv`).

  Args:
    xs: per modality `[B, N_m, D]` node features (modality m's nodes have
      node type m).
    codes: per block (`DenseGroup.pairs()` order) `[B, N_r, W]` int8 type
      codes, -1 where no edge.
    types: per block `[B, K]` edge type of each code.
    alive: per block `[B, N_r, W]` booleans, the edges still present.
    dropout_key: PRNG key for attention dropout, or None (no dropout).
    intra: "adjacent" (intra-modal blocks are bands) or "all_to_all".
    kernel, att_src, att_dst, bias: the `MTGATConv` parameters.
    negative_slope: LeakyReLU slope.
    dropout_rate: attention dropout rate.

  Returns:
    `(outs, alphas)`: per modality `[B, N_m, features]`, and per block
    `[B, H, N_r, W]` attention, pre-dropout and zero where no live edge.
  """
  num_mod = len(xs)
  heads, channels = att_src.shape[1:]
  hs = [
    jnp.einsum(
      "bnd,dhc->bhnc", x, kernel[m].reshape(x.shape[-1], heads, channels)
    )
    for m, x in enumerate(xs)
  ]  # [B, H, N_m, C]: heads lead the matmuls
  # Attention in at least float32 whatever the compute dtype.
  acc = jnp.promote_types(hs[0].dtype, jnp.float32)
  a_src = [jnp.einsum("bhnc,thc->bhnt", h, att_src).astype(acc) for h in hs]
  a_dst = [jnp.einsum("bhnc,thc->bhnt", h, att_dst).astype(acc) for h in hs]
  blocks = dense_layout.block_pairs(num_mod, intra)
  pairs = [(r, s) for r, s, _ in blocks]
  band = [b for _, _, b in blocks]
  outs, alphas = [], [None] * len(pairs)
  for r in range(num_mod):
    mine = [k for k, (rr, _) in enumerate(pairs) if rr == r]
    logits = {}
    for k in mine:
      s = pairs[k][1]
      raw = _block_logits(a_dst[r], a_src[s], codes[k], types[k], band[k])
      live = (alive[k] & (codes[k] >= 0))[:, None]
      # Dead entries: the logit plus `_DEAD`, so far below any live logit
      # that their exp() after the row shift is exactly 0, as with a
      # select, and so is their cotangent. A select's gradient would need a
      # full-size zero fill, which JAX hoists out of the layer scan as a
      # loop-invariant residual and reads back on every layer.
      dead = jnp.where(live, 0.0, _DEAD).astype(raw.dtype)
      logits[k] = jax.nn.leaky_relu(raw, negative_slope) + dead
    # The shift cancels in the ratio; no gradient through it (as PyG). A
    # row without live entries has the dead value as maximum: shift it far
    # above, so that its entries, too, get exactly 0.
    row_max = functools.reduce(
      jnp.maximum, [v.max(-1) for v in logits.values()]
    )
    row_max = jax.lax.stop_gradient(row_max)
    row_max = jnp.where(row_max > 0.1 * _DEAD, row_max, -_DEAD)[..., None]
    ex = {k: jnp.exp(v - row_max) for k, v in logits.items()}
    denom = sum(v.sum(-1, keepdims=True) for v in ex.values())
    inv = 1.0 / (denom + layers.SOFTMAX_EPS)
    out = None
    for k in mine:
      alpha = ex[k] * inv
      alphas[k] = alpha
      weights = alpha
      if dropout_key is not None:
        keep = hash_keep_mask(
          jax.random.fold_in(dropout_key, k), alpha.shape, 1.0 - dropout_rate
        )
        # A product with the mask rather than a select (no zero fill in
        # the gradient, as for the logits above).
        weights = alpha / (1.0 - dropout_rate) * keep.astype(alpha.dtype)
      weights = weights.astype(hs[r].dtype)
      s = pairs[k][1]
      if band[k]:
        part = sum(
          weights[..., c, None] * _shift(hs[r], o, axis=2)
          for c, o in enumerate(dense_layout.BAND_OFFSETS)
        )
      else:
        part = jnp.einsum("bhij,bhjc->bhic", weights, hs[s])
      out = part if out is None else out + part
    b, _, n, _ = out.shape
    outs.append(
      out.transpose(0, 2, 1, 3).reshape(b, n, heads * channels) + bias
    )
  return outs, alphas


class DenseMTGATConv(layers.MTGATConv):
  """`layers.MTGATConv` over modality blocks; the same parameters.

  Attributes:
    remat: recompute the layer in the backward pass instead of keeping its
      `[B, H, N_r, W]` intermediates (they would take gigabytes per layer
      on a MOSI-sized batch).

  References:
    Yang et al., MTAG, NAACL 2021, section 3.3; see `layers.MTGATConv`.
  """

  remat: bool = True

  @nn.compact
  def __call__(
    self,
    xs: Sequence[Array],
    *,
    codes: Sequence[Array] | None = None,
    types: Sequence[Array] | None = None,
    alive: Sequence[Array] | None = None,
    intra: str = "adjacent",
    train: bool = False,
    params_only: bool = False,
  ) -> tuple[Array, ...]:
    """Applies the layer to one group of graphs (`DenseGroup` blocks).

    Args:
      xs: per modality `[..., B, N_m, D]` node features (leading axes:
        shards); modality m's nodes use node type m.
      codes: per block `[..., B, N_r, W]` int8 codes, -1 where no edge.
      types: per block `[..., B, K]` edge type of each code.
      alive: per block `[..., B, N_r, W]` booleans, the edges still present
        (None: all edges of `codes`).
      intra: as `DenseGroup.intra`.
      train: whether to apply attention dropout (needs a 'dropout' rng).
      params_only: return the parameters `(kernel, att_src, att_dst,
        bias)` in the compute dtype instead (for `dense_stack`, which runs
        the layers in a scan).

    Returns:
      `(outs, alphas)`: per modality `[..., B, N_m, features]`, per block
      `[..., B, heads, N_r, W]`.
    """
    x0, kernel, att_src, att_dst, bias = self.parameters(xs[0])
    if params_only:
      return kernel, att_src, att_dst, bias
    if len(xs) != self.num_node_types:
      raise ValueError(
        f"{len(xs)} modalities of node features for {self.num_node_types} "
        "node types; the dense layer takes one array per modality"
      )
    if len(codes) != len(xs) ** 2 or len(types) != len(codes):
      raise ValueError(
        f"codes and types need one block per (receiver, sender) modality "
        f"pair ({len(xs) ** 2}); got {len(codes)} and {len(types)}"
      )
    if alive is None:
      alive = [c >= 0 for c in codes]
    key = None
    if train and self.dropout_rate > 0.0:
      key = self.make_rng("dropout")
    xs = [x.astype(x0.dtype) for x in xs]
    fn = functools.partial(
      dense_mtgat,
      intra=intra,
      kernel=kernel,
      att_src=att_src,
      att_dst=att_dst,
      bias=bias,
      negative_slope=self.negative_slope,
      dropout_rate=self.dropout_rate,
    )
    lead = xs[0].shape[:-2]  # shard axes, then the group's graphs

    def flat(a, keep):
      return a.reshape(-1, *a.shape[a.ndim - keep :])

    if self.remat:
      fn = jax.checkpoint(fn)
    outs, alphas = fn(
      [flat(x, 2) for x in xs],
      [flat(c, 2) for c in codes],
      [flat(t, 1) for t in types],
      [flat(a, 2) for a in alive],
      key,
    )
    return (
      [o.reshape(*lead, *o.shape[1:]) for o in outs],
      [a.reshape(*lead, *a.shape[1:]) for a in alphas],
    )


# -- the layer stack -----------------------------------------------------------


def prune_families(blocks: Sequence[Sequence], scope: str) -> list[list]:
  """Per group, per block values -> the families `prune_dense` ranks in.

  "batch": every block in one family; "graph": one family per group; "node":
  one per (group, receiver modality), the blocks holding that modality's
  incoming edges.
  """
  if scope == "batch":
    return [dense_layout.flat_blocks(blocks)]
  if scope == "graph":
    return [list(group) for group in blocks]
  families = []
  for group in blocks:
    num_mod = math.isqrt(len(group))
    for r in range(num_mod):
      families.append(list(group[r * num_mod : (r + 1) * num_mod]))
  return families


def _unfamily(families: Sequence[Sequence], blocks: Sequence[Sequence]):
  """Inverse of `prune_families` (same block order): per group lists."""
  flat = dense_layout.flat_blocks(families)
  out, start = [], 0
  for group in blocks:
    out.append(list(flat[start : start + len(group)]))
    start += len(group)
  return out


def dense_stack(
  xs: Sequence[Sequence[Array]],
  codes: Sequence[Sequence[Array]],
  types: Sequence[Sequence[Array]],
  edge_ids: Sequence[Sequence[Array]],
  params: tuple[Array, ...],
  keep_counts: Sequence[Array],
  *,
  intra: str,
  dropout_keys: Array | None,
  prune_keys: Array | None,
  prune: bool,
  prune_scope: str,
  negative_slope: float,
  dropout_rate: float,
  remat: bool = True,
) -> tuple[list[list[Array]], dict]:
  """All MTGAT layers and prunings, as one `lax.scan` over the layers.

  A scan lets XLA reuse one layer's block buffers for the next, and with
  `remat` the backward pass keeps only each layer's inputs (node features
  and alive masks) and recomputes the rest.

  Args:
    xs: per group, per modality `[S, B, N_m, D]` input node features.
    codes, types, edge_ids: per group, per block, as in `DenseGroup`.
    params: `(kernel, att_src, att_dst, bias)`, each stacked `[L, ...]`.
    keep_counts: per pruning family (`prune_families`), leading `[L]`:
      "batch": `[L]`; "graph": `[L, S, B]`; "node": `[L, S, B, N_r]`.
    intra: as `DenseGroup.intra`.
    dropout_keys: `[L]` keys (None: no dropout).
    prune_keys: `[L]` keys for random pruning (None: prune by attention).
    prune: whether to prune after each layer.
    prune_scope: "batch", "graph" or "node".
    negative_slope: LeakyReLU slope.
    dropout_rate: attention dropout rate.
    remat: recompute each layer in the backward pass.

  Returns:
    `(xs, aux)`: the final per-group, per-modality node features and `aux`
    with, per group, per modality `nodes` `[L+1, S, B, N_m, D]`, and per
    block `attention` `[L, S, B, H, N_r, W]` and `edge_mask`
    `[L+1, S, B, N_r, W]`.
  """
  alive0 = [[c >= 0 for c in group] for group in codes]
  flat = lambda a: a.reshape(-1, *a.shape[2:])  # shards x graphs -> [B]
  unflat = lambda a, like: a.reshape(*like.shape[:2], *a.shape[1:])

  def body(carry, inputs):
    xs, alive = carry
    layer_params, keep, dkey, pkey = inputs
    kernel, att_src, att_dst, bias = layer_params
    outs, alphas = [], []
    for g in range(len(xs)):
      key = None if dkey is None else jax.random.fold_in(dkey, g)
      out, alpha = dense_mtgat(
        [flat(x) for x in xs[g]],
        [flat(c) for c in codes[g]],
        [flat(t) for t in types[g]],
        [flat(a) for a in alive[g]],
        key,
        intra=intra,
        kernel=kernel,
        att_src=att_src,
        att_dst=att_dst,
        bias=bias,
        negative_slope=negative_slope,
        dropout_rate=dropout_rate,
      )
      outs.append([unflat(o, x) for o, x in zip(out, xs[g], strict=True)])
      alphas.append(
        [unflat(a, c) for a, c in zip(alpha, codes[g], strict=True)]
      )
    new_alive = alive
    if prune:
      if pkey is None:
        # No gradient flows through the ranking; without the stop, the
        # JVP of its selects keeps full-size fill constants as residuals,
        # which JAX hoists out of the scan and materialises on every step.
        scores = [
          [jax.lax.stop_gradient(a.mean(-3)) for a in group] for group in alphas
        ]
      else:
        scores, k = [], 0
        for group in alive:
          scores.append([])
          for a in group:
            key = jax.random.fold_in(pkey, k)
            scores[-1].append(jax.random.uniform(key, a.shape))
            k += 1
      kept = prune_dense(
        prune_families(scores, prune_scope),
        prune_families(alive, prune_scope),
        prune_families(edge_ids, prune_scope),
        keep,
        scope=prune_scope,
      )
      new_alive = _unfamily(kept, alive)
    return (outs, new_alive), (outs, alphas, new_alive)

  if remat:
    body = jax.checkpoint(body)
  (final, _), (nodes, attention, masks) = jax.lax.scan(
    body,
    ([list(x) for x in xs], alive0),
    (params, list(keep_counts), dropout_keys, prune_keys),
  )
  cat = lambda first, rest: jnp.concatenate([first[None], rest])
  aux = dict(
    nodes=tuple(
      tuple(cat(x, n) for x, n in zip(xg, ng, strict=True))
      for xg, ng in zip(xs, nodes, strict=True)
    ),
    attention=tuple(tuple(group) for group in attention),
    edge_mask=tuple(
      tuple(cat(a, m) for a, m in zip(ag, mg, strict=True))
      for ag, mg in zip(alive0, masks, strict=True)
    ),
  )
  return final, aux
