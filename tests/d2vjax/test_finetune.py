"""Fine-tuning heads, losses, metrics and optimizer pieces (spec §6)."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d2vjax import finetune, masking, pretrain, speech
from tests import helpers

# ---------------------------------------------------------------------------
# CTC loss and decoding.


def _brute_force_ctc(log_probs, label, blank=0):
  """-log Σ over all frame paths that collapse to `label`."""
  t, v = log_probs.shape
  total = 0.0
  for path in itertools.product(range(v), repeat=t):
    collapsed = [k for k, _ in itertools.groupby(path)]
    if [k for k in collapsed if k != blank] == list(label):
      total += np.exp(sum(log_probs[i, k] for i, k in enumerate(path)))
  return -np.log(total)


def test_ctc_loss_matches_brute_force_and_averages_utterances():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 5, 3)).astype(np.float32)
  frames = [5, 4, 3]
  logit_pad = np.arange(5)[None] >= np.array(frames)[:, None]
  labels = np.array([[1, 2, 1], [1, 1, 0], [2, 0, 0]])
  lengths = [3, 2, 1]
  label_pad = np.arange(3)[None] >= np.array(lengths)[:, None]

  expected = []
  for i in range(3):
    lp = jax.nn.log_softmax(logits[i, : frames[i]].astype(np.float64))
    expected.append(_brute_force_ctc(np.asarray(lp), labels[i, : lengths[i]]))
  loss = jax.jit(finetune.ctc_loss)(logits, logit_pad, labels, label_pad)
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  # Per utterance: a single row gives its own value (eager here).
  one = finetune.ctc_loss(
    logits[1:2], logit_pad[1:2], labels[1:2], label_pad[1:2]
  )
  np.testing.assert_allclose(one, expected[1], rtol=1e-5)


def test_ctc_loss_zeroes_impossible_alignments():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((2, 3, 3)), jnp.float32)
  logit_pad = np.array([[0, 0, 0], [0, 0, 1]], bool)
  # Row 1: "1 1" needs 3 frames (blank between repeats) but has 2.
  labels = np.array([[1, 2], [1, 1]])
  label_pad = np.zeros((2, 2), bool)
  loss_and_grad = jax.jit(jax.value_and_grad(finetune.ctc_loss))
  loss, grad = loss_and_grad(logits, logit_pad, labels, label_pad)
  first, _ = loss_and_grad(logits[:1], logit_pad[:1], labels[:1], label_pad[:1])
  np.testing.assert_allclose(loss, first / 2, rtol=1e-6)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[1], 0.0)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
  path = np.array(
    [[1, 1, 0, 1, 2, 2, 0, 0, 2, 3], [0, 3, 3, 3, 0, 0, 0, 0, 1, 1]]
  )
  logits = np.eye(4)[path] * 5.0
  padding = np.zeros(path.shape, bool)
  padding[1, 8:] = True
  out = finetune.greedy_decode(logits, padding)
  assert out == [[1, 1, 2, 2, 3], [3]]
  assert finetune.greedy_decode(jnp.asarray(logits))[1] == [3, 1]


def test_letter_vocab_round_trip(tmp_path):
  vocab = finetune.LetterVocab()
  assert len(vocab) == 32
  assert vocab.symbols[:6] == ("<s>", "<pad>", "</s>", "<unk>", "|", "E")
  ids = vocab.encode("hello  world")
  assert ids[-1] == vocab.index("|") == 4
  assert [vocab.symbols[i] for i in ids[:6]] == ["H", "E", "L", "L", "O", "|"]
  assert vocab.decode(ids) == "HELLO WORLD"
  # Blanks, pads and eos are ignored; unknown characters map to <unk>.
  assert vocab.decode([0] + ids[:5] + [1, 2]) == "HELLO"
  assert vocab.encode("é")[0] == vocab.unk_id

  path = tmp_path / "dict.ltr.txt"
  path.write_text("".join(f"{c} {100 - i}\n" for i, c in enumerate("|BA")))
  small = finetune.LetterVocab.from_dict_file(path)
  assert small.encode("ab", trailing_separator=False) == [6, 5]


def test_wer_and_cer_hand_examples():
  assert finetune.wer("a b c", "a x c d") == pytest.approx(2 / 3)
  # Corpus level: summed errors over summed reference words.
  assert finetune.wer(["a b", "c"], ["a", "c d"]) == pytest.approx(2 / 3)
  assert finetune.cer(["abc"], ["abd"]) == pytest.approx(1 / 3)
  assert finetune.cer("ab cd", "ab  cd") == 0.0  # whitespace normalised
  assert finetune.cer("ab", "") == 1.0
  with pytest.raises(ValueError):
    finetune.wer(["a"], ["a", "b"])


# ---------------------------------------------------------------------------
# CTCModel.


def _ctc_batch(rng, batch=3):
  wave = rng.standard_normal((batch, 800)).astype(np.float32)
  attention = np.ones((batch, 800), np.int32)
  attention[1, 600:] = 0
  # 800 samples -> 79 frames with the tiny CNN; row 1 has 59 real ones.
  padding = speech.frame_padding_mask(attention, helpers.TINY_CONV_LAYERS)
  return wave, attention, np.asarray(padding)


def _init(model, *args, **kwargs):
  return jax.jit(lambda: model.init(helpers.init_rngs(), *args, **kwargs))()[
    "params"
  ]


@pytest.fixture(scope="module")
def ctc_model():
  """One tiny CTC model and its params, shared by the CTC tests."""
  model = finetune.CTCModel(
    helpers.tiny_audio_encoder(layerdrop=0.1), vocab_size=32, final_dropout=0.1
  )
  wave, attention, padding = _ctc_batch(np.random.default_rng(0))
  params = _init(model, wave, attention_mask=attention, train=False)
  return model, params, wave, attention, padding


def test_ctc_model_shapes_and_frozen_cnn(ctc_model):
  model, params, wave, attention, padding = ctc_model
  rng = np.random.default_rng(1)
  assert set(params) == {"encoder", "proj"}
  np.testing.assert_array_equal(params["proj"]["bias"], 0.0)
  time_mask = masking.span_mask(
    (3, 79), mask_prob=0.65, mask_length=5, rng=rng, padding_mask=padding
  )

  @functools.partial(jax.jit, static_argnames=("module", "freeze"))
  def grad(p, module, freeze):
    def loss(p):
      out, pad = module.apply(
        {"params": p},
        wave,
        attention_mask=attention,
        time_mask=time_mask,
        train=True,
        freeze_encoder=freeze,
        rngs={"dropout": jax.random.key(3)},
      )
      return jnp.sum(out**2), (out, pad)

    return jax.grad(loss, has_aux=True)(p)

  grads, (logits, pad) = grad(params, model, False)
  assert logits.shape == (3, 79, 32) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(pad, padding)
  assert padding[1].any() and not padding[0].any()
  front = grads["encoder"]["front_end"]
  for g in jax.tree.leaves(front["feature_extractor"]):
    np.testing.assert_array_equal(g, 0.0)
  assert np.abs(front["feature_projection"]["projection"]["kernel"]).sum() > 0
  assert np.abs(front["mask_embedding"]).sum() > 0  # reused by the time mask

  frozen, _ = grad(params, model, True)
  for g in jax.tree.leaves(frozen["encoder"]):
    np.testing.assert_array_equal(g, 0.0)
  assert np.abs(frozen["proj"]["kernel"]).sum() > 0

  # With freezing off the CNN learns.
  free = model.clone(freeze_feature_extractor=False)
  cnn = grad(params, free, False)[0]["encoder"]["front_end"]
  cnn = cnn["feature_extractor"]
  assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(cnn)) > 0


def test_ctc_channel_mask_zeroes_channels_at_every_frame(ctc_model):
  model, params, wave, attention, _ = ctc_model
  channels = np.zeros((3, 16), bool)
  channels[0, 2:6] = True
  channels[2, 10:] = True

  @functools.partial(jax.jit, static_argnames=("channel",))
  def front(channel):
    return model.apply(
      {"params": params},
      wave,
      attention_mask=attention,
      channel_mask=channels if channel else None,
      train=False,
      method=lambda m, *a, **k: m.encoder(*a, **k)[1]["pos_conv_input"],
    )

  masked, plain = np.asarray(front(True)), np.asarray(front(False))
  np.testing.assert_array_equal(masked[channels[:, None, :].repeat(79, 1)], 0)
  keep = ~channels[:, None, :].repeat(79, 1)
  np.testing.assert_array_equal(masked[keep], plain[keep])
  assert np.abs(plain[0, :, 2:6]).sum() > 0
  with pytest.raises(ValueError, match="channel_mask shape"):
    model.apply(
      {"params": params},
      wave,
      attention_mask=attention,
      channel_mask=channels[:, :8],
      train=False,
    )


def test_frozen_mask_marks_the_cnn_or_the_encoder():
  model = finetune.CTCModel(helpers.tiny_audio_encoder(), vocab_size=5)
  wave = np.zeros((1, 800), np.float32)
  params = jax.eval_shape(
    lambda: model.init(helpers.init_rngs(), wave, train=False)["params"]
  )
  mask = finetune.frozen_mask(params)
  cnn = mask["encoder"]["front_end"].pop("feature_extractor")
  assert all(jax.tree.leaves(cnn))
  assert not any(jax.tree.leaves(mask))
  whole = finetune.frozen_mask(params, whole_encoder=True)
  assert all(jax.tree.leaves(whole["encoder"]))
  assert not any(jax.tree.leaves(whole["proj"]))


def test_ctc_train_step_jit(ctc_model):
  model, params, wave, attention, padding = ctc_model
  rng = np.random.default_rng(2)
  vocab = finetune.LetterVocab()
  texts = ["a cab", "bad", "ace be"]
  labels = np.full((3, 8), vocab.pad_id, np.int32)
  for i, t in enumerate(texts):
    ids = vocab.encode(t)
    labels[i, : len(ids)] = ids
  tx = optax.multi_transform(
    {False: optax.adam(1e-3, b2=0.98), True: optax.set_to_zero()},
    finetune.frozen_mask(params),
  )
  state = {"params": params, "opt": tx.init(params), "step": jnp.int32(0)}

  @jax.jit
  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.key(0), state["step"])

    def loss_fn(p):
      logits, pad = model.apply(
        {"params": p},
        batch["wave"],
        attention_mask=batch["attention"],
        time_mask=batch["time_mask"],
        train=True,
        rngs={"dropout": key},
      )
      return finetune.ctc_loss(
        logits, pad, batch["labels"], batch["labels"] == vocab.pad_id
      )

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = {
      "params": optax.apply_updates(state["params"], updates),
      "opt": opt,
      "step": state["step"] + 1,
    }
    return new, {"train/loss": loss}

  batch = {
    "wave": wave,
    "attention": attention,
    "labels": labels,
    "time_mask": masking.span_mask(
      (3, 79), mask_prob=0.5, mask_length=5, rng=rng, padding_mask=padding
    ),
  }
  new, metrics = train_step(state, batch)
  assert np.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
  cnn = "feature_extractor"
  for a, b in zip(
    jax.tree.leaves(new["params"]["encoder"]["front_end"][cnn]),
    jax.tree.leaves(params["encoder"]["front_end"][cnn]),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(
    new["params"]["proj"]["kernel"], params["proj"]["kernel"]
  )
  new, _ = train_step(new, batch)
  assert int(new["step"]) == 2

  logits = np.eye(len(vocab))[[0] + labels[0].tolist()] * 3.0
  decoded = finetune.greedy_decode(logits[None])
  assert vocab.decode(decoded[0]) == "A CAB"


# ---------------------------------------------------------------------------
# Image classification.


@pytest.fixture(scope="module")
def image_model():
  """One classifier, its params and a jitted apply, shared across tests."""
  model = finetune.ImageClassifier(
    helpers.tiny_vision_encoder(use_final_norm=False), num_classes=1000
  )
  images = np.random.default_rng(0).standard_normal((2, 16, 16, 3))
  params = _init(model, images, train=False)

  @functools.partial(jax.jit, static_argnames="train")
  def apply(p, x, train):
    return model.apply({"params": p}, x, train=train, rngs=helpers.init_rngs(5))

  return model, params, apply, images


def test_image_classifier_shapes_and_init_scale(image_model):
  _, params, apply, images = image_model
  assert set(params) == {"encoder", "fc_norm", "head"}
  assert "norm" not in params["encoder"]
  logits = apply(params, images, train=True)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  kernel = np.asarray(params["head"]["kernel"])
  assert kernel.shape == (16, 1000)
  assert np.std(kernel) == pytest.approx(0.02 * 0.001, rel=0.05)
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  with pytest.raises(ValueError, match="use_final_norm"):
    finetune.ImageClassifier(helpers.tiny_vision_encoder(), num_classes=3).init(
      helpers.init_rngs(), images, train=False
    )  # raises before any compute


class _FixedTokens(nn.Module):
  """Stands in for the encoder: returns the input tokens unchanged."""

  use_final_norm: bool = False

  def __call__(self, tokens, mask, train):
    del mask, train
    return tokens, {}


def test_image_classifier_mean_pools_patches_without_cls():
  rng = np.random.default_rng(0)
  tokens = rng.standard_normal((2, 5, 8)).astype(np.float32)
  model = finetune.ImageClassifier(
    _FixedTokens(), num_classes=3, init_scale=1.0
  )
  params = model.init(helpers.init_rngs(), tokens, train=False)["params"]
  out = model.apply({"params": params}, tokens, train=False)
  changed = tokens.copy()
  changed[:, 0] = 1e3  # the CLS token
  np.testing.assert_allclose(
    model.apply({"params": params}, changed, train=False), out, rtol=1e-6
  )
  pooled = tokens[:, 1:].mean(1)
  normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(
    pooled.var(-1, keepdims=True) + 1e-6
  )
  expected = normed @ np.asarray(params["head"]["kernel"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_layer_decay_multipliers_three_blocks():
  model = finetune.ImageClassifier(
    helpers.tiny_vision_encoder(use_final_norm=False), num_classes=4
  )
  images = np.zeros((1, 16, 16, 3), np.float32)
  params = jax.eval_shape(
    lambda: model.init(helpers.init_rngs(), images, train=False)["params"]
  )
  d = 0.65
  mult = finetune.layer_decay_multipliers(params, num_layers=3, decay=d)
  enc = mult["encoder"]
  for name in ("cls_token", "mask_token"):
    assert enc[name] == pytest.approx(d**4)
  assert enc["patch_embed"]["kernel"] == pytest.approx(d**4)
  for i in range(3):
    leaves = jax.tree.leaves(enc["encoder"][f"layers_{i}"])
    assert leaves and all(v == pytest.approx(d ** (3 - i)) for v in leaves)
  assert enc["encoder"]["relative_position_bias_table"] == 1.0
  assert all(v == 1.0 for v in jax.tree.leaves(mult["fc_norm"]))
  assert all(v == 1.0 for v in jax.tree.leaves(mult["head"]))
  with pytest.raises(ValueError, match="block 2"):
    finetune.layer_decay_multipliers(params, num_layers=2)


def test_scale_by_layer_equals_per_group_learning_rates():
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5, 3.0]])}
  grads = {"a": jnp.array([0.3, -0.1]), "b": jnp.array([[1.0, 2.0]])}
  mult = {"a": 0.25, "b": 1.0}
  lr, wd = 0.1, 0.05

  def adamw(scale):
    return optax.chain(
      optax.scale_by_adam(),
      optax.add_decayed_weights(wd),
      scale,
      optax.scale_by_learning_rate(lr),
    )

  tx = adamw(finetune.scale_by_layer(mult))
  updates, _ = tx.update(grads, tx.init(params), params)
  # Reference: each group is torch AdamW with lr * multiplier.
  for name, m in mult.items():
    ref = optax.adamw(lr * m, weight_decay=wd)
    sub = {name: params[name]}
    want, _ = ref.update({name: grads[name]}, ref.init(sub), sub)
    np.testing.assert_allclose(updates[name], want[name], rtol=1e-6)


def test_label_smoothing_cross_entropy_value():
  logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
  labels = np.array([0, 2])
  s = 0.1
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = np.full((2, 3), s / 3)
  target[[0, 1], labels] += 1 - s
  want = -(target * logp).sum(-1).mean()
  got = finetune.label_smoothing_cross_entropy(logits, labels, s)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  soft = finetune.label_smoothing_cross_entropy(logits, target, 0.0)
  np.testing.assert_allclose(soft, want, rtol=1e-6)
  plain = finetune.label_smoothing_cross_entropy(logits, labels)
  np.testing.assert_allclose(plain, -logp[[0, 1], labels].mean(), rtol=1e-6)


def _lam_from_targets(targets, labels, k, smoothing):
  off = smoothing / k
  # Row 0 pairs with row B-1; distinct labels make lam readable.
  return (targets[0, labels[0]] - off) / (1 - smoothing)


def test_mixup_soft_targets_and_images():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 3])
  mixed, targets = finetune.mixup_cutmix(
    images, labels, rng=rng, num_classes=5, cutmix_alpha=0.0
  )
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  lam = _lam_from_targets(targets, labels, 5, 0.1)
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(
    mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(targets[:, 4], 0.1 / 5, rtol=1e-6)


def test_cutmix_lambda_is_the_area_left_untouched():
  for seed in range(20):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((4, 10, 12, 3)).astype(np.float32)
    labels = np.array([3, 1, 0, 2])
    mixed, targets = finetune.mixup_cutmix(
      images, labels, rng=rng, num_classes=4, mixup_alpha=0.0
    )
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    changed = np.any(mixed[0] != images[0], axis=-1)
    area = changed.sum()
    lam = _lam_from_targets(targets, labels, 4, 0.1)
    np.testing.assert_allclose(lam, 1 - area / (10 * 12), atol=1e-6)
    if area:
      ys, xs = np.nonzero(changed)
      box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
      assert box == area  # one rectangle
      np.testing.assert_array_equal(mixed[0][changed], images[3][changed])


def test_mixup_disabled_returns_smoothed_one_hot():
  rng = np.random.default_rng(0)
  images = np.ones((2, 4, 4, 1), np.float32)
  mixed, targets = finetune.mixup_cutmix(
    images, np.array([0, 1]), rng=rng, num_classes=2, prob=0.0
  )
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_allclose(targets, [[0.95, 0.05], [0.05, 0.95]])


# ---------------------------------------------------------------------------
# Sentence classification.


def test_sentence_classifier_shapes_and_losses():
  ids = np.random.default_rng(0).integers(4, 49, (3, 10)).astype(np.int32)
  ids[:, 0], ids[2, 7:] = 0, 1
  model = finetune.SentenceClassifier(
    helpers.tiny_text_encoder(), num_labels=3, pooler_dropout=0.1
  )
  params = _init(model, ids, train=False)
  assert set(params) == {"encoder", "dense", "out_proj"}
  assert params["out_proj"]["kernel"].shape == (16, 3)

  @jax.jit
  def both(p):
    def run(train):
      return model.apply(
        {"params": p}, ids, train=train, rngs=helpers.init_rngs(2)
      )

    return run(False), run(True)

  logits, trained = both(params)
  assert logits.shape == (3, 3) and logits.dtype == jnp.float32
  assert trained.shape == (3, 3)
  assert not np.allclose(trained, logits)  # pooler dropout is active

  labels = np.array([0, 2, 1])
  logp = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(
    finetune.classification_loss(logits, labels, 3),
    -np.mean(np.asarray(logp)[np.arange(3), labels]),
    rtol=1e-6,
  )
  # Regression (STS-B): one output, mean squared error over sentences.
  scores = logits[:, :1]
  target = np.array([1.0, 4.5, 2.0], np.float32)
  np.testing.assert_allclose(
    finetune.classification_loss(scores, target, 1),
    np.mean((np.asarray(scores)[:, 0] - target) ** 2),
    rtol=1e-6,
  )
  assert finetune.classification_loss(
    np.array([[1.0], [3.0]]), np.array([0.0, 1.0]), 1
  ) == pytest.approx((1 + 4) / 2)
  with pytest.raises(ValueError):
    finetune.classification_loss(logits, labels, 2)


# ---------------------------------------------------------------------------
# From pretraining.


def test_pretrained_encoder_drops_head_and_loads(image_model):
  _, params, apply, images = image_model
  mask = np.zeros((2, 16), bool)
  pre = pretrain.Data2Vec(
    encoder=helpers.tiny_vision_encoder(), modality="vision"
  )
  shapes = jax.eval_shape(
    lambda: pre.init(helpers.init_rngs(7), images, mask, train=False)["params"]
  )
  fill = iter(range(1, 1000))
  pre_params = jax.tree.map(
    lambda x: np.full(x.shape, next(fill) / 100, x.dtype), shapes
  )
  assert set(pre_params) == {"encoder", "head"}
  enc = finetune.encoder_params_from_pretrained(pre_params)
  assert "norm" in enc

  with pytest.warns(UserWarning, match="norm/scale"):
    loaded = finetune.with_pretrained_encoder(params, enc)
  np.testing.assert_array_equal(
    loaded["encoder"]["patch_embed"]["kernel"], enc["patch_embed"]["kernel"]
  )
  np.testing.assert_array_equal(
    loaded["head"]["kernel"], params["head"]["kernel"]
  )
  assert np.all(np.isfinite(apply(loaded, images, train=False)))

  broken = dict(enc)
  del broken["cls_token"]
  with pytest.raises(KeyError, match="cls_token"):
    finetune.with_pretrained_encoder(params, broken)
  wrong = {k: v for k, v in enc.items() if k != "norm"}
  wrong["cls_token"] = np.zeros((1, 2, 16), np.float32)
  with pytest.raises(ValueError, match="cls_token"):
    finetune.with_pretrained_encoder(params, wrong)
  with pytest.raises(KeyError):
    finetune.encoder_params_from_pretrained({"head": {}})
