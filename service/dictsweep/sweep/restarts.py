"""Trainers that crash or lose their node, seen from the driver: where they run, and their restarts.

Ray restarts a crashed trainer in its bundle of the wave's placement group; when its node left the
cluster, Ray first moves the bundle to a node with room. The driver does not wait for it: the
other trainers go on, and `poll_restarts` hands it back once it answers (the driver then resumes
it where its checkpoint stands, with batches cut from the windows of the node it runs on now). A
trainer whose bundle no node has taken for NODE_WAIT_SECONDS is lost: its SAEs fail naming the
node that left, and its checkpoint stays for `--resume`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from dictsweep.errors import first_line

if TYPE_CHECKING:
    from dictsweep.sweep.driver import Slot

log = logging.getLogger(__name__)

# how long a trainer whose node left the cluster waits for a node with room (a replacement node
# comes within minutes) before its SAEs count as failed; `--resume` continues them from their checkpoints
NODE_WAIT_SECONDS = 300.0
RESTART_SECONDS = 600.0  # a trainer whose bundle has a node but that does not answer for this long is dead


def restart(slot: Slot) -> None:
    """A trainer that crashed: Ray restarts it; ask where it stands, and take the answer when it comes."""
    slot.lost_node, slot.node = slot.node, None
    slot.in_flight.clear()
    slot.crashed_at = time.time()
    slot.restarting = slot.actor.status.remote()


def poll_restarts(slots: list[Slot], group) -> list[tuple[Slot, dict]]:
    """The restarting trainers that are back, with their status (`Trainer.status`); those that no
    node has taken for NODE_WAIT_SECONDS are marked lost, naming the node they ran on."""
    import ray
    from ray.util.placement_group import placement_group_table

    back = []
    for slot in [s for s in slots if s.alive and s.restarting is not None]:
        if ray.wait([slot.restarting], timeout=0)[0]:
            try:
                back.append((slot, ray.get(slot.restarting)))
                slot.restarting = None
                continue
            except ray.exceptions.ActorUnavailableError:  # not back yet: ask again
                slot.restarting = slot.actor.status.remote()
            except ray.exceptions.RayError as error:
                slot.alive, slot.error = False, f"trainer {slot.key} failed: {first_line(error)}"
                continue
        waited = time.time() - slot.crashed_at
        if waited > NODE_WAIT_SECONDS and not placement_group_table(group)["bundles_to_node_id"].get(slot.bundle):
            slot.alive, slot.lost = False, True
            slot.error = (
                f"node {describe_node(slot.lost_node)} left the cluster and no node had room for trainer "
                f"{slot.key} for {waited:.0f} s; its checkpoint is kept: run the sweep again with --resume "
                "once the cluster has room"
            )
            log.error(slot.error)
        elif waited > RESTART_SECONDS:
            slot.alive, slot.error = False, f"trainer {slot.key} did not come back from a restart"
    return back


def describe_node(node: str | None) -> str:
    """A node as `ray status` and the dashboard show it: the head of its ID, and its address."""
    import ray

    address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node), "address unknown")
    return f"{(node or 'unknown')[:12]} ({address})"


def placement(slots: list[Slot]) -> str:
    """Which trainers run on which node, e.g. `node 3f1a4ac085c4 (10.0.0.5): w0-t0, w0-t1`."""
    nodes: dict[str | None, list[str]] = {}
    for slot in slots:
        nodes.setdefault(slot.node, []).append(slot.key)
    return "; ".join(f"node {describe_node(node)}: {', '.join(keys)}" for node, keys in nodes.items())
