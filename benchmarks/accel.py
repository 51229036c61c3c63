"""Accelerator facts for the benchmark lines: model FLOPs, peak memory, MFU.

MFU here is *model* FLOPs utilisation: `d2v_model_flops` counts the
matmuls and convolutions a data2vec pretrain step needs (teacher forward
once, student forward and backward as three forwards; recomputation,
elementwise ops, the regression head and the optimizer are not counted),
divided by the step time and the accelerator's peak rate. XLA's own cost
analysis is no substitute: on GPU it does not count the cuBLAS/cuDNN
calls that hold most of the work, and it counts a loop body once.
`PEAK_TFLOPS` holds the datasheet dense rates of the accelerators the
benchmarks have been run on; pass `--peak_tflops` for a measured ceiling.
"""

from __future__ import annotations

# glibc malloc settings for CPU runs. XLA:CPU allocates its temporaries on
# every execution; glibc serves large blocks from fresh mmaps that the
# kernel faults in and zeroes page by page, every step (a 15 s speech step:
# 1.27 M page faults, a third of its time). One arena that never returns
# memory to the system and never mmaps lets the next step reuse the pages:
# no faults, at the price of keeping the peak resident. Both frameworks of
# a benchmark process run under it; `--no_malloc_tuning` turns it off.
CPU_MALLOC_TUNABLES = ":".join(
  (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=68719476736",
  )
)

# Dense (no sparsity) datasheet rates, TFLOP/s. float32 matmuls on these
# GPUs run on the tensor cores as TF32 under JAX's default precision.
PEAK_TFLOPS = {
  "H100": {"bfloat16": 989.0, "float32": 494.0},
  "H200": {"bfloat16": 989.0, "float32": 494.0},
  "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def _encoder_flops(m, tokens: int) -> float:
  """Forward FLOPs of the transformer layers over one sequence."""
  d, f = m.hidden, m.mlp_dim
  per_layer = tokens * (8 * d * d + 4 * d * f) + 4 * tokens * tokens * d
  return float(m.num_layers * per_layer)


def d2v_model_flops(config, batch) -> float:
  """Model FLOPs of one data2vec pretrain step on `batch` (see above).

  Every position the batch holds is counted, padding included (it is
  computed); the teacher sees the same positions as the student.
  """
  m = config.model
  size, positions = batch["mask"].shape
  if config.modality == "vision":
    tokens = positions + 1  # the CLS token
    patch = 2 * 3 * m.patch_size**2 * m.hidden * positions
    forward = patch + _encoder_flops(m, tokens)
  elif config.modality == "text":
    forward = _encoder_flops(m, positions)
  else:
    length, channels, forward = batch["inputs"].shape[1], 1, 0.0
    for dim, kernel, stride in m.conv_layers:
      length = (length - kernel) // stride + 1
      forward += 2 * channels * dim * kernel * length
      channels = dim
    forward += 2 * channels * m.hidden * length  # feature projection
    pos_in = m.hidden // m.pos_groups
    forward += m.pos_depth * 2 * length * m.hidden * pos_in * m.pos_kernel_size
    forward += _encoder_flops(m, length)
  return 4.0 * size * forward  # teacher 1x, student forward + backward 3x


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
