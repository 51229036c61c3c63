"""Host-side mask generators for data2vec (numpy, fixed shapes, seeded).

Every generator returns a dense boolean array of a fixed shape (`True` =
masked) so that the jitted step sees static shapes; variable numbers of masked
positions are handled downstream with mask weights. Each function takes a
`np.random.Generator` so the same seed always gives the same mask. The draws
follow the *algorithms* of the official code, not its random streams: fairseq
and BEiT use the global numpy / `random` state, which no port can replay.

* `span_mask`: wav2vec 2.0 / data2vec-audio span masking
  (fairseq `compute_mask_indices`).
* `block_mask`, `block_masks`: BEiT's blockwise patch masking, as used by the
  data2vec vision code.
* `text_span_mask`, `apply_text_mask`: the span masking of the released
  data2vec text config (fairseq `MaskTokensDataset`) and the token corruption
  with optional BERT 80/10/10.
* `bert_mask`: the paper's BERT-style token selection.
* `check_mask`: rejects masks that mask nothing or everything in a row.

Padding masks follow the fairseq convention: `True` marks a padded position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def check_mask(
  mask: np.ndarray,
  padding_mask: np.ndarray | None = None,
  name: str = "mask",
  *,
  allow_empty_rows: bool = False,
  allow_full_rows: bool = False,
) -> None:
  """Raises if a row of `mask` is degenerate.

  A row that masks nothing contributes no loss positions; a row that masks
  every valid position leaves the student no context (and leaves contrastive
  objectives without distractors). Masked padding is always an error.

  Args:
    mask: bool `[B, T]` (or `[T]`), `True` = masked.
    padding_mask: optional bool array of the same shape, `True` = padded.
    name: how the mask is called in error messages.
    allow_empty_rows: accept rows that mask nothing.
    allow_full_rows: accept rows that mask every valid position.

  Raises:
    ValueError: naming the first offending row.
  """
  mask = np.asarray(mask)
  if mask.dtype != np.bool_:
    raise ValueError(f"{name} must be boolean, got dtype {mask.dtype}")
  mask = np.atleast_2d(mask)
  if padding_mask is None:
    valid = np.ones_like(mask)
  else:
    padding_mask = np.atleast_2d(np.asarray(padding_mask, dtype=bool))
    if padding_mask.shape != mask.shape:
      raise ValueError(
        f"padding_mask shape {padding_mask.shape} does not match {name} "
        f"shape {mask.shape}"
      )
    valid = ~padding_mask
  on_padding = np.flatnonzero((mask & ~valid).any(axis=1))
  if on_padding.size:
    raise ValueError(f"{name} masks padding in row {on_padding[0]}")
  counts = mask.sum(axis=1)
  if not allow_empty_rows:
    empty = np.flatnonzero(counts == 0)
    if empty.size:
      raise ValueError(f"{name} masks nothing in row {empty[0]}")
  if not allow_full_rows:
    full = np.flatnonzero(counts == valid.sum(axis=1))
    if full.size:
      raise ValueError(f"{name} masks every valid position in row {full[0]}")


def _check_prob(value: float, name: str) -> None:
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value}")


def _random_ranks(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A uniformly random order of the `True` cells of each row (0, 1, ...).

  `False` cells get ranks after every `True` cell, so `ranks < k` picks a
  uniform random subset of size `min(k, count)` of each row's `True` cells.
  """
  keys = np.where(mask, rng.random(mask.shape), np.inf)
  return np.argsort(np.argsort(keys, axis=1), axis=1)


