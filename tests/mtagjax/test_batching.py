"""Tests for mtagjax.batching: samples to padded, sharded graph batches.

A slow, loop-based checker (`check_batch`) rebuilds every sample from a
`Batch`: node blocks, features, positions, each graph's edges in
`graph.build_edges` order, labels, budgets and pruning counts. It runs on
random batches (numpy and hypothesis). Further tests cover positions (spec
§2), zero-frame removal (spec §1.3), the budget ladders and the number of
compilations they cause, and input validation.
"""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtagjax import batching
from mtagjax import config as config_lib
from mtagjax import graph as graph_lib
from mtagjax import model as model_lib
from mtagjax.batching import GraphBatcher, Sample, bucket_size
from mtagjax.config import default_config


def small_config(**overrides):
  """Default config with small feature sizes and padded lengths."""
  c = default_config()
  c.feature_dims = (3, 4, 2)
  c.padded_lengths = (40, 20, 30)
  c.num_layers = 3
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


def make_sample(rng, config, lengths, label="float", positions=None):
  """Random float64 frames; label "float" (MOSI), "vector" (IEMOCAP), or
  any other value as is."""
  feats = [
    rng.normal(size=(n, d))
    for n, d in zip(lengths, config.feature_dims, strict=True)
  ]
  if isinstance(label, str) and label == "float":
    label = float(rng.normal())
  elif isinstance(label, str) and label == "vector":
    label = rng.integers(0, 2, size=4)
  return Sample(feats, label=label, positions=positions)


def random_lengths(rng, num_mod, max_len, p_empty=0.3):
  """Per-modality lengths, some empty, never all empty."""
  lengths = [
    0 if rng.random() < p_empty else int(rng.integers(1, max_len + 1))
    for _ in range(num_mod)
  ]
  if not any(lengths):
    lengths[int(rng.integers(num_mod))] = int(rng.integers(1, max_len + 1))
  return lengths


def keep_ref(count, keep, num_layers):
  """The official rule, in plain Python: k <- int(k * keep) per layer."""
  out = []
  for _ in range(num_layers):
    count = int(count * keep)
    out.append(count)
  return out


def expected_positions(sample, config):
  if sample.positions is not None:
    return [np.asarray(p) for p in sample.positions]
  out = []
  for m, f in enumerate(sample.features):
    n = len(f)
    if config.pe == "padded":
      total = config.padded_lengths[m]
      out.append(np.arange(total - n, total))
    else:
      out.append(np.arange(n))
  return out


