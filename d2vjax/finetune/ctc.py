"""Speech recognition fine-tuning: a CTC head on the data2vec audio encoder.

Pieces, in the order a fine-tuning loop uses them:

* `LetterVocab` turns transcripts into letter ids in fairseq's dictionary
  order (`<s>` = 0 doubles as the CTC blank);
* `CTCModel` runs the pretrained `AudioEncoder` with its convolutional
  feature extractor frozen and projects every frame to the vocabulary;
* `ctc_loss` is fairseq's CTC criterion (sum per utterance, mean over
  utterances, impossible alignments zeroed);
* `greedy_decode`, `LetterVocab.decode`, `wer` and `cer` score the output.

Time masking during fine-tuning is drawn on the host with
`d2vjax.masking.span_mask` over the encoder's frame grid and passed as
`time_mask`; the encoder's pretrained mask embedding fills the masked frames.
Channel masking (fairseq `mask_channel_prob`) is drawn the same way over
`(B, hidden)` and passed as `channel_mask`: those channels are zeroed at
every frame.

    model = CTCModel(AudioEncoder(...), vocab_size=len(vocab))
    logits, padding = model.apply(
      {"params": params}, wave, attention_mask=am, time_mask=tm, train=True,
      rngs={"dropout": key})
    loss = ctc_loss(logits, padding, labels, labels == vocab.pad_id)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2vjax import audio, speech, tree_util

Array = jax.Array
PyTree = Any

# Letters of fairseq's LibriSpeech `dict.ltr.txt`, in its (frequency) order;
# with the four specials in front they give the 32 CTC outputs.
LIBRISPEECH_LETTERS: tuple[str, ...] = tuple("|ETAONIHSRDLUMWCFGYPBVK'XJQZ")

_FEATURE_EXTRACTOR_PATH = ("encoder", "front_end", "feature_extractor")


def _stop_cnn_gradient(next_fun, args, kwargs, context):
  """Method interceptor: no gradient flows out of the conv extractor."""
  out = next_fun(*args, **kwargs)
  if (
    isinstance(context.module, speech.ConvFeatureExtractor)
    and context.method_name == "__call__"
  ):
    out = jax.lax.stop_gradient(out)
  return out


class CTCModel(nn.Module):
  """data2vec audio encoder with a linear CTC output layer.

  The encoder's parameters keep the `AudioEncoder` layout under `encoder`
  (so pretrained or HF-converted encoder trees drop in unchanged); the
  output layer is `proj/{kernel,bias}`.

  Freezing the CNN (fairseq `feature_grad_mult: 0`): the feature extractor
  is a submodule deep inside `AudioEncoder`'s front end, so this module
  intercepts that submodule's call with `nn.intercept_methods` and wraps
  its output in `jax.lax.stop_gradient`. Gradients w.r.t. the CNN
  parameters are therefore exactly zero and XLA drops the CNN's backward
  pass, while the feature projection, mask embedding, positional
  convolution and Transformer train. Zero gradients still let an optimizer
  with weight decay move the CNN weights (fairseq skips parameters without
  a gradient); the fine-tuning recipes use no weight decay, and
  `frozen_mask` lets an optax chain leave them untouched in any case.

  Channel masking (`mask_channel_prob`) zeroes the `channel_mask` channels
  after the time mask and before the positional convolution, as fairseq
  does (`AudioEncoder`'s `channel_mask`).

  Attributes:
    encoder: the (pretrained) `AudioEncoder`; configure its fine-tuning
      dropouts and LayerDrop on it (spec §6.1: layerdrop 0.1, activation
      dropout 0.1, dropout and attention dropout 0).
    vocab_size: number of CTC outputs, blank included.
    final_dropout: dropout on the encoder output before the projection.
    freeze_feature_extractor: stop gradients at the CNN output.

  References:
    Baevski et al., "data2vec", 2022, section 5.2; Baevski et al.,
    "wav2vec 2.0", 2020, section 4.4; fairseq
    `models/wav2vec/wav2vec2_asr.py` (`Wav2VecEncoder`); data2vec spec §6.1.
  """

  encoder: audio.AudioEncoder
  vocab_size: int
  final_dropout: float = 0.0
  freeze_feature_extractor: bool = True

  @nn.compact
  def __call__(
    self,
    waveform: Array,
    *,
    attention_mask: Array | None = None,
    time_mask: Array | None = None,
    channel_mask: Array | None = None,
    train: bool,
    freeze_encoder: bool = False,
  ) -> tuple[Array, Array]:
    """Frame-level vocabulary logits.

    Args:
      waveform: `[B, samples]` float, normalised per utterance upstream
        (fairseq `normalize: true` is required for data2vec checkpoints).
      attention_mask: `[B, samples]`, 1 = real sample, or None.
      time_mask: `[B, T]` bool over encoder frames, True = replaced by the
        mask embedding (draw it with `d2vjax.masking.span_mask` and the
        frame padding mask; fairseq masks only in training), or None.
      channel_mask: `[B, hidden]` bool, True = channel zeroed at every frame
        after the time mask (`span_mask` over `(B, hidden)`), or None.
      train: enables dropout and LayerDrop (needs a `"dropout"` RNG).
      freeze_encoder: stop all gradients at the encoder output, so only
        `proj` learns (fairseq `freeze_finetune_updates`: use it for the
        first updates; a Python bool, so each value compiles once).

    Returns:
      `(logits [B, T, vocab_size] float32, padding_mask [B, T] bool)`,
      padding True at padded frames.
    """
    # The interceptor cuts the CNN's gradient (see the class docstring).
    frozen_cnn = (
      nn.intercept_methods(_stop_cnn_gradient)
      if self.freeze_feature_extractor
      else contextlib.nullcontext()
    )
    with frozen_cnn:
      x, aux = self.encoder(
        waveform,
        time_mask,
        train,
        attention_mask=attention_mask,
        channel_mask=channel_mask,
      )
    if freeze_encoder:
      x = jax.lax.stop_gradient(x)
    x = nn.Dropout(self.final_dropout)(
      x.astype(jnp.float32), deterministic=not train
    )
    logits = nn.Dense(
      self.vocab_size,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.zeros,
      name="proj",
    )(x)
    return logits, aux["padding_mask"]


def frozen_mask(params: PyTree, *, whole_encoder: bool = False) -> PyTree:
  """Marks the `CTCModel` parameters that fine-tuning leaves unchanged.

  Use it to keep an optimizer (state, weight decay) off frozen weights:

      tx = optax.multi_transform(
        {False: tx, True: optax.set_to_zero()}, frozen_mask(params))

  Args:
    params: a `CTCModel` parameter tree (`encoder`, `proj`).
    whole_encoder: also mark every encoder parameter (fairseq's
      `freeze_finetune_updates` phase, where only `proj` trains).

  Returns:
    A tree of Python bools with the structure of `params`; True = frozen
    (the conv feature extractor, or the whole encoder).
  """
  prefix = _FEATURE_EXTRACTOR_PATH[:1] if whole_encoder else None

  def frozen(path, _):
    names = tree_util.path_names(path)
    if prefix is not None:
      return names[: len(prefix)] == prefix
    return names[: len(_FEATURE_EXTRACTOR_PATH)] == _FEATURE_EXTRACTOR_PATH

  return jax.tree_util.tree_map_with_path(frozen, params)


def _alignable(
  logit_padding: Array, labels: Array, label_padding: Array
) -> Array:
  """Whether each row's label fits into its frames under CTC.

  A label of length L with r adjacent repeats needs L + r frames (a blank
  must separate the repeats).
  """
  frames = jnp.sum(1.0 - logit_padding, axis=-1)
  real = label_padding < 0.5
  length = jnp.sum(real, axis=-1)
  repeats = jnp.sum(
    (labels[:, 1:] == labels[:, :-1]) & real[:, 1:] & real[:, :-1], axis=-1
  )
  return frames >= length + repeats


def ctc_loss(
  logits: Array,
  logit_padding: Array,
  labels: Array,
  label_padding: Array,
  *,
  blank_id: int = 0,
) -> Array:
  """fairseq's CTC criterion: per-utterance sums averaged over utterances.

  `optax.ctc_loss` gives the negative log-likelihood of each utterance
  (already summed over its frames); fairseq reduces with `sum` and divides
  by the number of sentences (`sentence_avg`). Utterances whose label
  cannot be aligned to their frames (too short; PyTorch reports +inf) are
  set to 0 and get zero gradient, as with `zero_infinity=True`; they still
  count in the denominator, as in fairseq.

  Args:
    logits: `[B, T, V]` unnormalised scores (computed in float32).
    logit_padding: `[B, T]` bool or 0/1, True/1 = padded frame.
    labels: `[B, L]` integer label ids, padding at the end of each row.
    label_padding: `[B, L]` bool or 0/1, True/1 = padding.
    blank_id: the blank's index (0: fairseq's `<s>`).

  Returns:
    Scalar float32: mean over the batch of the per-utterance loss.

  References:
    Graves et al., "Connectionist Temporal Classification", ICML 2006;
    fairseq `criterions/ctc.py`; data2vec spec §6.1.
  """
  logits = jnp.asarray(logits, jnp.float32)
  logit_padding = jnp.asarray(logit_padding).astype(jnp.float32)
  label_padding = jnp.asarray(label_padding).astype(jnp.float32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  per_utterance = optax.ctc_loss(
    logits, logit_padding, labels, label_padding, blank_id=blank_id
  )
  # optax keeps impossible paths finite (log_epsilon), so detect them from
  # the lengths rather than by looking for inf.
  ok = _alignable(logit_padding, labels, label_padding)
  ok = ok & jnp.isfinite(per_utterance)
  per_utterance = jnp.where(ok, per_utterance, 0.0)
  return jnp.mean(per_utterance)


def greedy_decode(
  logits: Any, padding_mask: Any | None = None, *, blank_id: int = 0
) -> list[list[int]]:
  """Best-path CTC decoding on the host.

  Per frame the arg-max token, then runs of the same token collapse to one
  and blanks are dropped (so a blank between two equal tokens keeps both).

  Args:
    logits: `[B, T, V]` scores (any array type; moved to numpy).
    padding_mask: `[B, T]` bool, True = padded frame (ignored), or None.
    blank_id: the blank's index.

  Returns:
    One list of token ids per utterance.

  References:
    Graves et al., "Connectionist Temporal Classification", ICML 2006,
    section 3.2 (best path decoding); fairseq `W2lViterbiDecoder`.
  """
  best = np.asarray(logits).argmax(axis=-1)
  if padding_mask is None:
    valid = np.ones(best.shape, bool)
  else:
    valid = ~np.asarray(padding_mask, bool)
  out = []
  for row, keep in zip(best, valid, strict=True):
    collapsed = (token for token, _ in itertools.groupby(row[keep].tolist()))
    out.append([t for t in collapsed if t != blank_id])
  return out


@dataclasses.dataclass(frozen=True)
class LetterVocab:
  """fairseq's letter dictionary for CTC fine-tuning.

  Ids: `<s>` = 0 (the CTC blank), `<pad>` = 1, `</s>` = 2, `<unk>` = 3,
  then `letters` in order (LibriSpeech: `|` = 4, `E` = 5, ...). HF's
  `Wav2Vec2CTCTokenizer` vocabularies swap `<s>` and `<pad>` (blank = pad
  = 0); converting an HF CTC head needs that permutation.

  Attributes:
    letters: the symbols after the specials, including the word separator.
    word_separator: symbol that stands for a space.
    uppercase: upper-case text before encoding (LibriSpeech letters are
      upper case).

  References:
    fairseq `data/dictionary.py` and `examples/wav2vec/libri_labels.py`.
  """

  letters: tuple[str, ...] = LIBRISPEECH_LETTERS
  word_separator: str = "|"
  uppercase: bool = True

  SPECIALS: ClassVar[tuple[str, ...]] = ("<s>", "<pad>", "</s>", "<unk>")
  blank_id: ClassVar[int] = 0
  pad_id: ClassVar[int] = 1
  eos_id: ClassVar[int] = 2
  unk_id: ClassVar[int] = 3

  def __post_init__(self):
    object.__setattr__(self, "letters", tuple(self.letters))
    if self.word_separator not in self.letters:
      raise ValueError(f"word separator {self.word_separator!r} not in letters")
    if len(set(self.letters)) != len(self.letters):
      raise ValueError("letters contain duplicates")

  @classmethod
  def from_dict_file(
    cls, path: str | os.PathLike, **kwargs: Any
  ) -> LetterVocab:
    """Builds the vocabulary of a fairseq `dict.ltr.txt`.

    Args:
      path: the dictionary file, one `SYMBOL COUNT` per line in id order
        (the four specials are implicit, as in fairseq).
      **kwargs: other `LetterVocab` fields.

    Returns:
      The vocabulary.
    """
    with open(path, encoding="utf-8") as f:
      letters = tuple(line.split()[0] for line in f if line.strip())
    return cls(letters=letters, **kwargs)

  @property
  def symbols(self) -> tuple[str, ...]:
    """All symbols in id order."""
    return self.SPECIALS + self.letters

  def __len__(self) -> int:
    return len(self.SPECIALS) + len(self.letters)

  def index(self, symbol: str) -> int:
    """Id of `symbol` (`unk_id` if unknown)."""
    return self._ids().get(symbol, self.unk_id)

  def _ids(self) -> dict[str, int]:
    return {s: i for i, s in enumerate(self.symbols)}

  def encode(self, text: str, *, trailing_separator: bool = True) -> list[int]:
    """Letter ids of `text`: words split on whitespace, `|` between them.

    Args:
      text: a transcript.
      trailing_separator: end with a separator, as fairseq's `.ltr` files
        do (`H E L L O | W O R L D |`).

    Returns:
      List of ids; characters outside the vocabulary map to `<unk>`.
    """
    if self.uppercase:
      text = text.upper()
    words = text.split()
    symbols = list(self.word_separator.join(words))
    if trailing_separator and words:
      symbols.append(self.word_separator)
    ids = self._ids()
    return [ids.get(s, self.unk_id) for s in symbols]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of a letter-id sequence (fairseq's `letter` post-processing).

    Args:
      ids: letter ids, e.g. a `greedy_decode` row.

    Returns:
      The text: `<s>`, `<pad>` and `</s>` dropped, separators turned into
      spaces, runs of spaces collapsed, no leading or trailing space.
    """
    skip = {self.blank_id, self.pad_id, self.eos_id}
    symbols = self.symbols
    text = "".join(symbols[int(i)] for i in ids if int(i) not in skip)
    return " ".join(text.replace(self.word_separator, " ").split())


