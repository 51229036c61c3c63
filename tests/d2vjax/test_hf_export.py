"""`d2vjax.hf_export`: encoders back to HF data2vec checkpoints.

The export is checked as the inverse of `d2vjax.convert`: tiny random
encoders survive `from_hf(to_hf(...))` bit for bit, and the tiny HF
fixtures (`tests/fixtures/d2v/hf_*_tiny.npz`, real HF state dicts) load,
export and reload to the very tensors HF wrote, which pins the key names.
Where torch and transformers are installed, HF itself loads the exported
folders.
"""

import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from d2vjax import convert, hf_export
from tests import helpers

ARCHITECTURES = {
  "audio": "Data2VecAudioModel",
  "vision": "Data2VecVisionModel",
  "text": "Data2VecTextModel",
}


def canonical_encoder(modality: str):
  """A tiny encoder in the form `convert.from_hf` builds (HF can say all)."""
  if modality == "audio":
    return helpers.tiny_audio_encoder(num_layers=2)
  if modality == "vision":
    return helpers.tiny_vision_encoder(image_size=(16, 16))
  return helpers.tiny_text_encoder(
    num_layers=2, type_vocab_size=1, zero_pad_embeddings=False
  )


def init_params(model, modality: str, seed: int = 0):
  (x,), _ = encoder_inputs(modality)
  return model.init(helpers.init_rngs(seed), x)["params"]


@functools.cache
def canonical(modality: str):
  model = canonical_encoder(modality)
  return model, init_params(model, modality)


def encoder_inputs(modality: str) -> tuple[tuple, dict]:
  rng = np.random.default_rng(0)
  if modality == "audio":
    return (rng.standard_normal((2, 800)).astype(np.float32),), {}
  if modality == "vision":
    return (rng.standard_normal((2, 16, 16, 3)).astype(np.float32),), {}
  ids = rng.integers(4, 50, (2, 8)).astype(np.int32)
  ids[:, 0], ids[0, -1] = 0, 2
  ids[1, 5], ids[1, 6:] = 2, 1  # row 1: five tokens, </s>, two pads
  return (ids,), {"attention_mask": (ids != 1).astype(np.int32)}


def apply(model, params, modality):
  args, kwargs = encoder_inputs(modality)
  return model.apply({"params": params}, *args, **kwargs)[0]


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g, w)


def fixture_checkpoint(modality: str):
  with np.load(helpers.D2V_FIXTURES / f"hf_{modality}_tiny.npz") as z:
    sd = {k[6:]: z[k] for k in z.files if k.startswith("param/")}
    return sd, json.loads(str(z["config_json"]))


def write_hf_folder(folder, state_dict, config):
  folder.mkdir()
  safetensors.numpy.save_file(
    state_dict, folder / "model.safetensors", metadata={"format": "pt"}
  )
  (folder / "config.json").write_text(json.dumps(config))
  return folder


# --------------------------------------------------------------------------
# to_hf


