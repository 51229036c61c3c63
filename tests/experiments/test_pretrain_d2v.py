"""data2vec pretraining end to end: tiny runs, resume, devices, fsdp."""

import os
import signal

import jax
import numpy as np
import pytest

from experiments import pretrain_d2v
from experiments.configs import d2v_audio, d2v_text, d2v_vision
from experiments.data import pretrain_batches
from experiments.runtime import distributed, writers
from experiments.tasks import pretrain as pretrain_task
from tests.helpers import sigterm_at, train_losses

CONFIGS = {"audio": d2v_audio, "vision": d2v_vision, "text": d2v_text}
METRICS = (
  "train/loss",
  "train/ema_decay",
  "train/target_var",
  "train/pred_var",
  "train/grad_norm",
  "train/learning_rate",
)


def _config(modality="vision", **train):
  c = CONFIGS[modality].get_config("tiny")
  c.mesh.data = 1
  for k, v in train.items():
    setattr(c.train, k, v)
  return c


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return writers.read_jsonl(path, dedupe=True)


pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vision"))
  state = pretrain_d2v.run(_config(), workdir)
  return workdir, state


def _check_finished_run(workdir, state, steps):
  assert int(state.step) == steps
  records = _records(workdir)
  assert [r["step"] for r in records] == list(range(1, steps + 1))
  for record in records:
    for name in METRICS:
      assert np.isfinite(record[name]), (name, record)
  assert os.listdir(os.path.join(workdir, "checkpoints"))


def test_vision_tiny_runs_and_logs_finite_metrics(vision_run):
  workdir, state = vision_run
  _check_finished_run(workdir, state, 6)
  # The EMA anneals 0.99 -> 0.999 over 10 updates; update k uses d(k).
  decays = [r["train/ema_decay"] for r in _records(workdir)]
  np.testing.assert_allclose(decays[:2], [0.9909, 0.9918], rtol=1e-6)


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_tiny_runs_and_logs_finite_metrics(modality, tmp_path):
  state = pretrain_d2v.run(_config(modality), str(tmp_path))
  _check_finished_run(str(tmp_path), state, 6)


def test_resume_reproduces_the_uninterruptedtrain_losses(vision_run, tmp_path):
  full, _ = vision_run
  workdir = str(tmp_path)
  stopped = pretrain_d2v.run(_config(stop_after_steps=2), workdir)
  assert int(stopped.step) == 2
  pretrain_d2v.run(_config(), workdir)
  assert train_losses(workdir) == train_losses(full)  # bit for bit


def test_sigterm_checkpoints_and_resumes(vision_run, tmp_path):
  full, _ = vision_run
  workdir = str(tmp_path)
  before = signal.getsignal(signal.SIGTERM)
  with sigterm_at(3):
    stopped = pretrain_d2v.run(_config(), workdir)
  assert int(stopped.step) == 3
  assert signal.getsignal(signal.SIGTERM) == before  # handler removed
  pretrain_d2v.run(_config(), workdir)
  assert train_losses(workdir) == train_losses(full)  # bit for bit


def test_eight_devices_match_one_device(vision_run, tmp_path):
  assert len(jax.devices()) == 8
  full, _ = vision_run
  c = _config()
  c.mesh.data = 8
  pretrain_d2v.run(c, str(tmp_path))
  one, eight = train_losses(full), train_losses(str(tmp_path))
  assert one.keys() == eight.keys()
  np.testing.assert_allclose(
    list(eight.values()), list(one.values()), rtol=1e-5
  )


