"""Tests of mtl_lm.sharding.

The multi-device checks run in a subprocess with 8 fake CPU devices, because
XLA_FLAGS must be set before jax is first imported and other test modules in
the same pytest process import jax earlier.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, PartitionSpec
import numpy as np
import pytest

from mtl_lm import sharding

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH_2X2X2 = AbstractMesh((2, 2, 2), sharding.MESH_AXES)


# ---------------------------------------------------------------------------
# Single-process checks.


@pytest.mark.parametrize("mesh_config, expected", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"data": 2, "fsdp": -1, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"data": 1, "fsdp": 4, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}),
])
def test_mesh_shape_resolves_sizes(mesh_config, expected):
  assert sharding.mesh_shape(mesh_config, num_devices=8) == expected


@pytest.mark.parametrize("mesh_config, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1},
     r"has 3 devices in all but 8 are available"),
    ({"data": -1, "fsdp": 3, "tensor": 1},
     r"multiply to 3, which does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, r"at most one axis"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, r"Invalid config.mesh.data=0"),
    ({"data": 8, "fsdp": 1}, r"config.mesh.tensor is missing"),
])
def test_mesh_shape_invalid_raises(mesh_config, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh_config, num_devices=8)


@pytest.mark.parametrize("names, expected", [
    (("batch", "length", "embed"), PartitionSpec(("data", "fsdp"), None, None)),
    (("batch", "length", "mlp"),
     PartitionSpec(("data", "fsdp"), None, "tensor")),
    (("embed", "heads", "head_dim"), PartitionSpec("fsdp", "tensor", None)),
    (("layers", "heads", "head_dim", "embed"),
     PartitionSpec(None, "tensor", None, "fsdp")),
    (("vocab", "embed"), PartitionSpec("tensor", "fsdp")),
    (("embed", "vocab"), PartitionSpec("fsdp", "tensor")),
    (("norm",), PartitionSpec(None)),
])
def test_logical_axis_rules_map_names(names, expected):
  mesh_axes = nn.logical_to_mesh_axes(names, sharding.LOGICAL_AXIS_RULES)
  assert mesh_axes == expected


def test_check_batch_size_accepts_multiple():
  sharding.check_batch_size(8, MESH_2X2X2)


def test_check_batch_size_rejects_indivisible():
  with pytest.raises(ValueError, match=r"batch_size=6 .* = 4"):
    sharding.check_batch_size(6, MESH_2X2X2)


def test_logical_specs_replicate_indivisible_dims():
  tree = {
      "even": nn.LogicallyPartitioned(
          jax.ShapeDtypeStruct((4, 2, 6), np.float32),
          ("embed", "kv_heads", "head_dim")),
      "one_head": nn.LogicallyPartitioned(
          jax.ShapeDtypeStruct((4, 1, 6), np.float32),
          ("embed", "kv_heads", "head_dim")),
      "plain": jax.ShapeDtypeStruct((3,), np.float32),
  }
  specs = sharding.logical_specs(tree, MESH_2X2X2)
  assert specs["even"] == PartitionSpec("embed", "kv_heads", "head_dim")
  assert specs["one_head"] == PartitionSpec("embed", None, "head_dim")
  assert specs["plain"] == PartitionSpec()


# ---------------------------------------------------------------------------
# Eight fake devices, in a subprocess.

_EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from mtl_lm import model as model_lib
    from mtl_lm import sharding

    results = {}
    for name, mesh_config in (
        ("three_devices", {"data": 3, "fsdp": 1, "tensor": 1}),
        ("fsdp_three", {"data": -1, "fsdp": 3, "tensor": 1})):
      try:
        sharding.make_mesh(mesh_config)
        results[name] = "no error"
      except ValueError as error:
        results[name] = str(error)

    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    results["mesh_shape"] = dict(mesh.shape)

    config = model_lib.ModelConfig(
        vocab_size=40, embed_dim=16, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=6, mlp_dim=24, sop_classes=6,
        generator_width_fraction=0.5)
    model = model_lib.Transformer(config)
    rng = np.random.default_rng(0)
    batch, length = 4, 8
    ids = rng.integers(0, 40, size=(batch, length)).astype(np.int32)
    segments = np.ones((batch, length), np.int32)
    segments[1, 5:] = 2
    segments[2, 6:] = 0
    positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    bidirectional = np.array([False, True, False, True])

    def init(key):
      return model.init(key, ids, segment_ids=segments, positions=positions,
                        bidirectional=bidirectional)["params"]

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.params_shardings(abstract, mesh)
    traces = []

    def forward(params, ids, segments, positions, bidirectional):
      traces.append(None)
      out = model.apply({"params": params}, ids, segment_ids=segments,
                        positions=positions, bidirectional=bidirectional)
      out["generator"] = model.apply(
          {"params": params}, ids, segment_ids=segments, positions=positions,
          method=model_lib.Transformer.generator_hidden)
      return out

    with sharding.sharding_context(mesh):
      params = jax.jit(lambda key: jax.tree.map(
          lambda box: box.unbox(), init(key),
          is_leaf=lambda x: hasattr(x, "unbox")),
          out_shardings=shardings)(jax.random.key(0))
      data = jax.device_put((ids, segments, positions, bidirectional),
                            sharding.batch_sharding(mesh))
      sharded_forward = jax.jit(forward)
      sharded = sharded_forward(params, *data)
      sharded_forward(params, *data)

    wq = params["decoder"]["layers"]["attention"]["wq"]
    results["wq_spec"] = str(wq.sharding.spec)
    results["wq_shard_shape"] = list(wq.addressable_shards[0].data.shape)
    results["embedding_spec"] = str(params["embed"]["embedding"].sharding.spec)
    results["generator_wk_spec"] = str(
        params["generator"]["decoder"]["layers"]["attention"]["wk"]
        .sharding.spec)
    results["hidden_spec"] = str(sharded["hidden"].sharding.spec)
    results["traces"] = len(traces)

    single = jax.device_put(params, jax.devices()[0])
    reference = jax.jit(forward)(single, ids, segments, positions,
                                 bidirectional)
    results["max_difference"] = {
        name: float(np.max(np.abs(np.asarray(sharded[name], np.float32)
                                  - np.asarray(reference[name], np.float32))))
        for name in reference}
    results["reference_device_count"] = len(
        reference["hidden"].sharding.device_set)
    print("RESULTS" + json.dumps(results))
""")


