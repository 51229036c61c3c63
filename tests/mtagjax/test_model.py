"""The full model against the official forward fixture, and its surface."""

import jax
import numpy as np
import pytest

import mtagjax
from mtagjax import batching, convert, inference
from mtagjax import config as config_lib
from mtagjax import model as model_lib
from tests import helpers


@pytest.fixture(scope="module")
def fx():
  return dict(np.load(helpers.MTAG_FORWARD_FIXTURE))


def _official_order(batch, lengths):
  """Our row of each node, listed in the official batched node order."""
  blocks = [f.shape[-2] for f in batch.features]
  offsets = np.concatenate([[0], np.cumsum(blocks)[:-1]])
  starts = np.cumsum(lengths, 0) - lengths
  rows = []
  for b, lens in enumerate(lengths):
    for m, n in enumerate(lens):
      rows.extend(offsets[m] + starts[b, m] + np.arange(n))
  return np.array(rows)


def _run(fx, prefix, num, dtype):
  sd = helpers.official_state_dict(fx)
  config = convert.config_from_state_dict(sd)
  variables = convert.from_official_state_dict(sd)
  variables = jax.tree.map(lambda a: np.asarray(a, dtype), variables)
  samples = batching.samples_from_padded(
    [fx["vision"][:num], fx["text"][:num], fx["audio"][:num]]
  )
  batch = batching.GraphBatcher(config, batch_size=num, dtype=dtype)(samples)
  model = model_lib.create_model(config)
  out, aux = jax.jit(lambda v, b: model.apply(v, b, train=False))(
    variables, batch
  )
  return config, variables, samples, batch, np.asarray(out)[0, :num, 0], aux


@pytest.mark.parametrize("prefix,num", [("", 3), ("b1/", 1)])
def test_forward_matches_official_x64(fx, prefix, num):
  with jax.enable_x64(True):
    _, _, _, batch, out, aux = _run(fx, prefix, num, np.float64)
  np.testing.assert_allclose(out, fx[prefix + "out"], rtol=0, atol=1e-9)
  masks = np.asarray(aux["edge_mask"])[:, 0]
  np.testing.assert_array_equal(masks.sum(-1), fx[prefix + "edges_per_layer"])
  # Our edge list is the official batched one (then padding), so the
  # surviving edge ids compare directly.
  for layer in range(1, 7):
    kept = np.flatnonzero(masks[layer])
    np.testing.assert_array_equal(kept, fx[f"{prefix}kept_l{layer}"])
  per_graph = np.stack(
    [
      np.bincount(
        np.asarray(batch.graph.edges["graph"])[0][m], minlength=num + 1
      )[:num]
      for m in masks
    ]
  )
  np.testing.assert_array_equal(per_graph, fx[prefix + "edges_per_graph"])


def test_node_features_per_layer_match_official_x64(fx):
  with jax.enable_x64(True):
    _, _, samples, batch, _, aux = _run(fx, "", 3, np.float64)
  lengths = np.array([[len(f) for f in s.features] for s in samples])
  rows = _official_order(batch, lengths)
  nodes = np.asarray(aux["nodes"])[:, 0]
  for layer in range(7):
    np.testing.assert_allclose(
      nodes[layer][rows], fx[f"node_features_l{layer}"], rtol=0, atol=1e-9
    )
  node_type = np.asarray(batch.graph.nodes["modality"])[0][rows]
  np.testing.assert_array_equal(node_type, fx["x_type"])


