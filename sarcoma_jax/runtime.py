"""Where a run's arrays live: its devices and mesh, its hosts, the batch split, one padded predict.

Every training loop runs on a 1-D `jax.sharding.Mesh` with one axis, 'batch': parameters and
states are replicated, batches are split along their batch axis, so BatchNorm statistics and
losses are over the global batch and a step computes what one device computes (up to the order of
float sums). Several hosts (`config.distributed`, main.initialize_distributed): the mesh spans
every device of every host; each host loads the same data and draws the same batches, hands its
own devices their part (`put`), and only the first host writes files (`is_primary`).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from sarcoma_jax.input_pipeline import ConfigError

BATCH_AXIS = "batch"


def mesh_devices(config: ml_collections.ConfigDict) -> list:
    """The devices a run uses: the first `config.num_devices` local devices (0 or unset: all of
    them); in a multi-host run, every device of every host.

    Raises:
      ConfigError: more devices asked for than there are, or a device count on several hosts.
    """
    num_devices = config.get("num_devices", 0)
    if jax.process_count() > 1:
        if num_devices and num_devices != jax.device_count():
            raise ConfigError(
                f"config.num_devices {num_devices}: a multi-host run uses all "
                f"{jax.device_count()} devices of its {jax.process_count()} hosts (set 0)"
            )
        return jax.devices()
    devices = jax.local_devices()
    if num_devices:
        if num_devices > len(devices):
            raise ConfigError(
                f"config.num_devices {num_devices} but only {len(devices)} local devices"
            )
        devices = devices[:num_devices]
    return devices


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The run's 1-D mesh over `mesh_devices(config)`, axis BATCH_AXIS."""
    return Mesh(np.asarray(mesh_devices(config)), (BATCH_AXIS,))


def check_batch_split(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError unless config.batch_size and eval_batch_size split evenly over
    `num_devices` devices."""
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % num_devices:
            raise ConfigError(
                f"config.{name} {config[name]} must be divisible by the {num_devices} devices "
                "the batch is split over (or set config.num_devices)"
            )


def is_primary() -> bool:
    """Whether this process writes the run's files (the first host; always on one host)."""
    return jax.process_index() == 0


def sync_hosts(name: str) -> None:
    """Waits for every host to get here (nothing to wait for on one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def put(tree: Any, sharding: NamedSharding) -> Any:
    """Places host values (the same on every host) with `sharding`.

    One host: jax.device_put. Several: each host builds the global array from its own copy,
    handing each of its devices the part `sharding` gives it; every host holds the same data and
    draws the same batches (same seeds), so no data is exchanged.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def global_array(value):
        value = np.asarray(jax.device_get(value))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(global_array, tree)


def global_input(batch: Any, sharding: NamedSharding) -> Any:
    """A host batch as a jitted function's input: as it is on one host (jit places it), a global
    array on several (where jit cannot place host arrays)."""
    return batch if jax.process_count() == 1 else put(batch, sharding)


def predict(
    function: Callable[[Any, Any], Any],
    variables: Any,
    inputs: np.ndarray | Mapping[str, np.ndarray],
    batch_size: int,
    sharding: NamedSharding | None = None,
) -> Any:
    """`function(variables, batch)` over `inputs` in order, in batches of one fixed shape.

    The last batch is padded with zeros up to `batch_size` (so `function` compiles once) and its
    padding dropped from the outputs. A model that normalises with the statistics of the batch
    it is given would see the padding in the last batch; ours evaluate with fixed statistics.

    Args:
      function: jit-compiled; takes the variables and a batch shaped like `inputs` (an array
        (n, ...) or a dict of arrays sharing their first axis) and returns a pytree of arrays
        with a leading batch axis.
      variables: its first argument.
      inputs: the examples.
      batch_size: examples per call.
      sharding: the batches' sharding (needed on several hosts).

    Returns:
      The outputs' pytree, each leaf (n, ...) as a numpy array.
    """
    leaves, treedef = jax.tree.flatten(inputs)
    num_examples = leaves[0].shape[0]
    collected = []
    for start in range(0, num_examples, batch_size):
        batch = [leaf[start : start + batch_size] for leaf in leaves]
        num_real = batch[0].shape[0]
        if num_real < batch_size:
            batch = [
                np.concatenate(
                    [leaf, np.zeros((batch_size - num_real, *leaf.shape[1:]), leaf.dtype)]
                )
                for leaf in batch
            ]
        batch = jax.tree.unflatten(treedef, batch)
        if sharding is not None:
            batch = global_input(batch, sharding)
        outputs = jax.device_get(function(variables, batch))
        collected.append(jax.tree.map(lambda leaf, n=num_real: np.asarray(leaf)[:n], outputs))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *collected)