def test_fsdp_shards_parameters(tmp_path):
  c = _config(steps=2)
  c.mesh.data, c.mesh.fsdp = 4, 2
  state = pretrain_d2v.run(c, str(tmp_path))
  kernel = state.params["encoder"]["encoder"]["layers_0"]["fc1"]["kernel"]
  assert kernel.shape == (16, 32)
  assert tuple(kernel.sharding.spec) == (None, "fsdp")
  # Teacher copies and Adam moments are laid out like the parameters.
  for leaf in jax.tree.leaves(state):
    if leaf.ndim >= 2:
      assert "fsdp" in tuple(leaf.sharding.spec), leaf.shape
  assert all(np.isfinite(v) for v in train_losses(str(tmp_path)).values())


def test_fsdp_that_does_not_divide_a_parameter_fails_at_start(tmp_path):
  c = _config("text")
  c.mesh.fsdp = 4  # the 50-row token embedding does not split in four
  with pytest.raises(ValueError, match=r"word_embeddings.*\(50, 16\).*fsdp=4"):
    pretrain_d2v.run(c, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_batch_that_does_not_divide_fails_at_start(tmp_path):
  c = _config(batch_size=12)
  c.mesh.data = 8
  with pytest.raises(ValueError, match="config.train.batch_size=12"):
    pretrain_d2v.run(c, str(tmp_path))


def test_batches_depend_only_on_seed_and_step():
  c = _config("text")
  whole = pretrain_batches.batch_at(c, 5)
  part = pretrain_batches.batch_at(c, 5, rows=(3, 7))
  for name, value in whole.items():
    np.testing.assert_array_equal(value[3:7], part[name])
  again = pretrain_batches.batch_at(c, 5)
  other = pretrain_batches.batch_at(c, 6)
  np.testing.assert_array_equal(whole["inputs"], again["inputs"])
  assert not np.array_equal(whole["inputs"], other["inputs"])
  # Masked tokens are <mask> in the input and the original id in the target.
  mask = whole["mask"]
  assert (whole["inputs"][mask] == c.mask.mask_id).all()
  assert (whole["inputs"][~mask] == whole["targets_ids"][~mask]).all()
  # BERT style: 80/10/10, so some selected tokens are not <mask>; <s>,
  # </s> and padding are never selected.
  c.mask.style = "bert"
  bert = pretrain_batches.batch_at(c, 5)
  selected = bert["inputs"][bert["mask"]]
  assert 0 < (selected == c.mask.mask_id).mean() < 1
  assert not np.isin(bert["targets_ids"][bert["mask"]], (0, 1, 2)).any()


def test_base_configs_follow_the_recipes():
  a = d2v_audio.get_config("base")
  assert a.optim.peak_lr == 5e-4 and a.mask.mask_prob == 0.65
  assert a.mask.mask_length == 10 and a.model.top_k == 8
  assert (a.ema.start, a.ema.end, a.ema.anneal_steps) == (0.999, 0.9999, 30000)
  v = d2v_vision.get_config("base")
  assert v.ema.start == v.ema.end == 0.9998
  assert v.mask.num_masking_patches == 120
  assert (v.model.image_size // v.model.patch_size) ** 2 == 196
  assert v.optim.peak_lr == 2e-3 and v.optim.clip_norm == 3.0
  t = d2v_text.get_config("base")
  assert t.optim.peak_lr == 2e-4 and t.mask.span_length == 4
  assert t.mask.style == "span" and t.model.top_k == 10
  assert not t.model.teacher_sees_only_masked
  for module in CONFIGS.values():
    c = module.get_config("base")
    assert c.data.source == "synthetic" and c.mesh.fsdp == 1
    # The encoders build from the config (no parameters are created).
    assert pretrain_task.create_model(c).modality == c.modality
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("large")


def test_distributed_start_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(
    jax.distributed, "initialize", lambda **kw: calls.append(kw)
  )
  assert not distributed.maybe_initialize_distributed({})
  assert not distributed.maybe_initialize_distributed({"SLURM_NTASKS": "1"})
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "2",
    "JAX_PROCESS_ID": "1",
  }
  assert distributed.maybe_initialize_distributed(env)
  assert calls == [{"num_processes": 2, "process_id": 1}]
