"""data2vec pretrain step time and memory, against HuggingFace PyTorch.

For each modality, size (the `tiny` and `base` variants of
`experiments/configs/d2v_*.py`), remat setting and compute dtype: the
compile time, median steady-state time, items (clips, images, sequences)
per second and peak memory of `d2vjax.pretrain.pretrain_step` (EMA teacher
forward and targets, student forward and backward, optimizer update,
teacher EMA update), on a fixed batch from
`experiments.data.pretrain_batches.batch_at`
(generated data, seed 0). Base speech clips are cut to `--audio_seconds`
(15 s of 16 kHz audio by default; the config's 20 s crops are the
pretraining recipe, not the issue's benchmark).

With `--baseline`, the same batch also goes through the HuggingFace
PyTorch `Data2Vec{Audio,Vision,Text}Model` of the same size (random init,
built from a config, nothing downloaded) doing what data2vec does: a
no-grad forward of an EMA teacher copy over the unmasked input, targets
from its top-K layer outputs (normalised per layer and averaged), a
student forward over the masked input (HF's own mask embedding for audio
and vision, the corrupted ids for text), a regression head, the modality's
loss on the masked positions, backward, gradient clipping where the config
clips, a fused AdamW step and the EMA update of the teacher.
`torch.set_num_threads` is the CPU count. Remat maps to HF gradient
checkpointing and bfloat16 to `torch.autocast`. The baseline line carries
`ratio = torch_step_ms / jax_step_ms` (above 1: JAX is faster).

Each case runs in its own subprocess. JAX compiles and warms up first and
its peak RSS (`VmHWM`: imports, batch, state, compilation) is read before
torch is imported; with `--baseline` the torch models are then built and
warmed up (`rss_growth_mb`: the new peak over the RSS before them), and
then all JAX steps are timed, then all torch steps. With `--alternate`
the timed steps alternate, JAX, torch, JAX, ..., so that both see the same
changing background load (`ratio_pairs`: the median of the per-pair
ratios), at a cost: each framework's first step after the other's is
slower (a 15 s speech step: 10.6 s against 8.2 s). Every JSON line records
the load average at its start and end. Cases run under the glibc malloc
settings of `accel.CPU_MALLOC_TUNABLES` (recorded as `glibc_tunables`;
`--no_malloc_tuning` turns them off): they let both frameworks reuse their
pages from step to step, and they make `rss_growth_mb` meaningless (torch
reuses memory JAX freed).

  python -m benchmarks.d2v_step --sizes=tiny --modalities=vision --steps=2
  python -m benchmarks.d2v_step --sizes=base --modalities=vision,text \
    --dtypes=float32 --baseline --steps=3

torch and transformers come with the optional `bench` extra
(`pip install -e .[bench]`); without `--baseline` they are not imported.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from benchmarks import accel

MODALITIES = ("audio", "vision", "text")
SIZES = ("tiny", "base")
# Per-device batch that a 2-core CPU gets through in seconds, not minutes.
DEFAULT_BATCH = {
  ("audio", "tiny"): 8,
  ("vision", "tiny"): 8,
  ("text", "tiny"): 8,
  ("audio", "base"): 1,
  ("vision", "base"): 2,
  ("text", "base"): 1,
}


def _status_mb(field: str) -> float:
  """`VmHWM` (peak) or `VmRSS` (current) of this process, in MB."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  # No procfs: the lifetime peak is the best there is.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> None:
  """Restarts `VmHWM` from the current RSS (Linux `clear_refs`)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def make_config(case: dict):
  """The pretraining config of a case (modality, size, dtype, remat, batch)."""
  module = importlib.import_module(
    f"experiments.configs.d2v_{case['modality']}"
  )
  c = module.get_config(case["size"])
  c.model.dtype = case["dtype"]
  c.model.remat = case["remat"]
  c.train.batch_size = case["batch"]
  if case["modality"] == "audio" and case["size"] == "base":
    c.data.num_samples = int(round(case["audio_seconds"] * c.data.sample_rate))
  return c


def _shape_info(config, batch) -> dict:
  mask = batch["mask"]
  out = dict(positions=int(mask.shape[1]), masked=int(mask.sum()))
  if config.modality == "audio":
    out["samples"] = int(batch["inputs"].shape[1])
  elif config.modality == "vision":
    out["image"] = int(config.model.image_size)
  else:
    out["tokens"] = int(batch["attention_mask"].sum())
  return out


def _time(call) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def _summary(batch_size: int, times: list[float]) -> dict:
  median = statistics.median(times)
  return dict(
    step_ms=round(1e3 * median, 1),
    step_ms_all=[round(1e3 * t, 1) for t in times],
    items_per_s=round(batch_size / median, 3),
  )


def jax_step(config, batch) -> tuple[Callable[[], None], dict]:
  """Compiles `pretrain_step` for the batch; returns (call, facts)."""
  import jax

  from d2vjax import pretrain
  from experiments.tasks import pretrain as pretrain_task

  model, tx, ema, init = pretrain_task.build(config)
  state = jax.jit(init)(jax.random.key(config.train.seed))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  batch = jax.device_put(batch)
  step = jax.jit(
    functools.partial(pretrain.pretrain_step, model=model, tx=tx, ema=ema),
    donate_argnums=(0,),
  )
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], batch)
    holder["loss"] = float(jax.block_until_ready(metrics)["loss"])

  first = _time(call)
  return call, dict(
    impl="jax",
    device=str(jax.devices()[0].device_kind),
    platform=jax.default_backend(),
    jax=jax.__version__,
    params_m=round(params / 1e6, 2),
    compile_s=round(compile_s, 2),
    first_step_s=round(first, 2),
    loss=round(holder["loss"], 4),
  )


def _hf_encoder(config):
  """The HF `Data2Vec*Model` of the config's size and dropout rates."""
  import transformers

  m = config.model
  common = dict(
    hidden_size=m.hidden,
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.heads,
    intermediate_size=m.mlp_dim,
  )
  if config.modality == "audio":
    dims, kernels, strides = zip(*m.conv_layers, strict=True)
    hf = transformers.Data2VecAudioConfig(
      **common,
      conv_dim=dims,
      conv_kernel=kernels,
      conv_stride=strides,
      conv_pos_kernel_size=m.pos_kernel_size,
      num_conv_pos_embeddings=m.pos_depth,  # HF: stacked layers
      num_conv_pos_embedding_groups=m.pos_groups,
      hidden_dropout=m.dropout_rate,
      attention_dropout=m.attention_dropout_rate,
      activation_dropout=m.activation_dropout_rate,
      feat_proj_dropout=m.feature_dropout_rate,
      layerdrop=m.layerdrop,
      layer_norm_eps=1e-5,
    )
    return transformers.Data2VecAudioModel(hf)
  if config.modality == "vision":
    hf = transformers.Data2VecVisionConfig(
      **common,
      image_size=m.image_size,
      patch_size=m.patch_size,
      use_mask_token=True,
      use_absolute_position_embeddings=False,
      use_relative_position_bias=False,
      use_shared_relative_position_bias=True,
      layer_scale_init_value=m.layer_scale_init,
      drop_path_rate=m.drop_path_rate,
      hidden_dropout_prob=m.dropout_rate,
      attention_probs_dropout_prob=m.attention_dropout_rate,
      layer_norm_eps=m.layer_norm_eps,
      use_mean_pooling=False,  # the final LayerNorm on every token
    )
    return transformers.Data2VecVisionModel(hf, add_pooling_layer=False)
  hf = transformers.Data2VecTextConfig(
    **common,
    vocab_size=m.vocab_size,
    max_position_embeddings=m.max_positions,
    pad_token_id=m.pad_id,
    type_vocab_size=1,
    hidden_dropout_prob=m.dropout_rate,
    attention_probs_dropout_prob=m.attention_dropout_rate,
    layer_norm_eps=1e-5,
  )
  return transformers.Data2VecTextModel(hf, add_pooling_layer=False)


