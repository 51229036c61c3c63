"""Figures of an MTAG run: training curves and a pruned attention graph.

`training_curves` reads the `metrics.jsonl` of one or more runs
(`experiments.mtag_loop.train_and_evaluate`) and draws the train loss per
step beside the valid MAE per epoch. `attention_graph` runs a trained
model on one sample and draws its graph the way MTAG sees it after the
last pruning: one row of nodes per modality, frames spread over the
utterance's relative time, and the cross-modal edges that survive,
coloured by their attention.

Figures are written with matplotlib's Agg backend, so no display is
needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import matplotlib
import ml_collections
import numpy as np

matplotlib.use("Agg")  # files only; must precede pyplot
from matplotlib import cm  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from experiments.runtime import writers  # noqa: E402
from mtagjax import batching  # noqa: E402
from mtagjax import model as model_lib  # noqa: E402

MODALITY_COLOURS = ("tab:green", "tab:blue", "tab:orange", "tab:purple")


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
  """A trailing mean over up to `width` values (shorter at the start)."""
  sums = np.cumsum(np.insert(values, 0, 0.0))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - width, 0)
  return (sums[idx] - sums[lo]) / (idx - lo)


def training_curves(
  runs: Mapping[str, str | os.PathLike], path: str | os.PathLike
) -> None:
  """Draws train loss per step and valid MAE per epoch of several runs.

  Args:
    runs: label -> workdir holding `metrics.jsonl` (`train/loss` and
      `eval/valid/mae` records).
    path: the PNG to write.

  Raises:
    FileNotFoundError: a workdir has no `metrics.jsonl`.
    ValueError: a run logged no train loss.
  """
  fig, (ax_loss, ax_mae) = plt.subplots(1, 2, figsize=(10, 3.8))
  for i, (label, workdir) in enumerate(runs.items()):
    file = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file}: no metrics of run {label!r}")
    records = writers.read_jsonl(file, dedupe=True)
    colour = f"C{i}"
    loss = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    if not loss:
      raise ValueError(f"{file}: run {label!r} logged no train/loss")
    steps, values = np.asarray(loss, np.float64).T
    ax_loss.plot(steps, values, color=colour, alpha=0.25, lw=0.8)
    width = max(1, len(values) // 20)
    ax_loss.plot(
      steps,
      _smooth(values, width),
      color=colour,
      label=label,
      marker="o" if len(values) < 3 else None,
    )
    mae = [
      (r["step"], r["eval/valid/mae"])
      for r in records
      if r.get("eval/valid/mae") is not None
    ]
    if mae:
      steps, values = np.asarray(mae, np.float64).T
      ax_mae.plot(steps, values, "o-", color=colour, label=label)
  ax_loss.set(xlabel="step", ylabel="train loss (normalised SmoothL1)")
  ax_loss.set_title("train loss (faint: per step; solid: running mean)")
  ax_mae.set(xlabel="step", ylabel="valid MAE", title="valid MAE per epoch")
  for ax in (ax_loss, ax_mae):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def graph_attention(
  params: dict,
  config: ml_collections.ConfigDict,
  sample: batching.Sample,
) -> dict[str, np.ndarray]:
  """The nodes and surviving edges of one sample after the last pruning.

  Runs the model (segment backend, eval mode) on a batch holding only
  `sample`.

  Args:
    params: the model's variables (`{"params": ..., **constants}`).
    config: the model config (`config.model` of the run).
    sample: one `mtagjax.Sample`.

  Returns:
    `modality` and `index` (frame within its modality) per real node;
    `senders`, `receivers` (node ids into those arrays), `attention`
    (last layer, mean over heads) and `cross` (sender and receiver of
    different modalities) per edge alive after the last pruning; and
    `num_edges`, `num_cross`, the real edges and cross-modal edges the
    graph started with.
  """
  config = config.copy_and_resolve_references()
  config.backend = "segment"
  batcher = batching.GraphBatcher(
    config, batch_size=1, num_shards=1, sticky_budgets=False
  )
  batch = batcher([sample])
  model = model_lib.create_model(config)
  _, aux = jax.jit(lambda v, b: model.apply(v, b, train=False))(params, batch)
  g = jax.tree.map(lambda a: np.asarray(a)[0], batch.graph)  # shard 0
  real = np.asarray(g.nodes["mask"], bool)
  modality = np.asarray(g.nodes["modality"])
  # Real frames come first in each modality's block, in time order.
  index = np.zeros(len(modality), np.int64)
  for m in np.unique(modality[real]):
    rows = np.flatnonzero(real & (modality == m))
    index[rows] = np.arange(len(rows))
  new_id = np.cumsum(real) - 1
  senders, receivers = np.asarray(g.senders), np.asarray(g.receivers)
  first = np.asarray(aux["edge_mask"])[0, 0].astype(bool)
  alive = np.asarray(aux["edge_mask"])[-1, 0].astype(bool)
  attention = np.asarray(aux["attention"])[-1, 0].mean(-1)
  cross = modality[senders] != modality[receivers]
  return {
    "modality": modality[real],
    "index": index[real],
    "senders": new_id[senders[alive]],
    "receivers": new_id[receivers[alive]],
    "attention": attention[alive].astype(np.float64),
    "cross": cross[alive],
    "num_edges": int(first.sum()),
    "num_cross": int((first & cross).sum()),
  }


def attention_graph(
  graph: Mapping[str, np.ndarray],
  modalities: Sequence[str],
  path: str | os.PathLike,
  *,
  title: str = "",
  labels: Mapping[str, Sequence[str]] | None = None,
) -> None:
  """Draws the surviving cross-modal edges of one graph (`graph_attention`).

  Nodes sit in one row per modality at x = frame / (frames - 1), the
  relative time within the utterance (modalities run at different rates;
  MTAG's pseudo-alignment spreads them the same way). Each edge is a line
  coloured by its attention on a log scale, strongest on top.

  Args:
    graph: the dict of `graph_attention`.
    modalities: modality names, in the config's order.
    path: the PNG to write.
    title: a first title line (e.g. the sentence and its label).
    labels: optional per-modality node labels (e.g. the words), drawn
      under that modality's nodes.
  """
  modality, index = graph["modality"], graph["index"]
  counts = np.bincount(modality, minlength=len(modalities))
  x = index / np.maximum(counts[modality] - 1, 1)
  y = (len(modalities) - 1 - modality).astype(np.float64)
  cross = graph["cross"]
  snd, rcv = graph["senders"][cross], graph["receivers"][cross]
  att = np.maximum(graph["attention"][cross], 1e-6)
  order = np.argsort(att)
  segments = np.stack(
    [np.stack([x[snd], y[snd]], -1), np.stack([x[rcv], y[rcv]], -1)], 1
  )[order]
  fig, ax = plt.subplots(figsize=(12, 2.2 + 1.3 * len(modalities)))
  if len(att):
    norm = mcolors.LogNorm(vmin=att.min(), vmax=max(att.max(), att.min() * 2))
    mappable = cm.ScalarMappable(norm=norm, cmap="viridis")
    rgba = mappable.to_rgba(att[order])
    # Weak edges fade, so the few strong ones stand out of a dense graph.
    strength = np.clip(norm(att[order]), 0.0, 1.0)
    rgba[:, 3] = 0.08 + 0.87 * strength
    ax.add_collection(
      LineCollection(segments, colors=rgba, linewidths=0.4 + 1.2 * strength)
    )
    fig.colorbar(mappable, ax=ax, label="attention (last layer, mean of heads)")
  for m, name in enumerate(modalities):
    on = modality == m
    ax.scatter(
      x[on],
      y[on],
      s=18,
      zorder=3,
      color=MODALITY_COLOURS[m % len(MODALITY_COLOURS)],
      edgecolors="black",
      linewidths=0.4,
      label=f"{name} ({int(counts[m])} nodes)",
    )
    for k, text in enumerate((labels or {}).get(name, [])[: int(counts[m])]):
      xi = k / max(int(counts[m]) - 1, 1)
      yi = len(modalities) - 1 - m - 0.12
      ax.text(xi, yi, text, rotation=60, ha="right", va="top", fontsize=7)
  ax.set_yticks(range(len(modalities)), list(reversed(modalities)))
  ax.set_xlabel("relative time in the utterance")
  ax.set_xlim(-0.03, 1.03)
  ax.set_ylim(-0.6 if labels else -0.3, len(modalities) - 0.7)
  lines = [
    title,
    f"{len(att)} of {graph['num_cross']} cross-modal edges survive the "
    f"last pruning ({len(graph['attention'])} of {graph['num_edges']} "
    "edges in all)",
  ]
  ax.set_title("\n".join(t for t in lines if t), fontsize=9)
  ax.legend(
    loc="upper center",
    bbox_to_anchor=(0.5, -0.16),
    ncol=len(modalities),
    fontsize=8,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
