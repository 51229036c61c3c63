"""Token modalities: ids through a learned embedding instead of features."""

import jax
import numpy as np
import pytest

from mtagjax import batching
from mtagjax import config as config_lib
from mtagjax import model as model_lib

VOCAB = 11


def _config(vocab=VOCAB):
  c = config_lib.default_config()
  c.feature_dims = (3, 1, 2)  # text as ids
  c.padded_lengths = (6, 5, 7)
  c.vocab_sizes = (0, vocab, 0)
  c.hidden, c.heads, c.num_layers = 8, 2, 2
  c.head_hidden = 4
  return c


def _samples(rng, num=3):
  out = []
  for _ in range(num):
    lengths = rng.integers(1, (6, 5, 7))
    feats = [
      rng.standard_normal((lengths[0], 3)).astype(np.float32),
      rng.integers(0, VOCAB, (lengths[1], 1)).astype(np.float32),
      rng.standard_normal((lengths[2], 2)).astype(np.float32),
    ]
    out.append(batching.Sample(feats, label=float(rng.standard_normal())))
  return out


def _setup(seed):
  """The token config, three random samples, their batch, model and init."""
  c = _config()
  samples = _samples(np.random.default_rng(seed))
  batch = batching.GraphBatcher(c, batch_size=3)(samples)
  model = model_lib.create_model(c)
  variables = model.init(jax.random.key(0), batch, train=False)
  return c, samples, batch, model, variables


def test_token_modality_equals_one_hot_features_through_the_table():
  c, samples, batch, model, variables = _setup(0)
  table = variables["params"]["embed_text"]["embedding"]["embedding"]
  assert table.shape == (VOCAB, 8)
  out, _ = model.apply(variables, batch, train=False)

  # The same model with one-hot text features and a bias-free projection
  # whose kernel is the embedding table.
  one_hot = config_lib.default_config()
  one_hot.update({k: c[k] for k in ("padded_lengths", "hidden", "heads")})
  one_hot.update({k: c[k] for k in ("num_layers", "head_hidden")})
  one_hot.feature_dims = (3, VOCAB, 2)
  hot_samples = [
    batching.Sample(
      [f[0], np.eye(VOCAB, dtype=np.float32)[f[1][:, 0].astype(int)], f[2]],
      label=s.label,
    )
    for s, f in ((s, s.features) for s in samples)
  ]
  hot_batch = batching.GraphBatcher(one_hot, batch_size=3)(hot_samples)
  params = dict(variables["params"])
  params["proj_text"] = {
    "dense_0": {"dense": {"kernel": table, "bias": np.zeros(8, np.float32)}}
  }
  del params["embed_text"]
  hot_model = model_lib.create_model(one_hot)
  hot, _ = hot_model.apply({"params": params}, hot_batch, train=False)
  np.testing.assert_allclose(out, hot, rtol=1e-5, atol=1e-6)


def test_embedding_learns_only_the_ids_it_saw():
  _, samples, batch, model, variables = _setup(1)

  def loss(params):
    out, _ = model.apply({"params": params}, batch, train=False)
    return (out**2).sum()

  grad = jax.grad(loss)(variables["params"])["embed_text"]["embedding"]
  seen = {int(t) for s in samples for t in s.features[1][:, 0]}
  norms = np.abs(np.asarray(grad["embedding"])).sum(axis=1)
  # Padded text frames are id 0 but masked: row 0 moves only if it is seen.
  assert {i for i in range(VOCAB) if norms[i] > 0} == seen


@pytest.mark.parametrize("bad", [VOCAB, -1, 2.5])
def test_ids_outside_the_vocabulary_are_refused(bad):
  c = _config()
  samples = _samples(np.random.default_rng(2), num=1)
  samples[0].features[1][0, 0] = bad
  with pytest.raises(ValueError, match=r"token id .* config.vocab_sizes\[1\]"):
    batching.GraphBatcher(c, batch_size=1)(samples)


def test_token_modality_needs_feature_size_one():
  c = _config()
  c.feature_dims = (3, 4, 2)
  with pytest.raises(ValueError, match=r"config.feature_dims\[1\] must be 1"):
    model_lib.create_model(c)
  c.feature_dims, c.vocab_sizes = (3, 1, 2), (0, VOCAB)
  with pytest.raises(ValueError, match="one entry .* per"):
    model_lib.create_model(c)
  # All zeros fit any number of modalities.
  c.modalities, c.feature_dims = ("text",), (4,)
  c.padded_lengths, c.vocab_sizes = (5,), (0, 0, 0)
  assert config_lib.vocab_sizes(c) == (0,)
  assert model_lib.create_model(c).vocab_sizes is None