def _torch_targets(hidden_states, modality: str, top_k: int):
  """data2vec targets: top-K layers normalised, averaged (float32)."""
  import torch
  import torch.nn.functional as F

  layers = [h.float() for h in hidden_states[-top_k:]]
  if modality == "vision":
    layers = [h[:, 1:] for h in layers]  # the CLS token is no target
  if modality == "audio":
    normed = [
      F.instance_norm(h.transpose(1, 2)).transpose(1, 2) for h in layers
    ]
  else:
    normed = [F.layer_norm(h, h.shape[-1:]) for h in layers]
  y = torch.stack(normed).mean(0)
  if modality == "vision":
    y = F.layer_norm(y, y.shape[-1:])
  return y


def _torch_loss(pred, y, mask, modality: str):
  """The modality's regression loss on the masked positions (as ours)."""
  import torch.nn.functional as F

  p, t = pred[mask], y[mask]
  if modality == "audio":
    return ((p - t) ** 2).sum(-1).mean() / math.sqrt(p.shape[-1])
  if modality == "text":
    return F.smooth_l1_loss(p, t, beta=4.0, reduction="none").sum(-1).mean()
  return F.smooth_l1_loss(p, t, beta=2.0)


def torch_step(config, batch, remat: bool) -> tuple[Callable[[], None], dict]:
  """The HF PyTorch data2vec step on the batch; returns (call, facts)."""
  import contextlib
  import copy

  import numpy as np
  import torch
  import transformers

  from d2vjax.targets import TARGET_RECIPES

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  # The accelerator when there is one (as JAX uses it), else the CPU.
  device = "cuda" if torch.cuda.is_available() else "cpu"
  modality = config.modality
  encoder = _hf_encoder(config).to(device).train()
  teacher = copy.deepcopy(encoder).eval().requires_grad_(False)
  if remat:
    encoder.gradient_checkpointing_enable(
      gradient_checkpointing_kwargs={"use_reentrant": False}
    )
  c = config.model.hidden
  if modality == "text":
    head = torch.nn.Sequential(
      torch.nn.Linear(c, 2 * c), torch.nn.GELU(), torch.nn.Linear(2 * c, c)
    )
  else:
    head = torch.nn.Linear(c, c)
  head = head.to(device)
  params = [*encoder.parameters(), *head.parameters()]
  opt = torch.optim.AdamW(
    params,
    lr=config.optim.peak_lr,
    weight_decay=config.optim.weight_decay,
    fused=True,
  )
  student_params = list(encoder.parameters())
  teacher_params = list(teacher.parameters())
  top_k = config.model.top_k or TARGET_RECIPES[modality]["top_k"]
  decay = config.ema.start

  def tensor(x):
    return torch.from_numpy(np.asarray(x)).to(device)

  mask = tensor(batch["mask"])
  inputs = tensor(batch["inputs"])
  if modality == "audio":
    student_in = dict(input_values=inputs, mask_time_indices=mask)
    teacher_in = dict(input_values=inputs)
  elif modality == "vision":
    pixels = inputs.permute(0, 3, 1, 2).contiguous()
    student_in = dict(pixel_values=pixels, bool_masked_pos=mask)
    teacher_in = dict(pixel_values=pixels)
  else:
    attention = tensor(batch["attention_mask"])
    student_in = dict(input_ids=inputs.long(), attention_mask=attention)
    teacher_in = dict(
      input_ids=tensor(batch["targets_ids"]).long(),
      attention_mask=attention,
    )
  if config.model.dtype == "bfloat16":
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
  else:
    autocast = contextlib.nullcontext
  holder = {}

  def call():
    with torch.no_grad(), autocast():
      out = teacher(**teacher_in, output_hidden_states=True)
      y = _torch_targets(out.hidden_states, modality, top_k)
    with autocast():
      x = encoder(**student_in).last_hidden_state
      pred = head(x[:, 1:] if modality == "vision" else x)
    loss = _torch_loss(pred.float(), y, mask, modality)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if config.optim.clip_norm:
      torch.nn.utils.clip_grad_norm_(params, config.optim.clip_norm)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(teacher_params, student_params, 1.0 - decay)
    holder["loss"] = float(loss.detach())

  first = _time(call)
  return call, dict(
    impl="torch",
    device=(torch.cuda.get_device_name() if device == "cuda" else "cpu"),
    torch=torch.__version__,
    transformers=transformers.__version__,
    threads=torch.get_num_threads(),
    attn=encoder.config._attn_implementation,
    params_m=round(sum(p.numel() for p in params) / 1e6, 2),
    compile_s=None,  # eager
    first_step_s=round(first, 2),
    loss=round(holder["loss"], 4),
  )


