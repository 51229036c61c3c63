"""Ridge on frozen features: the penalty picked on valid, the intercept."""

import numpy as np

from experiments.reports import probe


def test_ridge_probe_recovers_a_linear_target_and_picks_on_valid():
  rng = np.random.default_rng(0)
  w = rng.normal(size=6)
  make = lambda n: (x := rng.normal(3.0, 2.0, (n, 6)), x @ w + 5.0)
  splits = {"train": make(400), "valid": make(100), "test": make(100)}
  alpha, preds = probe.ridge_probe(splits, alphas=(1e-3, 1e4))
  # Noise-free: the least penalty wins; predictions match, intercept too.
  assert alpha == 1e-3
  for split, (_, y) in splits.items():
    np.testing.assert_allclose(preds[split], y, atol=1e-3)
  # Noise targets: a penalty of the grid, finite predictions per split.
  noise = {s: (x, rng.normal(size=len(x))) for s, (x, _) in splits.items()}
  alpha, preds = probe.ridge_probe(noise)
  assert alpha in probe.RIDGE_GRID
  assert all(
    np.isfinite(p).all() and p.shape == (len(noise[s][0]),)
    for s, p in preds.items()
  )
