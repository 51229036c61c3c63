"""Tests of the data2vec audio front end against the HF `hf_audio_tiny` fixture.

The fixture stores float32 HF weights and float64 outputs (spec §9 item 7,
fixture README steps 1-5); the other tests check properties that have no
fixture: frame arithmetic, masking, the wav2vec 2.0 variants, conversion.
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vjax import speech, speech_hf
from tests import helpers

FIXTURE = helpers.D2V_FIXTURES / "hf_audio_tiny.npz"
STAGES = (
  "conv_features",
  "extract_features",
  "projected_features",
  "pos_conv_input",
  "pos_conv_output",
)


@pytest.fixture(scope="module")
def hf():
  z = np.load(FIXTURE)
  config = json.loads(str(z["config_json"]))
  model = speech.SpeechFrontEnd(**speech_hf.front_end_config_from_hf(config))
  attention_mask = z["input/attention_mask"]
  # One jitted apply for the module: eager dispatch and per-call re-jits are
  # what dominate the runtime on CPU.
  # The attention mask is a traced argument, so the frame mask is computed
  # under jit too.
  apply = jax.jit(
    lambda p, w, a, m: model.apply({"params": p}, w, attention_mask=a, mask=m)
  )
  return {
    "config": config,
    "model": model,
    "apply": lambda p, w, mask=None: apply(p, w, attention_mask, mask),
    "state": {k[len("param/") :]: z[k] for k in z.files if "param/" in k},
    "wave": z["input/input_values"],
    "attention_mask": attention_mask,
    "out": {k[len("output/") :]: z[k] for k in z.files if "output/" in k},
  }


def _random_params(model, *inputs, seed=0):
  """Numpy-random params with the module's tree (no PRNG compile needed)."""
  shapes = jax.eval_shape(
    lambda *x: model.init(jax.random.key(0), *x), *inputs
  )["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.5, shapes
  )


def _np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


# ---------------------------------------------------------------- lengths


@pytest.mark.parametrize(
  "samples, frames", [(16000, 49), (32000, 99), (320000, 999)]
)
def test_feature_lengths_base(samples, frames):
  assert speech.feature_lengths(samples) == frames
  assert speech.feature_lengths(np.array([samples]))[0] == frames
  assert int(speech.feature_lengths(jnp.array([samples]))[0]) == frames


def test_receptive_field_is_minimum_input():
  assert speech.receptive_field() == 400
  for layers in (speech.BASE_CONV_LAYERS, ((32, 10, 5), (32, 3, 2))):
    rf = speech.receptive_field(layers)
    assert speech.feature_lengths(rf, layers) == 1
    assert speech.feature_lengths(rf - 1, layers) == 0


def test_too_short_waveform_raises():
  model = speech.ConvFeatureExtractor(((8, 10, 5), (8, 3, 2)))
  rf = speech.receptive_field(model.conv_layers)  # 15
  with pytest.raises(ValueError, match=rf"{rf - 1} samples.*{rf} samples"):
    model.init(jax.random.key(0), jnp.zeros((1, rf - 1)))
  # Exactly the receptive field gives one frame.
  out, _ = jax.eval_shape(
    model.init_with_output, jax.random.key(0), jnp.zeros((1, rf))
  )
  assert out.shape == (1, 1, 8)


def test_frame_padding_mask_matches_fixture(hf):
  layers = speech_hf.front_end_config_from_hf(hf["config"])["conv_layers"]
  padded = speech.frame_padding_mask(hf["attention_mask"], layers)
  assert padded.dtype == jnp.bool_
  # The fixture's frame_mask is True at *valid* frames.
  np.testing.assert_array_equal(~np.asarray(padded), hf["out"]["frame_mask"])
  np.testing.assert_array_equal((~padded).sum(-1), [199, 149])


# ---------------------------------------------------------------- fixture


def test_matches_hf_float32(hf):
  params = speech_hf.front_end_params_from_hf(hf["state"], config=hf["config"])
  x, aux = hf["apply"](params, hf["wave"])
  for name in STAGES:
    assert aux[name].dtype == jnp.float32
    np.testing.assert_allclose(
      aux[name], hf["out"][name], atol=1e-4, rtol=0, err_msg=name
    )
  np.testing.assert_array_equal(~aux["padding_mask"], hf["out"]["frame_mask"])
  np.testing.assert_allclose(
    x, aux["pos_conv_input"] + aux["pos_conv_output"], rtol=1e-6
  )
  np.testing.assert_array_equal(aux["features"], aux["projected_features"])


