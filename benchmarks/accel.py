"""Accelerator facts for the benchmark lines: FLOPs, peak memory, MFU.

`step_flops` is what XLA's cost analysis counts for one compiled step
(every matmul, convolution and elementwise op of forward, backward and
update), so an MFU from it counts the work the program really does,
recomputation included. XLA counts the body of a loop once, so this
undercounts programs that scan over layers (the dense MTGAT stack); the
data2vec encoders are unrolled. `PEAK_TFLOPS` holds the datasheet dense rates
of the accelerators the benchmarks have been run on; pass
`--peak_tflops` to use a measured ceiling instead.
"""

from __future__ import annotations

# Dense (no sparsity) datasheet rates, TFLOP/s. float32 matmuls on these
# GPUs run on the tensor cores as TF32 under JAX's default precision.
PEAK_TFLOPS = {
  "H100": {"bfloat16": 989.0, "float32": 494.0},
  "H200": {"bfloat16": 989.0, "float32": 494.0},
  "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def step_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled jax function (XLA's count), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(cost, list | tuple):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The datasheet dense rate for `device_kind`, or None if unknown."""
  for name, rates in PEAK_TFLOPS.items():
    if name in device_kind:
      return rates.get(dtype)
  return None


def device_peak_mb() -> float | None:
  """Peak bytes in use on the first device (accelerators only), in MB."""
  import jax

  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def utilisation(
  flops: float | None,
  step_s: float,
  device_kind: str,
  dtype: str,
  peak: float | None = None,
) -> dict:
  """Achieved TFLOP/s and MFU against `peak` (or the datasheet) rate."""
  if not flops or step_s <= 0:
    return {}
  achieved = flops / step_s / 1e12
  out = dict(gflop_per_step=round(flops / 1e9, 3), tflops=round(achieved, 3))
  peak = peak or peak_tflops(device_kind, dtype)
  if peak:
    out.update(peak_tflops=peak, mfu=round(achieved / peak, 4))
  return out
