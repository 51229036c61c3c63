"""data2vec fine-tuning end to end: tiny tasks, inits, resume, SIGTERM."""

import json
import os
import pathlib
import struct
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from d2vjax import convert
from experiments import finetune_d2v, tasks
from experiments.configs import d2v_finetune, d2v_vision
from experiments.runtime import checkpoint as ckpt_lib
from experiments.runtime import driver
from experiments.runtime import mesh as mesh_lib
from experiments.tasks import base, ctc, finetune, pretrain
from tests.helpers import run_records, sigterm_at, train_losses

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "d2v"
TASKS = ("speech", "image", "text")
# Parameters of the converted HF encoder that fine-tuning does not use: the
# pretraining final norm (mean pooling has fc_norm) and the mask token.
_UNUSED_BY_CLASSIFIER = ("norm/scale", "norm/bias", "mask_token")


def _config(task, **train):
  c = d2v_finetune.get_config(f"{task}_tiny")
  c.mesh.data = 1
  for k, v in train.items():
    setattr(c.train, k, v)
  return c


def _mesh(c):
  return mesh_lib.make_mesh(c, c.train.batch_size)


def task_with_encoder(c):
  """The config's task and its encoder, to look at batches without a run."""
  encoder, _ = finetune.load_encoder(c, _mesh(c))
  return tasks.get(c.task)(c, encoder)


pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One uninterrupted run per tiny task, trained once for the module."""
  cache = {}

  def get(task):
    if task not in cache:
      workdir = str(tmp_path_factory.mktemp(task))
      cache[task] = workdir, finetune_d2v.run(_config(task), workdir)
    return cache[task]

  return get


@pytest.mark.parametrize("task", TASKS)
def test_tiny_task_trains_evaluates_and_keeps_the_best(runs, task):
  workdir, state = runs(task)
  c = _config(task)
  assert int(state.step) == c.train.steps
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, c.train.steps + 1))
  assert all(np.isfinite(v) for v in losses.values())
  metric, _ = tasks.create(c).best_metric
  evals = [r for r in run_records(workdir) if metric in r]
  assert [r["step"] for r in evals] == list(
    range(c.train.eval_every, c.train.steps + 1, c.train.eval_every)
  )
  assert all(np.isfinite(r[metric]) for r in evals)
  assert os.listdir(os.path.join(workdir, "best"))
  if task == "speech":
    assert {"eval/valid/cer", "eval/valid/loss"} <= evals[-1].keys()


def test_image_accuracy_beats_chance(runs):
  workdir, _ = runs("image")
  c = _config("image")
  labels = np.concatenate(
    [b["labels"] for b in task_with_encoder(c).valid_batches()]
  )[: c.data.num_valid]
  majority = np.bincount(labels).max() / labels.size
  final = [r for r in run_records(workdir) if "eval/valid/accuracy" in r][-1]
  assert final["eval/valid/accuracy"] >= max(0.7, majority + 0.2)


def test_resume_reproduces_the_uninterrupted_losses(runs, tmp_path):
  full, _ = runs("image")
  workdir = str(tmp_path)
  # Stops after the step-12 evaluation, mid-way to the next one.
  state = finetune_d2v.run(_config("image", stop_after_steps=13), workdir)
  assert int(state.step) == 13
  finetune_d2v.run(_config("image"), workdir)
  assert train_losses(workdir) == train_losses(full)  # bit for bit


def test_sigterm_checkpoints_and_resumes(runs, tmp_path):
  full, _ = runs("image")
  workdir = str(tmp_path)
  with sigterm_at(2):
    state = finetune_d2v.run(_config("image"), workdir)
  assert int(state.step) == 2
  finetune_d2v.run(_config("image"), workdir)
  assert train_losses(workdir) == train_losses(full)


def _adam_count(state, branch):
  multi = next(
    s for s in state.opt_state if isinstance(s, optax.MultiTransformState)
  )
  return int(multi.inner_states[branch].inner_state[0].count)


def test_speech_freezes_the_cnn_and_at_first_the_encoder(runs):
  workdir, state = runs("speech")
  c = _config("speech")
  # The CTC layer trained every step, the rest of the encoder only after
  # the frozen phase: fairseq's per-parameter Adam steps.
  steps, frozen = c.train.steps, c.optim.freeze_finetune_updates
  assert 0 < frozen < steps
  assert _adam_count(state, "proj") == steps
  assert _adam_count(state, "encoder") == steps - frozen
  # Between the checkpoints of steps 4 and 8 everything moved but the CNN.
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    state,
  )
  with ckpt_lib.Checkpointer(
    workdir, c, ignore_fields=base.RESUMABLE_FIELDS
  ) as checkpoints:
    earlier, _, _ = checkpoints.restore(abstract, step=c.train.checkpoint_every)
  before = traverse_util.flatten_dict(jax.device_get(earlier.params))
  after = traverse_util.flatten_dict(jax.device_get(state.params))
  cnn = ("encoder", "front_end", "feature_extractor")
  for key, value in before.items():
    moved = not np.array_equal(value, after[key])
    assert moved != (key[:3] == cnn), key


@pytest.mark.parametrize("task", TASKS)
def test_batches_are_a_function_of_seed_and_step(task):
  c = _config(task)
  task = task_with_encoder(c)
  encoder = task.encoder
  first, again, later = (task.batch_at(step) for step in (3, 3, 4))
  assert first.keys() == again.keys() == later.keys()
  for key, value in first.items():
    np.testing.assert_array_equal(value, again[key], err_msg=key)
  assert any(not np.array_equal(v, later[k]) for k, v in first.items())
  if task == "speech":
    padding = ctc.frame_padding(c, encoder, first["attention_mask"])
    assert padding.any() and first["time_mask"].any()
    assert not (first["time_mask"] & padding).any()
    # fairseq's channel mask: spans over (B, hidden), the same count per row.
    channels = first["channel_mask"]
    assert channels.shape == (c.train.batch_size, encoder.hidden)
    assert channels.any() and not channels.all()
    assert len(set(channels.sum(axis=1))) == 1
    c.mask.mask_channel_prob = 0.0
    assert "channel_mask" not in task.batch_at(3)
  if task == "image":
    np.testing.assert_allclose(first["targets"].sum(axis=-1), 1, rtol=1e-6)


def test_text_regression_labels_and_metric():
  c = _config("text")
  c.model.num_labels = 1
  assert tasks.create(c).best_metric == ("eval/valid/pearson", "max")
  labels = task_with_encoder(c).valid_batches()[0]["labels"]
  assert labels.dtype == np.float32 and labels.std() > 0
  assert 0 <= labels.min() and labels.max() <= 5


# ---------------------------------------------------------------------------
# Initialisation from an HF checkpoint.


def _write_safetensors(path, tensors):
  """A minimal safetensors writer: header length, JSON header, raw bytes."""
  header, chunks, offset = {}, [], 0
  for name, value in tensors.items():
    data = np.ascontiguousarray(value, "<f4").tobytes()
    header[name] = {
      "dtype": "F32",
      "shape": list(value.shape),
      "data_offsets": [offset, offset + len(data)],
    }
    chunks.append(data)
    offset += len(data)
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
  """The tiny HF vision fixture as a checkpoint folder, and its config."""
  folder = tmp_path_factory.mktemp("hf_vision")
  with np.load(FIXTURES / "hf_vision_tiny.npz") as z:
    state_dict = {
      k.removeprefix("param/"): z[k] for k in z.files if k.startswith("param/")
    }
    hf_config = json.loads(str(z["config_json"]))
  _write_safetensors(folder / "model.safetensors", state_dict)
  (folder / "config.json").write_text(json.dumps(hf_config))
  return str(folder), state_dict, hf_config


def test_hf_init_starts_from_the_converted_encoder(hf_vision, tmp_path):
  folder, state_dict, hf_config = hf_vision
  c = _config("image", steps=2, eval_every=2)
  c.init = f"hf:{folder}"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the unused norm and mask token
    task = tasks.create(c)
    task.mesh = task.make_mesh()
    state = task.setup(task.mesh)
    encoder = task.encoder
    _, converted = convert.from_hf(state_dict, hf_config)
  assert encoder.image_size == (32, 32) and not encoder.use_final_norm
  want = traverse_util.flatten_dict(converted, sep="/")
  got = traverse_util.flatten_dict(state.params["encoder"], sep="/")
  assert set(want) - set(got) == set(_UNUSED_BY_CLASSIFIER)
  assert set(got) <= set(want)
  for key, value in got.items():
    np.testing.assert_array_equal(value, want[key], err_msg=key)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    final = finetune_d2v.run(c, str(tmp_path))
  assert int(final.step) == 2
  assert all(np.isfinite(v) for v in train_losses(str(tmp_path)).values())
  assert any("eval/valid/accuracy" in r for r in run_records(str(tmp_path)))


def test_pretrain_and_encoder_init_take_the_student_encoder(tmp_path):
  # Not the pretrain_d2v entry point: its --config flag would clash with
  # other entry points imported in the same test process.
  pretrain_config = d2v_vision.get_config("tiny")
  pretrain_config.mesh.data = 1
  pretrain_config.train.steps = 2
  pretrain_config.train.export_encoder_at = (0.5,)
  work = tmp_path / "pretrain"
  pretrained = driver.run(pretrain.Task(pretrain_config), str(work))
  # The run leaves its final encoder, and the one at half of the run.
  assert (work / "encoder" / "params.msgpack").exists()
  assert (
    json.loads((work / "encoder-1" / "encoder.json").read_text())["metadata"][
      "step"
    ]
    == 1
  )
  want = traverse_util.flatten_dict(
    jax.device_get(pretrained.params["encoder"]), sep="/"
  )
  m = pretrain_config.model
  c = _config("image")
  # From the workdir's checkpoint, or from the saved encoder: the same.
  for init in (f"pretrain:{work}", f"encoder:{work / 'encoder'}"):
    c.init = init
    encoder, params = finetune.load_encoder(c, _mesh(c))
    assert (encoder.hidden, encoder.num_layers) == (m.hidden, m.num_layers)
    assert encoder.drop_path_rate == c.model.overrides.drop_path_rate
    assert not encoder.use_final_norm
    got = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    assert got.keys() == want.keys()
    for key, value in got.items():
      np.testing.assert_array_equal(value, want[key], err_msg=key)


# ---------------------------------------------------------------------------
# Bad configs.


def test_unknown_variant_fails():
  with pytest.raises(ValueError, match="unknown variant 'audio'"):
    d2v_finetune.get_config("audio")
  with pytest.raises(ValueError, match="unknown variant"):
    d2v_finetune.get_config(None)
  assert d2v_finetune.get_config("image:tiny").task == "image_classification"


def test_bad_init_fails_before_training(hf_vision, tmp_path):
  c = _config("text")
  mesh = _mesh(c)
  c.init = "checkpoint:/nowhere"
  with pytest.raises(ValueError, match="config.init"):
    finetune.load_encoder(c, mesh)
  c.init = f"hf:{hf_vision[0]}"
  with pytest.raises(ValueError, match="needs a TextEncoder"):
    finetune.load_encoder(c, mesh)
  c = _config("speech")
  c.data.max_label_length = 4
  with pytest.raises(ValueError, match="max_label_length"):
    finetune_d2v.run(c, str(tmp_path))