def test_matches_hf_float64(hf):
  # The fixture's float64 outputs come from the float32 weights upcast
  # exactly, so a float64 run must agree to rounding level.
  state64 = {k: v.astype(np.float64) for k, v in hf["state"].items()}
  with jax.enable_x64(True):
    params = speech_hf.front_end_params_from_hf(state64)
    _, aux = hf["apply"](params, hf["wave"].astype(np.float64))
    for name in STAGES:
      assert aux[name].dtype == jnp.float64
      np.testing.assert_allclose(
        aux[name], hf["out"][name], atol=1e-9, rtol=0, err_msg=name
      )


def test_jit_matches_no_jit(hf):
  params = speech_hf.front_end_params_from_hf(hf["state"])
  eager, _ = hf["model"].apply(
    {"params": params}, hf["wave"], attention_mask=hf["attention_mask"]
  )
  jitted, _ = hf["apply"](params, hf["wave"])
  np.testing.assert_allclose(jitted, eager, atol=1e-5, rtol=1e-5)


def test_mask_embedding_replaces_exactly_masked_frames(hf):
  params = speech_hf.front_end_params_from_hf(hf["state"])
  mask = np.random.default_rng(0).random((2, 199)) < 0.4
  _, plain = hf["apply"](params, hf["wave"])
  _, masked = hf["apply"](params, hf["wave"], mask=jnp.asarray(mask))
  valid = hf["out"]["frame_mask"]
  got = np.asarray(masked["pos_conv_input"])
  ref = np.asarray(plain["pos_conv_input"])
  emb = hf["state"]["masked_spec_embed"]
  np.testing.assert_array_equal(
    got[mask & valid], np.broadcast_to(emb, got[mask & valid].shape)
  )
  np.testing.assert_array_equal(got[~mask], ref[~mask])
  # Padding wins over masking (zeroed after the replacement, as in fairseq).
  assert not got[~valid].any()
  # The teacher input is taken before masking.
  np.testing.assert_array_equal(masked["features"], plain["features"])


def test_mask_shape_is_checked(hf):
  params = speech_hf.front_end_params_from_hf(hf["state"])
  with pytest.raises(ValueError, match="mask shape"):
    hf["apply"](params, hf["wave"], mask=jnp.zeros((2, 198), bool))


def test_dropout_only_after_teacher_copy(hf):
  kw = speech_hf.front_end_config_from_hf(hf["config"]) | {"dropout_rate": 0.5}
  params = speech_hf.front_end_params_from_hf(hf["state"])
  model = speech.SpeechFrontEnd(**kw)
  x, aux = model.apply(
    {"params": params},
    hf["wave"],
    train=True,
    rngs={"dropout": jax.random.key(1)},
  )
  x_eval, aux_eval = hf["apply"](params, hf["wave"])
  # (eager vs jitted: equal up to float32 rounding)
  np.testing.assert_allclose(aux["features"], aux_eval["features"], atol=1e-6)
  assert np.abs(x - x_eval).max() > 0.1


# ---------------------------------------------------------------- variants


def test_base_shapes_match_hf_layout():
  model = speech.SpeechFrontEnd()
  (x, aux), variables = jax.eval_shape(
    lambda w: model.init_with_output(jax.random.key(0), w),
    jax.ShapeDtypeStruct((2, 16000), jnp.float32),
  )
  assert x.shape == (2, 49, 768)
  assert aux["conv_features"].shape == (2, 49, 512)
  p = variables["params"]
  fe = p["feature_extractor"]
  assert fe["conv_layers_0"]["conv"]["kernel"].shape == (10, 1, 512)
  assert fe["conv_layers_6"]["conv"]["kernel"].shape == (2, 512, 512)
  assert p["pos_conv"]["layers_4"]["conv"]["kernel"].shape == (19, 48, 768)
  assert p["feature_projection"]["projection"]["kernel"].shape == (512, 768)


def test_init_distributions():
  model = speech.SpeechFrontEnd(
    conv_layers=((64, 10, 5), (512, 3, 2)),
    hidden=32,
    pos_kernel_size=5,
    pos_groups=4,
    pos_kind="single",
  )
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 30)))
  params = params["params"]
  kernel = params["feature_extractor"]["conv_layers_1"]["conv"]["kernel"]
  # kaiming_normal_ (fan_in = 3 * 64): untruncated N(0, 2 / fan_in).
  std = np.sqrt(2 / 192)
  np.testing.assert_allclose(np.std(kernel), std, rtol=0.02)
  assert np.abs(kernel).max() > 2.5 * std  # a 2-sigma truncation would fail
  emb = params["mask_embedding"]
  assert emb.shape == (32,) and emb.min() >= 0 and emb.max() < 1
  # PyTorch's weight_norm starts with g = ||v|| (norm over all axes but the
  # kernel's), so the effective weight is v.
  pos = params["pos_conv"]["conv"]
  np.testing.assert_allclose(
    pos["weight_g"], np.sqrt((pos["weight_v"] ** 2).sum((1, 2))), rtol=1e-6
  )
  assert not pos["bias"].any()


