"""HF data2vec checkpoints → `d2vjax` models, checked on the tiny fixtures.

The fixtures (`tests/fixtures/d2v/hf_*_tiny.npz`, see their README) hold
HF parameters, inputs and float64 outputs of `Data2VecAudioModel`,
`Data2VecVisionModel` and `Data2VecTextModel`. Outputs are compared in
float32 at atol = rtol = 1e-4; audio on **all** frames, padded ones
included (nothing is zeroed after the front end, as in HF).
"""

import functools
import json
import struct
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from d2vjax import convert
from d2vjax.encoder import relative_position_index
from tests import helpers

TOL = dict(atol=1e-4, rtol=1e-4)


@functools.cache
def fixture(modality: str) -> dict:
  with np.load(helpers.D2V_FIXTURES / f"hf_{modality}_tiny.npz") as z:
    return {k: z[k] for k in z.files}


def state_dict(modality: str) -> dict[str, np.ndarray]:
  z = fixture(modality)
  return {k[len("param/") :]: v for k, v in z.items() if k.startswith("param/")}


def hf_config(modality: str) -> dict:
  return json.loads(str(fixture(modality)["config_json"]))


def model_inputs(modality: str) -> tuple[tuple, dict]:
  z = fixture(modality)
  if modality == "vision":
    return (z["input/pixel_values"].transpose(0, 2, 3, 1),), {}
  key = "input/input_values" if modality == "audio" else "input/input_ids"
  return (z[key],), {"attention_mask": z["input/attention_mask"]}


def run(model, params, modality):
  args, kwargs = model_inputs(modality)
  return model.apply({"params": params}, *args, **kwargs)


@functools.cache
def converted(modality: str):
  model, params = convert.from_hf(state_dict(modality), hf_config(modality))
  return model, params, run(model, params, modality)


def assert_matches_fixture(modality, outputs):
  z = fixture(modality)
  last, aux = outputs
  np.testing.assert_allclose(last, z["output/last_hidden_state"], **TOL)
  for name in ("hidden_states", "layer_results"):
    want = z[f"output/{name}"]
    assert aux[name].shape == want.shape
    for i in range(want.shape[0]):
      np.testing.assert_allclose(aux[name][i], want[i], **TOL, err_msg=name)


@pytest.mark.parametrize("modality", helpers.D2V_MODALITIES)
def test_matches_hf_outputs(modality):
  _, params, outputs = converted(modality)
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
  assert_matches_fixture(modality, outputs)


def test_audio_front_end_and_frame_mask():
  z = fixture("audio")
  _, _, (_, aux) = converted("audio")
  np.testing.assert_array_equal(~aux["padding_mask"], z["output/frame_mask"])
  for name in ("conv_features", "pos_conv_input", "pos_conv_output"):
    np.testing.assert_allclose(aux[name], z[f"output/{name}"], **TOL)


def test_vision_relative_position_index():
  z = fixture("vision")
  model, _, _ = converted("vision")
  assert model.grid == (4, 4)
  np.testing.assert_array_equal(
    relative_position_index(model.grid), z["aux/relative_position_index"]
  )


def test_text_position_ids():
  _, _, (_, aux) = converted("text")
  np.testing.assert_array_equal(
    aux["position_ids"], fixture("text")["output/position_ids"]
  )


def test_vision_mask_token_replaces_masked_patches():
  model, params, _ = converted("vision")
  (images,), _ = model_inputs("vision")
  mask = np.zeros((2, 16), bool)
  mask[0, [0, 5, 6]] = True
  _, aux = model.apply({"params": params}, images, mask=mask)
  emb = aux["hidden_states"][0]
  token = params["mask_token"][0, 0]
  np.testing.assert_allclose(emb[0, 1:][mask[0]], np.tile(token, (3, 1)))
  want = fixture("vision")["output/embedding_output"]
  np.testing.assert_allclose(emb[0, 1:][~mask[0]], want[0, 1:][~mask[0]], **TOL)
  np.testing.assert_allclose(emb[1], want[1], **TOL)


def test_audio_mask_embedding_replaces_masked_frames():
  model, params, _ = converted("audio")
  args, kwargs = model_inputs("audio")
  mask = np.zeros((2, 199), bool)
  mask[:, 10:20] = True
  _, aux = model.apply({"params": params}, *args, mask=mask, **kwargs)
  np.testing.assert_allclose(
    aux["pos_conv_input"][:, 10:20],
    np.broadcast_to(params["front_end"]["mask_embedding"], (2, 10, 32)),
  )


