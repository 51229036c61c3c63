"""Fine-tuning data2vec encoders on downstream tasks (data2vec spec §6).

One module per task family, re-exported here:

* `d2vjax.finetune.ctc`: speech recognition with CTC (`CTCModel`,
  `ctc_loss`, `greedy_decode`, `LetterVocab`, `wer`, `cer`,
  `frozen_mask`);
* `d2vjax.finetune.image`: image classification (`ImageClassifier`,
  `layer_decay_multipliers`, `scale_by_layer`,
  `label_smoothing_cross_entropy`, `mixup_cutmix`);
* `d2vjax.finetune.sentence`: GLUE classification and regression
  (`SentenceClassifier`, `classification_loss`);
* `d2vjax.finetune.pretrained`: loading a pretrained encoder
  (`encoder_params_from_pretrained`, `with_pretrained_encoder`).

Each model holds its backbone under the parameter name `encoder`, in the
backbone's own layout, and returns float32 outputs.
"""

from d2vjax.finetune.ctc import (
  LIBRISPEECH_LETTERS,
  CTCModel,
  LetterVocab,
  cer,
  ctc_loss,
  frozen_mask,
  greedy_decode,
  wer,
)
from d2vjax.finetune.image import (
  ImageClassifier,
  label_smoothing_cross_entropy,
  layer_decay_multipliers,
  mixup_cutmix,
  scale_by_layer,
)
from d2vjax.finetune.pretrained import (
  encoder_params_from_pretrained,
  with_pretrained_encoder,
)
from d2vjax.finetune.sentence import SentenceClassifier, classification_loss

__all__ = [
  "LIBRISPEECH_LETTERS",
  "CTCModel",
  "ImageClassifier",
  "LetterVocab",
  "SentenceClassifier",
  "cer",
  "classification_loss",
  "ctc_loss",
  "encoder_params_from_pretrained",
  "frozen_mask",
  "greedy_decode",
  "label_smoothing_cross_entropy",
  "layer_decay_multipliers",
  "mixup_cutmix",
  "scale_by_layer",
  "wer",
  "with_pretrained_encoder",
]
