"""The README's main job runs end to end (tiny sizes)."""

import numpy as np

from experiments import quickstart


def test_quickstart_runs_and_reports_every_metric(capsys):
  state, test = quickstart.run(epochs=2, num_train=24, num_eval=16)
  assert set(test) == {
    "mae",
    "corr",
    "acc2",
    "acc2_nonzero",
    "acc7",
    "f1",
    "f1_nonzero",
    "f1_7",
  }
  assert np.isfinite(test["mae"])
  assert int(state.step) > 0
  out = capsys.readouterr().out
  assert "epoch 1:" in out and "compiles" in out
