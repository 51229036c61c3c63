"""Per-sample MTAG graph construction: nodes, pseudo-alignment and typed edges.

MTAG turns one multimodal sample into a single graph whose nodes are the real
frames of every modality, concatenated modality by modality in time order.
Edges come in two families:

* intra-modal edges: a self-loop on every node plus "past" and "future" links
  between neighbouring frames (or between all earlier/later frames when
  ``intra="all_to_all"``);
* cross-modal edges: every node of one modality is linked to every node of the
  other, in both directions. A pseudo-alignment window on the longer modality
  only decides whether a link is labelled "current", "past" or "future".

Everything here runs on the host with numpy; the arrays it returns are meant
to be padded and batched before they reach a jitted model.

Edge types (``edge_types="modal_temporal"``, ``M`` modalities, the official
27-type scheme when ``M = 3``):

* intra types of modality ``m``: ``3m + 0`` self-loop, ``3m + 1`` past
  (``t+1 -> t``), ``3m + 2`` future (``t -> t+1``);
* modality pairs ``(a, b)``, ``a < b``, in lexicographic order ``p = 0, 1, ...``
  get base ``B = 3M + 6p``. With ``S`` the pair's shorter modality *in this
  sample* and ``L`` the longer one: ``B+0..B+2`` run ``S -> L`` (current, past,
  future) and ``B+3..B+5`` run ``L -> S`` (current, then the reverses of
  future and past).

References:
  Yang et al., "MTAG: Modal-Temporal Attention Graph for Unaligned Human
  Multimodal Language Sequences", NAACL 2021; behaviour of the official
  code's graph builder (jedyang97/MTAG, ``graph_model/graph_builder.py``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

__all__ = [
  "EDGE_TYPE_SCHEMES",
  "INTRA_MODES",
  "PSEUDO_ALIGN_RULES",
  "build_edges",
  "num_edge_types",
  "num_edges",
  "pseudo_align",
]

PSEUDO_ALIGN_RULES = ("official", "paper")
EDGE_TYPE_SCHEMES = ("modal_temporal", "temporal", "modal", "none")
INTRA_MODES = ("adjacent", "all_to_all")


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
  if value not in valid:
    raise ValueError(
      f"unknown {name} {value!r}; expected one of {', '.join(map(repr, valid))}"
    )


def _as_int(name: str, value: object) -> int:
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(
      f"{name} must be an integer, got {type(value).__name__}"
    ) from None


def _check_lengths(lengths: Sequence[int]) -> list[int]:
  ns = [_as_int(f"lengths[{m}]", n) for m, n in enumerate(lengths)]
  if not ns:
    raise ValueError("lengths must name at least one modality, got none")
  for m, n in enumerate(ns):
    if n < 0:
      raise ValueError(
        f"lengths[{m}] (modality {m}) must be non-negative, got {n}"
      )
  return ns


def pseudo_align(
  n_short: int, n_long: int, rule: str = "official"
) -> np.ndarray:
  """Pseudo-alignment windows of a shorter modality on a longer one.

  Shorter-modality node ``k`` is aligned to the longer-modality positions
  ``start_k, ..., start_k + width_k - 1`` (0-based). With ``N = n_short`` and
  ``M = n_long``:

  ``rule="official"`` (what the official code does):

  * ``M = 1``: the single window ``{0}``.
  * ``N <= M < 2N`` (``M > 1``): width-2 windows. With ``d = M - N`` (``d = 1``
    when ``N = M``), rows ``k < d`` use stride 2 (``{2k, 2k+1}``) and rows
    ``k >= d`` use stride 1 starting on the last index of row ``d - 1``
    (``{k+d-1, k+d}``). When ``N = M`` the last row would run past ``M - 1``,
    so it is a copy of the row before it.
  * ``M >= 2N``: ``N = 1`` gets one window over all of ``0..M-1``. Otherwise
    ``S = max(floor((floor(M/(N-1)) + 1) / 2), 2)``, ``W = M - (N-1) S`` and
    ``R_k = {kS, ..., kS + W - 1}``.

  ``rule="paper"`` (the formula printed in the paper):

  * ``N <= M/2``, ``N > 1``: ``S = ceil(avg(1, floor(M/(N-1))))``,
    ``W = M - (N-1) S``, ``R_k = {kS, ..., kS + W - 1}``. ``N = 1`` divides by
    zero in the paper; it gets the official single full window.
  * ``N > M/2``: the paper says ``S = W = 2``, which walks off the end of the
    longer modality. Here every window keeps width ``min(2, M)`` but its start
    is clamped to ``M - width``, so windows never pass index ``M - 1`` and
    none is empty (the trailing rows pile up on the last two positions).

  Args:
    n_short: ``N``, node count of the shorter modality, ``0 < N <= M``.
    n_long: ``M``, node count of the longer modality.
    rule: ``"official"`` or ``"paper"``.

  Returns:
    Integer array of shape ``[N, 2]`` holding ``(start, width)`` per row.

  Raises:
    ValueError: if ``not 0 < n_short <= n_long`` or ``rule`` is unknown.

  References:
    MTAG paper (NAACL 2021), §3 pseudo-alignment; behaviour of the official
    code's ``pseudo_align_cross_modal``.
  """
  _check_choice("rule", rule, PSEUDO_ALIGN_RULES)
  n = _as_int("n_short", n_short)
  m = _as_int("n_long", n_long)
  if not 0 < n <= m:
    raise ValueError(
      f"pseudo_align needs 0 < n_short <= n_long, got n_short={n}, n_long={m}"
    )
  k = np.arange(n, dtype=np.int64)
  out = np.empty((n, 2), dtype=np.int64)

  if n == 1:
    # One node sees the whole longer modality (M = 1 included); the paper's
    # M / (N - 1) is undefined here, so both rules share this case.
    out[0] = (0, m)
    return out

  if rule == "paper":
    if 2 * n <= m:
      stride = (m // (n - 1) + 2) // 2  # ceil((1 + s0) / 2)
      width = m - (n - 1) * stride
      out[:, 0] = k * stride
      out[:, 1] = width
    else:
      width = min(2, m)
      out[:, 0] = np.minimum(2 * k, m - width)
      out[:, 1] = width
    return out

  if m < 2 * n:
    # The reference tests ``M // N == 1`` and doubles up the first
    # ``M % N`` rows; ``M % N`` is 0 when N = M, which it bumps to 1.
    d = m - n if m != n else 1
    out[:, 0] = np.where(k < d, 2 * k, k + d - 1)
    if m == n:
      # Stride-1 rows would end on index M when N = M; the reference
      # replaces the last row with a copy of the one before it.
      out[:, 0] = np.minimum(k, n - 2)
    out[:, 1] = 2
    return out

  # The reference floors (s0 + 1) / 2 where the paper takes the ceiling, and
  # clamps the stride at 2. Its fallback for W < 2 is unreachable: M >= 2N
  # always leaves W >= 2.
  stride = max((m // (n - 1) + 1) // 2, 2)
  width = m - (n - 1) * stride
  out[:, 0] = k * stride
  out[:, 1] = width
  return out


def num_edge_types(
  num_modalities: int, edge_types: str = "modal_temporal"
) -> int:
  """Number of distinct edge-type ids produced by :func:`build_edges`.

  Args:
    num_modalities: ``M >= 1``, number of modalities.
    edge_types: ``"modal_temporal"`` (``3M + 6 M(M-1)/2``, 27 for ``M = 3``),
      ``"modal"`` (modality-only ablation, ``M + 2 M(M-1)/2``, 9 for
      ``M = 3``), ``"temporal"`` (time-only ablation, 3) or ``"none"`` (1).

  Returns:
    The number of edge types.

  Raises:
    ValueError: on ``M < 1`` or an unknown scheme.

  References:
    MTAG paper (NAACL 2021); the official code's ``time_aware_edges`` /
    ``type_aware_edges`` switches.
  """
  _check_choice("edge_types", edge_types, EDGE_TYPE_SCHEMES)
  m = _as_int("num_modalities", num_modalities)
  if m < 1:
    raise ValueError(f"num_modalities must be >= 1, got {m}")
  pairs = m * (m - 1) // 2
  if edge_types == "modal_temporal":
    return 3 * m + 6 * pairs
  if edge_types == "modal":
    return m + 2 * pairs
  if edge_types == "temporal":
    return 3
  return 1


def _type_table(num_modalities: int, edge_types: str) -> np.ndarray:
  """Maps each full modal-temporal type id to its id under ``edge_types``."""
  m = num_modalities
  full = np.arange(num_edge_types(m, "modal_temporal"))
  if edge_types == "modal_temporal":
    return full
  if edge_types == "none":
    return np.zeros_like(full)
  intra = full < 3 * m
  group = np.where(intra, full % 3, (full - 3 * m) % 6)
  if edge_types == "temporal":
    # Cross groups are numbered in list order [cur, past, fut, cur_rev,
    # fut_rev, past_rev], and the reference simply takes that index mod 3,
    # so "future_reverse" (b+4) lands on "past" and b+5 on "future".
    return group % 3
  # "modal": one type per modality, then outward/inward per pair.
  pair = (full - 3 * m) // 6
  return np.where(intra, full // 3, m + 2 * pair + group // 3)


def _ranges(
  starts: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates the integer ranges ``[starts[k], starts[k] + counts[k])``.

  Returns ``(owner, value)``: the row ``k`` each value came from (ascending)
  and the values themselves, without a Python loop over rows.
  """
  owner = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
  seg_begin = np.cumsum(counts) - counts
  value = np.arange(owner.size, dtype=np.int64)
  value += np.repeat(starts - seg_begin, counts)
  return owner, value