def check_batch(batch, samples, batcher):
  """Asserts every layout invariant of `batch` built from `samples`."""
  c = batcher.config
  num_mod = len(c.modalities)
  num_shards = batcher.num_shards
  per = -(-batcher.batch_size // num_shards)
  num_graphs = per + 1
  pad_graph = num_graphs - 1
  g = batch.graph

  for leaf in jax.tree.leaves(batch):
    assert leaf.shape[0] == num_shards
  frames = [f.shape[1] for f in batch.features]
  for m, f in enumerate(batch.features):
    assert f.shape == (num_shards, frames[m], c.feature_dims[m])
    assert f.dtype == batcher.dtype
  num_nodes = sum(frames)
  num_edges = g.senders.shape[1]
  for key in ("modality", "position", "graph", "mask"):
    assert g.nodes[key].shape == (num_shards, num_nodes)
  for key in ("type", "graph", "mask"):
    assert g.edges[key].shape == (num_shards, num_edges)
  assert g.receivers.shape == (num_shards, num_edges)
  for arr in (g.n_node, g.n_edge, g.globals["mask"]):
    assert arr.shape == (num_shards, num_graphs)

  shards = [samples[s * per : (s + 1) * per] for s in range(num_shards)]
  lengths = [[[len(f) for f in x.features] for x in sh] for sh in shards]
  refs = [
    [
      graph_lib.build_edges(
        ls, rule=c.alignment, edge_types=c.edge_types, intra=c.intra
      )
      for ls in shard_lengths
    ]
    for shard_lengths in lengths
  ]

  # Budgets: the ladder value of the neediest shard, shared by all shards.
  need_frames = [
    max(sum(ls[m] for ls in shard_lengths) for shard_lengths in lengths)
    for m in range(num_mod)
  ]
  need_edges = max(sum(r[0].size for r in shard_refs) for shard_refs in refs)
  want_frames = [
    bucket_size(n, growth=c.node_growth, minimum=8) for n in need_frames
  ]
  want_edges = bucket_size(need_edges, growth=c.edge_growth, minimum=64)
  if batcher.sticky_budgets:
    # Never below the batch's own rung; earlier batches may have raised it.
    assert all(f >= w for f, w in zip(frames, want_frames, strict=True))
    assert num_edges >= want_edges
    assert (frames, num_edges) == tuple(batcher.budgets)
  else:
    assert frames == want_frames and num_edges == want_edges
  total_edges = sum(r[0].size for shard_refs in refs for r in shard_refs)
  offsets = np.concatenate([[0], np.cumsum(frames)[:-1]])

  for s, shard in enumerate(shards):
    real = len(shard)
    np.testing.assert_array_equal(
      g.nodes["modality"][s], np.repeat(np.arange(num_mod), frames)
    )
    np.testing.assert_array_equal(
      g.globals["mask"][s], np.arange(num_graphs) < real
    )

    # Walk each modality block graph by graph; record row -> (graph, id).
    row_graph = np.full(num_nodes, pad_graph)
    row_local = np.full(num_nodes, -1)
    row_pos = np.zeros(num_nodes, np.int64)
    local_to_row = [np.zeros(sum(ls), np.int64) for ls in lengths[s]]
    for m in range(num_mod):
      b = 0
      for gi, x in enumerate(shard):
        ls = lengths[s][gi]
        n = ls[m]
        want = np.asarray(x.features[m]).astype(batcher.dtype)
        np.testing.assert_array_equal(batch.features[m][s, b : b + n], want)
        rows = offsets[m] + b + np.arange(n)
        local = sum(ls[:m]) + np.arange(n)
        row_graph[rows] = gi
        row_local[rows] = local
        local_to_row[gi][local] = rows
        row_pos[rows] = expected_positions(x, c)[m]
        b += n
      # Padding rows of the block carry zero features.
      assert not batch.features[m][s, b:].any()
    mask = row_local >= 0
    np.testing.assert_array_equal(g.nodes["mask"][s], mask)
    np.testing.assert_array_equal(g.nodes["graph"][s], row_graph)
    np.testing.assert_array_equal(g.nodes["position"][s][mask], row_pos[mask])

    n_node = [sum(ls) for ls in lengths[s]] + [0] * (num_graphs - real)
    n_node[pad_graph] = num_nodes - mask.sum()
    np.testing.assert_array_equal(g.n_node[s], n_node)

    emask = g.edges["mask"][s]
    egraph = g.edges["graph"][s]
    indegree = np.zeros(num_nodes, np.int64)
    for gi, (snd, rcv, typ) in enumerate(refs[s]):
      sel = emask & (egraph == gi)
      got_s, got_r = g.senders[s][sel], g.receivers[s][sel]
      assert (row_graph[got_s] == gi).all() and (row_graph[got_r] == gi).all()
      np.testing.assert_array_equal(row_local[got_s], snd)
      np.testing.assert_array_equal(row_local[got_r], rcv)
      np.testing.assert_array_equal(g.edges["type"][s][sel], typ)
      np.add.at(indegree, local_to_row[gi][rcv], 1)
    real_edges = sum(r[0].size for r in refs[s])
    assert emask.sum() == real_edges
    # Padding edges are masked and belong to the padding graph.
    assert (egraph[~emask] == pad_graph).all()
    n_edge = [r[0].size for r in refs[s]] + [0] * (num_graphs - real)
    n_edge[pad_graph] = num_edges - real_edges
    np.testing.assert_array_equal(g.n_edge[s], n_edge)

    labels = [x.label for x in samples]
    if labels[0] is None:
      assert batch.labels.shape == (num_shards, num_graphs)
      assert not batch.labels.any()
    else:
      want = np.asarray([x.label for x in shard]).reshape(
        -1, *np.shape(labels[0])
      )
      # Float labels are stored in the batcher's dtype, integer ones as int32.
      want = want.astype(batch.labels.dtype)
      np.testing.assert_array_equal(batch.labels[s, :real], want)
      assert not batch.labels[s, real:].any()

    keep = np.asarray(batch.keep_counts[s])
    layers = c.num_layers
    if c.prune_scope == "batch":
      # Global count: the whole batch's real edges, in every shard.
      assert keep.shape == (layers,)
      assert keep.tolist() == keep_ref(total_edges, c.prune_keep, layers)
    elif c.prune_scope == "graph":
      assert keep.shape == (num_graphs, layers)
      assert keep.tolist() == [
        keep_ref(k, c.prune_keep, layers) for k in n_edge[:real]
      ] + [[0] * layers] * (num_graphs - real)
    else:
      assert keep.shape == (num_nodes, layers)
      assert keep.tolist() == [
        keep_ref(int(k), c.prune_keep, layers) for k in indegree
      ]


# --------------------------------------------------------------------------
# Layout on random batches.


@pytest.mark.parametrize("scope", batching.PRUNE_SCOPES)
@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_layout_random_batches(num_shards, scope):
  rng = np.random.default_rng([num_shards, len(scope)])
  c = small_config(prune_scope=scope)
  batcher = GraphBatcher(c, batch_size=7, num_shards=num_shards)
  for trial in range(6):
    # Full batches as well as short ones that leave shards empty.
    n = 7 if trial == 0 else int(rng.integers(1, 8))
    samples = [make_sample(rng, c, random_lengths(rng, 3, 9)) for _ in range(n)]
    check_batch(batcher(samples), samples, batcher)


@pytest.mark.parametrize(
  "overrides",
  [
    dict(intra="all_to_all"),
    dict(alignment="paper", edge_types="modal"),
    dict(edge_types="temporal", pe="within_modality"),
    dict(edge_types="none", prune_scope="node", prune_keep=0.5),
    dict(
      modalities=("a", "b"),
      feature_dims=(3, 1),
      padded_lengths=(15, 12),
      prune_scope="graph",
    ),
    dict(modalities=("a",), feature_dims=(2,), padded_lengths=(10,)),
  ],
  ids=["all_to_all", "paper_modal", "temporal", "none_node", "two", "one"],
)
def test_layout_config_variants(overrides):
  rng = np.random.default_rng(7)
  c = small_config(**overrides)
  num_mod = len(c.modalities)
  batcher = GraphBatcher(c, batch_size=5, num_shards=2)
  for _ in range(3):
    samples = [
      make_sample(rng, c, random_lengths(rng, num_mod, 9)) for _ in range(5)
    ]
    check_batch(batcher(samples), samples, batcher)


def test_layout_float64_vector_labels_explicit_positions():
  rng = np.random.default_rng(3)
  c = small_config()
  batcher = GraphBatcher(c, batch_size=4, num_shards=2, dtype=np.float64)
  samples = []
  for _ in range(4):
    lengths = random_lengths(rng, 3, 6)
    pos = [np.sort(rng.choice(100, n, replace=False)) for n in lengths]
    samples.append(make_sample(rng, c, lengths, "vector", pos))
  batch = batcher(samples)
  assert batch.labels.dtype == np.int32
  assert batch.labels.shape == (2, 3, 4)
  check_batch(batch, samples, batcher)


def test_empty_shards_are_all_padding():
  rng = np.random.default_rng(0)
  c = small_config(prune_scope="graph")
  batcher = GraphBatcher(c, batch_size=6, num_shards=3)
  samples = [make_sample(rng, c, [2, 0, 3]) for _ in range(2)]
  batch = batcher(samples)
  check_batch(batch, samples, batcher)
  # Shards 1 and 2 hold no sample: every node and edge is padding.
  g = batch.graph
  assert batch.num_graphs == 2
  assert not g.nodes["mask"][1:].any() and not g.edges["mask"][1:].any()
  np.testing.assert_array_equal(g.n_node[1:, :-1], 0)
  np.testing.assert_array_equal(g.n_node[1:, -1], g.nodes["mask"].shape[1])


@st.composite
def batch_cases(draw):
  num_mod = 3
  lengths = draw(
    st.lists(
      st.lists(st.integers(0, 7), min_size=num_mod, max_size=num_mod).filter(
        any
      ),
      min_size=1,
      max_size=6,
    )
  )
  return dict(
    lengths=lengths,
    num_shards=draw(st.integers(1, 3)),
    batch_size=len(lengths) + draw(st.integers(0, 3)),
    scope=draw(st.sampled_from(batching.PRUNE_SCOPES)),
    label=draw(st.sampled_from(["float", "vector", None])),
    seed=draw(st.integers(0, 2**32 - 1)),
  )


@settings(max_examples=40, deadline=None)
@given(batch_cases())
def test_layout_hypothesis(case):
  rng = np.random.default_rng(case["seed"])
  c = small_config(prune_scope=case["scope"])
  # A fresh, non-sticky batcher: budgets must be exactly the batch's rungs.
  batcher = GraphBatcher(
    c,
    batch_size=case["batch_size"],
    num_shards=case["num_shards"],
    sticky_budgets=False,
  )
  samples = [make_sample(rng, c, ls, case["label"]) for ls in case["lengths"]]
  check_batch(batcher(samples), samples, batcher)


def test_batch_scope_keep_counts_are_global():
  # Two shards with very different edge counts still share one k.
  rng = np.random.default_rng(1)
  c = small_config(prune_scope="batch", num_layers=6)
  batcher = GraphBatcher(c, batch_size=2, num_shards=2)
  samples = [make_sample(rng, c, [9, 5, 7]), make_sample(rng, c, [1, 0, 0])]
  batch = batcher(samples)
  total = graph_lib.num_edges([9, 5, 7]) + graph_lib.num_edges([1, 0, 0])
  want = keep_ref(total, 0.8, 6)
  assert batch.keep_counts.tolist() == [want, want]
  # The padded edge budget must not leak into k.
  assert batch.graph.senders.shape[1] > total // 2


# --------------------------------------------------------------------------
# Positions (spec §2) and zero-frame removal (spec §1.3).


def node_positions(batch, m, n):
  """Positions of the first `n` rows of modality block `m`, shard 0."""
  start = sum(f.shape[1] for f in batch.features[:m])
  return batch.graph.nodes["position"][0, start : start + n]


def test_padded_positions_default_to_the_end_of_the_padded_array():
  c = small_config(pe="padded")
  batcher = GraphBatcher(c, batch_size=1)
  rng = np.random.default_rng(0)
  batch = batcher([make_sample(rng, c, [3, 0, 30])])
  np.testing.assert_array_equal(node_positions(batch, 0, 3), [37, 38, 39])
  np.testing.assert_array_equal(node_positions(batch, 2, 30), np.arange(30))
  got = batching.default_positions([3, 0, 30], c)
  assert [p.tolist() for p in got] == [[37, 38, 39], [], list(range(30))]


def test_within_modality_positions_start_at_zero():
  c = small_config(pe="within_modality")
  batcher = GraphBatcher(c, batch_size=1)
  rng = np.random.default_rng(0)
  # More frames than the padded length is fine here.
  batch = batcher([make_sample(rng, c, [3, 25, 1])])
  np.testing.assert_array_equal(node_positions(batch, 0, 3), [0, 1, 2])
  np.testing.assert_array_equal(node_positions(batch, 1, 25), np.arange(25))
  np.testing.assert_array_equal(node_positions(batch, 2, 1), [0])


@pytest.mark.parametrize("pe", ["padded", "within_modality"])
def test_explicit_positions_pass_through(pe):
  c = small_config(pe=pe)
  batcher = GraphBatcher(c, batch_size=1)
  rng = np.random.default_rng(0)
  pos = [np.array([0, 7, 4999]), np.array([], int), np.array([2, 3])]
  batch = batcher([make_sample(rng, c, [3, 0, 2], positions=pos)])
  np.testing.assert_array_equal(node_positions(batch, 0, 3), [0, 7, 4999])
  np.testing.assert_array_equal(node_positions(batch, 2, 2), [2, 3])


def test_samples_from_padded_strips_zero_frames():
  vision = np.zeros((2, 7, 3))
  vision[0, 2] = [1.0, 0.0, 0.0]
  vision[0, 3] = [np.nan, 0.0, 0.0]  # NaN counts as real
  # frame 4 is an interior all-zero frame: dropped
  vision[0, 5] = [1.0, -1.0, 0.0]  # sums to 0, but |x| does not
  vision[0, 6] = [0.0, 0.0, 2.0]
  vision[1, 6] = [3.0, 3.0, 3.0]
  text = np.zeros((2, 4, 4))
  text[1, 1:] = 1.0  # sample 0 has no text at all
  audio = np.ones((2, 5, 2))
  labels = np.array([[0.5], [-1.0]])
  out = batching.samples_from_padded([vision, text, audio], labels)

  assert len(out) == 2
  assert [p.tolist() for p in out[0].positions] == [
    [2, 3, 5, 6],
    [],
    [0, 1, 2, 3, 4],
  ]
  assert [p.tolist() for p in out[1].positions] == [
    [6],
    [1, 2, 3],
    list(range(5)),
  ]
  for sample, b in zip(out, range(2), strict=True):
    for f, p, a in zip(
      sample.features, sample.positions, (vision, text, audio), strict=True
    ):
      np.testing.assert_array_equal(f, a[b, p])
      assert not (np.abs(f).sum(-1) == 0).any()
  assert out[0].features[1].shape == (0, 4)
  np.testing.assert_array_equal(out[1].label, [-1.0])
  assert batching.samples_from_padded([vision])[0].label is None


def test_samples_from_padded_positions_leave_a_gap_in_the_batch():
  vision = np.zeros((1, 6, 3))
  vision[0, [1, 2, 4, 5]] = 1.0  # frame 3 is an interior zero frame
  text = np.ones((1, 2, 4))
  audio = np.ones((1, 3, 2))
  samples = batching.samples_from_padded([vision, text, audio], [0.0])
  c = small_config()
  batch = GraphBatcher(c, batch_size=1)(samples)
  np.testing.assert_array_equal(node_positions(batch, 0, 4), [1, 2, 4, 5])
  np.testing.assert_array_equal(node_positions(batch, 1, 2), [0, 1])


def test_samples_from_padded_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"same B"):
    batching.samples_from_padded([np.zeros((2, 3, 1)), np.zeros((3, 3, 1))])
  with pytest.raises(ValueError, match=r"\[B, T, d\] array"):
    batching.samples_from_padded([np.zeros((2, 3))])


