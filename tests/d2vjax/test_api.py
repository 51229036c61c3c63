"""The public surface of `d2vjax`: every exported name resolves, cheaply."""

import subprocess
import sys

import pytest

import d2vjax


def test_every_public_name_resolves():
  assert len(set(d2vjax.__all__)) == len(d2vjax.__all__)
  for name in d2vjax.__all__:
    assert getattr(d2vjax, name) is not None, name


def test_reexports_are_the_submodules_objects():
  assert d2vjax.AudioEncoder is d2vjax.audio.AudioEncoder
  assert d2vjax.pretrain_step is d2vjax.pretrain.pretrain_step
  assert d2vjax.load_hf_checkpoint is d2vjax.convert.load_hf_checkpoint
  assert d2vjax.save_hf_checkpoint is d2vjax.hf_export.save_hf_checkpoint
  assert d2vjax.block_masks is d2vjax.masking.block_masks


def test_import_is_cheap_and_acyclic():
  # A fresh interpreter: importing the package runs its `__init__` first,
  # whichever submodule is asked for, so one import covers every cycle.
  code = (
    "import sys, d2vjax\n"
    "heavy = ('scipy', 'soundfile', 'torch', 'd2vjax.datasets')\n"
    "print(sorted(m for m in heavy if m in sys.modules))\n"
    "import d2vjax.datasets.audio\n"
    "print(d2vjax.datasets.audio.__name__)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  ).stdout.split()
  assert out == ["[]", "d2vjax.datasets.audio"]


def test_unknown_attribute_raises():
  with pytest.raises(AttributeError, match="no_such_name"):
    d2vjax.no_such_name  # noqa: B018
