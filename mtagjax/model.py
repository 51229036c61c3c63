"""The MTAG model: projections, positional encoding, MTGAT layers, readout.

`MTAG.__call__(batch, *, train)` takes a `mtagjax.batching.Batch` (a stack of
shards) and returns `(predictions [S, G, output_dim], aux)`, where `aux` holds
the per-layer node features, attention and surviving-edge masks (unused
entries cost nothing under `jit`). With `backend="dense"` it takes a
`DenseBatch` and runs the MTGAT layers of `mtagjax.dense` on node blocks;
the parameters, outputs and kept edges are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtagjax import config as config_lib
from mtagjax import dense as dense_lib
from mtagjax import graph as graph_lib
from mtagjax import layers
from mtagjax.batching import Batch, DenseBatch

Array = jax.Array


@functools.lru_cache(maxsize=8)
def sinusoid_table(max_len: int, dim: int) -> np.ndarray:
  """The sinusoidal positional-encoding table `[max_len, dim]`, float32.

  Follows the official recipe step by step in float32 (frequencies from a
  float32 `exp`, float32 products); sin and cos are evaluated in float64 and
  rounded. It agrees with the official buffer to float32 rounding; official
  checkpoints carry the exact buffer, which `mtagjax.convert` ports.

  References:
    Vaswani et al., "Attention Is All You Need", 2017, section 3.5.
  """
  freq = np.exp(
    np.arange(0, dim, 2, dtype=np.float32) * np.float32(-np.log(10000.0) / dim)
  ).astype(np.float32)
  angle = (np.arange(max_len, dtype=np.float32)[:, None] * freq).astype(
    np.float32
  )
  table = np.zeros((max_len, dim), np.float32)
  table[:, 0::2] = np.sin(angle.astype(np.float64))
  table[:, 1::2] = np.cos(angle.astype(np.float64))[:, : dim // 2]
  return table


def _torch_bias_init(key, shape, dtype=jnp.float32, *, fan_in: int):
  """PyTorch's `nn.Linear` bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class TorchDense(nn.Module):
  """`nn.Dense` initialised like PyTorch's `nn.Linear` (fidelity of init)."""

  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    return nn.Dense(
      self.features,
      dtype=self.dtype,
      kernel_init=nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform"
      ),
      bias_init=functools.partial(_torch_bias_init, fan_in=fan_in),
      name="dense",
    )(x)


class Projection(nn.Module):
  """Per-modality input projection: Linear, or Linear-ReLU-Linear-ReLU."""

  features: int
  kind: str = "linear"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = TorchDense(self.features, self.dtype, name="dense_0")(x)
    if self.kind == "ffn":
      x = nn.relu(x)
      x = TorchDense(self.features, self.dtype, name="dense_1")(x)
      x = nn.relu(x)
    elif self.kind != "linear":
      raise ValueError(f"projection {self.kind!r}; expected 'linear' or 'ffn'")
    return x


class TokenEmbedding(nn.Module):
  """Input layer of a token modality: a learned table over ids `[..., 1]`."""

  vocab_size: int
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # Ids arrive as the batch's float features (exact below 2**24); padded
    # frames are id 0 and are masked downstream like any padded node.
    ids = x[..., 0].astype(jnp.int32)
    return nn.Embed(
      self.vocab_size,
      self.features,
      dtype=self.dtype,
      embedding_init=nn.initializers.normal(1.0),  # torch nn.Embedding
      name="embedding",
    )(ids)


