"""Tests for d2vjax.masking: determinism, spec statistics, structure, errors.

Reference statistics come from the data2vec spec (§4a.4, §4b.2, §4c.2 and §9
items 9-11), which simulated the official fairseq / BEiT algorithms.
"""

import numpy as np
import pytest

from d2vjax import masking

PAD, BOS, EOS, UNK, MASK = 1, 0, 2, 3, 50264
VOCAB = 50265


def _rng(seed=0):
  return np.random.default_rng(seed)


def _runs(row):
  """(start, length) of every maximal run of True in a 1-D bool array."""
  edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
  starts = np.flatnonzero(edges == 1)
  return list(zip(starts, np.flatnonzero(edges == -1) - starts, strict=True))


def _audio(t=499, same=True, batches=400, seed=0, batch=8):
  rng = _rng(seed)
  return [
    masking.span_mask(
      (batch, t),
      mask_prob=0.65,
      mask_length=10,
      rng=rng,
      require_same_masks=same,
    )
    for _ in range(batches)
  ]


def _tokens(batch, length, seed=0):
  tokens = _rng(seed).integers(4, 50000, size=(batch, length))
  tokens[:, 0] = BOS
  tokens[:, -1] = EOS
  return tokens


# --------------------------------------------------------------- determinism


@pytest.mark.parametrize(
  "make",
  [
    lambda rng: masking.span_mask(
      (4, 200), mask_prob=0.65, mask_length=10, rng=rng
    ),
    lambda rng: masking.block_masks(4, rng=rng),
    lambda rng: masking.text_span_mask(_tokens(4, 128), rng=rng),
    lambda rng: masking.bert_mask(_tokens(4, 128), rng=rng),
    lambda rng: masking.apply_text_mask(
      _tokens(4, 128),
      np.ones((4, 128), dtype=bool),
      mask_id=MASK,
      vocab_size=VOCAB,
      leave_unmasked_prob=0.1,
      random_token_prob=0.1,
      rng=rng,
    ),
  ],
  ids=["span", "block", "text_span", "bert", "apply_text"],
)
def test_same_seed_same_mask_other_seed_differs(make):
  a, b, c = make(_rng(7)), make(_rng(7)), make(_rng(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


# ---------------------------------------------------------------- audio spans


def test_span_mask_fraction_with_batch_min_trimming():
  masks = _audio(same=True)
  assert masks[0].shape == (8, 499) and masks[0].dtype == np.bool_
  assert np.mean([m.mean() for m in masks]) == pytest.approx(0.449, abs=0.01)
  for m in masks:
    counts = m.sum(axis=1)
    assert (counts == counts[0]).all()
    assert counts[0] >= 10  # at least one whole span survives the trim


def test_span_mask_mean_run_length_after_trimming():
  runs = [r for m in _audio(batches=100) for row in m for r in _runs(row)]
  mean_run = np.mean([length for _, length in runs])
  assert mean_run == pytest.approx(6.9, abs=0.3)


def test_span_mask_without_trimming_keeps_whole_spans():
  masks = _audio(same=False)
  assert np.mean([m.mean() for m in masks]) == pytest.approx(0.491, abs=0.01)
  for m in masks[:100]:
    for row in m:
      runs = _runs(row)
      assert runs  # at least one span (min_masks=1)
      # starts come from [0, T - 11], so no span is clipped at the end.
      assert min(length for _, length in runs) >= 10


@pytest.mark.parametrize("t, expected", [(49, 0.375), (999, 0.461)])
def test_span_mask_fraction_other_lengths(t, expected):
  masks = _audio(t=t, batches=1000 if t == 49 else 100)
  assert np.mean([m.mean() for m in masks]) == pytest.approx(expected, abs=0.01)


def test_span_mask_never_masks_padding():
  rng = _rng(3)
  lengths = np.array([499, 300, 120, 11])
  padding = np.arange(499)[None, :] >= lengths[:, None]
  # A row with holes in the middle: valid positions need not be contiguous.
  padding = np.concatenate([padding, (np.arange(499) % 3 == 0)[None]])
  fractions = []
  for _ in range(200):
    m = masking.span_mask(
      (5, 499),
      mask_prob=0.65,
      mask_length=10,
      rng=rng,
      padding_mask=padding,
      require_same_masks=False,
    )
    assert not (m & padding).any()
    assert m.any(axis=1).all()
    fractions.append(m[1, :300].mean())
  # The rate follows each row's own valid length.
  assert np.mean(fractions) == pytest.approx(0.49, abs=0.01)


def test_span_mask_short_sequence_fallback():
  # T=11, L=10: T - L <= n, so starts come from {0, 1} (fairseq's fallback).
  rng = _rng(0)
  seen = set()
  for _ in range(50):
    m = masking.span_mask((1, 11), mask_prob=0.65, mask_length=10, rng=rng)
    assert m.sum() == 10
    seen.add(int(np.argmax(m[0])))
  assert seen == {0, 1}


def test_span_mask_dropout_removes_that_fraction():
  rng = _rng(0)
  full = masking.span_mask((8, 499), mask_prob=0.65, mask_length=10, rng=rng)
  rng = _rng(0)
  dropped = masking.span_mask(
    (8, 499), mask_prob=0.65, mask_length=10, rng=rng, mask_dropout=0.2
  )
  assert not (dropped & ~full).any()
  count = full.sum(axis=1)
  np.testing.assert_array_equal(
    dropped.sum(axis=1), count - np.rint(0.2 * count)
  )


# ------------------------------------------------------------- block masks


def test_block_mask_statistics():
  rng = _rng(0)
  masks = masking.block_masks(2000, rng=rng)
  assert masks.shape == (2000, 196) and masks.dtype == np.bool_
  counts = masks.sum(axis=1)
  assert counts.max() <= 120
  assert counts.mean() == pytest.approx(119.5, abs=0.5)
  assert (counts == 120).mean() == pytest.approx(0.69, abs=0.04)
  assert counts.min() >= 16


def test_block_masks_are_row_major_block_mask_draws():
  batch = masking.block_masks(3, rng=_rng(5))
  rng = _rng(5)
  for flat in batch:
    np.testing.assert_array_equal(
      flat.reshape(14, 14), masking.block_mask(rng=rng)
    )


def test_block_mask_single_block_is_an_h_by_w_rectangle():
  # area fixed at 30 and aspect fixed at 0.3: h = round(3) rows,
  # w = round(10) columns, accepted in one pass.
  rng = _rng(0)
  corners = set()
  for _ in range(300):
    m = masking.block_mask(
      num_masking_patches=30,
      min_num_patches=30,
      min_aspect=0.3,
      max_aspect=0.3,
      rng=rng,
    )
    rows, cols = np.nonzero(m)
    top, left = rows.min(), cols.min()
    assert m.sum() == 30
    assert m[top : top + 3, left : left + 10].all()
    corners.add((int(top), int(left)))
  # Top-left is uniform over every position where the block fits.
  assert corners == {(r, c) for r in range(12) for c in range(5)}


def test_block_mask_rejects_blocks_as_tall_or_wide_as_the_grid():
  # Every attempt is a 4x4 block on a 4x4 grid, so nothing is ever masked.
  m = masking.block_mask(
    (4, 4),
    num_masking_patches=15,
    min_num_patches=16,
    min_aspect=1.0,
    rng=_rng(0),
  )
  assert not m.any()


# --------------------------------------------------------------- text spans


@pytest.mark.parametrize("length", [64, 128, 512])
def test_text_span_mask_fraction(length):
  rng = _rng(length)
  tokens = _tokens(256, length)
  fractions = [
    masking.text_span_mask(tokens, rng=rng).mean() for _ in range(20)
  ]
  assert np.mean(fractions) == pytest.approx(0.307, abs=0.01)


def test_text_span_mask_padding_specials_and_runs():
  rng = _rng(1)
  lengths = np.array([512, 300, 64, 5])
  tokens = _tokens(4, 512)
  pads = np.arange(512)[None, :] >= lengths[:, None]
  tokens[pads] = PAD
  bos_masked = 0
  for _ in range(100):
    m = masking.text_span_mask(tokens, rng=rng)
    assert not (m & pads).any()
    bos_masked += m[:, 0].sum()
    for row, sz in zip(m, lengths, strict=True):
      for start, length in _runs(row):
        # Runs are unions of 4-token spans; only the tail can be shorter.
        assert length >= 4 or start + length == sz
  # The official code counts <s> and can mask it.
  assert bos_masked > 0
  excluded = masking.text_span_mask(tokens, rng=rng, special_ids=(BOS, EOS))
  assert not excluded[np.isin(tokens, (BOS, EOS, PAD))].any()


def test_apply_text_mask_all_mask_tokens():
  tokens = _tokens(8, 128)
  mask = masking.text_span_mask(tokens, rng=_rng(0))
  out = masking.apply_text_mask(
    tokens, mask, mask_id=MASK, vocab_size=VOCAB, rng=_rng(1)
  )
  assert out.dtype == tokens.dtype
  assert (out[mask] == MASK).all()
  np.testing.assert_array_equal(out[~mask], tokens[~mask])


def test_apply_text_mask_80_10_10():
  tokens = _tokens(64, 512)
  mask = masking.text_span_mask(tokens, rng=_rng(0))
  out = masking.apply_text_mask(
    tokens,
    mask,
    mask_id=MASK,
    vocab_size=VOCAB,
    leave_unmasked_prob=0.1,
    random_token_prob=0.1,
    rng=_rng(1),
  )
  np.testing.assert_array_equal(out[~mask], tokens[~mask])
  sel_out, sel_in = out[mask], tokens[mask]
  assert (sel_out == MASK).mean() == pytest.approx(0.8, abs=0.01)
  assert (sel_out == sel_in).mean() == pytest.approx(0.1, abs=0.01)
  randomised = (sel_out != MASK) & (sel_out != sel_in)
  assert randomised.mean() == pytest.approx(0.1, abs=0.01)


def test_apply_text_mask_random_tokens_are_never_special():
  # A tiny vocabulary makes forbidden draws likely if they were possible.
  tokens = np.full((16, 64), 5)
  mask = np.ones_like(tokens, dtype=bool)
  out = masking.apply_text_mask(
    tokens,
    mask,
    mask_id=7,
    vocab_size=8,
    random_token_prob=0.5,
    rng=_rng(0),
  )
  randomised = out[out != 7]
  assert randomised.size > 0
  assert set(np.unique(randomised)) <= {4, 5, 6}


# ----------------------------------------------------------------------- BERT


def test_bert_mask_rate_and_exclusions():
  rng = _rng(0)
  tokens = _tokens(64, 512)
  tokens[:, 400:] = PAD
  tokens[-1, 2:-1] = PAD  # one ordinary token left: it must be selected
  eligible = ~np.isin(tokens, (PAD, BOS, EOS))
  rates = []
  for _ in range(10):
    m = masking.bert_mask(tokens, rng=rng)
    assert not (m & ~eligible).any()
    assert m.any(axis=1).all()
    assert m[-1, 1]
    rates.append(m[:-1][eligible[:-1]].mean())
  assert np.mean(rates) == pytest.approx(0.15, abs=0.005)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"mask_prob": 1.0}, "mask_prob"),
    ({"mask_prob": -0.1}, "mask_prob"),
    ({"mask_length": 0}, "mask_length"),
    ({"mask_dropout": 1.0}, "mask_dropout"),
    ({"min_masks": -1}, "min_masks"),
    ({"padding_mask": np.zeros((2, 5), bool)}, "padding_mask"),
    ({"shape": (2, 10)}, "at least 11"),
    ({"mask_prob": 0.0, "shape": (1, 11), "mask_dropout": 0.99}, "nothing"),
  ],
)
def test_span_mask_errors(kwargs, match):
  args = {"shape": (2, 50), "mask_prob": 0.65, "mask_length": 10}
  args.update(kwargs)
  shape = args.pop("shape")
  with pytest.raises(ValueError, match=match):
    masking.span_mask(shape, rng=_rng(), **args)


