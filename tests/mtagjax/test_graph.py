"""Tests for mtagjax.graph: pseudo-alignment, edge order, types and ablations.

The official graph builder's output (``edges_small.npz``) pins the exact edge
order for three modalities; a slow loop-based builder written from the spec
extends that check to 1-4 modalities, and property tests cover the invariants
(counts, full cross-modal connectivity, directions, ablation type maps).
"""

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtagjax import graph

FIXTURE = Path(__file__).parents[1] / "fixtures" / "mtag" / "edges_small.npz"
SIZES = [(4, 2, 3), (42, 18, 35), (1, 1, 1), (0, 3, 5), (7, 7, 7), (2, 9, 0)]


# --------------------------------------------------------------------------
# Slow, loop-based reference written straight from the spec text.


def ref_windows(n, m):
  """Official windows as lists of L positions, one row per S node."""
  if m == 1:
    return [[0]]
  if m // n == 1:
    d = 1 if n == m else m - n
    rows = []
    for k in range(n):
      lo = 2 * k if k < d else k + d - 1
      rows.append([lo, lo + 1])
    if n == m:
      rows[-1] = list(rows[-2])
    return rows
  if n == 1:
    return [list(range(m))]
  s = max(math.floor((m // (n - 1) + 1) / 2), 2)
  w = m - (n - 1) * s
  return [list(range(k * s, k * s + w)) for k in range(n)]


def ref_edges(lengths, intra="adjacent"):
  """List of (src, dst, full type) in the official order."""
  nm = len(lengths)
  off = [sum(lengths[:i]) for i in range(nm)]
  out = []
  for m, n in enumerate(lengths):
    nodes = [off[m] + t for t in range(n)]
    out += [(u, u, 3 * m) for u in nodes]
    if intra == "adjacent":
      out += [(nodes[t + 1], nodes[t], 3 * m + 1) for t in range(n - 1)]
      out += [(nodes[t], nodes[t + 1], 3 * m + 2) for t in range(n - 1)]
    else:
      out += [
        (nodes[j], nodes[i], 3 * m + 1)
        for j in range(n)
        for i in range(n)
        if i < j
      ]
      out += [
        (nodes[i], nodes[j], 3 * m + 2)
        for i in range(n)
        for j in range(n)
        if i < j
      ]
  for p, (a, b) in enumerate(itertools.combinations(range(nm), 2)):
    base = 3 * nm + 6 * p
    if lengths[a] == 0 or lengths[b] == 0:
      continue
    s, lg = (a, b) if lengths[a] <= lengths[b] else (b, a)
    ns, nl = lengths[s], lengths[lg]
    win = ref_windows(ns, nl)
    groups = [[] for _ in range(6)]
    for k in range(ns):
      u = off[s] + k
      for j in range(nl):
        v = off[lg] + j
        if j in win[k]:
          groups[0].append((u, v))
          groups[3].append((v, u))
        elif j < min(win[k]):
          groups[1].append((u, v))
          groups[5].append((v, u))
        else:
          groups[2].append((u, v))
          groups[4].append((v, u))
    for g, edges in enumerate(groups):
      out += [(x, y, base + g) for x, y in edges]
  return out


def ablate(full_types, nm, scheme):
  """Independent statement of the ablation type maps (spec §3.4)."""
  out = []
  for t in full_types:
    t = int(t)
    if t < 3 * nm:
      mod, tm = divmod(t, 3)
      cross = None
    else:
      pair, group = divmod(t - 3 * nm, 6)
      cross = (pair, group)
    if scheme == "none":
      out.append(0)
    elif scheme == "temporal":
      out.append(tm if cross is None else cross[1] % 3)
    elif scheme == "modal":
      if cross is None:
        out.append(mod)
      else:
        out.append(nm + 2 * cross[0] + (0 if cross[1] < 3 else 1))
    else:
      out.append(t)
  return np.array(out, dtype=np.int64)


def modality_of(lengths):
  return np.repeat(np.arange(len(lengths)), lengths)


# --------------------------------------------------------------------------
# Official fixture and the spec's worked example.


@pytest.fixture(scope="module")
def fixture():
  with np.load(FIXTURE) as data:
    return {k: data[k] for k in data.files}


def test_fixture_lists_expected_sizes(fixture):
  assert [tuple(s) for s in fixture["sizes"].tolist()] == SIZES


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "_".join(map(str, s)))
def test_matches_official_fixture(fixture, sizes):
  key = "e_{}_{}_{}".format(*sizes)
  src, dst, typ = graph.build_edges(sizes)
  for arr in (src, dst, typ):
    assert arr.dtype == np.int32
  np.testing.assert_array_equal(src, fixture[key + "_src"])
  np.testing.assert_array_equal(dst, fixture[key + "_dst"])
  np.testing.assert_array_equal(typ, fixture[key + "_type"])
  assert src.size == graph.num_edges(sizes)
  # The fixture's node types are the modality index of each node.
  np.testing.assert_array_equal(modality_of(sizes), fixture[key + "_x_type"])


WORKED_EXAMPLE = """
0: 0>0 1>1 2>2 3>3 | 1: 1>0 2>1 3>2 | 2: 0>1 1>2 2>3 | 3: 4>4 5>5 | 4: 5>4
5: 4>5 | 6: 6>6 7>7 8>8 | 7: 7>6 8>7 | 8: 6>7 7>8
9: 4>0 4>1 5>2 5>3 | 10: 5>0 5>1 | 11: 4>2 4>3 | 12: 0>4 1>4 2>5 3>5
13: 2>4 3>4 | 14: 0>5 1>5
15: 6>0 6>1 7>1 7>2 8>2 8>3 | 16: 7>0 8>0 8>1 | 17: 6>2 6>3 7>3
18: 0>6 1>6 1>7 2>7 2>8 3>8 | 19: 2>6 3>6 3>7 | 20: 0>7 0>8 1>8
21: 4>6 4>7 5>7 5>8 | 22: 5>6 | 23: 4>8 | 24: 6>4 7>4 7>5 8>5 | 25: 8>4
26: 6>5
"""


def parse_worked_example(text):
  edges = []
  for group in re.findall(r"(\d+):([^|\n]*)", text):
    t = int(group[0])
    for pair in group[1].split():
      u, v = map(int, pair.split(">"))
      edges.append((u, v, t))
  return edges


def test_worked_example_4_2_3():
  expected = parse_worked_example(WORKED_EXAMPLE)
  assert len(expected) == 73
  src, dst, typ = graph.build_edges([4, 2, 3])
  got = list(zip(src.tolist(), dst.tolist(), typ.tolist(), strict=True))
  assert got == expected


def test_worked_example_selected_groups():
  src, dst, typ = graph.build_edges([4, 2, 3])

  def group(t):
    sel = typ == t
    return list(zip(src[sel].tolist(), dst[sel].tolist(), strict=True))

  # V-T: text (nodes 4, 5) is shorter, so type 9 runs text -> vision.
  assert group(9) == [(4, 0), (4, 1), (5, 2), (5, 3)]
  assert group(13) == [(2, 4), (3, 4)]
  # V-A: audio is shorter; mixed windows {0,1}, {1,2}, {2,3}.
  assert group(15) == [(6, 0), (6, 1), (7, 1), (7, 2), (8, 2), (8, 3)]
  assert group(20) == [(0, 7), (0, 8), (1, 8)]
  # T-A: text is shorter, windows {0,1}, {1,2} on audio.
  assert group(22) == [(5, 6)]
  assert group(26) == [(6, 5)]


def test_notebook_example_edge_count():
  src, _, _ = graph.build_edges((42, 18, 35))
  assert src.size == 5991 == graph.num_edges((42, 18, 35))


# --------------------------------------------------------------------------
# Pseudo-alignment.


def windows(arr):
  return [list(range(s, s + w)) for s, w in arr.tolist()]


def stride_width(arr):
  starts = arr[:, 0]
  stride = int(starts[1] - starts[0]) if len(starts) > 1 else None
  return stride, int(arr[0, 1])


def test_pseudo_align_n5_m7():
  got = windows(graph.pseudo_align(5, 7))
  assert got == [[0, 1], [2, 3], [3, 4], [4, 5], [5, 6]]


@pytest.mark.parametrize(
  "n, m, code, paper",
  [
    (3, 8, (2, 4), (3, 2)),
    (11, 40, (2, 20), (3, 10)),
    (18, 375, (11, 188), (12, 171)),
    (50, 500, (5, 255), (6, 206)),
    (20, 500, (13, 253), (14, 234)),
    (18, 42, (2, 8), (2, 8)),
    (50, 375, (4, 179), (4, 179)),
    (20, 400, (11, 191), (11, 191)),
  ],
)
def test_pseudo_align_code_vs_paper(n, m, code, paper):
  official = graph.pseudo_align(n, m)
  printed = graph.pseudo_align(n, m, rule="paper")
  assert stride_width(official) == code
  assert stride_width(printed) == paper
  for arr, (s, w) in ((official, code), (printed, paper)):
    np.testing.assert_array_equal(arr[:, 0], np.arange(n) * s)
    assert (arr[:, 1] == w).all()
    assert arr[-1, 0] + arr[-1, 1] == m  # last window ends on M - 1


def test_pseudo_align_n_equals_m():
  assert windows(graph.pseudo_align(4, 4)) == [[0, 1], [1, 2], [2, 3], [2, 3]]
  assert windows(graph.pseudo_align(2, 2)) == [[0, 1], [0, 1]]
  for n in range(2, 30):
    arr = graph.pseudo_align(n, n)
    np.testing.assert_array_equal(arr[:, 0], np.minimum(np.arange(n), n - 2))
    assert (arr[:, 1] == 2).all()


def test_pseudo_align_m_is_2n_minus_1_and_2n():
  assert windows(graph.pseudo_align(4, 7)) == [[0, 1], [2, 3], [4, 5], [5, 6]]
  # M = 2N leaves the mixed scheme: floor stride, clamped at 2.
  assert windows(graph.pseudo_align(2, 4)) == [[0, 1], [2, 3]]
  assert windows(graph.pseudo_align(4, 8)) == [
    [0, 1],
    [2, 3],
    [4, 5],
    [6, 7],
  ]


def test_pseudo_align_single_nodes():
  assert graph.pseudo_align(1, 1).tolist() == [[0, 1]]
  assert graph.pseudo_align(1, 1, rule="paper").tolist() == [[0, 1]]
  assert graph.pseudo_align(1, 9).tolist() == [[0, 9]]
  assert graph.pseudo_align(1, 9, rule="paper").tolist() == [[0, 9]]
  assert graph.pseudo_align(1, 2).tolist() == [[0, 2]]


def test_pseudo_align_uncovered_node():
  # Spec §3.3: with the S >= 2 branch some L nodes fall in no window.
  covered = set(
    itertools.chain.from_iterable(windows(graph.pseudo_align(2, 375)))
  )
  assert 187 not in covered
  assert len(covered) == 374


def test_pseudo_align_matches_reference_and_stays_in_range():
  for m in range(1, 61):
    for n in range(1, m + 1):
      arr = graph.pseudo_align(n, m)
      assert arr.shape == (n, 2)
      assert windows(arr) == ref_windows(n, m), (n, m)
      paper = graph.pseudo_align(n, m, rule="paper")
      assert paper.shape == (n, 2)
      assert (paper[:, 0] >= 0).all() and (paper[:, 1] >= 1).all()
      assert (paper[:, 0] + paper[:, 1] <= m).all(), (n, m)
      assert (np.diff(paper[:, 0]) >= 0).all()
      if 2 * n > m:
        # Paper: S = W = 2, clipped so no window passes M - 1.
        assert (paper[:, 1] == min(2, m)).all()


def test_mixed_scheme_covers_all_positions():
  for n in range(1, 40):
    for m in range(max(n, 2), 2 * n):
      arr = graph.pseudo_align(n, m)
      assert (arr[:, 1] == 2).all()
      covered = sorted(set(itertools.chain.from_iterable(windows(arr))))
      assert covered == list(range(m)), (n, m)


# --------------------------------------------------------------------------
# Edge-type counts and ids.


def test_num_edge_types():
  assert graph.num_edge_types(3) == 27
  assert graph.num_edge_types(3, "modal_temporal") == 27
  assert graph.num_edge_types(3, "modal") == 9
  assert graph.num_edge_types(3, "temporal") == 3
  assert graph.num_edge_types(3, "none") == 1
  assert graph.num_edge_types(1) == 3
  assert graph.num_edge_types(1, "modal") == 1
  assert graph.num_edge_types(2) == 12
  assert graph.num_edge_types(4) == 12 + 36
  assert graph.num_edge_types(4, "modal") == 4 + 12


def test_pair_bases_three_modalities():
  # Each pair's "current S->L" group carries its base type.
  _, _, typ = graph.build_edges([3, 3, 3])
  bases = sorted(set(typ.tolist()) - set(range(9)))
  assert bases == list(range(9, 27))
  for base, (a, b) in zip((9, 15, 21), ((0, 1), (0, 2), (1, 2)), strict=True):
    lengths = [0, 0, 0]
    lengths[a], lengths[b] = 2, 3
    _, _, typ = graph.build_edges(lengths)
    assert sorted(set(typ.tolist()) - set(range(9))) == list(
      range(base, base + 6)
    )


def test_modal_ablation_ids_three_modalities():
  src, dst, full = graph.build_edges([4, 2, 3])
  _, _, modal = graph.build_edges([4, 2, 3], edge_types="modal")
  mapping = dict(zip(full.tolist(), modal.tolist(), strict=True))
  assert mapping == {
    **{t: t // 3 for t in range(9)},
    **{t: 3 for t in range(9, 12)},
    **{t: 4 for t in range(12, 15)},
    **{t: 5 for t in range(15, 18)},
    **{t: 6 for t in range(18, 21)},
    **{t: 7 for t in range(21, 24)},
    **{t: 8 for t in range(24, 27)},
  }


def test_temporal_ablation_ids():
  _, _, full = graph.build_edges([4, 2, 3])
  _, _, temporal = graph.build_edges([4, 2, 3], edge_types="temporal")
  mapping = dict(zip(full.tolist(), temporal.tolist(), strict=True))
  assert mapping == {
    t: (t % 3 if t < 9 else (t - 9) % 6 % 3) for t in range(27)
  }
  assert mapping[13] == 1 and mapping[14] == 2  # b+4 -> 1, b+5 -> 2
  _, _, none = graph.build_edges([4, 2, 3], edge_types="none")
  assert (none == 0).all()


# --------------------------------------------------------------------------
# All-to-all intra edges.


def test_all_to_all_intra_order():
  src, dst, typ = graph.build_edges([4], intra="all_to_all")
  got = list(zip(src.tolist(), dst.tolist(), typ.tolist(), strict=True))
  assert got[:4] == [(i, i, 0) for i in range(4)]
  past = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
  future = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
  assert got[4:10] == [(u, v, 1) for u, v in past]
  assert got[10:] == [(u, v, 2) for u, v in future]
  assert graph.num_edges([4], intra="all_to_all") == 16


def test_single_and_empty_samples():
  src, dst, typ = graph.build_edges([1])
  assert (src.tolist(), dst.tolist(), typ.tolist()) == ([0], [0], [0])
  for lengths in ([0], [0, 0, 0]):
    out = graph.build_edges(lengths)
    assert all(a.shape == (0,) and a.dtype == np.int32 for a in out)
    assert graph.num_edges(lengths) == 0


def test_large_sample_count():
  lengths = (500, 50, 375)
  src, dst, typ = graph.build_edges(lengths)
  assert src.size == graph.num_edges(lengths) == 465269
  assert typ.max() == 26 and src.max() == dst.max() == 924


# --------------------------------------------------------------------------
# Property tests, 1-4 modalities.

lengths_st = st.lists(st.integers(0, 12), min_size=1, max_size=4)
rule_st = st.sampled_from(graph.PSEUDO_ALIGN_RULES)
intra_st = st.sampled_from(graph.INTRA_MODES)
scheme_st = st.sampled_from(graph.EDGE_TYPE_SCHEMES)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, intra=intra_st)
def test_matches_slow_reference(lengths, intra):
  src, dst, typ = graph.build_edges(lengths, intra=intra)
  got = list(zip(src.tolist(), dst.tolist(), typ.tolist(), strict=True))
  assert got == ref_edges(lengths, intra)
  assert len(got) == graph.num_edges(lengths, intra=intra)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, rule=rule_st, intra=intra_st)
def test_edge_invariants(lengths, rule, intra):
  nm = len(lengths)
  src, dst, typ = graph.build_edges(lengths, rule=rule, intra=intra)
  assert src.size == graph.num_edges(lengths, intra=intra)
  assert typ.size == 0 or typ.max() < graph.num_edge_types(nm)
  assert (typ >= 0).all()
  mod = modality_of(lengths)
  ms, md = mod[src], mod[dst]
  # No duplicate edges at all.
  assert len(set(zip(src.tolist(), dst.tolist(), strict=True))) == src.size

  # Intra types stay inside their modality; self-loops are exactly 3m.
  intra_sel = typ < 3 * nm
  assert (ms[intra_sel] == md[intra_sel]).all()
  assert (ms[intra_sel] == typ[intra_sel] // 3).all()
  loops = src == dst
  assert (loops == (intra_sel & (typ % 3 == 0))).all()
  assert loops.sum() == sum(lengths)
  past = intra_sel & (typ % 3 == 1)
  future = intra_sel & (typ % 3 == 2)
  assert (src[past] > dst[past]).all()
  assert (src[future] < dst[future]).all()

  # Every ordered cross-modal node pair appears exactly once.
  cross = ~intra_sel
  assert (ms[cross] != md[cross]).all()
  pairs = set(zip(src[cross].tolist(), dst[cross].tolist(), strict=True))
  expected = {
    (u, v) for u in range(mod.size) for v in range(mod.size) if mod[u] != mod[v]
  }
  assert pairs == expected and len(pairs) == cross.sum()

  # Cross types: b+0..b+2 go shorter -> longer, b+3..b+5 the reverse.
  combos = list(itertools.combinations(range(nm), 2))
  pair_idx, group = np.divmod(typ[cross] - 3 * nm, 6)
  for p, (a, b) in enumerate(combos):
    sel = pair_idx == p
    if not sel.any():
      continue
    short, long_ = (a, b) if lengths[a] <= lengths[b] else (b, a)
    out = sel & (group < 3)
    inw = sel & (group >= 3)
    assert (ms[cross][out] == short).all() and (md[cross][out] == long_).all()
    assert (ms[cross][inw] == long_).all() and (md[cross][inw] == short).all()


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, scheme=scheme_st, rule=rule_st)
def test_ablations_consistent_with_full_types(lengths, scheme, rule):
  nm = len(lengths)
  src, dst, full = graph.build_edges(lengths, rule=rule)
  s2, d2, typ = graph.build_edges(lengths, rule=rule, edge_types=scheme)
  np.testing.assert_array_equal(src, s2)
  np.testing.assert_array_equal(dst, d2)
  np.testing.assert_array_equal(typ, ablate(full, nm, scheme))
  assert typ.size == 0 or typ.max() < graph.num_edge_types(nm, scheme)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 80), st.integers(0, 80))