class MTAG(nn.Module):
  """Modal-Temporal Attention Graph.

  Attributes:
    modalities: modality names, in node order (names the projections).
    hidden: node feature size (input and output of every MTGAT layer).
    heads: attention heads.
    num_layers: MTGAT layers, each followed by a pruning.
    num_edge_types: edge types of the graph scheme.
    projection: "linear" (official run.sh) or "ffn".
    pe: "padded" or "within_modality" (positions come with the batch: both
      add the sinusoid at the node's position) or "none".
    max_positions: rows of the positional-encoding table.
    pe_dropout: dropout after the positional encoding.
    attention_dropout: dropout on attention weights.
    negative_slope: LeakyReLU slope of the attention.
    prune: whether to prune edges after each layer.
    prune_scope: "batch" (official), "graph" or "node".
    prune_type: "topk" (by mean attention) or "random".
    head_hidden: width of the two hidden layers of the head.
    output_dim: outputs per graph.
    dtype: compute dtype (None: from inputs and parameters).
    vocab_sizes: per modality, 0 (feature vectors, projected) or the size
      of the vocabulary of a token modality (ids, embedded).
    backend: "segment" (edge lists, takes a `Batch`) or "dense" (node
      blocks, takes a `DenseBatch`).
    dense_remat: with the dense backend, recompute each layer in the
      backward pass (saves its `[B, H, N, N]` intermediates).

  References:
    Yang et al., MTAG, NAACL 2021; the official model code (spec sections
    2, 4, 5 and 6).
  """

  modalities: Sequence[str] = ("vision", "text", "audio")
  hidden: int = 64
  heads: int = 4
  num_layers: int = 6
  num_edge_types: int = 27
  projection: str = "linear"
  pe: str = "padded"
  max_positions: int = 5000
  pe_dropout: float = 0.1
  attention_dropout: float = 0.1
  negative_slope: float = 0.2
  prune: bool = True
  prune_scope: str = "batch"
  prune_type: str = "topk"
  head_hidden: int = 16
  output_dim: int = 1
  dtype: Any = None
  backend: str = "segment"
  vocab_sizes: Sequence[int] | None = None
  dense_remat: bool = True

  def _pe_table(self) -> Array:
    # Official checkpoints carry their own (float32) buffer; use it when
    # given, so that converted models reproduce the official numbers.
    if self.has_variable("constants", "pe"):
      return self.get_variable("constants", "pe")
    return jnp.asarray(sinusoid_table(self.max_positions, self.hidden))

  @nn.compact
  def __call__(
    self, batch: Batch | DenseBatch, *, train: bool
  ) -> tuple[Array, dict]:
    """Predicts one output vector per graph.

    Args:
      batch: a `Batch` from `mtagjax.batching.GraphBatcher`.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      `(out, aux)`: `out` is `[S, G, output_dim]` (padding graphs included;
      `batch.graph.globals["mask"]` marks the real ones); `aux` has
      `nodes` `[L+1, S, N, hidden]`, `attention` `[L, S, E, heads]` and
      `edge_mask` `[L+1, S, E]` (edges alive entering each layer, and after
      the last pruning). With the dense backend each of the three is a
      tuple over `batch.groups`: `nodes` of per-modality `[L+1, S, B, N_m,
      hidden]`, `attention` and `edge_mask` of per-block `[L, S, B, heads,
      N_r, W]` and `[L+1, S, B, N_r, W]` (`DenseGroup` blocks);
      `dense_layout.to_edge_list` and the groups' `rows` map them back.
    """
    is_dense = isinstance(batch, DenseBatch)
    if self.backend not in ("segment", "dense"):
      raise ValueError(
        f"backend {self.backend!r}; expected 'segment' or 'dense'"
      )
    if is_dense != (self.backend == "dense"):
      raise ValueError(
        f"backend={self.backend!r} needs a "
        f"{'DenseBatch' if self.backend == 'dense' else 'Batch'}, got a "
        f"{type(batch).__name__}; build batches with GraphBatcher(config, "
        f"layout={self.backend!r})"
      )
    g = batch.graph
    if len(batch.features) != len(self.modalities):
      raise ValueError(
        f"batch has {len(batch.features)} modalities, the model "
        f"{len(self.modalities)}"
      )
    blocks = tuple(f.shape[-2] for f in batch.features)
    vocab = self.vocab_sizes or (0,) * len(self.modalities)
    x = jnp.concatenate(
      [
        TokenEmbedding(v, self.hidden, self.dtype, name=f"embed_{name}")(f)
        if v
        else Projection(
          self.hidden, self.projection, self.dtype, name=f"proj_{name}"
        )(f)
        for name, f, v in zip(
          self.modalities, batch.features, vocab, strict=True
        )
      ],
      axis=-2,
    )
    if self.pe != "none":
      x = x + self._pe_table()[g.nodes["position"]]
    x = nn.Dropout(self.pe_dropout)(x, deterministic=not train)
    if is_dense:
      pooled, aux = self._dense_layers(x, batch, train)
      return self._head(pooled), aux

    edge_mask = g.edges["mask"]
    nodes, attention, masks = [x], [], [edge_mask]
    for layer in range(self.num_layers):
      x, alpha = layers.MTGATConv(**self._conv_kwargs(layer))(
        x,
        node_type=g.nodes["modality"],
        senders=g.senders,
        receivers=g.receivers,
        edge_type=g.edges["type"],
        edge_mask=edge_mask,
        type_blocks=blocks,
        train=train,
      )
      if self.prune:
        edge_mask = self._prune(alpha, edge_mask, batch, layer)
      nodes.append(x)
      attention.append(alpha)
      masks.append(edge_mask)

    pooled = _mean_readout(x, g.nodes["mask"], g.nodes["graph"], g.n_node)
    aux = dict(
      nodes=jnp.stack(nodes),
      attention=jnp.stack(attention),
      edge_mask=jnp.stack(masks),
    )
    return self._head(pooled), aux

  def _conv_kwargs(self, layer: int) -> dict:
    """MTGAT layer `layer`'s settings, the same for both backends."""
    return dict(
      features=self.hidden,
      heads=self.heads,
      num_node_types=len(self.modalities),
      num_edge_types=self.num_edge_types,
      dropout_rate=self.attention_dropout,
      negative_slope=self.negative_slope,
      dtype=self.dtype,
      name=f"mtgat_{layer}",
    )

  def _head(self, pooled):
    y = pooled
    for i, width in enumerate((self.head_hidden, self.head_hidden)):
      y = nn.relu(TorchDense(width, self.dtype, name=f"head_{i}")(y))
    return TorchDense(self.output_dim, self.dtype, name="head_2")(y)

  def _prune(self, alpha, edge_mask, batch, layer):
    g = batch.graph
    if self.prune_type == "topk":
      scores = alpha.mean(-1)
    elif self.prune_type == "random":
      # A uniformly random subset of size k. The official ablation instead
      # always drops the tail of the edge list (spec section 5).
      key = (
        self.make_rng("prune")
        if self.has_rng("prune")
        else jax.random.fold_in(jax.random.key(0), layer)
      )
      scores = jax.random.uniform(key, alpha.shape[:-1])
    else:
      raise ValueError(
        f"prune_type {self.prune_type!r}; expected 'topk' or 'random'"
      )
    return layers.prune_edges(
      scores,
      edge_mask,
      batch.keep_counts[..., layer],
      scope=self.prune_scope,
      edge_graph=g.edges["graph"],
      receivers=g.receivers,
    )

  def _dense_layers(self, x, batch, train):
    """MTGAT layers and pruning over modality blocks; `(pooled, aux)`."""
    g, groups = batch.graph, batch.groups
    # Flat node rows -> per-modality blocks, per shard.
    take = jax.vmap(lambda a, rows: a[rows])
    xs = [[take(x, rows) for rows in grp.rows] for grp in groups]
    params = [
      dense_lib.DenseMTGATConv(**self._conv_kwargs(layer))(
        [x], params_only=True
      )
      for layer in range(self.num_layers)
    ]
    params = jax.tree.map(lambda *a: jnp.stack(a), *params)
    dropout_keys = prune_keys = None
    if train and self.attention_dropout > 0.0:
      dropout_keys = jnp.stack(
        [self.make_rng("dropout") for _ in range(self.num_layers)]
      )
    if self.prune_type == "random":
      # A uniformly random subset of size k, as the segment backend draws
      # (a different subset: the draws follow the layout).
      prune_keys = jnp.stack(
        [
          self.make_rng("prune")
          if self.has_rng("prune")
          else jax.random.fold_in(jax.random.key(0), layer)
          for layer in range(self.num_layers)
        ]
      )
    elif self.prune_type != "topk":
      raise ValueError(
        f"prune_type {self.prune_type!r}; expected 'topk' or 'random'"
      )
    counts = jnp.moveaxis(jnp.asarray(batch.keep_counts), -1, 0)  # [L, ...]
    if self.prune_scope == "batch":
      keep = [counts.reshape(self.num_layers, -1)[:, 0]]
    elif self.prune_scope == "graph":
      keep = [jnp.take_along_axis(counts, grp.graph[None], 2) for grp in groups]
    else:  # per (group, receiver modality), as `dense.prune_families`
      keep = [
        jax.vmap(take, (0, None))(counts, rows)
        for grp in groups
        for rows in grp.rows
      ]
    intra = {grp.intra for grp in groups}
    if len(intra) > 1:
      raise ValueError(f"dense groups disagree on intra: {sorted(intra)}")
    xs, aux = dense_lib.dense_stack(
      xs,
      [grp.code for grp in groups],
      [grp.types for grp in groups],
      [grp.edge_id for grp in groups],
      params,
      keep,
      intra=intra.pop(),
      dropout_keys=dropout_keys,
      prune_keys=prune_keys,
      prune=self.prune,
      prune_scope=self.prune_scope,
      negative_slope=self.negative_slope,
      dropout_rate=self.attention_dropout,
      remat=self.dense_remat,
    )
    return _dense_readout(xs, groups, g.n_node.shape[-1]), aux


