"""MTAG (Modal-Temporal Attention Graph, NAACL 2021) in JAX.

Quick use::

  import mtagjax
  config = mtagjax.default_config()
  preds = mtagjax.predict(params, config, samples)
"""

from mtagjax.batching import Batch, GraphBatcher, Sample, samples_from_padded
from mtagjax.config import default_config, iemocap_config
from mtagjax.inference import predict
from mtagjax.model import MTAG, create_model

__all__ = [
  "MTAG",
  "Batch",
  "GraphBatcher",
  "Sample",
  "create_model",
  "default_config",
  "iemocap_config",
  "predict",
  "samples_from_padded",
]