@pytest.mark.parametrize("modality", helpers.D2V_MODALITIES)
def test_from_hf_inverts_to_hf(modality):
  model, params = canonical(modality)
  state, config = hf_export.to_hf(model, params)
  assert config["model_type"] == f"data2vec-{modality}"
  assert config["architectures"] == [ARCHITECTURES[modality]]
  for key, value in state.items():
    assert not key.startswith("data2vec_"), key  # the bare model's names
    assert value.dtype == np.float32 and value.flags.c_contiguous, key
  back_model, back_params = convert.from_hf(state, config)
  assert back_model == model
  assert_same_tree(back_params, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("modality", helpers.D2V_MODALITIES)
def test_fixture_exports_to_its_own_state_dict(modality):
  sd, config = fixture_checkpoint(modality)
  model, params = convert.from_hf(sd, config)
  state, exported = hf_export.to_hf(model, params)
  assert sorted(state) == sorted(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
    assert state[key].shape == value.shape, key
  # Every field written means what HF's own config says.
  for key, value in exported.items():
    if key != "architectures" and key in config:
      assert value == config[key], key


def test_variables_dict_is_unwrapped():
  model, params = canonical("vision")
  state, _ = hf_export.to_hf(model, {"params": params})
  want, _ = hf_export.to_hf(model, params)
  assert sorted(state) == sorted(want)


def test_fairseq_text_encoder_exports_as_hf_converter_does():
  # Pretrained here: no token-type table, pad rows zeroed. HF keeps one
  # all-zero token-type row and never zeroes pads; real tokens agree.
  model = helpers.tiny_text_encoder(num_layers=2)
  assert model.type_vocab_size == 0 and model.zero_pad_embeddings
  params = init_params(model, "text")
  state, config = hf_export.to_hf(model, params)
  assert config["type_vocab_size"] == 1
  np.testing.assert_array_equal(
    state["embeddings.token_type_embeddings.weight"], np.zeros((1, 16))
  )
  back_model, back_params = convert.from_hf(state, config)
  assert back_model.type_vocab_size == 1
  assert not back_model.zero_pad_embeddings
  (_,), kwargs = encoder_inputs("text")
  real = kwargs["attention_mask"].astype(bool)
  np.testing.assert_allclose(
    apply(back_model, back_params, "text")[real],
    apply(model, params, "text")[real],
    atol=1e-6,
  )


def test_fields_hf_has_no_name_for_are_dropped():
  model = helpers.tiny_vision_encoder(image_size=16, tap="ffn", remat=True)
  params = init_params(model, "vision")
  back_model, back_params = convert.from_hf(*hf_export.to_hf(model, params))
  assert back_model.image_size == (16, 16) and back_model.tap == "end"
  assert not back_model.remat
  assert_same_tree(back_params, jax.tree.map(np.asarray, params))


def test_non_square_images_and_no_layer_scale():
  model = helpers.tiny_vision_encoder(
    image_size=(16, 8), layer_scale_init=None, use_final_norm=False
  )
  params = model.init(helpers.init_rngs(), np.zeros((1, 16, 8, 3)))["params"]
  state, config = hf_export.to_hf(model, params)
  assert config["image_size"] == [16, 8]
  assert config["layer_scale_init_value"] == 0.0
  assert config["use_mean_pooling"] and not any("lambda" in k for k in state)
  back_model, back_params = convert.from_hf(state, config)
  assert back_model == model
  assert_same_tree(back_params, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: helpers.tiny_audio_encoder(extractor_mode="group_norm"), "group"),
    (lambda: helpers.tiny_audio_encoder(pos_kind="single"), "pos_kind"),
    (lambda: helpers.tiny_vision_encoder(layer_scale_init=0.0), "layer_scale"),
  ],
)
def test_configs_hf_cannot_express_raise(make, match):
  model = make()
  modality = "audio" if hasattr(model, "conv_layers") else "vision"
  params = init_params(model, modality)
  with pytest.raises(ValueError, match=match):
    hf_export.to_hf(model, params)


def test_other_modules_raise():
  with pytest.raises(ValueError, match="Dense"):
    hf_export.to_hf(nn.Dense(3), {})


def test_params_that_do_not_fit_the_model_raise():
  model, params = canonical("text")
  params = jax.tree.map(np.asarray, params)
  wrong = dict(params, word_embeddings={"embedding": np.zeros((49, 16))})
  with pytest.raises(ValueError, match=r"word_embeddings/.*\(49, 16\)"):
    hf_export.to_hf(model, wrong)
  missing = {k: v for k, v in params.items() if k != "embedding_layer_norm"}
  with pytest.raises(ValueError, match="embedding_layer_norm/scale"):
    hf_export.to_hf(model, missing)


# --------------------------------------------------------------------------
# save_hf_checkpoint