@pytest.mark.parametrize("prefix,num", [("", 3), ("b1/", 1)])
def test_forward_matches_official_float32(fx, prefix, num):
  _, _, _, _, out, aux = _run(fx, prefix, num, np.float32)
  np.testing.assert_allclose(out, fx[prefix + "out"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(
    np.asarray(aux["edge_mask"])[:, 0].sum(-1), fx[prefix + "edges_per_layer"]
  )


def test_batch_dependence_of_official_pruning(fx):
  # Sample 0 keeps all its edges in the batch of 3 and loses some alone.
  _, _, _, _, out3, _ = _run(fx, "", 3, np.float32)
  _, _, _, _, out1, _ = _run(fx, "b1/", 1, np.float32)
  assert abs(out3[0] - out1[0]) > 1e-4
  np.testing.assert_allclose(
    [out3[0], out1[0]], [fx["out"][0], fx["b1/out"]], atol=1e-5
  )


def test_predict_matches_fixture(fx):
  sd = helpers.official_state_dict(fx)
  config = convert.config_from_state_dict(sd)
  variables = convert.from_official_state_dict(sd)
  samples = [
    [
      fx[m][b][np.abs(fx[m][b]).sum(-1) != 0]
      for m in ("vision", "text", "audio")
    ]
    for b in range(3)
  ]
  # Without positions, pe="padded" places frames at the end of the padded
  # length, which is where these left-padded samples had them.
  preds = mtagjax.predict(variables, config, samples)
  np.testing.assert_allclose(preds, fx["out"], atol=1e-5)
  hits = inference._jitted_apply.cache_info().hits
  alone = mtagjax.predict(variables, config, samples[:1])
  np.testing.assert_allclose(alone, [fx["b1/out"]], atol=1e-5)
  assert preds.shape == (3,)
  # The second call reuses the jitted forward of the same config.
  assert inference._jitted_apply.cache_info().hits == hits + 1


def test_sinusoid_table_close_to_official_buffer(fx):
  table = model_lib.sinusoid_table(5000, 64)
  official = fx["param/dgnn.text_pe.pe"][:, 0, :]
  # Same float32 recipe; PyTorch's float32 exp and sin/cos kernels differ
  # from numpy's in the last bit, and an ulp of a frequency grows with the
  # position: the error stays within a few float32 ulps of the angle.
  err = np.abs(table - official).max(-1)
  bound = 4e-8 * (np.arange(5000) + 1)
  assert (err <= bound).all(), np.max(err / bound)


@pytest.mark.parametrize(
  "make_config,expected",
  [(config_lib.default_config, 117_169), (config_lib.iemocap_config, 122_664)],
)
def test_parameter_count(make_config, expected):
  params = helpers.mtag_abstract_params(make_config(), 3)
  assert sum(p.size for p in jax.tree.leaves(params)) == expected


def test_init_distributions_follow_official():
  config = config_lib.default_config()
  model = model_lib.create_model(config)
  batch = helpers.mtag_single_batch(config, 3)
  params = model.init(jax.random.key(0), batch, train=False)["params"]
  kernel = np.asarray(params["mtgat_0"]["kernel"])
  assert np.abs(kernel).max() <= np.sqrt(6 / 128)
  assert np.abs(kernel).max() > 0.9 * np.sqrt(6 / 128)
  att = np.asarray(params["mtgat_0"]["att_src"])
  assert 0.9 * np.sqrt(6 / 20) < np.abs(att).max() <= np.sqrt(6 / 20)
  proj = params["proj_text"]["dense_0"]["dense"]
  for leaf in (proj["kernel"], proj["bias"]):
    assert np.abs(leaf).max() <= 1 / np.sqrt(300)
  assert not np.asarray(params["mtgat_0"]["bias"]).any()


def test_train_mode_uses_dropout_and_eval_is_deterministic(fx):
  config, variables, samples, batch, out, _ = _run(fx, "", 3, np.float32)
  model = model_lib.create_model(config)
  a, _ = model.apply(
    variables, batch, train=True, rngs={"dropout": jax.random.key(0)}
  )
  b, _ = model.apply(variables, batch, train=False)
  np.testing.assert_allclose(np.asarray(b)[0, :3, 0], out, atol=1e-6)
  assert not np.allclose(np.asarray(a)[0, :3, 0], out, atol=1e-6)


@pytest.mark.parametrize("scope", ["graph", "node"])
def test_other_prune_scopes_run_and_differ(fx, scope):
  sd = helpers.official_state_dict(fx)
  config = convert.config_from_state_dict(sd)
  config.prune_scope = scope
  variables = convert.from_official_state_dict(sd)
  samples = batching.samples_from_padded(
    [fx["vision"], fx["text"], fx["audio"]]
  )
  batch = batching.GraphBatcher(config, batch_size=3)(samples)
  out, aux = model_lib.create_model(config).apply(variables, batch, train=False)
  counts = np.asarray(aux["edge_mask"])[:, 0].sum(-1)
  if scope == "graph":
    # Per graph int(0.8 k), then summed over the three graphs.
    per = fx["edges_per_graph"][0]
    want = [per.sum()]
    for _ in range(6):
      per = np.floor(per * 0.8).astype(int)
      want.append(per.sum())
    np.testing.assert_array_equal(counts, want)
  assert np.isfinite(np.asarray(out)).all()
  assert not np.allclose(np.asarray(out)[0, :3, 0], fx["out"], atol=1e-6)


def test_random_pruning_keeps_k_uniformly(fx):
  sd = helpers.official_state_dict(fx)
  config = convert.config_from_state_dict(sd)
  config.prune_type = "random"
  variables = convert.from_official_state_dict(sd)
  samples = batching.samples_from_padded(
    [fx["vision"], fx["text"], fx["audio"]]
  )
  batch = batching.GraphBatcher(config, batch_size=3)(samples)
  model = model_lib.create_model(config)
  _, aux = model.apply(
    variables, batch, train=False, rngs={"prune": jax.random.key(0)}
  )
  masks = np.asarray(aux["edge_mask"])[:, 0]
  np.testing.assert_array_equal(masks.sum(-1), fx["edges_per_layer"])
  # Unlike the official ablation, the dropped edges are spread over the
  # whole list: the last sample's edges are not all gone.
  first = masks[1]
  last_graph = np.asarray(batch.graph.edges["graph"])[0] == 2
  frac = first[last_graph].mean()
  assert 0.75 < frac < 0.85


def test_bfloat16_compute_stays_close_to_float32(fx):
  config, variables, samples, batch, out, _ = _run(fx, "", 3, np.float32)
  config.dtype = "bfloat16"
  model = model_lib.create_model(config)
  low, _ = model.apply(variables, batch, train=False)
  assert low.dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(
    np.asarray(low, np.float32)[0, :3, 0], out, rtol=0, atol=0.02
  )
