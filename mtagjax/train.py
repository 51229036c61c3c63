"""Training state and pure train/eval steps for MTAG.

`train_step(state, batch, *, model, tx, loss) -> (state, metrics)` is pure:
bind the static arguments with `functools.partial` and `jax.jit` it at the
call site, with shardings (`make_mesh`, `batch_sharding`) and
`donate_argnums=(0,)`. The learning rate lives in the optimizer state
(`optax.inject_hyperparams`), so the plateau rule of `mtagjax.schedules` sets
it between epochs without recompiling.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mtagjax import losses
from mtagjax.batching import Batch

Array = jax.Array

LOSSES = ("smooth_l1", "l1", "mse", "iemocap_ce", "iemocap_weighted_ce")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  Attributes:
    step: optimizer steps taken.
    params: trainable parameters.
    constants: other variable collections (e.g. an official checkpoint's
      positional-encoding buffer); never trained.
    opt_state: optimizer state; `opt_state.hyperparams["learning_rate"]`
      is the learning rate in force.
    rng: base key; each step folds in `step` for its dropout.
  """

  step: Array
  params: Any
  constants: Any
  opt_state: Any
  rng: Array


def make_optimizer(
  learning_rate: float = 1e-3, weight_decay: float = 1e-2
) -> optax.GradientTransformation:
  """AdamW as the official code configures it (decay on every parameter).

  PyTorch's AdamW and `optax.adamw` apply the same update: decoupled decay
  `lr * wd * p` plus `lr * m_hat / (sqrt(v_hat) + eps)`, eps 1e-8.
  """
  return optax.inject_hyperparams(optax.adamw)(
    learning_rate=learning_rate,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=weight_decay,
  )


def create_train_state(
  rng: Array,
  model: nn.Module,
  batch: Batch,
  tx: optax.GradientTransformation,
  variables: dict | None = None,
) -> TrainState:
  """Initialises parameters (unless `variables` are given) and the optimizer.

  Args:
    rng: a PRNG key.
    model: the `MTAG` module.
    batch: any batch of the right feature sizes (only shapes are used).
    tx: the optimizer, e.g. `make_optimizer()`.
    variables: optional Flax variables to start from (e.g. converted
      official weights).
  """
  init_rng, rng = jax.random.split(rng)
  if variables is None:
    variables = jax.jit(functools.partial(model.init, train=False))(
      init_rng, batch
    )
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    constants=variables,
    opt_state=tx.init(params),
    rng=rng,
  )


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  """Returns `state` with the learning rate in the optimizer state set."""
  hyper = dict(state.opt_state.hyperparams)
  current = hyper["learning_rate"]
  new = jnp.asarray(lr, current.dtype)
  if isinstance(current, jax.Array):
    # Keep the placement: a differently sharded input would recompile the
    # jitted step. Built from a callback, which (unlike `device_put`) also
    # works when the sharding spans other processes' devices.
    value = np.asarray(lr, current.dtype)
    new = jax.make_array_from_callback((), current.sharding, lambda _: value)
  hyper["learning_rate"] = new
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def compute_loss(
  kind: str,
  out: Array,
  labels: Array,
  mask: Array,
  *,
  beta: float = 1.0,
  class_weights: np.ndarray | None = None,
) -> Array:
  """The task loss over the real graphs of a `[S, G, ...]` batch."""
  out = out.reshape(-1, out.shape[-1])
  labels = labels.reshape(-1, *labels.shape[2:])
  mask = mask.reshape(-1)
  if kind == "smooth_l1":
    return losses.smooth_l1(out[:, 0], labels, beta=beta, mask=mask)
  if kind == "l1":
    return losses.l1(out[:, 0], labels, mask=mask)
  if kind == "mse":
    return losses.mse(out[:, 0], labels, mask=mask)
  if kind == "iemocap_ce":
    return losses.iemocap_cross_entropy(out, labels, mask=mask)
  if kind == "iemocap_weighted_ce":
    weights = (
      losses.iemocap_inverse_count_weights()
      if class_weights is None
      else class_weights
    )
    return losses.iemocap_cross_entropy(
      out, labels, class_weights=weights, mask=mask
    )
  raise ValueError(f"loss {kind!r}; expected one of {LOSSES}")


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  loss: str = "smooth_l1",
  normalize: bool = True,
  beta: float = 1.0,
) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step on one batch (dropout on).

  Args:
    state: the training state.
    batch: a `Batch`.
    model: the `MTAG` module (static).
    tx: the optimizer (static).
    loss: one of `LOSSES`.
    normalize: the official loss normalisation `loss / |loss|` (the logged
      loss is the raw one).
    beta: SmoothL1 beta.

  Returns:
    The new state and metrics `loss`, `grad_norm`, `learning_rate`.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  mask = batch.graph.globals["mask"]

  def objective(params):
    out, _ = model.apply(
      {"params": params, **state.constants},
      batch,
      train=True,
      rngs={"dropout": dropout_rng},
    )
    raw = compute_loss(loss, out, batch.labels, mask, beta=beta)
    return (losses.normalize_loss(raw) if normalize else raw), raw

  grads, raw = jax.grad(objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    "loss": raw,
    "grad_norm": optax.tree.norm(grads),
    "learning_rate": state.opt_state.hyperparams["learning_rate"],
  }
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state
  )
  return new_state, metrics


def eval_step(
  state: TrainState,
  batch: Batch,
  *,
  model: nn.Module,
  loss: str = "smooth_l1",
  beta: float = 1.0,
) -> dict[str, Array]:
  """Eval-mode outputs and loss of one batch.

  Returns:
    `out` `[S, G, output_dim]`, `mask` `[S, G]` (real graphs) and the raw
    `loss`; the caller gathers `out[mask]` for the split's metrics.
  """
  out, _ = model.apply(
    {"params": state.params, **state.constants}, batch, train=False
  )
  mask = batch.graph.globals["mask"]
  raw = compute_loss(loss, out, batch.labels, mask, beta=beta)
  return {"out": out, "mask": mask, "loss": raw}


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh with a `data` axis over the first `num_devices` devices."""
  devices = jax.devices()
  num = len(devices) if num_devices is None else num_devices
  if num > len(devices):
    raise ValueError(f"asked for {num} devices, only {len(devices)} exist")
  return jax.make_mesh(
    (num,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:num]
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards every batch leaf on its leading (shard) axis over `data`."""
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  """Replicates a pytree (the train state) over the mesh."""
  return NamedSharding(mesh, PartitionSpec())