def _keep_random_subset(
  mask: np.ndarray, keep: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
  return mask & (_random_ranks(mask, rng) < keep[:, None])


def _span_starts(
  ranges: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Per row, `counts[i]` distinct starts drawn uniformly from `[0, ranges[i])`.

  Returns `(starts [B, S], valid [B, S])` with `S = max(counts)`; the first
  `counts[i]` entries of row i are real. Requires `counts <= ranges`.
  """
  width = max(int(ranges.max(initial=0)), 1)
  in_range = np.arange(width)[None, :] < ranges[:, None]
  # A random permutation of each row's range; its prefix is a draw without
  # replacement, like `np.random.choice(range, n, replace=False)`.
  keys = np.where(in_range, rng.random(in_range.shape), np.inf)
  num = int(counts.max(initial=0))
  starts = np.argsort(keys, axis=1)[:, :num]
  valid = np.arange(num)[None, :] < counts[:, None]
  return starts, valid


def _spans_to_mask(
  starts: np.ndarray,
  valid: np.ndarray,
  span: int,
  lengths: np.ndarray,
  width: int,
) -> np.ndarray:
  """Marks `[s, s + span)` for every valid start, clipped at each row's length.

  Overlapping spans merge: the result is the union, like fairseq's
  `np.unique` over the span indices.
  """
  positions = starts[:, :, None] + np.arange(span)[None, None, :]
  keep = valid[:, :, None] & (positions < lengths[:, None, None])
  rows = np.broadcast_to(np.arange(len(starts))[:, None, None], keep.shape)
  mask = np.zeros((len(starts), width), dtype=bool)
  mask[rows[keep], positions[keep]] = True
  return mask


def _expand(compact: np.ndarray, excluded: np.ndarray | None) -> np.ndarray:
  """Scatters per-row masks over the valid positions back to full positions.

  `compact[i, c]` refers to the c-th non-excluded position of row i, so the
  generators work on "the sequence without padding" as the official code does
  (it masks unpadded items), wherever the padding sits.
  """
  if excluded is None:
    return compact
  # Stable sort puts each row's valid positions first, in order; compact
  # entries past a row's valid length are False and land on the padding.
  order = np.argsort(excluded, axis=1, kind="stable")
  full = np.zeros_like(compact)
  np.put_along_axis(full, order, compact, axis=1)
  return full


def span_mask(
  shape: tuple[int, int],
  *,
  mask_prob: float,
  mask_length: int,
  rng: np.random.Generator,
  min_masks: int = 1,
  padding_mask: np.ndarray | None = None,
  require_same_masks: bool = True,
  mask_dropout: float = 0.0,
  no_overlap: bool = False,
) -> np.ndarray:
  """wav2vec 2.0 / data2vec-audio span masking over time steps.

  For a sample with `T` valid frames: `n = max(min_masks, floor(mask_prob * T
  / mask_length + u))` with `u ~ U[0, 1)` (probabilistic rounding, drawn per
  sample); `n` distinct span starts uniformly from `{0, ..., T -
  mask_length - 1}` (when `T - mask_length <= n` the official code shrinks the
  span length used for the range to `T - n - 1`, i.e. draws starts from
  `{0, ..., n}`); every span `[s, s + mask_length)` is masked, clipped at `T`,
  overlaps merged. With `require_same_masks` every row is then cut down to the
  smallest count in the batch by keeping a uniform random subset of its masked
  frames (which breaks spans into fragments). Finally `mask_dropout` unmasks
  `rint(count * mask_dropout)` random masked frames per row. Only the
  "static" span-length distribution is supported.

  Args:
    shape: `(B, T)`.
    mask_prob: expected span starts per frame times `mask_length`; in [0, 1).
    mask_length: span length in frames, >= 1.
    rng: numpy generator.
    min_masks: lower bound on the number of spans per sample.
    padding_mask: optional bool `[B, T]`, `True` = padded (fairseq
      convention). Padded frames are never masked; the valid frames of a row
      need not be contiguous but are masked as one sequence.
    require_same_masks: trim all rows to the batch-minimum masked count.
    mask_dropout: fraction of each row's masked frames to unmask, in [0, 1).
    no_overlap: fairseq's non-overlapping span placement; not implemented
      (data2vec uses overlapping spans).

  Returns:
    bool `[B, T]`, `True` = masked.

  Raises:
    ValueError: on bad arguments, a sample with at most `mask_length` valid
      frames, or (when `min_masks >= 1`) a row left with nothing masked.
    NotImplementedError: if `no_overlap` is set.

  References:
    Baevski et al., "data2vec", 2022, §3.2 and §4.2 (p=0.65, M=10).
    Baevski et al., "wav2vec 2.0", 2020, §3.1. Official code: fairseq
    `data/data_utils.py:compute_mask_indices` with `mask_type="static"`;
    starts via `choice(T - mask_length, n, replace=False)`, batch-min
    trimming via `choice(idx, min_len, replace=False)`. The 2022 fairseq
    drew one rounding `u` per batch when there is no padding; current fairseq
    (and this function) draw one per sample.
  """
  if no_overlap:
    raise NotImplementedError("span_mask: no_overlap=True is not implemented")
  batch, width = (int(s) for s in shape)
  if batch < 1 or width < 1:
    raise ValueError(f"shape must be positive, got {shape}")
  _check_prob(mask_prob, "mask_prob")
  _check_prob(mask_dropout, "mask_dropout")
  if mask_length < 1:
    raise ValueError(f"mask_length must be >= 1, got {mask_length}")
  if min_masks < 0:
    raise ValueError(f"min_masks must be >= 0, got {min_masks}")
  if padding_mask is None:
    lengths = np.full(batch, width)
  else:
    padding_mask = np.asarray(padding_mask, dtype=bool)
    if padding_mask.shape != (batch, width):
      raise ValueError(
        f"padding_mask shape {padding_mask.shape} does not match shape "
        f"{(batch, width)}"
      )
    lengths = width - padding_mask.sum(axis=1)
  short = np.flatnonzero(lengths <= mask_length)
  if short.size:
    i = short[0]
    raise ValueError(
      f"span_mask: sample {i} has {lengths[i]} valid frames; mask_length="
      f"{mask_length} needs at least {mask_length + 1}"
    )

  # Same float order as fairseq: (p * T) / L, then + u, then truncate.
  num_spans = np.floor(
    mask_prob * lengths / float(mask_length) + rng.random(batch)
  ).astype(np.int64)
  num_spans = np.maximum(num_spans, min_masks)
  ranges = np.where(
    lengths - mask_length <= num_spans, num_spans + 1, lengths - mask_length
  )
  starts, valid = _span_starts(ranges, num_spans, rng)
  mask = _spans_to_mask(starts, valid, mask_length, lengths, width)

  if require_same_masks:
    target = mask.sum(axis=1).min()
    mask = _keep_random_subset(mask, np.full(batch, target), rng)
  if mask_dropout > 0:
    counts = mask.sum(axis=1)
    holes = np.rint(counts * mask_dropout).astype(np.int64)
    mask = _keep_random_subset(mask, counts - holes, rng)

  mask = _expand(mask, padding_mask)
  if min_masks >= 1:
    # A fully masked row is legal for data2vec (teacher sees the input), so
    # only an empty row -- reachable through mask_dropout -- is rejected.
    check_mask(mask, padding_mask, name="span_mask", allow_full_rows=True)
  return mask


def block_mask(
  grid: tuple[int, int] = (14, 14),
  *,
  num_masking_patches: int = 120,
  min_num_patches: int = 16,
  max_num_patches: int | None = None,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  rng: np.random.Generator,
) -> np.ndarray:
  """BEiT blockwise masking of a patch grid.

  Passes repeat until `num_masking_patches` cells are masked or a pass adds
  nothing. A pass makes up to 10 attempts with `cap = min(remaining,
  max_num_patches)`: area `~ U(min_num_patches, cap)`, aspect log-uniform in
  `[min_aspect, max_aspect]`, `h = round(sqrt(area * aspect))`, `w =
  round(sqrt(area / aspect))` (round half to even, as Python's `round`); the
  block needs `h < H` and `w < W`; its top-left is uniform over the positions
  that fit; it is accepted only if the number of newly masked cells is in
  `(0, cap]`. The first accepted attempt ends the pass. The result never
  exceeds `num_masking_patches` and is a union of rectangles.

  Args:
    grid: `(H, W)` patches.
    num_masking_patches: target number of masked patches (DV: 120 of 196).
    min_num_patches: smallest block area drawn (DV:
      `--min_mask_patches_per_block 16`).
    max_num_patches: largest block area; `None` means `num_masking_patches`
      (DV passes 196, which is equivalent since the cap never exceeds the
      remaining count).
    min_aspect: smallest aspect ratio h/w.
    max_aspect: largest aspect ratio; `None` means `1 / min_aspect`.
    rng: numpy generator.

  Returns:
    bool `[H, W]`, `True` = masked.

  Raises:
    ValueError: on bad arguments.

  References:
    Bao et al., "BEiT", 2021, §2.5, Algorithm 1; Baevski et al., "data2vec",
    2022, §3.2 and §4.1 (60% of patches). Official code: data2vec_vision
    `beit/masking_generator.py` (`MaskingGenerator`).
  """
  height, width = (int(g) for g in grid)
  if height < 1 or width < 1:
    raise ValueError(f"grid must be positive, got {grid}")
  if not 1 <= num_masking_patches < height * width:
    raise ValueError(
      f"num_masking_patches must be in [1, {height * width}), got "
      f"{num_masking_patches}"
    )
  if min_num_patches < 1:
    raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
  if max_num_patches is None:
    max_num_patches = num_masking_patches
  if max_num_patches < 1:
    raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")
  if min_aspect <= 0:
    raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
  if max_aspect is None:
    max_aspect = 1.0 / min_aspect
  if max_aspect < min_aspect:
    raise ValueError(
      f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})"
    )
  log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)

  mask = np.zeros((height, width), dtype=bool)
  count = 0
  while count < num_masking_patches:
    cap = min(num_masking_patches - count, max_num_patches)
    added = 0
    for _ in range(10):
      # Written out rather than rng.uniform(lo, hi): late passes have
      # cap < min_num_patches, where BEiT's random.uniform still samples
      # between the two bounds.
      area = min_num_patches + (cap - min_num_patches) * rng.random()
      aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
      h = round(math.sqrt(area * aspect))
      w = round(math.sqrt(area / aspect))
      if h >= height or w >= width:
        continue
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      block = mask[top : top + h, left : left + w]
      new = h * w - int(block.sum())
      if 0 < new <= cap:
        block[...] = True
        added = new
        break
    if added == 0:
      break
    count += added
  return mask


def block_masks(
  batch: int,
  grid: tuple[int, int] = (14, 14),
  *,
  num_masking_patches: int = 120,
  min_num_patches: int = 16,
  max_num_patches: int | None = None,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  rng: np.random.Generator,
) -> np.ndarray:
  """A batch of independent `block_mask`s, flattened row-major.

  Args:
    batch: number of masks B.
    grid: `(H, W)` patches; the other arguments are as for `block_mask`.
    rng: numpy generator, shared by the B draws.

  Returns:
    bool `[B, H * W]`; index `r * W + c` is patch row r, column c (the
    order of ViT's flattened patch sequence).

  References:
    As `block_mask`.
  """
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got {batch}")
  masks = np.stack(
    [
      block_mask(
        grid,
        num_masking_patches=num_masking_patches,
        min_num_patches=min_num_patches,
        max_num_patches=max_num_patches,
        min_aspect=min_aspect,
        max_aspect=max_aspect,
        rng=rng,
      ).reshape(-1)
      for _ in range(batch)
    ]
  )
  check_mask(masks, name="block_masks")
  return masks


def _token_rows(tokens: np.ndarray) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
      f"tokens must be an integer [B, T] array, got {tokens.dtype} "
      f"{tokens.shape}"
    )
  return tokens


def text_span_mask(
  tokens: np.ndarray,
  *,
  mask_prob: float = 0.35,
  mask_multiple_length: int = 4,
  rng: np.random.Generator,
  pad_id: int = 1,
  special_ids: Sequence[int] = (),
) -> np.ndarray:
  """Span masking of the released data2vec text config.

  Per sequence of `sz` maskable tokens: `n = floor(mask_prob * sz /
  mask_multiple_length + u)`, `u ~ U[0, 1)`; `n` distinct starts uniformly
  from all `sz` positions; each start masks itself and the next
  `mask_multiple_length - 1` tokens, clipped at the end of the sequence,
  overlaps merged. There is no minimum: very short sequences may get no mask,
  as in the official code (its loss is normalised over the batch).

  The official code runs on unpadded items that include `<s>` and `</s>`, so
  those are counted in `sz` and can be masked. That is the default here
  (`special_ids=()`); ids listed in `special_ids` are instead treated like
  padding (neither counted nor masked).

  Args:
    tokens: int `[B, T]`.
    mask_prob: in [0, 1); 0.35 in the released config.
    mask_multiple_length: span length; 4 in the released config.
    rng: numpy generator.
    pad_id: padding id (never masked, not counted).
    special_ids: ids excluded like padding; empty = official behaviour.

  Returns:
    bool `[B, T]`, `True` = masked.

  Raises:
    ValueError: on bad arguments.

  References:
    Baevski et al., "data2vec", 2022, §4.3 (which describes BERT masking;
    the released config uses these spans). Official code: fairseq
    `data/mask_tokens_dataset.py` (`MaskTokensDataset` with
    `mask_multiple_length=4`, `mask_prob=0.35`), config
    `examples/data2vec/config/text/pretraining/base.yaml`.
  """
  tokens = _token_rows(tokens)
  _check_prob(mask_prob, "mask_prob")
  if mask_multiple_length < 1:
    raise ValueError(
      f"mask_multiple_length must be >= 1, got {mask_multiple_length}"
    )
  excluded = (tokens == pad_id) | np.isin(tokens, list(special_ids))
  batch, width = tokens.shape
  lengths = width - excluded.sum(axis=1)
  num_spans = np.floor(
    mask_prob * lengths / float(mask_multiple_length) + rng.random(batch)
  ).astype(np.int64)
  # n <= sz already holds since mask_prob < 1; the clip guards sz = 0.
  num_spans = np.minimum(num_spans, lengths)
  starts, valid = _span_starts(lengths, num_spans, rng)
  mask = _spans_to_mask(starts, valid, mask_multiple_length, lengths, width)
  return _expand(mask, excluded)


def apply_text_mask(
  tokens: np.ndarray,
  mask: np.ndarray,
  *,
  mask_id: int,
  rng: np.random.Generator,
  vocab_size: int,
  leave_unmasked_prob: float = 0.0,
  random_token_prob: float = 0.0,
  special_ids: Sequence[int] = (0, 1, 2, 3),
) -> np.ndarray:
  """Corrupts the selected tokens: `<mask>`, or BERT's 80/10/10.

  Each selected position is, independently, left unchanged with probability
  `leave_unmasked_prob`, replaced by a uniformly random ordinary token with
  probability `random_token_prob`, and otherwise replaced by `mask_id`. The
  released data2vec text config uses 0 / 0 (all `<mask>`); BERT uses 0.1 /
  0.1. Note the official data2vec loss is taken at `tokens == <mask>`
  (fairseq issue #4229), so with 80/10/10 it skips the kept and random
  positions; pass the selection `mask` to the loss to train on all of them.

  Args:
    tokens: int `[B, T]`.
    mask: bool `[B, T]` selection, e.g. from `text_span_mask`.
    mask_id: the `<mask>` id (50264 in the RoBERTa dictionary).
    rng: numpy generator.
    vocab_size: random tokens are drawn from `[0, vocab_size)`.
    leave_unmasked_prob: probability a selected token is kept.
    random_token_prob: probability a selected token is randomised.
    special_ids: ids never drawn as random tokens; the default is fairseq's
      four specials `<s>`, `<pad>`, `</s>`, `<unk>`. `mask_id` is excluded
      too (fairseq can draw `<mask>` with probability ~2e-5, which would
      silently turn a "random" token into a loss position).

  Returns:
    int `[B, T]` corrupted tokens, same dtype as `tokens`.

  Raises:
    ValueError: on bad arguments.

  References:
    Devlin et al., "BERT", 2019, §3.1; Baevski et al., "data2vec", 2022,
    §4.3. Official code: fairseq `data/mask_tokens_dataset.py` (one
    draw for "random or unmask", then one for which of the two).
  """
  tokens = _token_rows(tokens)
  mask = np.asarray(mask)
  if mask.dtype != np.bool_ or mask.shape != tokens.shape:
    raise ValueError(
      f"mask must be boolean with shape {tokens.shape}, got {mask.dtype} "
      f"{mask.shape}"
    )
  for value, name in (
    (leave_unmasked_prob, "leave_unmasked_prob"),
    (random_token_prob, "random_token_prob"),
  ):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {value}")
  if leave_unmasked_prob + random_token_prob > 1.0:
    raise ValueError(
      "leave_unmasked_prob + random_token_prob must be <= 1, got "
      f"{leave_unmasked_prob + random_token_prob}"
    )
  if not 0 <= mask_id < vocab_size:
    raise ValueError(f"mask_id {mask_id} is outside [0, {vocab_size})")

  out = tokens.copy()
  out[mask] = mask_id
  either = leave_unmasked_prob + random_token_prob
  if either == 0.0:
    return out
  # Same decomposition as fairseq: one coin for "keep or randomise", then a
  # second coin splitting the two with probability keep / (keep + random).
  other = mask & (rng.random(mask.shape) < either)
  keep = other & (rng.random(mask.shape) < leave_unmasked_prob / either)
  randomise = other & ~keep
  out[keep] = tokens[keep]
  num_random = int(randomise.sum())
  if num_random:
    banned = np.asarray([*special_ids, mask_id])
    allowed = np.setdiff1d(np.arange(vocab_size), banned)
    if allowed.size == 0:
      raise ValueError("special_ids and mask_id leave no token to draw")
    out[randomise] = rng.choice(allowed, size=num_random)
  return out


def bert_mask(
  tokens: np.ndarray,
  *,
  mask_prob: float = 0.15,
  rng: np.random.Generator,
  pad_id: int = 1,
  special_ids: Sequence[int] = (0, 2),
) -> np.ndarray:
  """The paper's BERT selection: each ordinary token with prob `mask_prob`.

  Padding and `special_ids` are never selected. A row whose draw selects
  nothing gets one uniformly random ordinary token, so every row has a loss
  position. (fairseq's RoBERTa path instead draws `floor(p * sz + u)`
  positions including specials; that is `text_span_mask` with
  `mask_multiple_length=1`.) Combine with `apply_text_mask(...,
  leave_unmasked_prob=0.1, random_token_prob=0.1)` for 80/10/10.

  Args:
    tokens: int `[B, T]`.
    mask_prob: selection probability, in [0, 1).
    rng: numpy generator.
    pad_id: padding id.
    special_ids: ids never selected (`<s>`, `</s>` by default).

  Returns:
    bool `[B, T]`, `True` = selected.

  Raises:
    ValueError: on bad arguments or a row without any ordinary token.

  References:
    Devlin et al., "BERT", 2019, §3.1; Baevski et al., "data2vec", 2022,
    §4.3 ("BERT masking ... 15% of tokens").
  """
  tokens = _token_rows(tokens)
  _check_prob(mask_prob, "mask_prob")
  eligible = (tokens != pad_id) & ~np.isin(tokens, list(special_ids))
  bare = np.flatnonzero(~eligible.any(axis=1))
  if bare.size:
    raise ValueError(f"tokens row {bare[0]} has no maskable (ordinary) token")
  mask = eligible & (rng.random(tokens.shape) < mask_prob)
  empty = ~mask.any(axis=1)
  if empty.any():
    mask |= empty[:, None] & (_random_ranks(eligible, rng) == 0)
  return mask