def _np_conv(x, kernel, stride=1, pad=0, groups=1):
  """Naive [T, C_in] conv with a Flax kernel [k, C_in/groups, C_out]."""
  k, per_in, c_out = kernel.shape
  x = np.pad(x, ((pad, pad), (0, 0)))
  frames = (x.shape[0] - k) // stride + 1
  per_out = c_out // groups
  y = np.zeros((frames, c_out))
  for t in range(frames):
    win = x[t * stride : t * stride + k]
    for g in range(groups):
      cols = slice(g * per_out, (g + 1) * per_out)
      y[t, cols] = np.einsum(
        "ki,kio->o", win[:, g * per_in : (g + 1) * per_in], kernel[..., cols]
      )
  return y


def test_group_norm_mode_normalises_each_channel_over_time():
  layers = ((6, 4, 2), (5, 3, 2))
  model = speech.ConvFeatureExtractor(layers, mode="group_norm", conv_bias=True)
  wave = np.random.default_rng(0).normal(size=(2, 60)).astype(np.float32)
  p = _random_params(model, wave)
  out = jax.jit(model.apply)({"params": p}, wave)
  assert out.shape == (2, speech.feature_lengths(60, layers), 5)
  assert set(p["conv_layers_0"]) == {"conv", "group_norm"}
  assert set(p["conv_layers_1"]) == {"conv"}  # no norm after block 0
  for b in range(2):
    c0, c1 = p["conv_layers_0"], p["conv_layers_1"]
    h = _np_conv(np.asarray(wave[b])[:, None], c0["conv"]["kernel"], 2)
    h = h + c0["conv"]["bias"]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
    h = _np_gelu(h * c0["group_norm"]["scale"] + c0["group_norm"]["bias"])
    h = _np_conv(h, c1["conv"]["kernel"], 2) + c1["conv"]["bias"]
    np.testing.assert_allclose(out[b], _np_gelu(h), atol=1e-5)


