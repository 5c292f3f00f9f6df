"""Checkpoints: one manager, save, restore, the latest step, and finding a model's variables.

Every checkpoint folder (W/checkpoints/latest, best, game, or one per stopping criterion) is an
orbax CheckpointManager keeping one step. A step folder holds two items: 'state' (a pytree as
flax's state dict, so any folder's 'state' can be restored without its template by
`restore_variables`) and 'meta' (JSON: the loop's counters, or the evaluation row that chose it).
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sarcoma_jax.input_pipeline import ConfigError
from sarcoma_jax.workdir import jsonable


def manager(directory: pathlib.Path) -> ocp.CheckpointManager:
    """The manager of one checkpoint folder (created), keeping the latest step only.

    Saves are synchronous, so a run killed right after a save finds it complete; a save cut short
    by a kill leaves a temporary folder, which is removed when the manager opens.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).resolve(), options=options)


def save(manager: ocp.CheckpointManager, step: int, tree: Any, meta: Mapping[str, Any]) -> None:
    """Saves a pytree and a JSON record at `step`, replacing an earlier save of that step (a
    resumed run makes it again when it was killed between two saves of one step)."""
    step = int(step)
    if step in manager.all_steps():
        manager.delete(step)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(tree)),
            meta=ocp.args.JsonSave(jsonable(dict(meta))),
        ),
    )


def restore(manager: ocp.CheckpointManager, template: Any) -> tuple[Any, dict]:
    """The latest step's pytree (shaped like `template`) and its JSON record.

    The arrays come through the host, uncommitted to any device: restored arrays are committed,
    fresh ones are not, and jit would compile its functions again for the difference.
    """
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(template)
    )
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    state_dict = jax.tree.map(jnp.asarray, jax.device_get(restored.state))
    return flax.serialization.from_state_dict(template, state_dict), restored.meta


def latest_step(directory: pathlib.Path) -> int | None:
    """The step of the checkpoint in a checkpoint folder, or None (no folder, or no step)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return None
    steps = [
        int(child.name)
        for child in directory.iterdir()
        if child.name.isdigit() and (child / "state").is_dir()
    ]
    return max(steps) if steps else None


def resolve_state_dir(
    path: str | pathlib.Path, what: str = "config.source_checkpoint"
) -> pathlib.Path:
    """The 'state' folder of a model's checkpoint.

    Args:
      path: a segmentation run's workdir (its checkpoints/best is used), a checkpoint folder such
        as W/checkpoints/best or W/checkpoints/confusion (its newest step), one step folder in
        it, or that step's 'state'.
      what: how the caller names the path, for messages.

    Raises:
      ConfigError: nothing there, or no checkpoint in it.
    """
    root = pathlib.Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"checkpoint not found: {path} ({what})")
    if root.name == "state" and root.is_dir():
        return root
    for folder in (root / "checkpoints" / "best", root):
        if (folder / "state").is_dir():
            return folder / "state"
        step = latest_step(folder)
        if step is not None:
            return folder / str(step) / "state"
    raise ConfigError(
        f"no checkpoint in {path} ({what}): expected a segmentation workdir with "
        "checkpoints/best, a checkpoint folder, or one of its steps"
    )


def restore_variables(state_dir: pathlib.Path) -> dict:
    """{'params', 'batch_stats'} of the model whose state `resolve_state_dir` found (a
    segmentation TrainState or a target map's variables; 'batch_stats' may be {})."""
    restored = ocp.StandardCheckpointer().restore(pathlib.Path(state_dir).resolve())
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