def worker(case: dict) -> None:
  """Measures one case in this process; prints one or two JSON lines.

  JAX compiles and warms up first, and its peak RSS is read then, before
  torch is imported. With the baseline, torch builds its models and warms
  up next (its memory is the growth of the peak over the RSS it started
  from), and then the timed steps run: all JAX steps then all torch steps,
  or alternating with `alternate`.
  """
  from experiments.data import pretrain_batches

  load_start = _load()
  config = make_config(case)
  start = time.perf_counter()
  batch = pretrain_batches.batch_at(config, 0)
  info = dict(case, **_shape_info(config, batch))
  info["batch_host_s"] = round(time.perf_counter() - start, 3)
  info["load_avg_start"] = load_start
  info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
  calls, rows = [], []
  call, facts = jax_step(config, batch)
  calls.append(call)
  rows.append(dict(info, **facts, peak_rss_mb=round(_status_mb("VmHWM"), 1)))
  device_mb = accel.device_peak_mb()
  if device_mb is not None:
    rows[0]["peak_device_mb"] = round(device_mb, 1)
  if case["baseline"]:
    before = _status_mb("VmRSS")
    _reset_peak()
    call, facts = torch_step(config, batch, case["remat"])
    peak = _status_mb("VmHWM")
    calls.append(call)
    rows.append(
      dict(
        info,
        **facts,
        peak_rss_mb=round(peak, 1),  # the process, jax state included
        rss_growth_mb=round(peak - before, 1),
      )
    )
  times = [[] for _ in calls]
  if case.get("alternate"):
    for _ in range(case["steps"]):
      for fn, out in zip(calls, times, strict=True):
        out.append(_time(fn))
  else:
    for fn, out in zip(calls, times, strict=True):
      out.extend(_time(fn) for _ in range(case["steps"]))
  for row, ts in zip(rows, times, strict=True):
    row.update(_summary(config.train.batch_size, ts), load_avg=_load())
  flops = accel.d2v_model_flops(config, batch)
  for row in rows:
    row.update(
      accel.utilisation(
        flops,
        row["step_ms"] / 1e3,
        row["device"],
        case["dtype"],
        case.get("peak_tflops"),
      )
    )
  if len(rows) == 2:
    jax_ms, torch_ms = rows[0]["step_ms"], rows[1]["step_ms"]
    rows[1]["jax_step_ms"] = jax_ms
    rows[1]["ratio"] = round(torch_ms / jax_ms, 3)
    if case.get("alternate"):
      # Per alternating pair: robust to load that changes between pairs.
      rows[1]["ratio_pairs"] = round(
        statistics.median(t / j for j, t in zip(*times, strict=True)), 3
      )
  for row in rows:
    print(json.dumps(row), flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--modalities", default=",".join(MODALITIES))
  p.add_argument("--sizes", default=",".join(SIZES))
  p.add_argument(
    "--remat", default="off", help="comma-separated: off, on (or both)"
  )
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument(
    "--batch",
    type=int,
    default=0,
    help="examples per step for every case; 0 = per modality and size "
    f"({', '.join(f'{m}/{s}={b}' for (m, s), b in DEFAULT_BATCH.items())})",
  )
  p.add_argument("--steps", type=int, default=3, help="timed steps per case")
  p.add_argument(
    "--audio_seconds",
    type=float,
    default=15.0,
    help="clip length of base speech (tiny keeps its 800 samples)",
  )
  p.add_argument(
    "--baseline",
    action="store_true",
    help="also time the HF PyTorch models (needs the bench extra)",
  )
  p.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="the accelerator's peak rate for MFU; 0 = the datasheet table in "
    "benchmarks/accel.py (no MFU on unknown devices)",
  )
  p.add_argument(
    "--alternate",
    action="store_true",
    help="alternate JAX and torch steps (default: all JAX steps, then all "
    "torch steps; alternating evens out changing background load but "
    "slows each framework's first step after the other's)",
  )
  p.add_argument(
    "--no_malloc_tuning",
    action="store_true",
    help="do not set GLIBC_TUNABLES (benchmarks/accel.py) for the cases",
  )
  p.add_argument("--case", help=argparse.SUPPRESS)  # worker mode
  args = p.parse_args(argv)
  if args.case:
    worker(json.loads(args.case))
    return

  def split(text, allowed, flag):
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
      p.error(f"{flag}: {bad or text!r}; use some of {allowed}")
    return items

  modalities = split(args.modalities, MODALITIES, "--modalities")
  sizes = split(args.sizes, SIZES, "--sizes")
  remats = [r == "on" for r in split(args.remat, ("off", "on"), "--remat")]
  dtypes = split(args.dtypes, ("float32", "bfloat16"), "--dtypes")
  # One process per case, so that each peak RSS is its own; see
  # `accel.CPU_MALLOC_TUNABLES` for the allocator settings.
  env = dict(os.environ)
  if not args.no_malloc_tuning:
    env.setdefault("GLIBC_TUNABLES", accel.CPU_MALLOC_TUNABLES)
  for modality in modalities:
    for size in sizes:
      for remat in remats:
        for dtype in dtypes:
          case = dict(
            modality=modality,
            size=size,
            remat=remat,
            dtype=dtype,
            batch=args.batch or DEFAULT_BATCH[modality, size],
            steps=args.steps,
            audio_seconds=args.audio_seconds,
            baseline=args.baseline,
            peak_tflops=args.peak_tflops or None,
            alternate=args.alternate,
          )
          cmd = [sys.executable, "-m", "benchmarks.d2v_step"]
          proc = subprocess.run([*cmd, "--case", json.dumps(case)], env=env)
          if proc.returncode:
            error = f"worker exited with {proc.returncode}"
            print(json.dumps(dict(case, error=error)), flush=True)


if __name__ == "__main__":
  main()