@pytest.fixture(scope="module")
def eight_devices():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  env["JAX_PLATFORMS"] = "cpu"
  completed = subprocess.run(
      [sys.executable, "-c", _EIGHT_DEVICE_SCRIPT], env=env, cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  lines = [line for line in completed.stdout.splitlines()
           if line.startswith("RESULTS")]
  assert lines, completed.stdout[-3000:] + completed.stderr[-3000:]
  return json.loads(lines[-1][len("RESULTS"):])


def test_make_mesh_rejects_product_mismatch(eight_devices):
  assert "has 3 devices in all but 8 are available" in (
      eight_devices["three_devices"])


def test_make_mesh_rejects_indivisible_axis(eight_devices):
  assert "does not divide the 8 devices" in eight_devices["fsdp_three"]


def test_make_mesh_fills_remaining_axis(eight_devices):
  assert eight_devices["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2}


def test_params_sharded_by_logical_axes(eight_devices):
  assert eight_devices["wq_spec"] == str(
      PartitionSpec(None, "fsdp", "tensor", None))
  # [layers, embed, heads, head_dim] = [2, 16, 4, 6] split over fsdp, tensor.
  assert eight_devices["wq_shard_shape"] == [2, 8, 2, 6]
  assert eight_devices["embedding_spec"] == str(
      PartitionSpec("tensor", "fsdp"))


def test_generator_single_kv_head_replicated(eight_devices):
  assert eight_devices["generator_wk_spec"] == str(
      PartitionSpec(None, "fsdp", None, None))


def test_activations_sharded_over_batch(eight_devices):
  assert eight_devices["hidden_spec"].startswith(
      str(PartitionSpec(("data", "fsdp")))[:-1])


def test_sharded_forward_matches_single_device(eight_devices):
  assert eight_devices["reference_device_count"] == 1
  for name, difference in eight_devices["max_difference"].items():
    assert difference < 1e-5, name


def test_sharded_forward_traces_once(eight_devices):
  assert eight_devices["traces"] == 1