def test_span_mask_no_overlap_not_implemented():
  with pytest.raises(NotImplementedError):
    masking.span_mask(
      (2, 50), mask_prob=0.65, mask_length=10, rng=_rng(), no_overlap=True
    )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"num_masking_patches": 0}, "num_masking_patches"),
    ({"num_masking_patches": 196}, "num_masking_patches"),
    ({"min_num_patches": 0}, "min_num_patches"),
    ({"min_aspect": 0.0}, "min_aspect"),
    ({"max_aspect": 0.1}, "max_aspect"),
  ],
)
def test_block_mask_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    masking.block_mask(rng=_rng(), **kwargs)


def test_block_masks_rejects_degenerate_result():
  with pytest.raises(ValueError, match="masks nothing in row 0"):
    masking.block_masks(
      2,
      (4, 4),
      num_masking_patches=15,
      min_num_patches=16,
      min_aspect=1.0,
      rng=_rng(),
    )


def test_text_errors():
  tokens = _tokens(2, 16)
  with pytest.raises(ValueError, match="mask_multiple_length"):
    masking.text_span_mask(tokens, mask_multiple_length=0, rng=_rng())
  with pytest.raises(ValueError, match="mask_prob"):
    masking.text_span_mask(tokens, mask_prob=1.5, rng=_rng())
  with pytest.raises(ValueError, match="tokens"):
    masking.text_span_mask(tokens.astype(float), rng=_rng())
  with pytest.raises(ValueError, match="row 1"):
    masking.bert_mask(np.array([[0, 5, 2], [0, 1, 2]]), rng=_rng())
  mask = np.ones_like(tokens, dtype=bool)
  with pytest.raises(ValueError, match="<= 1"):
    masking.apply_text_mask(
      tokens,
      mask,
      mask_id=MASK,
      vocab_size=VOCAB,
      leave_unmasked_prob=0.6,
      random_token_prob=0.6,
      rng=_rng(),
    )
  with pytest.raises(ValueError, match="mask must be boolean"):
    masking.apply_text_mask(
      tokens, mask[:, 1:], mask_id=MASK, vocab_size=VOCAB, rng=_rng()
    )


def test_check_mask():
  padding = np.array([[False, False, True], [False, False, False]])
  masking.check_mask(np.array([[True, False, False], [False, True, True]]))
  with pytest.raises(ValueError, match="masks nothing in row 1"):
    masking.check_mask(np.array([[True, False, False], [False] * 3]))
  with pytest.raises(ValueError, match="every valid position in row 0"):
    masking.check_mask(
      np.array([[True, True, False], [True, False, False]]), padding
    )
  with pytest.raises(ValueError, match="padding in row 0"):
    masking.check_mask(
      np.array([[True, False, True], [True, False, False]]), padding
    )
  masking.check_mask(
    np.array([[False] * 3, [True] * 3]),
    allow_empty_rows=True,
    allow_full_rows=True,
  )