# --------------------------------------------------------------------------
# Budgets and compilation count.


@pytest.mark.parametrize("growth, minimum", [(2.0, 8), (1.25, 64)])
def test_bucket_size_ladder(growth, minimum):
  rng = np.random.default_rng(0)
  ns = np.unique(np.r_[0:4000, rng.integers(0, 1 << 22, 300)])
  sizes = np.array(
    [bucket_size(int(n), growth=growth, minimum=minimum) for n in ns]
  )
  assert (sizes >= ns).all()
  assert (np.diff(sizes) >= 0).all()
  assert (sizes % 8 == 0).all()
  assert (sizes[ns <= minimum] == minimum).all()
  # Ladder values are fixed points (the smallest rung >= n is n itself).
  for size in np.unique(sizes):
    assert bucket_size(int(size), growth=growth, minimum=minimum) == size
  # Geometric: padding waste is bounded, and rungs are few.
  assert (sizes <= np.maximum(minimum, ns * growth + 8)).all()
  rungs = math.ceil(math.log(ns.max() / minimum, growth)) + 2
  assert len(np.unique(sizes)) <= rungs


def rungs_spanned(lo, hi, growth, minimum):
  """Number of ladder rungs that budgets for needs in [lo, hi] can take."""
  size, count = bucket_size(lo, growth=growth, minimum=minimum), 1
  while size < hi:
    size = bucket_size(size + 1, growth=growth, minimum=minimum)
    count += 1
  return count