def build_edges(
  lengths: Sequence[int],
  *,
  rule: str = "official",
  edge_types: str = "modal_temporal",
  intra: str = "adjacent",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Typed, directed edge list of one sample, in the official order.

  Node ``i`` is local to the sample: modality 0's frames come first, then
  modality 1's, and so on, each in time order. Empty modalities contribute no
  nodes and no edges; type ids do not shift because of them.

  Order of the list: for each modality its intra groups ``[self, past,
  future]``, then each modality pair ``(a, b)``, ``a < b``, in lexicographic
  order with its six groups ``B+0 .. B+5`` (see the module docstring). Inside
  a cross group edges are sorted by shorter-modality node, then by
  longer-modality position. Empty groups are skipped.

  The shorter modality of a pair is the one with fewer nodes in this sample;
  on a tie it is the first of the pair (``a``). So the meaning of a cross type
  such as 9 (``V->T`` or ``T->V``) depends on the sample.

  With ``intra="all_to_all"``, "past" holds every ``j -> i`` with ``j > i`` and
  "future" every ``i -> j`` with ``i < j``; both groups are sorted by source,
  then by target, which is the order the official code's meshgrid produces.
  Self-loops are kept.

  Args:
    lengths: node (real frame) count of each modality, ``M >= 1`` entries.
    rule: pseudo-alignment rule, ``"official"`` or ``"paper"`` (see
      :func:`pseudo_align`).
    edge_types: ``"modal_temporal"`` (full scheme), ``"temporal"`` (time-only
      ablation), ``"modal"`` (modality-only ablation) or ``"none"``.
    intra: ``"adjacent"`` (official run.sh setting) or ``"all_to_all"``.

  Returns:
    ``(senders, receivers, edge_type)``, three int32 arrays of length ``E``
    (:func:`num_edges`). Messages flow from ``senders`` to ``receivers``.

  Raises:
    ValueError: on a negative length (naming the modality) or an unknown
      option string.

  References:
    MTAG paper (NAACL 2021), §3; behaviour of the official code's
    ``construct_time_aware_dynamic_graph`` (graph_builder.py).
  """
  _check_choice("rule", rule, PSEUDO_ALIGN_RULES)
  _check_choice("edge_types", edge_types, EDGE_TYPE_SCHEMES)
  _check_choice("intra", intra, INTRA_MODES)
  ns = _check_lengths(lengths)
  num_mod = len(ns)
  table = _type_table(num_mod, edge_types)
  offsets = np.concatenate([[0], np.cumsum(ns)[:-1]]).astype(np.int64)

  srcs: list[np.ndarray] = []
  dsts: list[np.ndarray] = []
  types: list[np.ndarray] = []

  def emit(src: np.ndarray, dst: np.ndarray, full_type: int) -> None:
    if src.size:
      srcs.append(src)
      dsts.append(dst)
      types.append(np.full(src.size, table[full_type], dtype=np.int32))

  for mod, n in enumerate(ns):
    if n == 0:
      continue
    idx = offsets[mod] + np.arange(n, dtype=np.int64)
    emit(idx, idx, 3 * mod)
    if intra == "adjacent":
      emit(idx[1:], idx[:-1], 3 * mod + 1)
      emit(idx[:-1], idx[1:], 3 * mod + 2)
    else:
      later, earlier = np.tril_indices(n, -1)
      emit(idx[later], idx[earlier], 3 * mod + 1)
      earlier, later = np.triu_indices(n, 1)
      emit(idx[earlier], idx[later], 3 * mod + 2)

  pair = 0
  for a in range(num_mod):
    for b in range(a + 1, num_mod):
      base = 3 * num_mod + 6 * pair
      pair += 1
      if ns[a] == 0 or ns[b] == 0:
        continue
      short, long_ = (a, b) if ns[a] <= ns[b] else (b, a)
      n_s, n_l = ns[short], ns[long_]
      win = pseudo_align(n_s, n_l, rule)
      start, width = win[:, 0], win[:, 1]
      stop = start + width
      off_s, off_l = offsets[short], offsets[long_]
      zeros = np.zeros(n_s, dtype=np.int64)
      k_cur, j_cur = _ranges(start, width)
      k_past, j_past = _ranges(zeros, start)
      k_fut, j_fut = _ranges(stop, n_l - stop)
      emit(off_s + k_cur, off_l + j_cur, base + 0)
      emit(off_s + k_past, off_l + j_past, base + 1)
      emit(off_s + k_fut, off_l + j_fut, base + 2)
      emit(off_l + j_cur, off_s + k_cur, base + 3)
      emit(off_l + j_fut, off_s + k_fut, base + 4)
      emit(off_l + j_past, off_s + k_past, base + 5)

  if not srcs:
    empty = np.zeros(0, dtype=np.int32)
    return empty, empty.copy(), empty.copy()
  senders = np.concatenate(srcs).astype(np.int32)
  receivers = np.concatenate(dsts).astype(np.int32)
  return senders, receivers, np.concatenate(types)


def num_edges(lengths: Sequence[int], intra: str = "adjacent") -> int:
  """Closed-form edge count of :func:`build_edges` for one sample.

  ``adjacent``: ``sum_{m: n_m > 0} (3 n_m - 2) + 2 sum_{a<b} n_a n_b``.
  ``all_to_all``: each modality has ``n`` self-loops and ``n (n-1)`` ordered
  pairs of distinct frames, i.e. ``n^2`` edges; the cross term is unchanged
  because every cross-modal node pair is linked both ways whatever the
  windows are.

  Args:
    lengths: node count of each modality.
    intra: ``"adjacent"`` or ``"all_to_all"``.

  Returns:
    The number of edges ``E``.

  Raises:
    ValueError: on a negative length or an unknown ``intra``.

  References:
    MTAG paper (NAACL 2021); the official graph builder's edge count
    (e.g. 5991 edges for sizes (42, 18, 35)).
  """
  _check_choice("intra", intra, INTRA_MODES)
  ns = _check_lengths(lengths)
  if intra == "adjacent":
    intra_count = sum(3 * n - 2 for n in ns if n > 0)
  else:
    intra_count = sum(n * n for n in ns)
  total = sum(ns)
  cross_pairs = (total * total - sum(n * n for n in ns)) // 2
  return intra_count + 2 * cross_pairs