def test_pseudo_align_properties(n, extra):
  m = n + extra
  for rule in graph.PSEUDO_ALIGN_RULES:
    arr = graph.pseudo_align(n, m, rule=rule)
    assert arr.shape == (n, 2)
    assert (arr[:, 0] >= 0).all() and (arr[:, 1] >= 1).all()
    assert (arr[:, 0] + arr[:, 1] <= m).all()
    assert (np.diff(arr[:, 0]) >= 0).all()


# --------------------------------------------------------------------------
# Bad input.


def test_negative_length_names_modality():
  with pytest.raises(ValueError, match=r"lengths\[1\].*-3"):
    graph.build_edges([2, -3, 4])
  with pytest.raises(ValueError, match=r"lengths\[0\].*-1"):
    graph.num_edges([-1])


def test_empty_lengths_rejected():
  with pytest.raises(ValueError, match="at least one modality"):
    graph.build_edges([])


def test_non_integer_length_rejected():
  with pytest.raises(TypeError, match=r"lengths\[0\]"):
    graph.build_edges([2.5])


@pytest.mark.parametrize(
  "kwargs, valid",
  [
    ({"rule": "ceil"}, "'official', 'paper'"),
    ({"edge_types": "all"}, "'modal_temporal', 'temporal', 'modal', 'none'"),
    ({"intra": "full"}, "'adjacent', 'all_to_all'"),
  ],
)
def test_unknown_options_list_valid_ones(kwargs, valid):
  with pytest.raises(ValueError, match=re.escape(valid)):
    graph.build_edges([2, 3], **kwargs)


def test_bad_pseudo_align_inputs():
  with pytest.raises(ValueError, match="0 < n_short <= n_long"):
    graph.pseudo_align(0, 3)
  with pytest.raises(ValueError, match="n_short=4, n_long=3"):
    graph.pseudo_align(4, 3)
  with pytest.raises(ValueError, match="'official', 'paper'"):
    graph.pseudo_align(2, 3, rule="nope")


def test_bad_num_edge_types_inputs():
  with pytest.raises(ValueError, match=">= 1"):
    graph.num_edge_types(0)
  with pytest.raises(ValueError, match="modal_temporal"):
    graph.num_edge_types(3, "typed")
  with pytest.raises(ValueError, match="'adjacent', 'all_to_all'"):
    graph.num_edges([1, 2], intra="dense")