REALISTIC = dict(vision=(5, 60), text=(2, 30), audio=(5, 50))


def realistic_config():
  c = default_config()
  c.feature_dims = (6, 7, 5)
  c.hidden = 16
  c.heads = 2
  c.num_layers = 2
  c.padded_lengths = (60, 30, 50)
  return c


def realistic_batches(rng, config, num_batches, batch_size=8):
  """Batches of MOSI-like length variety (needs: per-modality frames, E)."""
  batcher = GraphBatcher(config, batch_size=batch_size)
  out, needs = [], []
  for _ in range(num_batches):
    lengths = [
      [int(rng.integers(lo, hi + 1)) for lo, hi in REALISTIC.values()]
      for _ in range(batch_size)
    ]
    samples = [make_sample(rng, config, ls) for ls in lengths]
    out.append(batcher(samples))
    frames = np.sum(lengths, 0).tolist()
    needs.append((*frames, sum(graph_lib.num_edges(ls) for ls in lengths)))
  return out, np.array(needs)


def budgets(batch):
  return (*(f.shape[1] for f in batch.features), batch.graph.senders.shape[1])


def test_distinct_budgets_over_many_batches_are_few():
  c = realistic_config()
  rng = np.random.default_rng(1)
  batches, needs = realistic_batches(rng, c, 120)
  got = np.array([budgets(b) for b in batches])
  # Budgets never shrink within one batcher.
  assert (np.diff(got, axis=0) >= 0).all()
  growths = [c.node_growth] * 3 + [c.edge_growth]
  minima = [8] * 3 + [64]
  for k in range(4):
    distinct = len(np.unique(got[:, k]))
    lo, hi = int(needs[:, k].min()), int(needs[:, k].max())
    # Only the ladder rungs between the smallest and largest need occur.
    assert distinct <= rungs_spanned(lo, hi, growths[k], minima[k])
  # Node ladders (x2) take at most two or three values; edges a few more.
  assert all(len(np.unique(got[:, k])) <= 3 for k in range(3))
  assert len(np.unique(got[:, 3])) <= 7
  assert len({tuple(b) for b in got}) < len(batches) // 4


