"""The dense MTGAT backend against the segment backend, and its batches.

Both backends run the same parameters on the same samples; every test maps
the dense results (node blocks, `[receiver, sender]` tables) back to the
segment layout and compares outputs, per-layer node features, attention and
the edges alive after every pruning, in float64 to ~1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtagjax import batching, dense, dense_layout, dense_prune, layers
from mtagjax import model as model_lib
from mtagjax.config import default_config

# Some modalities empty, one graph with a single node, sizes that differ a
# lot (so groups get different node budgets).
LENGTHS = [[5, 3, 7], [0, 2, 4], [6, 0, 0], [9, 4, 1], [2, 2, 2], [1, 0, 0]]


def small_config(**overrides):
  c = default_config()
  c.feature_dims = (3, 4, 2)
  c.padded_lengths = (40, 20, 30)
  c.num_layers = 3
  c.hidden = 8
  c.heads = 2
  c.dense_groups = 3
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


def make_samples(rng, config, lengths=LENGTHS, constant=False):
  samples = []
  for ls in lengths:
    feats = [
      np.ones((n, d)) if constant else rng.normal(size=(n, d))
      for n, d in zip(ls, config.feature_dims, strict=True)
    ]
    samples.append(batching.Sample(feats, label=float(rng.normal())))
  return samples


def both_batches(config, samples, num_shards=1, dtype=np.float64):
  kw = dict(batch_size=len(samples), num_shards=num_shards, dtype=dtype)
  seg = batching.GraphBatcher(config, layout="segment", **kw)(samples)
  den = batching.GraphBatcher(config, layout="dense", **kw)(samples)
  return seg, den


def both_models(config):
  config = config.copy_and_resolve_references()
  config.backend = "segment"
  seg = model_lib.create_model(config)
  config.backend = "dense"
  return seg, model_lib.create_model(config)


def random_variables(model, batch, seed=0, dtype=np.float64):
  shapes = jax.eval_shape(
    lambda k, b: model.init(k, b, train=False), jax.random.key(0), batch
  )
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: rng.normal(scale=0.5, size=s.shape).astype(dtype), shapes
  )


def real_edges(values, seg_batch):
  """`[S, E, ...]` segment values -> `[E_real, ...]` (shard-major)."""
  values = np.asarray(values)
  mask = np.asarray(seg_batch.graph.edges["mask"])
  return np.concatenate([v[m] for v, m in zip(values, mask, strict=True)])


def dense_nodes(per_group, den, num_rows):
  """Per group, per modality `[S, B, N_m, D]` values -> flat `[S, rows, D]`."""
  out = None
  for values, grp in zip(per_group, den.groups, strict=True):
    for v, rows, mask in zip(values, grp.rows, grp.node_mask, strict=True):
      v = np.asarray(v)
      if out is None:
        out = np.zeros((v.shape[0], num_rows, v.shape[-1]), v.dtype)
      for s in range(v.shape[0]):
        out[s, rows[s][mask[s]]] = v[s][mask[s]]
  return out


def layer_blocks(per_group, layer, heads_last=False):
  """Per group, per block `[L, ...]` aux values -> flat blocks of `layer`."""
  out = []
  for group in per_group:
    for v in group:
      v = np.asarray(v[layer])
      out.append(np.moveaxis(v, -3, -1) if heads_last else v)
  return out


def assert_same_run(seg, den, out_s, aux_s, out_d, aux_d, num_layers):
  gmask = np.asarray(seg.graph.globals["mask"])
  np.testing.assert_allclose(
    np.asarray(out_d)[gmask], np.asarray(out_s)[gmask], rtol=0, atol=1e-12
  )
  node_mask = np.asarray(seg.graph.nodes["mask"])
  ids = dense_layout.flat_blocks([grp.edge_id for grp in den.groups])
  num_edges = den.num_edges
  for layer in range(num_layers + 1):
    got = dense_nodes(
      [[a[layer] for a in group] for group in aux_d["nodes"]],
      den,
      node_mask.shape[1],
    )
    want = np.asarray(aux_s["nodes"][layer])
    np.testing.assert_allclose(
      got[node_mask], want[node_mask], rtol=0, atol=1e-12
    )
    kept = dense_layout.to_edge_list(
      layer_blocks(aux_d["edge_mask"], layer), ids, num_edges
    )
    np.testing.assert_array_equal(
      kept, real_edges(aux_s["edge_mask"][layer], seg), f"layer {layer}"
    )
  for layer in range(num_layers):
    att = dense_layout.to_edge_list(
      layer_blocks(aux_d["attention"], layer, heads_last=True),
      ids,
      num_edges,
    )
    want = real_edges(aux_s["attention"][layer], seg)
    np.testing.assert_allclose(att, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
  "scope,shards", [("batch", 1), ("batch", 2), ("graph", 2), ("node", 1)]
)
def test_backends_agree_x64(scope, shards):
  c = small_config(prune_scope=scope)
  ms, md = both_models(c)
  with jax.enable_x64(True):
    seg, den = both_batches(
      c, make_samples(np.random.default_rng(0), c), shards
    )
    v = random_variables(ms, seg)
    out_s, aux_s = jax.jit(lambda v, b: ms.apply(v, b, train=False))(v, seg)
    out_d, aux_d = jax.jit(lambda v, b: md.apply(v, b, train=False))(v, den)
  assert_same_run(seg, den, out_s, aux_s, out_d, aux_d, c.num_layers)
  # Pruning did happen (and differently per layer).
  counts = np.asarray(aux_s["edge_mask"]).sum((1, 2))
  assert (np.diff(counts) < 0).all()


@pytest.mark.parametrize("scope", ["batch", "graph", "node"])
def test_ties_go_to_the_lower_edge_index(scope):
  # One modality, constant features, one edge type: every node has the same
  # features, so each edge gets exactly 1/in-degree (1, 1/2 or 1/3), in both
  # backends bit for bit, and the cut falls inside a class of equal scores.
  # (With several layers the features stop being equal, and ties computed
  # in different summation orders may differ by an ulp; the pruning of
  # exact ties over several modalities is `test_prune_dense_equals_...`.)
  c = small_config(
    modalities=("text",),
    feature_dims=(4,),
    padded_lengths=(20,),
    prune_scope=scope,
    edge_types="none",
    pe="none",
    num_layers=1,
  )
  ms, md = both_models(c)
  lengths = [[5], [3], [1], [9], [2], [4]]
  with jax.enable_x64(True):
    samples = make_samples(np.random.default_rng(1), c, lengths, True)
    seg, den = both_batches(c, samples)
    v = random_variables(ms, seg, seed=1)
    out_s, aux_s = jax.jit(lambda v, b: ms.apply(v, b, train=False))(v, seg)
    out_d, aux_d = jax.jit(lambda v, b: md.apply(v, b, train=False))(v, den)
  att = real_edges(aux_s["attention"][0], seg)
  assert len(np.unique(att)) == 3  # 1, 1/2 and 1/3
  kept = real_edges(aux_s["edge_mask"][1], seg)
  # Some segment's cut splits a class of equal scores (else the tie order
  # would not matter).
  segment = {
    "batch": np.zeros(len(att), int),
    "graph": real_edges(seg.graph.edges["graph"], seg),
    "node": real_edges(seg.graph.receivers, seg),
  }[scope]
  classes = [(g, a) for g, a in zip(segment, att.mean(-1), strict=True)]
  kept_pairs = {c for c, k in zip(classes, kept, strict=True) if k}
  dropped_pairs = {c for c, k in zip(classes, kept, strict=True) if not k}
  assert kept_pairs & dropped_pairs
  assert_same_run(seg, den, out_s, aux_s, out_d, aux_d, c.num_layers)


@pytest.mark.parametrize("scope", ["batch", "graph", "node"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prune_dense_equals_prune_edges(scope, dtype):
  # Quantised random scores (many ties) on a dense batch, pruned by both.
  c = small_config(prune_scope=scope)
  rng = np.random.default_rng(2)
  seg, den = both_batches(c, make_samples(rng, c), num_shards=2)
  num_edges = den.num_edges
  scores = (rng.integers(0, 7, num_edges) / 6.0).astype(dtype)
  alive = rng.random(num_edges) < 0.9
  ids = [grp.edge_id for grp in den.groups]

  def to_dense(values, fill):
    blocks = [
      [np.where(i >= 0, values[np.maximum(i, 0)], fill) for i in grp.edge_id]
      for grp in den.groups
    ]
    return dense.prune_families(blocks, scope)

  emask = np.asarray(seg.graph.edges["mask"])
  seg_scores = np.zeros(emask.shape, dtype)
  seg_alive = np.zeros(emask.shape, bool)
  seg_scores[emask], seg_alive[emask] = scores, alive
  keep = np.asarray(seg.keep_counts)[..., 0]
  if scope == "batch":
    keep = np.full_like(keep, int(alive.sum() * 0.8))
    dense_keep = [keep[0]]
  elif scope == "graph":
    dense_keep = [np.take_along_axis(keep, g.graph, 1) for g in den.groups]
  else:
    dense_keep = [
      np.stack([k[r] for k, r in zip(keep, rows, strict=True)])
      for g in den.groups
      for rows in g.rows
    ]
  with jax.enable_x64(dtype == np.float64):
    want = layers.prune_edges(
      jnp.asarray(seg_scores),
      jnp.asarray(seg_alive),
      jnp.asarray(keep),
      scope=scope,
      edge_graph=seg.graph.edges["graph"],
      receivers=seg.graph.receivers,
    )
    got = jax.jit(
      lambda s, a, i, k: dense_prune.prune_dense(s, a, i, k, scope=scope)
    )(
      to_dense(scores, 0.0),
      to_dense(alive, False),
      dense.prune_families(ids, scope),
      dense_keep,
    )
  got = dense_layout.to_edge_list(
    dense_layout.flat_blocks(got), dense_layout.flat_blocks(ids), num_edges
  )
  np.testing.assert_array_equal(got, real_edges(want, seg))
  assert 0 < got.sum() < alive.sum()


def test_train_mode_and_gradients_agree_x64():
  # Dropout off (its masks follow the layout); everything else in train mode.
  c = small_config(pe_dropout=0.0, attention_dropout=0.0)
  ms, md = both_models(c)

  def loss_fn(model, batch):
    def loss(params):
      out, _ = model.apply({"params": params}, batch, train=True)
      mask = batch.graph.globals["mask"]
      return (jnp.where(mask, out[..., 0], 0.0) ** 2).sum()

    return jax.jit(jax.value_and_grad(loss))

  with jax.enable_x64(True):
    seg, den = both_batches(c, make_samples(np.random.default_rng(3), c))
    params = random_variables(ms, seg, seed=3)["params"]
    loss_s, grad_s = loss_fn(ms, seg)(params)
    loss_d, grad_d = loss_fn(md, den)(params)
  np.testing.assert_allclose(loss_d, loss_s, rtol=1e-12)
  flat_s = jax.tree_util.tree_leaves_with_path(grad_s)
  flat_d = dict(jax.tree_util.tree_leaves_with_path(grad_d))
  for path, g in flat_s:
    np.testing.assert_allclose(
      flat_d[path], g, rtol=1e-9, atol=1e-11, err_msg=str(path)
    )
  assert any(np.abs(g).max() > 1e-3 for _, g in flat_s)


def test_dropout_keeps_the_rate_and_the_pre_dropout_attention():
  key = jax.random.key(0)
  mask = np.asarray(dense.hash_keep_mask(key, (64, 128, 128), 0.9))
  assert abs(mask.mean() - 0.9) < 0.002
  # Entries at any stride are independent (the sampling noise of each pair
  # mean is ~4e-4); keys give different masks.
  flat = mask.reshape(-1)
  for stride in (1, 2, 127, 128, 4096, 1 << 14, 1 << 18):
    both = (flat[stride:] & flat[:-stride]).mean()
    assert abs(both - 0.81) < 0.003, stride
  other = np.asarray(dense.hash_keep_mask(jax.random.key(1), mask.shape, 0.9))
  assert (other != mask).mean() > 0.15
  np.testing.assert_array_equal(
    mask, np.asarray(dense.hash_keep_mask(key, mask.shape, 0.9))
  )

  c = small_config(attention_dropout=0.5, pe_dropout=0.0, prune=False)
  _, md = both_models(c)
  _, den = both_batches(
    c, make_samples(np.random.default_rng(4), c), 1, np.float32
  )
  v = random_variables(md, den, dtype=np.float32)
  apply = jax.jit(md.apply, static_argnames="train")
  ev, aux_e = apply(v, den, train=False)
  tr, aux_t = apply(v, den, train=True, rngs={"dropout": jax.random.key(5)})
  assert not np.allclose(ev, tr)
  # The first layer's attention is the pre-dropout one in both modes.
  for got, want in zip(
    layer_blocks(aux_t["attention"], 0),
    layer_blocks(aux_e["attention"], 0),
    strict=True,
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("intra", ["adjacent", "all_to_all"])
def test_dense_batch_layout_covers_every_edge_once(intra):
  c = small_config(intra=intra)
  rng = np.random.default_rng(5)
  seg, den = both_batches(c, make_samples(rng, c), num_shards=2)
  num_edges = den.num_edges
  assert num_edges == int(np.asarray(seg.graph.edges["mask"]).sum())
  ids = np.concatenate([i[i >= 0] for g in den.groups for i in g.edge_id])
  np.testing.assert_array_equal(np.sort(ids), np.arange(num_edges))
  # Types, senders and receivers agree with the segment edge list.
  send = real_edges(seg.graph.senders, seg)
  recv = real_edges(seg.graph.receivers, seg)
  etype = real_edges(seg.graph.edges["type"], seg)
  offsets = np.cumsum([0] + [int(m.sum()) for m in seg.graph.edges["mask"]])
  n_node = np.asarray(seg.graph.n_node)
  for grp in den.groups:
    assert grp.intra == intra
    blocks = zip(
      grp.pairs(), grp.edge_id, grp.edge_types(), grp.senders(), strict=True
    )
    for (r, m), edge_id, types, senders in blocks:
      assert edge_id.shape[-1] == (
        3 if grp.is_band(r, m) else grp.rows[m].shape[-1]
      )
      s, b, i, w = np.nonzero(edge_id >= 0)
      e = edge_id[s, b, i, w]
      np.testing.assert_array_equal(types[s, b, i, w], etype[e])
      np.testing.assert_array_equal(grp.rows[r][s, b, i], recv[e])
      np.testing.assert_array_equal(grp.rows[m][s, b, senders[i, w]], send[e])
      assert (e >= offsets[s]).all() and (e < offsets[s + 1]).all()
    # Graph slots hold real graphs with their node count (or nothing).
    for s_ in range(2):
      counts = sum(mask[s_].sum(-1) for mask in grp.node_mask)
      pad = grp.graph[s_] == seg.graph.n_node.shape[1] - 1
      assert (counts[pad] == 0).all()
      np.testing.assert_array_equal(
        counts[~pad], n_node[s_][grp.graph[s_][~pad]]
      )


def dense_from_segment(seg, den):
  """The `DenseBatch` the segment batch `seg` implies, built with loops.

  `seg` holds the same samples as `den`, which gives the slots and budgets.
  """
  g = seg.graph
  node_mask, egraph = np.asarray(g.nodes["mask"]), g.edges["graph"]
  # Node rows per (shard, graph, modality), in time order, and back.
  rows = {}
  for s, row in zip(*np.nonzero(node_mask), strict=True):
    key = (s, g.nodes["graph"][s, row], g.nodes["modality"][s, row])
    rows.setdefault(key, []).append(row)
  where = {}
  for (s, _, m), run in rows.items():
    where.update({(s, row): (m, i) for i, row in enumerate(run)})
  first_id = np.cumsum([0, *np.asarray(g.edges["mask"]).sum(1)])
  groups = []
  for grp in den.groups:
    pairs = grp.pairs()
    code = [np.full(c.shape, -1, np.int8) for c in grp.code]
    types = [np.zeros(t.shape, np.int32) for t in grp.types]
    edge_id = [np.full(i.shape, -1, np.int32) for i in grp.edge_id]
    node_rows = [np.zeros(r.shape, np.int32) for r in grp.rows]
    mask = [np.zeros(r.shape, bool) for r in grp.rows]
    for s, b in np.ndindex(grp.graph.shape):
      graph = grp.graph[s, b]
      for m in range(len(grp.rows)):
        got = rows.get((s, graph, m), [])
        node_rows[m][s, b, : len(got)] = got
        mask[m][s, b, : len(got)] = True
      entries = {}
      for e in np.flatnonzero(g.edges["mask"][s] & (egraph[s] == graph)):
        r, i = where[s, g.receivers[s, e]]
        m, j = where[s, g.senders[s, e]]
        col = dense_layout.BAND_OFFSETS.index(j - i) if grp.is_band(r, m) else j
        blk = pairs.index((r, m))
        entries.setdefault(blk, []).append((i, col, g.edges["type"][s, e], e))
      for blk, edges in entries.items():
        held = sorted({t for _, _, t, _ in edges})
        types[blk][s, b, : len(held)] = held
        for i, col, t, e in edges:
          code[blk][s, b, i, col] = held.index(t)
          edge_id[blk][s, b, i, col] = first_id[s] + e
    groups.append(
      grp.replace(
        rows=tuple(node_rows),
        node_mask=tuple(mask),
        code=tuple(code),
        types=tuple(types),
        edge_id=tuple(edge_id),
      )
    )
  n_edge = np.where(g.globals["mask"], g.n_edge, 0).astype(np.int32)
  graph = g._replace(edges=None, senders=None, receivers=None, n_edge=n_edge)
  return dense_layout.DenseBatch(
    graph, seg.features, seg.labels, seg.keep_counts, tuple(groups)
  )


@pytest.mark.parametrize(
  "overrides,shards",
  [
    (dict(prune_scope="node"), 1),
    (dict(intra="all_to_all", prune_scope="graph"), 2),
    (dict(edge_types="none", alignment="paper", dense_groups=2), 3),
    (
      dict(vocab_sizes=(0, 7, 0), feature_dims=(3, 1, 2), intra="all_to_all"),
      2,
    ),
    (dict(modalities=("a", "b"), feature_dims=(3, 4), dense_groups=1), 2),
  ],
  ids=["node", "all_to_all", "none_paper", "tokens", "two_modalities"],
)
def test_dense_batch_is_the_segment_batch_bit_for_bit(overrides, shards):
  # The dense batch is built from the graphs' edge lists, not from a
  # segment batch; it must hold exactly what the segment batch implies:
  # every leaf, dtype and shape, edge ids in segment order (the tie order
  # of pruning), over batches of several sizes and sticky budgets.
  c = small_config(**overrides)
  num_mod = len(c.modalities)
  rng = np.random.default_rng(10)
  kw = dict(batch_size=7, num_shards=shards)
  seg_batcher = batching.GraphBatcher(c, layout="segment", **kw)
  den_batcher = batching.GraphBatcher(c, layout="dense", **kw)
  for size in (7, 3, 5):
    lengths = [
      [int(n) for n in rng.integers(0, 10, num_mod)] for _ in range(size)
    ]
    lengths[0][0] = lengths[0][0] or 1  # never all modalities empty
    lengths = [ls if any(ls) else [1] * num_mod for ls in lengths]
    samples = make_samples(rng, c, lengths)
    if c.vocab_sizes[1]:
      for x in samples:
        x.features[1] = rng.integers(0, 7, (len(x.features[1]), 1)) * 1.0
    floor = den_batcher.dense_budgets
    seg, den = seg_batcher(samples), den_batcher(samples)
    want = dense_from_segment(seg, den)
    got_leaves = jax.tree_util.tree_leaves_with_path(den)
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, got), (_, leaf) in zip(got_leaves, want_leaves, strict=True):
      assert got.dtype == leaf.dtype, path
      np.testing.assert_array_equal(got, leaf, str(path))
    # Slots hold the graphs the grouping gives the segment batch's lengths.
    counts = np.zeros((shards, kw["batch_size"] // shards + 2, num_mod), int)
    nodes = seg.graph.nodes
    for s, row in zip(*np.nonzero(nodes["mask"]), strict=True):
      counts[s, nodes["graph"][s, row], nodes["modality"][s, row]] += 1
    per_shard = den_batcher.per_shard
    members, _ = dense_layout.group_slots(
      counts[:, :per_shard], c.dense_groups, c.intra, floor
    )
    for k, grp in enumerate(den.groups):
      for s in range(shards):
        mem = members[s][k]
        real = counts[s, mem].sum(1) > 0
        np.testing.assert_array_equal(
          grp.graph[s], np.where(real, mem, per_shard)
        )


def test_group_assignment_is_a_partition_no_worse_than_sorting():
  rng = np.random.default_rng(11)
  lengths = np.stack(
    [rng.integers(lo, hi, 32) for lo, hi in ((50, 501), (5, 51), (50, 376))],
    -1,
  )
  lengths[3] = 0  # an empty slot
  counts = [4] * 8
  for intra in ("adjacent", "all_to_all"):
    groups = dense_layout.assign_groups(lengths, counts, intra)
    assert [len(g) for g in groups] == counts
    np.testing.assert_array_equal(
      np.sort(np.concatenate(groups)), np.arange(32)
    )

    def total(groups, intra=intra):
      return sum(
        len(g) * dense_layout.block_entries(lengths[g].max(0), intra)
        for g in groups
      )

    by_size = np.argsort(-lengths.sum(1))
    sorted_groups = np.split(by_size, np.cumsum(counts)[:-1])
    assert total(groups) < total(sorted_groups)
    assert total(groups) >= sum(
      dense_layout.block_entries(lengths, intra)
    )  # padding never makes a graph smaller


def test_few_distinct_shapes_over_varied_batches():
  c = small_config(dense_groups=4, padded_lengths=(60, 15, 40))
  rng = np.random.default_rng(6)
  batcher = batching.GraphBatcher(c, batch_size=8, layout="dense")
  shapes, budgets = set(), []
  for _ in range(40):
    num = int(rng.integers(4, 9))  # a short last batch, too
    lengths = [
      [int(rng.integers(lo, hi)) for lo, hi in ((10, 60), (2, 15), (8, 40))]
      for _ in range(num)
    ]
    batch = batcher(make_samples(rng, c, lengths))
    shapes.add(tuple(x.shape for x in jax.tree.leaves(batch)))
    budgets.append(batcher.dense_budgets)
  # jit compiles once per distinct set of shapes.
  assert len(shapes) <= 6, len(shapes)
  assert (np.diff(np.array(budgets), axis=0) >= 0).all()  # sticky


def test_order_key_preserves_float_order():
  rng = np.random.default_rng(7)
  x = np.concatenate(
    [rng.normal(size=200), [0.0, -0.0, 1e-40, -1e-40, np.inf, -np.inf]]
  ).astype(np.float32)
  key = np.asarray(dense_prune.order_key(jnp.asarray(x)))
  order = np.argsort(x, kind="stable")
  assert (np.diff(key[order].astype(np.int64)) >= 0).all()
  assert key[x == 0.0].min() == key[x == 0.0].max()  # -0.0 == 0.0


def test_mismatched_batch_and_backend_is_named():
  c = small_config()
  ms, md = both_models(c)
  seg, den = both_batches(c, make_samples(np.random.default_rng(8), c))
  with pytest.raises(ValueError, match="needs a DenseBatch.*layout='dense'"):
    md.init(jax.random.key(0), seg, train=False)
  with pytest.raises(ValueError, match="needs a Batch"):
    ms.init(jax.random.key(0), den, train=False)
  with pytest.raises(ValueError, match="layout 'sparse'"):
    batching.GraphBatcher(c, batch_size=2, layout="sparse")
  with pytest.raises(ValueError, match="config.dense_groups=0"):
    batching.GraphBatcher(
      small_config(dense_groups=0), batch_size=2, layout="dense"
    )


def test_random_pruning_keeps_the_same_counts():
  c = small_config(prune_type="random", prune_scope="graph")
  ms, md = both_models(c)
  seg, den = both_batches(c, make_samples(np.random.default_rng(9), c), 2)
  v = random_variables(ms, seg)
  rngs = {"prune": jax.random.key(3)}
  run = lambda m: jax.jit(lambda v, b: m.apply(v, b, train=False, rngs=rngs))
  _, aux_s = run(ms)(v, seg)
  _, aux_d = run(md)(v, den)
  per_graph = lambda m, ids: np.bincount(ids[m], minlength=ids.max() + 1)
  for layer in range(c.num_layers + 1):
    kept_s = real_edges(aux_s["edge_mask"][layer], seg)
    kept_d = dense_layout.to_edge_list(
      layer_blocks(aux_d["edge_mask"], layer),
      dense_layout.flat_blocks([g.edge_id for g in den.groups]),
      den.num_edges,
    )
    graph = real_edges(seg.graph.edges["graph"], seg)
    shard = np.repeat([0, 1], [int(m.sum()) for m in seg.graph.edges["mask"]])
    ids = graph + shard * seg.graph.n_node.shape[1]
    np.testing.assert_array_equal(
      per_graph(kept_d, ids), per_graph(kept_s, ids)
    )
    if layer:
      # A random subset: not the attention ranking of the segment backend.
      assert not (kept_d == kept_s).all()


def test_alive_without_an_edge_type_counts_as_dead():
  """`alive` set where a block has no edge is ignored."""
  rng = np.random.default_rng(0)
  b, lengths, d, types = 2, (7, 5), 6, 27
  xs = [
    jnp.asarray(rng.standard_normal((b, n, d)), jnp.float32) for n in lengths
  ]
  codes, type_lists = [], []
  for r, s in [(r, s) for r in range(2) for s in range(2)]:
    width = 3 if r == s else lengths[s]
    codes.append(
      jnp.asarray(rng.integers(-1, 3, (b, lengths[r], width)), jnp.int8)
    )
    type_lists.append(jnp.asarray(rng.integers(0, types, (b, 3)), jnp.int32))
  conv = dense.DenseMTGATConv(
    features=8, heads=2, num_node_types=2, num_edge_types=types
  )
  params = conv.init(jax.random.key(0), xs, codes=codes, types=type_lists)
  run = lambda alive: conv.apply(
    params, xs, codes=codes, types=type_lists, alive=alive
  )
  out, alpha = run([jnp.ones(c.shape, bool) for c in codes])
  ref_out, ref_alpha = run([c >= 0 for c in codes])
  for got, want in zip(out + alpha, ref_out + ref_alpha, strict=True):
    np.testing.assert_array_equal(got, want)
  for a, c in zip(alpha, codes, strict=True):  # no weight without an edge
    assert np.all(np.moveaxis(np.asarray(a), 1, -1)[np.asarray(c) < 0] == 0)
    assert np.asarray(a).sum() > 0
