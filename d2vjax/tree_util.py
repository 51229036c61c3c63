"""Plain names for pytree key paths.

`jax.tree_util.tree_map_with_path` and `tree_flatten_with_path` hand out a
leaf's path as a tuple of key objects (`DictKey`, `GetAttrKey`,
`SequenceKey`, `FlattenedIndexKey`). Rules that pick parameters by name
(the EMA teacher's shared leaves, BEiT's layer ids, weight-decay and freezing
masks, HF key translation) and error messages want the names themselves:
`("encoder", "layers_0", "fc1", "kernel")`, or `"encoder/layers_0/fc1/kernel"`
as `flax.traverse_util.flatten_dict(..., sep="/")` spells the same leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["path_name", "path_names"]


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The name of every key of a pytree path, outermost first.

  Args:
    path: a key path from `jax.tree_util` (dict keys, attribute names,
      sequence indices or flattened indices).

  Returns:
    One string per key: the dict key, the attribute name or the index
    (`"0"` for a list's first entry); any other key as `str(key)`.
  """
  return tuple(_key_name(key) for key in path)


def path_name(path: Sequence[Any], sep: str = "/") -> str:
  """The names of a pytree path joined by `sep` (`""` for the root).

  Args:
    path: a key path from `jax.tree_util`.
    sep: the separator placed between names.

  Returns:
    E.g. `"encoder/layers_0/fc1/kernel"`.
  """
  return sep.join(path_names(path))
