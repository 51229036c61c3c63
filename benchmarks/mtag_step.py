"""MTAG train and eval step time and memory, per MTGAT backend.

One batch of 32 MOSI-sized graphs (fixed seed; text U[5, 50], audio
U[50, 375], vision U[50, 500] frames; feature sizes 20/300/5) through the
run.sh model (hidden 64, 4 heads, 6 layers, keep 0.8, batch-scope pruning):
compile time, median steady-state step time, graphs per second and peak
memory of the train step (forward, backward, AdamW update) and of the eval
step; then how many times a 50-batch epoch of varied lengths compiles.
With `--loop_batches=N`, N train steps on fresh batches, built in the loop
and then ahead on a background thread (`experiments.runtime.prefetch`).

Each backend and mode runs in its own subprocess so that peak RSS
(`resource.getrusage`, the whole process: batch, parameters, compilation)
belongs to it alone. One JSON line per measurement:

  python -m benchmarks.mtag_step --backends=dense
  python -m benchmarks.mtag_step --backends=segment --modes=eval --steps=2
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import accel

LENGTHS = {"vision": (50, 500), "text": (5, 50), "audio": (50, 375)}


def make_samples(rng, num, config):
  """`num` random samples with MOSI-like lengths (all modalities present)."""
  from mtagjax.batching import Sample

  out = []
  for _ in range(num):
    feats = []
    for name, dim in zip(config.modalities, config.feature_dims, strict=True):
      lo, hi = LENGTHS[name]
      n = int(rng.integers(lo, hi + 1))
      feats.append(rng.standard_normal((n, dim)).astype(np.float32))
    out.append(Sample(feats, label=float(rng.uniform(-3, 3))))
  return out


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _shapes(batch) -> dict:
  import jax

  from mtagjax.batching import DenseBatch

  g = batch.graph
  out = dict(
    graphs=batch.num_graphs,
    nodes=int(np.asarray(g.nodes["mask"]).sum()),
    node_budget=int(np.asarray(g.nodes["mask"]).shape[-1]),
  )
  if isinstance(batch, DenseBatch):
    out["edges"] = batch.num_edges
    # Per group: graph slots, then the node budget of each modality.
    out["dense_groups"] = [
      [int(grp.graph.shape[1]), *(int(r.shape[-1]) for r in grp.rows)]
      for grp in batch.groups
    ]
    out["dense_entries"] = batch.num_entries
  else:
    out["edges"] = int(np.asarray(g.edges["mask"]).sum())
    out["edge_budget"] = int(g.edges["mask"].shape[-1])
  out["batch_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(batch)))
  return out


def _time(fn, steps):
  times = []
  out = None
  for _ in range(steps):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return out, times


def worker(args) -> None:
  """Measures one backend in this process; prints JSON lines."""
  import jax

  from mtagjax import batching, train
  from mtagjax import config as config_lib
  from mtagjax import model as model_lib

  c = config_lib.default_config()
  c.backend = args.backend
  c.dense_groups = args.dense_groups
  c.dense_remat = not args.no_remat
  model = model_lib.create_model(c)
  rng = np.random.default_rng(args.seed)
  samples = make_samples(rng, args.batch_size, c)
  batcher = batching.GraphBatcher(c, batch_size=args.batch_size)
  start = time.perf_counter()
  batch = batcher(samples)
  host_s = time.perf_counter() - start
  # Parameters do not depend on the batch: init on a tiny one.
  tiny = batching.GraphBatcher(c, batch_size=1)(make_samples(rng, 1, c)[:1])
  tx = train.make_optimizer()
  state = train.create_train_state(jax.random.key(0), model, tiny, tx)
  batch = jax.device_put(batch)
  base = dict(
    device=str(jax.devices()[0].device_kind),
    platform=jax.default_backend(),
    backend=args.backend,
    batch_host_s=round(host_s, 3),
    **_shapes(batch),
  )
  for mode in args.modes.split(","):
    if mode == "train":
      step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
    elif mode == "eval":
      step = jax.jit(functools.partial(train.eval_step, model=model))
    else:
      raise ValueError(f"--modes: unknown mode {mode!r}")
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    call = lambda fn=compiled: jax.block_until_ready(fn(state, batch))
    call()  # first run (allocations, caches)
    _, times = _time(call, args.steps)
    median = statistics.median(times)
    row = dict(
      base,
      mode=mode,
      compile_s=round(compile_s, 2),
      step_ms=round(1e3 * median, 1),
      step_ms_all=[round(1e3 * t, 1) for t in times],
      graphs_per_s=round(base["graphs"] / median, 2),
      peak_rss_mb=round(_peak_rss_mb(), 1),
    )
    device_mb = accel.device_peak_mb()
    if device_mb is not None:
      row["peak_device_mb"] = round(device_mb, 1)
    print(json.dumps(row), flush=True)
  if args.loop_batches and "train" in args.modes.split(","):
    _loop(args, c, model, tx, state)
  if args.epoch_batches:
    _compile_count(args, c, model, state)


def _loop(args, c, model, tx, state) -> None:
  """Train steps with host batch building in the loop vs built ahead.

  `loop_batches` fresh batches of the same size distribution; the batchers'
  budgets are settled on them first, so every timed step has one shape
  (compiled once, before timing) and the difference is the host work.
  """
  import jax

  from experiments.runtime import prefetch
  from mtagjax import batching, train

  rng = np.random.default_rng(args.seed + 2)
  sets = [
    make_samples(rng, args.batch_size, c) for _ in range(args.loop_batches)
  ]
  settle = batching.GraphBatcher(c, batch_size=args.batch_size)
  for samples in sets:
    settle(samples)
  first = jax.device_put(settle(sets[0]))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  compiled = step.lower(state, first).compile()
  for depth in (0, args.prefetch):
    batcher = batching.GraphBatcher(c, batch_size=args.batch_size)
    batcher.budgets = settle.budgets
    if c.backend == "dense":
      batcher.dense_budgets = settle.dense_budgets
    jax.block_until_ready(compiled(state, first))
    s = state
    start = time.perf_counter()
    for batch in prefetch.build_ahead(batcher, sets, depth):
      s, metrics = compiled(s, jax.device_put(batch))
      jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    print(
      json.dumps(
        dict(
          backend=args.backend,
          mode="train_loop",
          prefetch=depth,
          batches=len(sets),
          ms_per_step=round(1e3 * seconds / len(sets), 1),
          graphs_per_s=round(args.batch_size * len(sets) / seconds, 2),
        )
      ),
      flush=True,
    )


def _compile_count(args, c, model, state) -> None:
  """Compilations of the eval forward over an epoch of varied batches."""
  import jax

  from mtagjax import batching

  rng = np.random.default_rng(args.seed + 1)
  batcher = batching.GraphBatcher(c, batch_size=args.batch_size)
  signatures = []
  host = 0.0
  for _ in range(args.epoch_batches):
    # Varied batch sizes too: the last batch of an epoch is smaller.
    num = int(rng.integers(args.batch_size // 2, args.batch_size + 1))
    start = time.perf_counter()
    batch = batcher(make_samples(rng, num, c))
    host += time.perf_counter() - start
    signatures.append(
      tuple((x.shape, x.dtype.str) for x in jax.tree.leaves(batch))
    )
  print(
    json.dumps(
      dict(
        backend=args.backend,
        mode="epoch_compiles",
        batches=args.epoch_batches,
        compiles=len(set(signatures)),
        first_compile_at=[
          i for i, s in enumerate(signatures) if s not in signatures[:i]
        ],
        host_ms_per_batch=round(1e3 * host / args.epoch_batches, 1),
        dense_budgets=(batcher.dense_budgets if c.backend == "dense" else None),
      )
    ),
    flush=True,
  )


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backends", default="dense,segment")
  p.add_argument("--modes", default="train,eval")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dense_groups", type=int, default=8)
  p.add_argument("--no_remat", action="store_true")
  p.add_argument(
    "--epoch_batches",
    type=int,
    default=50,
    help="batches of the compile-count epoch (0: skip)",
  )
  p.add_argument(
    "--loop_batches",
    type=int,
    default=0,
    help="train steps timed with batches built in the loop and ahead",
  )
  p.add_argument(
    "--prefetch", type=int, default=2, help="build-ahead depth for the loop"
  )
  p.add_argument("--backend", help=argparse.SUPPRESS)  # worker mode
  args = p.parse_args(argv)
  if args.backend:
    worker(args)
    return
  # One process per backend and mode, so that each peak RSS is its own.
  passed = [
    a
    for a in (sys.argv[1:] if argv is None else argv)
    if not a.startswith(("--backends", "--modes", "--epoch_batches"))
  ]
  for backend in args.backends.split(","):
    modes = args.modes.split(",")
    for i, mode in enumerate(modes):
      epoch = args.epoch_batches if i == len(modes) - 1 else 0
      cmd = [sys.executable, "-m", "benchmarks.mtag_step"]
      cmd += [f"--backend={backend}", f"--modes={mode}"]
      cmd += [f"--epoch_batches={epoch}", *passed]
      subprocess.run(cmd, check=True)


if __name__ == "__main__":
  main()