@pytest.mark.parametrize("modality", helpers.D2V_MODALITIES)
def test_save_and_load_round_trip(modality, tmp_path):
  model, params = canonical(modality)
  folder = hf_export.save_hf_checkpoint(tmp_path / "hf", model, params)
  assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
  assert os.listdir(tmp_path) == ["hf"]  # no temporary folder left behind
  with safetensors.safe_open(folder / "model.safetensors", "np") as f:
    assert f.metadata() == {"format": "pt"}  # transformers insists on it
  loaded_model, loaded_params = convert.load_hf_checkpoint(folder)
  assert loaded_model == model
  assert_same_tree(loaded_params, jax.tree.map(np.asarray, params))
  np.testing.assert_array_equal(
    apply(loaded_model, loaded_params, modality),
    apply(model, params, modality),
  )


@pytest.mark.parametrize("modality", helpers.D2V_MODALITIES)
def test_fixture_folder_reloads_to_identical_tensors(modality, tmp_path):
  sd, config = fixture_checkpoint(modality)
  original = write_hf_folder(tmp_path / "original", sd, config)
  model, params = convert.load_hf_checkpoint(original)
  exported = hf_export.save_hf_checkpoint(tmp_path / "out", model, params)
  want = convert.read_safetensors(original / "model.safetensors")
  got = convert.read_safetensors(exported / "model.safetensors")
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype and got[key].flags.writeable, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_save_refuses_a_non_empty_folder(tmp_path):
  model, params = canonical("text")
  (tmp_path / "hf").mkdir()
  hf_export.save_hf_checkpoint(tmp_path / "hf", model, params)  # empty: fine
  with pytest.raises(FileExistsError, match="hf"):
    hf_export.save_hf_checkpoint(tmp_path / "hf", model, params)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
  model, params = canonical("text")

  def crash(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(hf_export.safetensors.numpy, "save_file", crash)
  with pytest.raises(OSError, match="disk full"):
    hf_export.save_hf_checkpoint(tmp_path / "hf", model, params)
  assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# read_safetensors on bad files


def test_corrupt_safetensors_names_the_file(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(ValueError, match="model.safetensors"):
    convert.read_safetensors(path)
  path.write_bytes(b"ab")
  with pytest.raises(ValueError, match="model.safetensors"):
    convert.read_safetensors(path)


def test_truncated_safetensors_names_the_file(tmp_path):
  path = tmp_path / "w.safetensors"
  safetensors.numpy.save_file({"a": np.ones((4, 4), np.float32)}, path)
  path.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(ValueError, match="w.safetensors"):
    convert.read_safetensors(path)


def test_missing_safetensors_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
    convert.read_safetensors(tmp_path / "nothing.safetensors")


# --------------------------------------------------------------------------
# HF itself (needs torch and transformers; skipped without them)


@pytest.mark.parametrize("modality", helpers.D2V_MODALITIES)
def test_transformers_loads_the_export(modality, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if modality == "text":  # as pretrained here: fairseq-style embeddings
    model = helpers.tiny_text_encoder(num_layers=2)
    params = init_params(model, "text")
  else:
    model, params = canonical(modality)
  folder = hf_export.save_hf_checkpoint(tmp_path / "hf", model, params)
  hf = getattr(transformers, ARCHITECTURES[modality]).from_pretrained(folder)
  hf.eval()
  (x,), kwargs = encoder_inputs(modality)
  if modality == "audio":
    inputs = {"input_values": torch.from_numpy(x)}
  elif modality == "vision":
    inputs = {"pixel_values": torch.from_numpy(x.transpose(0, 3, 1, 2).copy())}
  else:
    mask = kwargs["attention_mask"]
    inputs = {
      "input_ids": torch.from_numpy(x.astype(np.int64)),
      "attention_mask": torch.from_numpy(mask.astype(np.int64)),
    }
  with torch.no_grad():
    theirs = hf(**inputs).last_hidden_state.numpy()
  ours = np.asarray(apply(model, params, modality))
  if modality == "text":  # pad rows differ by design (zeroed here)
    real = kwargs["attention_mask"].astype(bool)
    ours, theirs = ours[real], theirs[real]
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