def _edit_distance(ref: Sequence[Any], hyp: Sequence[Any]) -> int:
  """Levenshtein distance (unit-cost substitutions, insertions, deletions)."""
  row = list(range(len(hyp) + 1))
  for i, r in enumerate(ref, start=1):
    diag, row[0] = row[0], i
    for j, h in enumerate(hyp, start=1):
      diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
  return row[-1]


def _error_rate(refs, hyps, split) -> float:
  if isinstance(refs, str):
    refs = [refs]
  if isinstance(hyps, str):
    hyps = [hyps]
  if len(refs) != len(hyps):
    raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
  errors = total = 0
  for ref, hyp in zip(refs, hyps, strict=True):
    r, h = split(ref), split(hyp)
    errors += _edit_distance(r, h)
    total += len(r)
  if total == 0:
    raise ValueError("the references are empty")
  return errors / total


def wer(refs: Sequence[str] | str, hyps: Sequence[str] | str) -> float:
  """Word error rate: summed word edit distances / summed reference words.

  Args:
    refs: reference transcripts (a single string means one utterance).
    hyps: hypotheses, aligned with `refs`.

  Returns:
    The corpus-level WER as a fraction (may exceed 1).

  References:
    fairseq `examples/speech_recognition/infer.py` (corpus WER).
  """
  return _error_rate(refs, hyps, str.split)


def cer(refs: Sequence[str] | str, hyps: Sequence[str] | str) -> float:
  """Character error rate over whitespace-normalised strings.

  Words are re-joined with single spaces, so spaces count as characters
  (like fairseq's unit error rate over letters including `|`, without the
  trailing separator).

  Args:
    refs: reference transcripts.
    hyps: hypotheses, aligned with `refs`.

  Returns:
    Summed character edit distances / summed reference characters.
  """
  return _error_rate(refs, hyps, lambda s: " ".join(s.split()))