@pytest.mark.parametrize("kernel_size", [8, 7])
def test_single_pos_conv_is_weight_normed_conv(kernel_size):
  hidden, groups = 16, 4
  model = speech.ConvPositionalEmbedding(
    hidden, kernel_size, groups, kind="single"
  )
  x = np.random.default_rng(1).normal(size=(2, 11, hidden)).astype(np.float32)
  p = _random_params(model, x)["conv"]
  v, g = p["weight_v"], p["weight_g"]
  assert v.shape == (kernel_size, hidden // groups, hidden)
  assert g.shape == (kernel_size,)
  out = model.apply({"params": {"conv": p}}, x)
  assert out.shape == x.shape  # even kernels drop the extra frame
  # Output = plain grouped conv with kernel g * v / ||v|| (any g, v).
  norm = np.sqrt((v**2).sum((1, 2)))
  plain = nn.Conv(
    hidden,
    (kernel_size,),
    padding=[(kernel_size // 2,) * 2],
    feature_group_count=groups,
  )
  kernel = g[:, None, None] * v / norm[:, None, None]
  ref = plain.apply({"params": {"kernel": kernel, "bias": p["bias"]}}, x)
  ref = jax.nn.gelu(ref[:, : x.shape[1]], approximate=False)
  np.testing.assert_allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------- conversion


def test_config_from_hf(hf):
  kw = speech_hf.front_end_config_from_hf(hf["config"])
  assert kw["conv_layers"] == ((32, 10, 5), (32, 3, 2), (32, 3, 2))
  assert kw["extractor_mode"] == "layer_norm"
  assert (kw["pos_kind"], kw["pos_depth"], kw["pos_kernel_size"]) == (
    "stacked",
    2,
    16,
  )
  assert (kw["hidden"], kw["pos_groups"], kw["conv_bias"]) == (32, 4, False)
  w2v = hf["config"] | {"feat_extract_norm": "group", "model_type": "wav2vec2"}
  del w2v["conv_pos_kernel_size"]
  kw = speech_hf.front_end_config_from_hf(w2v)
  assert kw["extractor_mode"] == "group_norm"
  assert (kw["pos_kind"], kw["pos_kernel_size"]) == ("single", 2)


def test_params_prefix_and_inferred_config(hf):
  prefixed = {f"data2vec_audio.{k}": v for k, v in hf["state"].items()}
  a = speech_hf.front_end_params_from_hf(prefixed, "data2vec_audio.")
  b = speech_hf.front_end_params_from_hf(hf["state"], config=hf["config"])
  jax.tree.map(np.testing.assert_array_equal, a, b)
  kernel = hf["state"]["encoder.pos_conv_embed.layers.1.conv.weight"]
  np.testing.assert_array_equal(
    a["pos_conv"]["layers_1"]["conv"]["kernel"], kernel.transpose(2, 1, 0)
  )


def test_params_missing_key(hf):
  state = dict(hf["state"])
  del state["feature_projection.layer_norm.bias"]
  with pytest.raises(KeyError, match="feature_projection.layer_norm.bias"):
    speech_hf.front_end_params_from_hf(state)


def test_params_wrong_shape(hf):
  state = dict(hf["state"])
  key = "feature_extractor.conv_layers.1.conv.weight"
  state[key] = np.zeros((32, 16, 3), np.float32)
  with pytest.raises(ValueError, match=r"conv_layers\.1.*\(3, 16, 32\).*32"):
    speech_hf.front_end_params_from_hf(state)
  bigger = hf["config"] | {"hidden_size": 48}
  # Expected shapes come from the config, here a 48-wide model.
  expect = r"masked_spec_embed -> mask_embedding.*\(32,\).*expected \(48,\)"
  with pytest.raises(ValueError, match=expect):
    speech_hf.front_end_params_from_hf(hf["state"], config=bigger)


@pytest.mark.parametrize("parametrizations", [False, True])
def test_wav2vec2_layout_round_trip(parametrizations):
  """Group-norm CNN with bias and weight-normed pos conv, from HF keys."""
  kw = dict(
    conv_layers=((8, 5, 2), (8, 3, 2)),
    extractor_mode="group_norm",
    conv_bias=True,
    hidden=12,
    pos_kernel_size=6,
    pos_groups=3,
    pos_kind="single",
  )
  model = speech.SpeechFrontEnd(**kw)
  p = _random_params(model, jnp.zeros((1, 30)))
  fe, pc = p["feature_extractor"], p["pos_conv"]["conv"]
  t = lambda w: w.transpose(2, 1, 0)
  state = {
    "masked_spec_embed": p["mask_embedding"],
    "feature_projection.layer_norm.weight": p["feature_projection"][
      "layer_norm"
    ]["scale"],
    "feature_projection.layer_norm.bias": p["feature_projection"]["layer_norm"][
      "bias"
    ],
    "feature_projection.projection.weight": p["feature_projection"][
      "projection"
    ]["kernel"].T,
    "feature_projection.projection.bias": p["feature_projection"]["projection"][
      "bias"
    ],
    "encoder.pos_conv_embed.conv.bias": pc["bias"],
  }
  for j in range(2):
    blk = fe[f"conv_layers_{j}"]
    hf_blk = f"feature_extractor.conv_layers.{j}"
    state[f"{hf_blk}.conv.weight"] = t(blk["conv"]["kernel"])
    state[f"{hf_blk}.conv.bias"] = blk["conv"]["bias"]
  state["feature_extractor.conv_layers.0.layer_norm.weight"] = fe[
    "conv_layers_0"
  ]["group_norm"]["scale"]
  state["feature_extractor.conv_layers.0.layer_norm.bias"] = fe[
    "conv_layers_0"
  ]["group_norm"]["bias"]
  base = "encoder.pos_conv_embed.conv."
  g, v = pc["weight_g"].reshape(1, 1, -1), t(pc["weight_v"])
  if parametrizations:
    state[base + "parametrizations.weight.original0"] = g
    state[base + "parametrizations.weight.original1"] = v
  else:
    state[base + "weight_g"], state[base + "weight_v"] = g, v
  back = speech_hf.front_end_params_from_hf(state)
  jax.tree.map(np.testing.assert_array_equal, back, p)


@pytest.mark.parametrize("kernel,groups", [(4, 2), (5, 4), (19, 16)])
def test_grouped_conv_gradients_equal_xla_convolution(kernel, groups):
  # The kernel gradient is custom (per-tap matmuls); value and both
  # gradients must equal the plain grouped convolution's, in float64.
  with jax.enable_x64(True):
    rng = np.random.default_rng(kernel)
    channels = 2 * groups * 3
    x = jnp.asarray(rng.standard_normal((2, 23, channels)))
    w = jnp.asarray(rng.standard_normal((kernel, channels // groups, channels)))
    pad = kernel // 2
    weights = jnp.asarray(rng.standard_normal((2, 23 + 2 * pad - kernel + 1)))

    def loss(conv):
      def f(x, w):
        y = conv(x, w)
        return jnp.sum(jnp.sin(y) * weights[..., None])

      return f

    def reference(x, w):
      return jax.lax.conv_general_dilated(
        x,
        w,
        (1,),
        [(pad, pad)],
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups,
      )

    ours = lambda x, w: speech.grouped_conv1d(x, w, groups, pad)
    np.testing.assert_allclose(ours(x, w), reference(x, w), rtol=1e-12)
    got = jax.grad(loss(ours), (0, 1))(x, w)
    want = jax.grad(loss(reference), (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