def shape_signature(batch):
  return tuple((x.shape, x.dtype.str) for x in jax.tree.leaves(batch))


def test_jit_compiles_once_per_batch_shape():
  c = realistic_config()
  rng = np.random.default_rng(0)
  batches, _ = realistic_batches(rng, c, 40)
  model = model_lib.create_model(c)
  # Random parameters from the shapes: avoids compiling `init` (seconds).
  shapes = jax.eval_shape(
    lambda k, b: model.init(k, b, train=False), jax.random.key(0), batches[0]
  )
  prng = np.random.default_rng(1)
  variables = jax.tree.map(
    lambda s: prng.normal(scale=0.3, size=s.shape).astype(s.dtype), shapes
  )
  traces = []

  def forward(v, b):
    traces.append(shape_signature(b))  # runs once per trace
    return model.apply(v, b, train=False)[0]

  # Backend optimisation off: compiling dominates this test's time, and the
  # count of compilations does not depend on it.
  fast_compile = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
  }
  fn = jax.jit(forward, compiler_options=fast_compile)
  for b in batches:
    out = fn(variables, b)
    assert np.isfinite(np.asarray(out)).all()
  signatures = {shape_signature(b) for b in batches}
  compiles = fn._cache_size() if hasattr(fn, "_cache_size") else len(traces)
  print(
    f"{len(batches)} batches, {len(signatures)} signatures, "
    f"{len(traces)} traces, {compiles} compilations"
  )
  assert len(traces) == compiles == len(signatures)
  assert set(traces) == signatures
  # Same shapes, different keep counts (dynamic k): no new compilation.
  by_sig = {}
  for b in batches:
    by_sig.setdefault(shape_signature(b), []).append(b.keep_counts.tolist())
  assert any(len({str(k) for k in ks}) > 1 for ks in by_sig.values())
  for b in batches[:10]:
    fn(variables, b)
  assert len(traces) == len(signatures)
  if hasattr(fn, "_cache_size"):
    assert fn._cache_size() == compiles
  # Sticky budgets: compiles happen only while budgets still grow.
  assert len(signatures) <= 8


