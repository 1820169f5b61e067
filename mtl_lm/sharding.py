"""Device mesh and the mapping of logical axis names onto it.

The mesh has three axes:
  "data":   pure data parallelism, parameters replicated.
  "fsdp":   data parallelism with parameters sharded along their embed axis
            (fully sharded data parallel, ZeRO-3 style).
  "tensor": tensor (Megatron-style) parallelism over heads, mlp and vocab.

Model code names array axes logically ("batch", "embed", "heads", ...);
`LOGICAL_AXIS_RULES` maps those names onto mesh axes.

Typical use:

  mesh = make_mesh(config.mesh)
  check_batch_size(config.data.batch_size, mesh)
  abstract = jax.eval_shape(init_fn, rng)   # boxed (logically partitioned)
  shardings = params_shardings(abstract, mesh)
  with sharding_context(mesh):
    params = jax.jit(init_fn, out_shardings=shardings)(rng)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch, and the one that splits the vocabulary.
BATCH_AXES = ("data", "fsdp")
VOCAB_AXIS = "tensor"

# Order matters: flax assigns a mesh axis to the first logical name that
# claims it, so "batch" takes "fsdp" before "embed" does in activations, while
# parameters (which have no batch axis) shard "embed" over "fsdp".
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(mesh_config: Mapping[str, int], *,
               num_devices: int) -> dict[str, int]:
  """Resolves the mesh axis sizes of `config.mesh`.

  Args:
    mesh_config: Mapping with integer "data", "fsdp" and "tensor". At most one
      of them may be -1, meaning all devices left after the others.
    num_devices: Number of devices the mesh must cover exactly.

  Returns:
    `{"data": d, "fsdp": f, "tensor": t}` with `d * f * t == num_devices`.

  Raises:
    ValueError: if a size is invalid or the sizes do not cover the devices.
  """
  sizes = {}
  for axis in MESH_AXES:
    if axis not in mesh_config:
      raise ValueError(f"config.mesh.{axis} is missing; set it to a positive "
                       "size or -1.")
    size = mesh_config[axis]
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(
          f"Invalid config.mesh.{axis}={size!r}: expected a positive integer "
          "or -1 for the remaining devices.")
    sizes[axis] = size

  remaining_axes = [axis for axis, size in sizes.items() if size == -1]
  if len(remaining_axes) > 1:
    raise ValueError(
        f"config.mesh sets {remaining_axes} to -1; at most one axis may take "
        "the remaining devices.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  described = ", ".join(f"{axis}={size}" for axis, size in sizes.items())

  if remaining_axes:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh ({described}): the fixed axes multiply to {fixed}, "
          f"which does not divide the {num_devices} devices. Choose sizes "
          f"whose product divides {num_devices}.")
    sizes[remaining_axes[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"config.mesh ({described}) has {fixed} devices in all but "
        f"{num_devices} are available. Make the product equal {num_devices}, "
        "or set one axis to -1.")
  return sizes


def make_mesh(mesh_config: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh of `config.mesh`.

  The sizes are checked before anything is compiled. The axes are of type
  Auto, so sharding inside jit follows the logical constraints and XLA's
  propagation rather than explicit sharding types.

  Args:
    mesh_config: `config.mesh`; see `mesh_shape`.
    devices: Devices to use; all of `jax.devices()` by default.

  Returns:
    A `jax.sharding.Mesh` with axis names `MESH_AXES`.

  Raises:
    ValueError: if the sizes do not cover the devices exactly.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, num_devices=len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  logging.info("Device mesh %s over %d devices.", sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_extent(mesh: Mesh) -> int:
  """Returns how many ways a batch is split: the data * fsdp mesh size."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh, *,
                     micro_batches: int = 1) -> None:
  """Raises ValueError unless `batch_size` splits evenly over the batch axes.

  Args:
    batch_size: Global batch size in examples (`config.data.batch_size`).
    mesh: The mesh from `make_mesh`.
    micro_batches: `config.train.gradient_accumulation_steps`; each
      micro-batch must split evenly over the batch axes too.
  """
  extent = batch_extent(mesh)
  if batch_size % extent:
    raise ValueError(
        f"config.data.batch_size={batch_size} is not divisible by the "
        f"data * fsdp mesh size {mesh.shape['data']} * {mesh.shape['fsdp']} "
        f"= {extent}. Choose a batch size that is a multiple of {extent} or "
        "change config.mesh.")
  if batch_size % (extent * micro_batches):
    raise ValueError(
        f"config.data.batch_size={batch_size} cannot be split into "
        f"config.train.gradient_accumulation_steps={micro_batches} "
        f"micro-batches of a multiple of {extent} examples (the data * fsdp "
        f"mesh size). Set config.data.batch_size to a multiple of "
        f"{extent * micro_batches}, or use fewer accumulation steps.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding of batch arrays: leading axis over data and fsdp."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _mesh_extent(mesh: Mesh, mesh_axes: str | tuple[str, ...] | None) -> int:
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return math.prod(mesh.shape[axis] for axis in mesh_axes)


def _divisible_logical_spec(
    box: nn.LogicallyPartitioned,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
    path: str,
) -> PartitionSpec:
  """Drops the logical names of dimensions the mesh cannot split evenly."""
  names = tuple(box.names)
  shape = box.value.shape
  mesh_axes = nn.logical_to_mesh_axes(names, rules)
  kept = []
  for name, size, axes in zip(names, shape, mesh_axes):
    extent = _mesh_extent(mesh, axes)
    if size % extent:
      # A small generator can have, for example, one head on a tensor axis of
      # two; replicating that dimension beats failing to place the array.
      logging.warning(
          "Replicating dimension %r of size %d of %s: it is not divisible by "
          "mesh axes %s of size %d.", name, size, path, axes, extent)
      kept.append(None)
    else:
      kept.append(name)
  return PartitionSpec(*kept)


def logical_specs(
    tree: Any,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> Any:
  """Returns the logical PartitionSpec of every leaf of a boxed tree.

  Leaves wrapped in `nn.LogicallyPartitioned` (as `init` or `jax.eval_shape`
  of `init` returns them) keep their axis names, except names whose dimension
  is not divisible by the mesh axes they map to: those become None
  (replicated) with a warning. Unboxed leaves get `PartitionSpec()`.

  Args:
    tree: Pytree of boxed arrays or `jax.ShapeDtypeStruct`s.
    mesh: The device mesh.
    rules: Logical-to-mesh axis rules.

  Returns:
    The same tree structure with a `PartitionSpec` of logical names per leaf.
  """

  def spec(path, leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return _divisible_logical_spec(leaf, mesh, rules,
                                     jax.tree_util.keystr(path))
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(
      spec, tree,
      is_leaf=lambda leaf: isinstance(leaf, nn.LogicallyPartitioned))


def params_shardings(
    tree: Any,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> Any:
  """Maps a boxed params (or optimizer state) tree to NamedShardings.

  Args:
    tree: Pytree whose leaves are `nn.LogicallyPartitioned` boxes or plain
      arrays / `jax.ShapeDtypeStruct`s (replicated).
    mesh: The device mesh.
    rules: Logical-to-mesh axis rules.

  Returns:
    A tree of `jax.sharding.NamedSharding` with the structure of the unboxed
    tree (`nn.unbox(tree)`), usable as `out_shardings` or for
    `jax.device_put`.
  """
  specs = logical_specs(tree, mesh, rules=rules)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


@contextlib.contextmanager
def sharding_context(
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> Iterator[None]:
  """Activates `mesh` and `rules` for tracing the model.

  Inside it, `nn.with_logical_constraint` in the model constrains
  activations; outside it those constraints are no-ops.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def vocab_parallel_axis(vocab_size: int) -> str | None:
  """Returns the axis of the active mesh that splits the vocabulary, if any.

  That is `VOCAB_AXIS` when a mesh is set (`sharding_context`) and its
  tensor axis has more than one device and divides `vocab_size`, the same
  condition under which `params_shardings` splits vocabulary dimensions.
  Otherwise None: the vocabulary is whole on every device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or VOCAB_AXIS not in mesh.axis_names:
    return None
  size = mesh.shape[VOCAB_AXIS]
  if size == 1 or vocab_size % size:
    return None
  return VOCAB_AXIS
