"""Exact top-k edge pruning over dense blocks, without sorting.

The `dense` backend keeps its edges in blocks of `[S, B, N_r, W]` tables,
so pruning is a mask again, and must keep exactly the edges
`layers.prune_edges` keeps: the k best scores per segment (the batch, a
graph or a receiving node), ties to the lower edge index of the segment
layout. Sorting tens of millions of
entries per layer is slow; instead the k-th largest score is found exactly
on an order-preserving integer key of the floats, by histograms over 16-bit
digits (one scatter-add pass per digit) or, per node, by fixing one bit per
counting pass. The cut among scores equal to it is found the same way over
the edge ids (histograms of the flipped ids, or bisection per node), only
when some segment needs one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtagjax import layers

Array = jax.Array


def order_key(scores: Array) -> Array:
  """An unsigned integer key whose order is the order of the float scores.

  Non-negative floats compare like their bit patterns; negative ones compare
  reversed. Flipping every bit of negatives and the sign bit of the rest
  gives one unsigned order for all (NaN aside). Never 0 for a real score
  except the most negative NaN pattern, so 0 can mark dead entries.
  """
  width = jnp.finfo(scores.dtype).bits
  utype = jnp.uint64 if width == 64 else jnp.uint32
  # Scores equal to 0 (-0.0, and denormals where they are flushed) are one
  # tie, so give them one key: +0.0 (`x - x` is +0.0 for finite x). No
  # scalar fill: under `jax.grad` of a scanned, rematerialised layer stack,
  # a broadcast constant becomes a loop-invariant residual that JAX hoists
  # and materialises full-size.
  scores = jnp.where(scores == 0, scores - scores, scores)
  bits = jax.lax.bitcast_convert_type(scores, utype)
  sign = utype(1) << utype(width - 1)
  return jnp.where(bits & sign, ~bits, bits | sign)


def _radix_max(nbits: int, utype, start, ok: Callable[[Array], Array]):
  """The largest value `v` (bits decided MSB first) with `ok(v)` true.

  `ok` must be monotone (true up to some value, false above).
  """

  def body(i, v):
    bit = (nbits - 1 - i).astype(utype)
    cand = v | (jnp.asarray(1, utype) << bit)
    return jnp.where(ok(cand), cand, v)

  return jax.lax.fori_loop(0, nbits, body, start)


class _Segments(NamedTuple):
  """How the entries of the groups split into ranking segments.

  Attributes:
    num: number of segments.
    ids: per group, the segment of each entry (broadcastable), or None.
    count: per-group booleans -> `[num]` counts.
    expand: `[num]` per-segment values -> broadcastable per group, as a
      function of the group's position.
  """

  num: int
  ids: Sequence[Array] | None
  count: Callable[[Sequence[Array]], Array]
  expand: Callable[[Array, int], Array]


_DIGIT = 16  # bits per histogram level


def _kth_by_histogram(keys, alive, k, seg: _Segments):
  """The k-th largest key per segment, 16 bits per level by histograms.

  Each level counts the entries whose higher digits match the prefix found
  so far in one scatter-add pass (`[num, 65536]` bins), and picks the digit
  where the count from the top reaches the rank still missing.

  Returns:
    `(tau, rest, num_equal)`: the key, how many entries equal to it are to
    be kept, and how many there are.
  """
  utype = keys[0].dtype
  nbits = jnp.iinfo(utype).bits
  bins = 1 << _DIGIT
  prefix = jnp.zeros((seg.num,), utype)
  rest = k
  for level in range(nbits // _DIGIT):
    shift = nbits - _DIGIT * (level + 1)
    hist = jnp.zeros((seg.num * bins,), jnp.int32)
    for g, (key, live) in enumerate(zip(keys, alive, strict=True)):
      digit = ((key >> shift) & (bins - 1)).astype(jnp.int32)
      match = live
      if level:
        high = key >> (shift + _DIGIT)
        match = match & (high == seg.expand(prefix, g))
      index = digit if seg.ids is None else seg.ids[g] * bins + digit
      index = jnp.broadcast_to(index, key.shape)
      hist = hist.at[index.reshape(-1)].add(match.reshape(-1).astype(jnp.int32))
    hist = hist.reshape(seg.num, bins)
    at_least = jnp.cumsum(hist[:, ::-1], -1)[:, ::-1]  # count >= digit
    if not level:
      rest = jnp.minimum(rest, at_least[:, 0])  # k past the live count
    digit = jnp.maximum((at_least >= rest[:, None]).sum(-1) - 1, 0)
    above = jnp.take_along_axis(
      jnp.pad(at_least, ((0, 0), (0, 1))), digit[:, None] + 1, 1
    )[:, 0]
    rest = rest - above
    prefix = (prefix << _DIGIT) | digit.astype(utype)
  num_equal = jnp.take_along_axis(hist, digit[:, None], 1)[:, 0]
  return prefix, rest, num_equal


def _kth_by_bisection(keys, alive, k, seg: _Segments):
  """As `_kth_by_histogram`, one counting pass per key bit (no scatter)."""
  del alive  # dead keys are 0 and every candidate is >= 1
  utype = keys[0].dtype
  nbits = jnp.iinfo(utype).bits
  exp = seg.expand

  def at_least_k(v):
    return seg.count([key >= exp(v, g) for g, key in enumerate(keys)]) >= k

  tau = _radix_max(nbits, utype, jnp.zeros(k.shape, utype), at_least_k)
  rest = k - seg.count([key > exp(tau, g) for g, key in enumerate(keys)])
  num_equal = seg.count(
    [(key == exp(tau, g)) & (key > 0) for g, key in enumerate(keys)]
  )
  return tau, rest, num_equal


def select_top(
  keys: Sequence[Array],
  alive: Sequence[Array],
  edge_ids: Sequence[Array],
  k: Array,
  seg: _Segments,
  *,
  method: str = "histogram",
) -> list[Array]:
  """The `k` largest keys of each segment, ties to the lower edge id.

  Exact selection without a sort: find the k-th largest key (by histograms
  over 16-bit digits, or by fixing one bit per counting pass), keep every
  key above it, and among the keys equal to it the `rest` lowest edge ids,
  found by the same method over the (flipped) ids; skipped when no segment
  needs it.

  Args:
    keys: per group, unsigned keys (`order_key`), 0 on dead entries.
    alive: per group, the live entries.
    edge_ids: per group, int32 edge ids (non-negative where alive).
    k: `[seg.num]` keep counts.
    seg: the segments.
    method: "histogram" or "bisection".

  Returns:
    Per group, the kept-entry booleans.
  """
  k = jnp.asarray(k, jnp.int32).reshape(seg.num)
  find = _kth_by_histogram if method == "histogram" else _kth_by_bisection
  tau, rest, num_equal = find(keys, alive, k, seg)
  exp = seg.expand
  above = [key > exp(tau, g) for g, key in enumerate(keys)]
  equal = [
    (key == exp(tau, g)) & live
    for g, (key, live) in enumerate(zip(keys, alive, strict=True))
  ]

  def cut_by_histogram(_):
    # The `rest`-th lowest edge id among the equal keys: the `rest`-th
    # largest of the flipped ids, two histogram passes instead of 31
    # counting passes (ids are unique, so exactly `rest` stay).
    flipped = [~i.astype(jnp.uint32) for i in edge_ids]
    low, _, _ = _kth_by_histogram(flipped, equal, rest, seg)
    return (~low).astype(jnp.int32)

  def cut_by_bisection(_):
    def fewer_than_rest(v):
      lims = [exp(v.astype(jnp.int32), g) for g in range(len(keys))]
      return (
        seg.count(
          [
            e & (i < lim)
            for e, i, lim in zip(equal, edge_ids, lims, strict=True)
          ]
        )
        < rest
      )

    start = jnp.zeros(k.shape, jnp.uint32)
    return _radix_max(31, jnp.uint32, start, fewer_than_rest).astype(jnp.int32)

  needs_cut = jnp.any((rest > 0) & (rest < num_equal))
  last = jax.lax.cond(
    needs_cut,
    cut_by_histogram if method == "histogram" else cut_by_bisection,
    lambda _: jnp.full(k.shape, jnp.iinfo(jnp.int32).max, jnp.int32),
    None,
  )
  return [
    a | (e & (i <= exp(last, g)) & exp(rest > 0, g))
    for g, (a, e, i) in enumerate(zip(above, equal, edge_ids, strict=True))
  ]


def prune_dense(
  scores: Sequence[Sequence[Array]],
  alive: Sequence[Sequence[Array]],
  edge_ids: Sequence[Sequence[Array]],
  keep_counts: Sequence[Array],
  *,
  scope: str = "batch",
) -> list[list[Array]]:
  """Dense-layout pruning: the same survivors as `layers.prune_edges`.

  The entries come in *families* of blocks that share their ranking
  segments (`dense.prune_families`): for "batch" one family of all blocks;
  for "graph" the blocks of one group (segments: their `[S, B]` graphs); for
  "node" the blocks of one group with one receiver modality (segments:
  their `[S, B, N_r]` receivers). Scopes "batch" and "graph" find the cut by
  histograms (one scatter-add pass per 16 key bits: two for float32
  scores), "node" by bisection (a counting pass per key bit: a histogram
  per node would not fit).

  Args:
    scores: per family, per block `[S, B, N_r, W]` edge scores.
    alive: per family, per block, the edges alive before this pruning.
    edge_ids: per family, per block, int32 segment-layout edge index
      (shard-major over the batch), the tie order.
    keep_counts: per family: "batch" a scalar; "graph" `[S, B]`; "node"
      `[S, B, N_r]`.
    scope: "batch", "graph" or "node".

  Returns:
    Per family, per block, the new alive mask.

  References:
    Yang et al., MTAG, NAACL 2021, section 3.4; `layers.prune_edges`.
  """
  if scope not in layers.PRUNE_SCOPES:
    raise ValueError(
      f"prune scope {scope!r}; expected one of {layers.PRUNE_SCOPES}"
    )
  out = []
  for fam_scores, fam_alive, fam_ids, k in zip(
    scores, alive, edge_ids, keep_counts, strict=True
  ):
    # One array per family: its blocks side by side along the entries of a
    # segment (fewer, larger passes; XLA fuses the concatenation).
    keep_axes = {"batch": 0, "graph": 2, "node": 3}[scope]
    lead = fam_scores[0].shape[:keep_axes]
    if any(a.shape[:keep_axes] != lead for a in fam_scores):
      raise ValueError(
        f"the blocks of one {scope}-scope family must share their leading "
        f"axes; got {[a.shape for a in fam_scores]}"
      )
    sizes = [int(np.prod(a.shape[keep_axes:])) for a in fam_scores]

    def join(blocks, lead=lead):
      return jnp.concatenate([b.reshape(*lead, -1) for b in blocks], -1)

    score, live, ids = join(fam_scores), join(fam_alive), join(fam_ids)
    key = order_key(score)
    key = key * live.astype(key.dtype)  # 0 on dead entries (no fill)
    if scope == "batch":
      seg = _Segments(
        num=1,
        ids=None,
        count=lambda bs: bs[0].sum(dtype=jnp.int32).reshape(1),
        expand=lambda v, g: v.reshape(()),
      )
      method = "histogram"
    else:
      num = int(np.prod(lead))
      seg = _Segments(
        num=num,
        ids=[jnp.arange(num, dtype=jnp.int32).reshape(*lead, 1)],
        count=lambda bs: bs[0].sum(-1, dtype=jnp.int32).reshape(-1),
        expand=lambda v, g, lead=lead: v.reshape(*lead, 1),
      )
      method = "bisection" if scope == "node" else "histogram"
    (kept,) = select_top([key], [live], [ids], k, seg, method=method)
    parts = jnp.split(kept, np.cumsum(sizes)[:-1], axis=-1)
    out.append(
      [p.reshape(a.shape) for p, a in zip(parts, fam_scores, strict=True)]
    )
  return out