# --------------------------------------------------------------------------
# Bad input.


def good(rng, c, lengths=(3, 2, 4)):
  return make_sample(rng, c, list(lengths))


def with_feature(sample, m, value):
  feats = list(sample.features)
  feats[m] = value
  return sample._replace(features=feats)


def bad_cases():
  rng = np.random.default_rng(0)
  c = small_config()
  s = good(rng, c)
  nan = np.array(s.features[0])
  nan[1, 2] = np.nan
  inf = np.array(s.features[2])
  inf[3, 0] = -np.inf
  pos = [np.arange(3), np.arange(2), np.arange(4)]
  return [
    (
      with_feature(s, 1, np.zeros((2, 5))),
      r"sample 1, modality 'text': expected a \[length, 4\] array "
      r"\(config.feature_dims\[1\]\), got shape \(2, 5\)",
    ),
    (
      with_feature(s, 2, np.zeros(8)),
      r"sample 1, modality 'audio': expected a \[length, 2\].*shape \(8,\)",
    ),
    (
      with_feature(s, 0, np.zeros((1, 3, 3))),
      r"sample 1, modality 'vision': .*shape \(1, 3, 3\)",
    ),
    (
      with_feature(s, 0, nan),
      r"sample 1, modality 'vision': non-finite value nan at frame 1, "
      r"feature 2",
    ),
    (
      with_feature(s, 2, inf),
      r"sample 1, modality 'audio': non-finite value -inf at frame 3, "
      r"feature 0",
    ),
    (
      s._replace(features=s.features[:2]),
      r"sample 1: has 2 modalities, config.modalities has 3",
    ),
    (
      s._replace(features=[*s.features, np.zeros((1, 1))]),
      r"sample 1: has 4 modalities",
    ),
    (
      s._replace(positions=[np.arange(3), np.arange(3), np.arange(4)]),
      r"sample 1, modality 'text': positions shape \(3,\) does not match "
      r"its 2 frames",
    ),
    (
      s._replace(positions=pos[:2]),
      r"sample 1: has 2 position arrays for 3 modalities",
    ),
    (
      s._replace(positions=[np.array([-1, 0, 1]), *pos[1:]]),
      r"sample 1, modality 'vision': positions must lie in "
      r"\[0, config.max_positions=5000\), got \[-1, 1\]",
    ),
    (
      s._replace(positions=[*pos[:2], np.array([0, 1, 2, 5000])]),
      r"sample 1, modality 'audio': positions must lie .*got \[0, 5000\]",
    ),
    (
      with_feature(s, 0, np.zeros((41, 3))),
      r"sample 1: modality 'vision' has 41 frames, more than "
      r"config.padded_lengths\[0\] = 40",
    ),
  ]