# --------------------------------------------------------------------------
# safetensors


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata=None):
  """A minimal writer: u64 header length, JSON header, raw bytes."""
  names = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
  header, chunks, offset = {}, [], 0
  if metadata is not None:
    header["__metadata__"] = metadata
  for name, value in tensors.items():
    raw = np.ascontiguousarray(value).tobytes()
    header[name] = {
      "dtype": names[value.dtype],
      "shape": list(value.shape),
      "data_offsets": [offset, offset + len(raw)],
    }
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


@pytest.mark.parametrize("modality", helpers.D2V_MODALITIES)
def test_safetensors_round_trip(modality, tmp_path):
  write_safetensors(
    tmp_path / "model.safetensors", state_dict(modality), {"format": "pt"}
  )
  (tmp_path / "config.json").write_text(str(fixture(modality)["config_json"]))
  model, params = convert.load_hf_checkpoint(tmp_path)
  reference_model, reference_params, reference = converted(modality)
  assert model == reference_model
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)
  last, _ = run(model, params, modality)
  np.testing.assert_array_equal(last, reference[0])


def test_read_safetensors_bfloat16(tmp_path):
  x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
  write_safetensors(
    tmp_path / "w.safetensors", {"a": x.astype(ml_dtypes.bfloat16), "b": x}
  )
  out = convert.read_safetensors(tmp_path / "w.safetensors")
  assert out["a"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["a"].astype(np.float32), x)
  np.testing.assert_array_equal(out["b"], x)


def test_pytorch_bin_without_torch_says_so(tmp_path):
  try:
    import torch  # noqa: F401

    pytest.skip("torch is installed")
  except ImportError:
    pass
  (tmp_path / "config.json").write_text(str(fixture("text")["config_json"]))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
  with pytest.raises(ImportError, match="torch"):
    convert.load_hf_checkpoint(tmp_path)


# --------------------------------------------------------------------------
# prefixes, leftovers and bad input


def test_task_model_prefix_and_head_keys_are_accepted():
  sd = {f"data2vec_text.{k}": v for k, v in state_dict("text").items()}
  sd["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)
  sd["data2vec_text.pooler.dense.bias"] = np.zeros(32, np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model, params = convert.from_hf(sd, hf_config("text"))
  _, reference_params, _ = converted("text")
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)


def test_unknown_keys_are_reported():
  sd = dict(state_dict("vision"), **{"mystery.weight": np.zeros(3)})
  with pytest.warns(UserWarning, match="mystery.weight"):
    convert.from_hf(sd, hf_config("vision"))


def test_image_size_not_multiple_of_patch():
  model, params, _ = converted("vision")
  with pytest.raises(ValueError, match=r"height 30 and width 32.*patch"):
    model.apply({"params": params}, jnp.zeros((1, 30, 32, 3)))
  with pytest.raises(ValueError, match="image_size"):
    model.apply({"params": params}, jnp.zeros((1, 40, 32, 3)))


def test_out_of_vocab_ids():
  model, params, _ = converted("text")
  ids = np.array([[0, 5, 100, 2]], np.int32)
  with pytest.raises(ValueError, match=r"token id 100.*vocab_size=100"):
    model.apply({"params": params}, ids)
  with pytest.raises(ValueError, match="token id -3"):
    model.apply({"params": params}, np.array([[0, -3, 2]]))


def test_shape_mismatch_names_parameter_and_shapes():
  sd = state_dict("text")
  key = "encoder.layer.1.intermediate.dense.weight"
  sd[key] = np.zeros((48, 32), np.float32)
  with pytest.raises(ValueError) as e:
    convert.from_hf(sd, hf_config("text"))
  message = str(e.value)
  assert key in message and "encoder/layers_1/fc1/kernel" in message
  assert "(32, 48)" in message and "(32, 64)" in message


def test_missing_key_is_named():
  sd = state_dict("vision")
  del sd["encoder.layer.2.lambda_2"]
  with pytest.raises(KeyError, match=r"encoder\.layer\.2\.lambda_2"):
    convert.from_hf(sd, hf_config("vision"))
  sd = state_dict("audio")
  del sd["encoder.layers.0.final_layer_norm.bias"]
  with pytest.raises(KeyError, match="final_layer_norm.bias"):
    convert.from_hf(sd, hf_config("audio"))


def test_unknown_model_type():
  with pytest.raises(ValueError, match="model_type"):
    convert.from_hf({}, {"model_type": "bert"})
