"""Tests of the MTGAT layer and edge pruning against plain numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtagjax import layers

HEADS, CHANNELS, TYPES, NODE_TYPES = 4, 3, 5, 3


def _reference_conv(x, node_type, src, dst, etype, mask, p):
  """Spec section 4, one edge at a time, float64."""
  n = x.shape[0]
  h = np.stack([x[i] @ p["kernel"][node_type[i]] for i in range(n)])
  h = h.reshape(n, HEADS, CHANNELS)
  alpha = np.zeros((len(src), HEADS))
  out = np.zeros((n, HEADS, CHANNELS))
  for i in range(n):
    inc = [e for e in range(len(src)) if dst[e] == i and mask[e]]
    if not inc:
      continue
    s = np.stack(
      [
        (h[src[e]] * p["att_src"][etype[e]]).sum(-1)
        + (h[i] * p["att_dst"][etype[e]]).sum(-1)
        for e in inc
      ]
    )
    s = np.where(s > 0, s, 0.2 * s)
    ex = np.exp(s - s.max(0))
    a = ex / (ex.sum(0) + 1e-16)
    for k, e in enumerate(inc):
      alpha[e] = a[k]
      out[i] += a[k][:, None] * h[src[e]]
  return out.reshape(n, -1) + p["bias"], alpha


def _random_graph(rng, n=14, e=60):
  node_type = np.sort(rng.integers(0, NODE_TYPES, n))
  src = rng.integers(0, n, e)
  dst = rng.integers(0, n, e)
  # Node n-1: in-degree 0. Node n-2: exactly one incoming edge.
  dst[dst >= n - 2] = 0
  dst[0], src[0] = n - 2, 3
  etype = rng.integers(0, TYPES, e)
  return node_type, src, dst, etype


@pytest.fixture
def setup():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    node_type, src, dst, etype = _random_graph(rng)
    x = rng.standard_normal((len(node_type), 8))
    conv = layers.MTGATConv(
      features=HEADS * CHANNELS,
      heads=HEADS,
      num_node_types=NODE_TYPES,
      num_edge_types=TYPES,
      param_dtype=jnp.float64,
    )
    kwargs = dict(
      node_type=node_type, senders=src, receivers=dst, edge_type=etype
    )
    params = conv.init(jax.random.key(0), x, **kwargs)["params"]
    params = jax.tree.map(
      lambda a: a + 0.1 * rng.standard_normal(a.shape), params
    )
    yield conv, params, x, kwargs


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_conv_matches_reference(setup, blocks, jit):
  conv, params, x, kw = setup
  rng = np.random.default_rng(1)
  mask = rng.random(len(kw["senders"])) < 0.8
  mask[0] = True
  type_blocks = (
    tuple(np.bincount(kw["node_type"], minlength=NODE_TYPES).tolist())
    if blocks
    else None
  )

  def run(params, x, mask):
    return conv.apply(
      {"params": params}, x, edge_mask=mask, type_blocks=type_blocks, **kw
    )

  if jit:
    run = jax.jit(run)
  with jax.enable_x64(True):
    out, alpha = run(params, x, mask)
  ref_out, ref_alpha = _reference_conv(
    x,
    kw["node_type"],
    kw["senders"],
    kw["receivers"],
    kw["edge_type"],
    mask,
    jax.tree.map(np.asarray, params),
  )
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-12)
  np.testing.assert_allclose(alpha, ref_alpha, rtol=0, atol=1e-12)
  # A single incoming edge gets all the attention; a node without incoming
  # edges outputs exactly the bias.
  np.testing.assert_allclose(alpha[0], 1.0, atol=1e-12)
  np.testing.assert_array_equal(out[-1], params["bias"])


def test_all_pruned_node_outputs_bias_and_no_nan_gradient(setup):
  conv, params, x, kw = setup
  mask = np.ones(len(kw["senders"]), bool)
  mask[kw["receivers"] == 0] = False  # node 0 loses every incoming edge

  def loss(params):
    out, _ = conv.apply({"params": params}, x, edge_mask=mask, **kw)
    return (out**2).sum()

  with jax.enable_x64(True):
    out, alpha = conv.apply({"params": params}, x, edge_mask=mask, **kw)
    grads = jax.grad(loss)(params)
  np.testing.assert_array_equal(out[0], params["bias"])
  assert not np.asarray(alpha)[~mask].any()
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_float32_matches_float64(setup):
  conv, params, x, kw = setup
  with jax.enable_x64(True):
    ref, _ = conv.apply({"params": params}, x, **kw)
  p32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  out, _ = conv.apply({"params": p32}, x.astype(np.float32), **kw)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_dropout_scales_kept_attention(setup):
  conv, params, x, kw = setup
  conv = conv.clone(dropout_rate=0.5)
  with jax.enable_x64(True):
    det, _ = conv.apply({"params": params}, x, **kw)
    a, alpha = conv.apply(
      {"params": params},
      x,
      train=True,
      rngs={"dropout": jax.random.key(1)},
      **kw,
    )
    b, alpha_b = conv.apply(
      {"params": params},
      x,
      train=True,
      rngs={"dropout": jax.random.key(2)},
      **kw,
    )
  # The returned attention is the pre-dropout one; outputs do change.
  np.testing.assert_allclose(alpha, alpha_b)
  assert not np.allclose(a, det) and not np.allclose(a, b)


def test_stacked_shards_equal_separate_graphs(setup):
  conv, params, x, kw = setup
  with jax.enable_x64(True):
    one, alpha = conv.apply({"params": params}, x, **kw)
    stacked = {k: np.stack([v, v]) for k, v in kw.items()}
    two, alpha2 = conv.apply({"params": params}, np.stack([x, x]), **stacked)
  np.testing.assert_allclose(two[1], one, atol=1e-13)
  np.testing.assert_allclose(alpha2[0], alpha, atol=1e-13)


def _reference_topk(scores, mask, k, seg):
  keep = np.zeros_like(mask)
  for s in np.unique(seg):
    idx = [i for i in np.argsort(-scores, kind="stable") if seg[i] == s]
    idx = [i for i in idx if mask[i]][: k[s]]
    keep[idx] = True
  return keep


@pytest.mark.parametrize("scope", ["batch", "graph", "node"])
def test_prune_scopes_match_reference(scope):
  rng = np.random.default_rng(3)
  shards, edges, graphs, nodes = 3, 40, 4, 10
  # Quantised scores produce ties, which go to the lower edge index.
  scores = rng.integers(0, 6, (shards, edges)) / 5.0
  mask = rng.random((shards, edges)) < 0.85
  egraph = rng.integers(0, graphs, (shards, edges))
  recv = rng.integers(0, nodes, (shards, edges))
  if scope == "batch":
    k = np.full((shards,), int(mask.sum() * 0.8))
    seg = np.zeros(shards * edges, int)
    kflat = k[:1]
  elif scope == "graph":
    k = rng.integers(0, 8, (shards, graphs))
    seg = (egraph + graphs * np.arange(shards)[:, None]).ravel()
    kflat = k.ravel()
  else:
    k = rng.integers(0, 4, (shards, nodes))
    seg = (recv + nodes * np.arange(shards)[:, None]).ravel()
    kflat = k.ravel()
  got = layers.prune_edges(
    jnp.asarray(scores),
    jnp.asarray(mask),
    jnp.asarray(k),
    scope=scope,
    edge_graph=egraph,
    receivers=recv,
  )
  want = _reference_topk(scores.ravel(), mask.ravel(), kflat, seg)
  np.testing.assert_array_equal(np.asarray(got).ravel(), want)


def test_prune_keeps_exact_counts_and_never_revives():
  rng = np.random.default_rng(4)
  scores = rng.random(1000)
  mask = rng.random(1000) < 0.9
  kept = layers.prune_edges(
    jnp.asarray(scores), jnp.asarray(mask), jnp.asarray(int(mask.sum() * 0.8))
  )
  assert int(kept.sum()) == int(mask.sum() * 0.8)
  assert not np.asarray(kept)[~mask].any()
  # The kept edges are exactly the best scores among the live ones.
  assert scores[np.asarray(kept)].min() >= scores[mask & ~kept].max()


def test_prune_rejects_unknown_scope():
  with pytest.raises(ValueError, match="prune scope"):
    layers.prune_edges(
      jnp.ones((1, 4)), jnp.ones((1, 4), bool), jnp.ones((1,)), scope="edge"
    )