def _mean_readout(x, node_mask, node_graph, n_node):
  """Mean of the real nodes of each graph, per shard: `[S, G, D]`."""
  num_graphs = n_node.shape[-1]

  def one(x, mask, graph):
    w = mask.astype(x.dtype)[:, None]
    total = jax.ops.segment_sum(x * w, graph, num_graphs)
    count = jax.ops.segment_sum(w, graph, num_graphs)
    return total / jnp.maximum(count, 1.0)

  return jax.vmap(one)(x, node_mask, node_graph)


def _dense_readout(xs, groups, num_graphs):
  """Mean of the real nodes of each graph from the blocks: `[S, G, D]`."""
  totals, counts, graph = [], [], []
  for xg, grp in zip(xs, groups, strict=True):
    total = count = 0.0
    for x, mask in zip(xg, grp.node_mask, strict=True):
      w = mask.astype(x.dtype)[..., None]
      total = total + (x * w).sum(-2)
      count = count + w.sum(-2)
    totals.append(total)
    counts.append(count)
    graph.append(grp.graph)
  total = jnp.concatenate(totals, 1)
  count = jnp.concatenate(counts, 1)
  ids = jnp.concatenate(graph, 1)
  seg = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_graphs))
  return seg(total, ids) / jnp.maximum(seg(count, ids), 1.0)


