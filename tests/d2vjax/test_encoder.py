"""Tests of `d2vjax.encoder`: block styles, taps, padding, remat, init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from d2vjax import encoder as encoder_lib
from d2vjax.encoder import TransformerEncoder
from d2vjax.vision import VisionEncoder
from tests import helpers

B, T, C, HEADS, MLP, L = 2, 5, 16, 4, 32, 2
GRID = (2, 2)  # pre_ln: CLS + 2x2 patches = 5 tokens


def make(block: str, **kw) -> TransformerEncoder:
  base = dict(num_layers=L, hidden=C, heads=HEADS, mlp_dim=MLP, block=block)
  if block == "pre_ln":
    base.update(
      layer_scale_init=0.1,
      key_bias=False,
      relative_position_grid=GRID,
      tap="end",
      drop_path_rate=0.2,
    )
  else:
    base.update(tap="ffn", layerdrop=0.2)
  base.update(kw)
  return TransformerEncoder(**base)


def key(seed: int) -> jax.Array:
  # The "rbg" PRNG compiles several times faster than threefry on CPU, which
  # dominates the compile time of these tiny train-mode graphs.
  return jax.random.key(seed, impl="rbg")


def inputs(seed: int = 0) -> jax.Array:
  return jax.random.normal(key(seed), (B, T, C))


def padding() -> jax.Array:
  return jnp.array([[False] * T, [False] * 3 + [True] * (T - 3)])


def init(model: TransformerEncoder, x: jax.Array) -> dict:
  """Random parameters of the right shapes, without compiling `init`.

  Every parameter gets a non-trivial value (γ, LayerNorm, biases and the
  rel-pos table start at constants otherwise), so each one matters.
  """
  shapes = jax.eval_shape(model.init, key(0), x)["params"]
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if name == "scale":
      return 1.0 + 0.1 * noise
    return (0.3 if name == "kernel" else 0.1) * noise

  return jax.tree_util.tree_map_with_path(fill, shapes)


BLOCKS = ("post_ln", "pre_ln")


@pytest.mark.parametrize("block", BLOCKS)
def test_jit_and_no_jit_agree(block):
  model, x = make(block), inputs()
  params = init(model, x)

  def run(p, x, pad):
    return model.apply({"params": p}, x, padding_mask=pad, train=False)

  y, aux = run(params, x, padding())
  y_jit, aux_jit = jax.jit(run)(params, x, padding())
  assert y.shape == (B, T, C)
  assert aux["layer_results"].shape == (L, B, T, C)
  assert aux["hidden_states"].shape == (L + 1, B, T, C)
  np.testing.assert_allclose(y, y_jit, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    aux["layer_results"], aux_jit["layer_results"], atol=1e-5, rtol=1e-5
  )
  np.testing.assert_array_equal(aux["hidden_states"][0], x)
  np.testing.assert_array_equal(aux["hidden_states"][-1], y)


def test_post_ln_tap_is_fc2_output():
  model, x = make("post_ln"), inputs()
  params = init(model, x)
  (_, aux), state = model.apply(
    {"params": params},
    x,
    padding_mask=padding(),
    capture_intermediates=True,
    mutable=["intermediates"],
  )
  inter = state["intermediates"]
  for i in range(L):
    fc2 = inter[f"layers_{i}"]["fc2"]["__call__"][0]
    np.testing.assert_array_equal(aux["layer_results"][i], fc2)


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
  return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def _attention(x, p, pad, bias=None):
  b, t, c = x.shape
  d = c // HEADS

  def heads(y):
    return y.reshape(b, t, HEADS, d).transpose(0, 2, 1, 3)

  q = heads(_dense(x, p["q_proj"])) * d**-0.5
  k, v = heads(_dense(x, p["k_proj"])), heads(_dense(x, p["v_proj"]))
  logits = q @ k.transpose(0, 1, 3, 2)
  if bias is not None:
    logits = logits + bias
  logits = np.where(pad[:, None, None, :], -np.inf, logits)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  out = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
  return _dense(out, p["out_proj"])


def _gelu(x):
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _apply_every_tap(model, params, x, pad):
  """`{tap: (y, aux)}` for the same parameters under each tap."""
  return {
    tap: model.clone(tap=tap).apply({"params": params}, x, padding_mask=pad)
    for tap in encoder_lib.TAPS
  }


def test_post_ln_matches_numpy_reference():
  """`a = LN1(x + attn(x))`, `fc = fc2(gelu(fc1(a)))`, `x = LN2(a + fc)`."""
  model, x = make("post_ln"), inputs()
  params = init(model, x)
  pad = np.asarray(padding())
  runs = _apply_every_tap(model, params, x, pad)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.asarray(x, np.float64)
  for i in range(L):
    q = p[f"layers_{i}"]
    att = _attention(h, q["attention"], pad)
    a = _ln(h + att, q["attn_layer_norm"], 1e-5)
    fc = _dense(_gelu(_dense(a, q["fc1"])), q["fc2"])
    h = _ln(a + fc, q["final_layer_norm"], 1e-5)
    want = {"ffn": fc, "ffn_residual": a + fc, "end": h, "attention": att}
    for tap, (_, aux) in runs.items():
      np.testing.assert_allclose(
        aux["layer_results"][i], want[tap], atol=2e-5, err_msg=tap
      )
      np.testing.assert_allclose(aux["hidden_states"][i + 1], h, atol=2e-5)
  for y, _ in runs.values():
    np.testing.assert_allclose(y, h, atol=2e-5)


def test_pre_ln_matches_numpy_reference():
  """`x += γ1·attn(LN(x)) + rel-pos bias`, `x += γ2·fc2(gelu(fc1(LN(x))))`."""
  model, x = make("pre_ln"), inputs()
  params = init(model, x)
  runs = _apply_every_tap(model, params, x, None)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  index = encoder_lib.relative_position_index(GRID)
  bias = p["relative_position_bias_table"][index].transpose(2, 0, 1)
  h = np.asarray(x, np.float64)
  no_pad = np.zeros((B, T), bool)
  for i in range(L):
    q = p[f"layers_{i}"]
    att = _attention(
      _ln(h, q["norm_before"], 1e-5), q["attention"], no_pad, bias
    )
    h = h + q["gamma_1"] * att
    ffn = _dense(
      _gelu(_dense(_ln(h, q["norm_after"], 1e-5), q["fc1"])), q["fc2"]
    )
    h = h + q["gamma_2"] * ffn
    want = {"ffn": ffn, "ffn_residual": h, "end": h, "attention": att}
    for tap, (_, aux) in runs.items():
      np.testing.assert_allclose(
        aux["layer_results"][i], want[tap], atol=2e-5, err_msg=tap
      )
  for y, _ in runs.values():
    np.testing.assert_allclose(y, h, atol=2e-5)
  assert "bias" not in params["layers_0"]["attention"]["k_proj"]


@pytest.mark.parametrize("block", BLOCKS)
def test_eval_is_deterministic_and_train_is_not(block):
  model = make(block, dropout_rate=0.3, attention_dropout_rate=0.3)
  x = inputs()
  params = init(model, x)
  apply = functools.partial(model.apply, {"params": params}, x)
  y1, _ = apply(train=False, rngs={"dropout": key(3)})
  y2, _ = apply(train=False, rngs={"dropout": key(4)})
  np.testing.assert_array_equal(y1, y2)
  t1, _ = apply(train=True, rngs={"dropout": key(3)})
  t2, _ = apply(train=True, rngs={"dropout": key(4)})
  t1_again, _ = apply(train=True, rngs={"dropout": key(3)})
  assert not np.allclose(t1, t2)
  assert not np.allclose(t1, y1)
  np.testing.assert_array_equal(t1, t1_again)


def test_layerdrop_is_one_draw_for_the_whole_batch():
  model = make("post_ln", dropout_rate=0.0, attention_dropout_rate=0.0)
  model = model.clone(layerdrop=0.5)
  x = jnp.broadcast_to(inputs()[:1], (16, T, C))  # identical samples
  params = init(model, x)
  skipped = 0
  for seed in range(6):
    y, aux = model.apply(
      {"params": params}, x, train=True, rngs={"dropout": key(seed)}
    )
    np.testing.assert_allclose(y, jnp.broadcast_to(y[:1], y.shape), atol=1e-6)
    hs = aux["hidden_states"]
    skipped += int(sum(bool(jnp.all(hs[i + 1] == hs[i])) for i in range(L)))
  assert skipped > 0
  # layerdrop 1: every layer is skipped, the input comes out unchanged.
  y, _ = model.clone(layerdrop=1.0).apply(
    {"params": params}, x, train=True, rngs={"dropout": key(0)}
  )
  np.testing.assert_array_equal(y, x)


def test_drop_path_is_per_sample():
  model = make("pre_ln", drop_path_rate=0.9, num_layers=1)
  x = jnp.broadcast_to(inputs()[:1], (16, T, C))
  params = init(model, x)
  y, _ = model.apply(
    {"params": params}, x, train=True, rngs={"dropout": key(0)}
  )
  distinct = {tuple(np.round(np.asarray(r).ravel(), 4)) for r in y}
  assert len(distinct) > 1


@pytest.mark.parametrize("block", BLOCKS)
def test_padded_inputs_do_not_change_valid_outputs(block):
  model, x = make(block), inputs()
  params = init(model, x)
  pad = padding()
  noise = jax.random.normal(key(9), x.shape) * 5.0
  x2 = jnp.where(pad[..., None], noise, x)
  y1, a1 = model.apply({"params": params}, x, padding_mask=pad)
  y2, a2 = model.apply({"params": params}, x2, padding_mask=pad)
  valid = ~np.asarray(pad)
  np.testing.assert_allclose(y1[valid], y2[valid], atol=1e-5)
  np.testing.assert_allclose(
    a1["layer_results"][:, valid], a2["layer_results"][:, valid], atol=1e-5
  )
  assert not np.allclose(y1[~valid], y2[~valid])


@pytest.mark.parametrize("block", BLOCKS)
def test_all_padded_row_has_no_nan(block):
  model, x = make(block), inputs()
  params = init(model, x)
  pad = jnp.array([[False] * T, [True] * T])

  def loss(p):
    y, aux = model.apply({"params": p}, x, padding_mask=pad)
    return jnp.sum(y**2) + jnp.sum(aux["layer_results"] ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("block", BLOCKS)
def test_remat_gives_same_outputs_and_gradients(block):
  # One block keeps the compile short; remat wraps each block the same way.
  model, x = make(block, num_layers=1), inputs()
  params = init(model, x)
  remat = model.clone(remat=True)

  def loss(m, p):
    # Train mode: dropout RNGs must be lifted identically through remat.
    y, aux = m.apply(
      {"params": p},
      x,
      padding_mask=padding(),
      train=True,
      rngs={"dropout": key(5)},
    )
    return jnp.sum(y**2) + jnp.sum(aux["layer_results"])

  @jax.jit
  def both(p):
    return (
      jax.value_and_grad(functools.partial(loss, model))(p),
      jax.value_and_grad(functools.partial(loss, remat))(p),
    )

  (v1, g1), (v2, g2) = both(params)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
    g1,
    g2,
  )


@pytest.mark.parametrize("block", BLOCKS)
def test_bfloat16_compute_with_float32_params(block):
  model, x = make(block), inputs()
  params = init(model, x)
  bf16 = model.clone(dtype=jnp.bfloat16)
  fresh = jax.eval_shape(bf16.init, key(0), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(fresh))
  y, aux = jax.jit(
    lambda p: bf16.apply({"params": p}, x, padding_mask=padding())
  )(params)
  ref, _ = model.apply({"params": params}, x, padding_mask=padding())
  assert y.dtype == jnp.bfloat16
  assert aux["layer_results"].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y, np.float32)).all()
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.15)


def test_vision_init_statistics():
  layers, width = 3, 64
  model = TransformerEncoder(
    num_layers=layers,
    hidden=width,
    heads=4,
    mlp_dim=4 * width,
    block="pre_ln",
    layer_scale_init=1e-4,
    key_bias=False,
    relative_position_grid=(3, 3),
    tap="end",
  )
  params = jax.jit(model.init)(key(0), jnp.zeros((1, 10, width)))
  params = params["params"]
  table = params["relative_position_bias_table"]
  assert table.shape == (25 + 3, 4)
  np.testing.assert_array_equal(table, 0)
  one_sigma_std = 0.02 * 0.5396  # std of N(0,1) truncated to [-1, 1]
  q = np.asarray(params["layers_0"]["attention"]["q_proj"]["kernel"])
  fc1 = np.concatenate(
    [np.ravel(params[f"layers_{i}"]["fc1"]["kernel"]) for i in range(layers)]
  )
  for w in (q, fc1):
    assert np.abs(w).max() <= 0.02
    np.testing.assert_allclose(w.std(), one_sigma_std, rtol=0.05)
  assert abs(fc1.std() - 0.0108) < 5e-4
  for i in range(layers):
    block = params[f"layers_{i}"]
    scale = 1.0 / np.sqrt(2.0 * (i + 1))
    for w in (block["fc2"]["kernel"], block["attention"]["out_proj"]["kernel"]):
      w = np.asarray(w)
      assert np.abs(w).max() <= 0.02 * scale + 1e-9
      np.testing.assert_allclose(w.std(), one_sigma_std * scale, rtol=0.1)
    np.testing.assert_array_equal(block["gamma_1"], np.float32(1e-4))
    np.testing.assert_array_equal(block["gamma_2"], np.float32(1e-4))
    np.testing.assert_array_equal(block["fc2"]["bias"], 0)
    np.testing.assert_array_equal(block["norm_before"]["scale"], 1)


def test_post_ln_uses_bert_init():
  model = make("post_ln", hidden=64, mlp_dim=256, heads=4, num_layers=1)
  params = jax.jit(model.init)(key(0), jnp.zeros((1, 4, 64)))
  params = params["params"]
  w = np.asarray(params["layers_0"]["fc1"]["kernel"])
  np.testing.assert_allclose(w.std(), 0.02, rtol=0.05)
  assert np.abs(w).max() > 0.05  # not truncated
  np.testing.assert_array_equal(params["layers_0"]["fc1"]["bias"], 0)


def test_bad_configuration_raises():
  x = inputs()
  with pytest.raises(ValueError, match="block"):
    make("post_ln").clone(block="sandwich").init(key(0), x)
  with pytest.raises(ValueError, match="tap"):
    make("post_ln", tap="attn").init(key(0), x)
  with pytest.raises(ValueError, match="tokens"):
    make("pre_ln", relative_position_grid=(3, 3)).init(key(0), x)


def test_model_level_init():
  """Vision patch/CLS/mask tokens: ±1σ truncated; text pad rows zero."""
  vision = VisionEncoder(
    image_size=16, patch_size=8, hidden=32, num_layers=1, heads=2, mlp_dim=32
  )
  p = jax.jit(vision.init)(key(0), jnp.zeros((1, 16, 16, 3)))
  p = p["params"]
  kernel = np.asarray(p["patch_embed"]["kernel"])
  assert np.abs(kernel).max() <= 0.02
  np.testing.assert_allclose(kernel.std(), 0.0108, rtol=0.1)
  np.testing.assert_array_equal(p["patch_embed"]["bias"], 0)
  for name in ("cls_token", "mask_token"):
    assert np.abs(p[name]).max() <= 0.02
  text = helpers.tiny_text_encoder(max_positions=20)
  p = jax.jit(text.init)(key(0), jnp.zeros((1, 4), jnp.int32))
  p = p["params"]
  for name in ("word_embeddings", "position_embeddings"):
    table = np.asarray(p[name]["embedding"])
    np.testing.assert_array_equal(table[text.pad_id], 0)
    np.testing.assert_allclose(table.std(), 0.02, rtol=0.15)


def test_gradient_barrier_is_the_identity_both_ways():
  x = jnp.asarray([1.5, -0.0, 0.0, jnp.nan, jnp.inf, -3.0], jnp.float32)
  np.testing.assert_array_equal(encoder_lib.gradient_barrier(x), x)
  for cotangent in (x, x.at[0].set(jnp.nan)):  # both branches of the cond
    _, vjp = jax.vjp(encoder_lib.gradient_barrier, x)
    (g,) = jax.jit(vjp)(cotangent)
    np.testing.assert_array_equal(g, cotangent)
    np.testing.assert_array_equal(np.signbit(g), np.signbit(cotangent))


def test_gradient_barrier_survives_compilation():
  """The conditional is what keeps XLA from fusing across block inputs."""
  f = lambda x: jnp.sum(jnp.sin(encoder_lib.gradient_barrier(x)) ** 2)
  hlo = jax.jit(jax.grad(f)).lower(jnp.ones(8)).compile().as_text()
  assert "conditional" in hlo


def test_layer_norm_rows_equals_the_layer_norm_and_its_gradients():
  with jax.enable_x64(True):
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (2, 5, 8), jnp.float64) * 3 + 1
    norm = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
    params = norm.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size), params)
    loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
    direct = lambda p, x: norm.apply(p, x)
    rows = lambda p, x: encoder_lib.layer_norm_rows(
      functools.partial(norm.apply, p), x
    )
    np.testing.assert_allclose(rows(params, x), direct(params, x), rtol=1e-12)
    g_rows = jax.grad(loss(rows), argnums=(0, 1))(params, x)
    g_direct = jax.grad(loss(direct), argnums=(0, 1))(params, x)
    pairs = zip(jax.tree.leaves(g_rows), jax.tree.leaves(g_direct), strict=True)
    for a, b in pairs:
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
