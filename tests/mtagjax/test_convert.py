"""Official state_dict conversion: structure, checks and inferred config."""

import jax
import numpy as np
import pytest

from mtagjax import convert
from tests import helpers


@pytest.fixture(scope="module")
def state_dict():
  return helpers.official_state_dict(np.load(helpers.MTAG_FORWARD_FIXTURE))


def test_converted_tree_matches_model_tree(state_dict):
  config = convert.config_from_state_dict(state_dict)
  variables = convert.from_official_state_dict(state_dict)
  want = jax.tree.map(lambda a: a.shape, helpers.mtag_abstract_params(config))
  got = jax.tree.map(lambda a: a.shape, variables["params"])
  assert got == want
  assert variables["constants"]["pe"].shape == (5000, 64)
  # PyTorch Linear stores (out, in); Flax Dense (in, out).
  np.testing.assert_array_equal(
    variables["params"]["proj_text"]["dense_0"]["dense"]["kernel"],
    state_dict["dgnn.text_fc.0.weight"].T,
  )
  np.testing.assert_array_equal(
    variables["params"]["mtgat_5"]["att_dst"],
    state_dict["dgnn.gats.10.att_r"][0],
  )


def test_config_from_state_dict(state_dict):
  config = convert.config_from_state_dict(state_dict)
  assert tuple(config.feature_dims) == (20, 300, 5)
  assert (config.hidden, config.heads, config.num_layers) == (64, 4, 6)
  assert (config.output_dim, config.edge_types) == (1, "modal_temporal")
  assert config.projection == "linear" and config.max_positions == 5000


def test_ffn_projection_converts(state_dict):
  sd = dict(state_dict)
  rng = np.random.default_rng(0)
  for m in ("vision", "text", "audio"):
    sd[f"dgnn.{m}_fc.2.weight"] = rng.standard_normal((64, 64))
    sd[f"dgnn.{m}_fc.2.bias"] = rng.standard_normal(64)
  config = convert.config_from_state_dict(sd)
  assert config.projection == "ffn"
  variables = convert.from_official_state_dict(sd)
  want = jax.tree.map(lambda a: a.shape, helpers.mtag_abstract_params(config))
  assert jax.tree.map(lambda a: a.shape, variables["params"]) == want


def test_rejects_unshared_lin(state_dict):
  sd = dict(state_dict)
  sd["dgnn.gats.2.lin_r"] = sd["dgnn.gats.2.lin_r"] + 1.0
  with pytest.raises(ValueError, match="lin_l and dgnn.gats.2.lin_r differ"):
    convert.from_official_state_dict(sd)


def test_rejects_missing_key(state_dict):
  sd = dict(state_dict)
  del sd["finalW.2.bias"]
  with pytest.raises(KeyError, match="finalW.2.bias"):
    convert.from_official_state_dict(sd)


def test_rejects_inconsistent_pe_buffers(state_dict):
  sd = dict(state_dict)
  sd["dgnn.audio_pe.pe"] = sd["dgnn.audio_pe.pe"] * 2
  with pytest.raises(ValueError, match="positional-encoding buffers"):
    convert.from_official_state_dict(sd)