@pytest.mark.parametrize("bad, pattern", bad_cases())
def test_bad_sample_is_named(bad, pattern):
  rng = np.random.default_rng(1)
  c = small_config()
  batcher = GraphBatcher(c, batch_size=3)
  with pytest.raises(ValueError, match=pattern):
    batcher([good(rng, c), bad, good(rng, c)])


def test_long_sequences_are_fine_without_the_padded_rule():
  # The padded-length check belongs to pe="padded" only.
  rng = np.random.default_rng(0)
  long = [41, 1, 1]
  c = small_config(pe="within_modality")
  GraphBatcher(c, batch_size=1)([make_sample(rng, c, long)])
  c = small_config(pe="padded")
  pos = [np.arange(41), np.arange(1), np.arange(1)]
  GraphBatcher(c, batch_size=1)([make_sample(rng, c, long, positions=pos)])


def test_empty_sample_raises_by_default():
  rng = np.random.default_rng(0)
  c = small_config()
  samples = [good(rng, c), make_sample(rng, c, [0, 0, 0])]
  with pytest.raises(ValueError, match=r"sample 1: every modality is empty"):
    GraphBatcher(c, batch_size=2)(samples)


def test_empty_sample_is_dropped_with_its_label():
  rng = np.random.default_rng(0)
  c = small_config(empty_samples="drop")
  a, b = good(rng, c, (2, 1, 3)), good(rng, c, (1, 4, 0))
  empty = make_sample(rng, c, [0, 0, 0], label=123.0)
  # batch_size 2: the count that matters is after dropping.
  batcher = GraphBatcher(c, batch_size=2)
  with pytest.warns(UserWarning, match=r"dropping sample 1"):
    batch = batcher([a, empty, b])
  assert batch.num_graphs == 2
  assert 123.0 not in batch.labels
  check_batch(batch, [a, b], batcher)


def test_batch_of_only_empty_samples_raises():
  rng = np.random.default_rng(0)
  c = small_config(empty_samples="drop")
  with (
    pytest.warns(UserWarning),
    pytest.raises(ValueError, match="empty batch"),
  ):
    GraphBatcher(c, batch_size=2)([make_sample(rng, c, [0, 0, 0])])


def test_too_many_samples():
  rng = np.random.default_rng(0)
  c = small_config()
  with pytest.raises(ValueError, match=r"3 samples exceed batch_size=2"):
    GraphBatcher(c, batch_size=2)([good(rng, c) for _ in range(3)])


