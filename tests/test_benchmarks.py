"""The model-FLOPs count behind the benchmarks' MFU column."""

import pytest

from benchmarks import accel, d2v_step
from experiments.data import pretrain_batches


def _flops(modality: str, batch: int = 1) -> float:
  case = dict(
    modality=modality,
    size="base",
    dtype="float32",
    remat=False,
    batch=batch,
    audio_seconds=15.0,
  )
  config = d2v_step.make_config(case)
  return accel.d2v_model_flops(config, pretrain_batches.batch_at(config, 0))


def test_vit_base_forward_matches_the_published_count():
  # ViT-B/16 at 224²: 17.56 G multiply-adds per image (DeiT/ViT tables),
  # i.e. 35.1 GFLOP; a pretrain step is four forwards' worth.
  assert _flops("vision") / 4 == pytest.approx(2 * 17.56e9, rel=0.005)


def test_flops_scale_with_the_batch():
  assert _flops("text", batch=2) == pytest.approx(2 * _flops("text"))


def test_utilisation_against_the_datasheet_peak():
  out = accel.utilisation(989e12, 1.0, "NVIDIA H100 80GB HBM3", "bfloat16")
  assert out["mfu"] == pytest.approx(1.0)
  assert "mfu" not in accel.utilisation(1e12, 1.0, "cpu", "float32")