def create_model(config: ml_collections.ConfigDict) -> MTAG:
  """Builds `MTAG` from a config (`mtagjax.config.default_config()`)."""
  if config.hidden % config.heads:
    raise ValueError(
      f"config.hidden ({config.hidden}) must be divisible by config.heads "
      f"({config.heads})"
    )
  if len(config.feature_dims) != len(config.modalities):
    raise ValueError(
      "config.feature_dims must give one size per entry of "
      f"config.modalities; got {tuple(config.feature_dims)} for "
      f"{tuple(config.modalities)}"
    )
  vocab = config_lib.vocab_sizes(config)
  for m, (v, dim) in enumerate(zip(vocab, config.feature_dims, strict=True)):
    if v and dim != 1:
      raise ValueError(
        f"modality {config.modalities[m]!r} is a token modality "
        f"(config.vocab_sizes[{m}]={v}): its frames are [length, 1] ids, so "
        f"config.feature_dims[{m}] must be 1, not {dim}"
      )
  if config.pe not in ("padded", "within_modality", "none"):
    raise ValueError(
      f"config.pe={config.pe!r}; expected 'padded', 'within_modality' or 'none'"
    )
  return MTAG(
    modalities=tuple(config.modalities),
    hidden=config.hidden,
    heads=config.heads,
    num_layers=config.num_layers,
    num_edge_types=graph_lib.num_edge_types(
      len(config.modalities), config.edge_types
    ),
    projection=config.projection,
    pe=config.pe,
    max_positions=config.max_positions,
    pe_dropout=config.pe_dropout,
    attention_dropout=config.attention_dropout,
    negative_slope=config.negative_slope,
    prune=config.prune,
    prune_scope=config.prune_scope,
    prune_type=config.prune_type,
    head_hidden=config.head_hidden,
    output_dim=config.output_dim,
    dtype=None if config.dtype == "float32" else jnp.dtype(config.dtype),
    backend=config.get("backend", config_lib.DEFAULTS.backend),
    vocab_sizes=vocab if any(vocab) else None,
    dense_remat=config.get("dense_remat", config_lib.DEFAULTS.dense_remat),
  )