def test_over_the_largest_bucket():
  rng = np.random.default_rng(0)
  c = small_config(max_edges=100)
  # 5991 edges (spec §3): far over 100.
  with pytest.raises(
    ValueError, match=r"over the largest bucket .*config.max_edges=100\)"
  ):
    GraphBatcher(c, batch_size=1)([make_sample(rng, c, [40, 18, 30])])
  c = small_config(max_nodes=30)
  # Frames 16 + 8 + 8 = 32 nodes after rounding up.
  with pytest.raises(
    ValueError,
    match=r"batch needs 32 nodes .*largest bucket \(config.max_nodes=30,",
  ):
    GraphBatcher(c, batch_size=1)([make_sample(rng, c, [9, 1, 1])])
  # Right at the limit is fine.
  c = small_config(max_nodes=32)
  GraphBatcher(c, batch_size=1)([make_sample(rng, c, [9, 1, 1])])


@pytest.mark.parametrize(
  "overrides, kwargs, pattern",
  [
    (
      dict(prune_scope="global"),
      {},
      r"config.prune_scope='global'; expected one of \('batch', 'graph', "
      r"'node'\)",
    ),
    (dict(empty_samples="skip"), {}, r"config.empty_samples='skip'"),
    ({}, dict(batch_size=0), r"batch_size \(0\) and num_shards \(1\)"),
    ({}, dict(batch_size=4, num_shards=0), r"num_shards \(0\) must be >= 1"),
  ],
)
def test_bad_batcher_settings(overrides, kwargs, pattern):
  c = small_config(**overrides)
  with pytest.raises(ValueError, match=pattern):
    GraphBatcher(c, **{"batch_size": 2, **kwargs})


@pytest.mark.parametrize("layout", batching.LAYOUTS)
def test_float_labels_follow_the_batcher_dtype(layout):
  # A MOSI label of 1.8 must stay 1.8 in an x64 run (float32 would make it
  # 1.7999999523, and an x64 loss 4e-8 off the official one).
  rng = np.random.default_rng(0)
  c = small_config()
  samples = [make_sample(rng, c, [3, 2, 1], label=1.8)] * 2
  with jax.enable_x64(True):
    batch = GraphBatcher(c, batch_size=2, dtype=np.float64, layout=layout)(
      samples
    )
    labels = np.asarray(jax.device_put(batch.labels))
  assert labels.dtype == np.float64
  np.testing.assert_array_equal(labels[0, :2], [1.8, 1.8])
  single = GraphBatcher(c, batch_size=2, layout=layout)(samples)
  assert single.labels.dtype == np.float32
  assert single.labels[0, 0] == np.float32(1.8)


def test_config_without_layout_fields_takes_the_config_defaults():
  # Configs saved before `backend` and `dense_groups` existed still build
  # batches, with the defaults of `mtagjax.config` (not a second copy).
  c = small_config()
  del c["backend"]
  assert GraphBatcher(c, batch_size=2).layout == config_lib.DEFAULTS.backend
  del c["dense_groups"]
  dense = GraphBatcher(c, batch_size=16, layout="dense")
  assert dense.num_groups == default_config().dense_groups


def test_label_shape_mismatch():
  rng = np.random.default_rng(0)
  c = small_config()
  a = make_sample(rng, c, [1, 2, 3], label=np.zeros(4))
  b = make_sample(rng, c, [1, 2, 3], label=np.zeros(3))
  with pytest.raises(ValueError, match=r"label of graph 1 has shape \(3,\)"):
    GraphBatcher(c, batch_size=2)([a, b])


def test_sticky_budgets_keep_the_largest_shapes_and_the_results():
  c = realistic_config()
  rng = np.random.default_rng(5)
  big = [make_sample(rng, c, [60, 30, 50]) for _ in range(4)]
  small = [make_sample(rng, c, [5, 2, 5]) for _ in range(4)]
  sticky = GraphBatcher(c, batch_size=4)
  loose = GraphBatcher(c, batch_size=4, sticky_budgets=False)
  sticky(big)
  loose(big)
  padded, tight = sticky(small), loose(small)
  assert budgets(padded) > budgets(tight)
  model = model_lib.create_model(c)
  variables = model.init(jax.random.key(0), tight, train=False)
  a, _ = model.apply(variables, padded, train=False)
  b, _ = model.apply(variables, tight, train=False)
  # Padding is masked everywhere: the predictions do not depend on it.
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
