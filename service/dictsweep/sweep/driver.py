"""The driver of a sweep's training: waves of trainer actors, then the SAEs trained with ZeRO.

Each trainer works through one sequence of tasks: train batches 0..T-1, eval batches 0..E-1, then
`finish` (metrics and export). The driver keeps at most `batches_in_flight` of them queued per
trainer (backpressure) and hands every trainer on a node the same batches as pieces of the windows
that node's readers hold in its object store (`stream.streams`); a trainer a window budget ahead of
the slowest one on its node waits for it. A trainer that crashes is restarted by Ray from its
checkpoint (on another node when its own left the cluster) while the others go on; the driver asks
where it stands and sends the batches from there, cut from the windows of the node it is on now. A
trainer that no node takes within NODE_WAIT_SECONDS fails with its node named, and keeps its
checkpoint for `--resume`. Every SAE is recorded (`ledger`) as soon as its trainer finishes, so a
later failure loses nothing that finished, and `--resume` picks a sweep up where its driver stopped.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

from dictsweep.config import SweepSpec
from dictsweep.errors import InputError, RunError, check_stop, first_line, held_stop
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.stream.streams import Streams
from dictsweep.sweep.lease import Lease
from dictsweep.sweep.ledger import Ledger
from dictsweep.sweep.plan import GridPoint, Plan, TrainerPlan, ZeroPlan
from dictsweep.sweep.preflight import transcoder_target
from dictsweep.sweep.throughput import merge_stream_stats, trainer_entry
from dictsweep.sweep.restarts import describe_node, placement, poll_restarts, restart

log = logging.getLogger(__name__)


# -- one trainer, seen from the driver ----------------------------------------------------------------
@dataclass
class Slot:
    """A trainer actor and its place in its task sequence (train steps, eval steps, finish)."""

    key: str  # stable across restarts and resumes: names its checkpoint
    plan: TrainerPlan
    actor: object
    node: str | None = None
    cursor: int = 0  # next task to send
    in_flight: deque = field(default_factory=deque)  # (task, ref)
    alive: bool = True
    done: bool = False
    error: str = ""
    restarts: int = 0
    first_step: int | None = None  # where it stood when this driver first located it
    trained_at: float | None = None  # when its last training step came back
    bundle: int = 0  # its bundle in the wave's placement group: where Ray restarts it
    restarting: object = None  # while Ray restarts it: the status call that answers once it is back
    crashed_at: float = 0.0
    lost_node: str | None = None  # the node it ran on before it crashed
    lost: bool = False  # failed because no node took it after its node left: `--resume` continues it

    @property
    def points(self) -> list[GridPoint]:
        return [p for e in self.plan.ensembles for p in e.points]


class Driver:
    """One run of a sweep's training (or its resumption) on a Ray cluster."""

    def __init__(
        self,
        spec: SweepSpec,
        dataset: ActivationDataset,
        plan: Plan,
        run_dir: str,
        resume: bool,
        lease: Lease | None = None,
    ):
        self.spec, self.dataset, self.plan = spec, dataset, plan
        self.storage = run_dir
        # at least one of each: `preflight` checked the spec against the dataset
        self.total_steps = spec.train.tokens // spec.train.batch_rows
        self.eval_steps = min(spec.train.eval_tokens, dataset.n_eval_rows) // spec.train.batch_rows
        self.input_scale = math.sqrt(dataset.d_model / dataset.mean_sq_norm())
        self.target = transcoder_target(spec, dataset)  # (d_target, its scale) when the grid trains transcoders
        truth = dataset.ground_truth("target_features" if self.target else "features")
        self.ground_truth = truth.numpy() if truth is not None else None
        if spec.select.metric == "loss_recovered":
            from dictsweep.sweep.splice import splice_source

            unspliceable = splice_source(dataset, bool(self.target))
            if isinstance(unspliceable, str):
                raise InputError(f"select.metric: loss_recovered needs a dataset with a source model; {unspliceable}")
        width, scale = self.target or (dataset.d_model, self.input_scale)  # of what the dictionaries reconstruct
        self.ledger = Ledger(spec, plan, run_dir, resume, lease, scale, width)
        self.ledger.log_dataset(spec.data.uri, dataset.manifest)
        self.baseline_feed = None  # sweep.baselines.BaselineFeed, from the first wave this driver runs

    # -- waves ------------------------------------------------------------------------------------------
    def run(self) -> None:
        ledger = self.ledger
        for wave_index, wave in enumerate(self.plan.waves):
            pending = []
            for trainer in wave:
                saved = ledger.saved(f"w{wave_index}-t{trainer.index}")
                if saved is not None:  # finished before the driver stopped: already recorded
                    ledger.replay(saved)
                else:
                    pending.append(trainer)
            if pending:
                self.run_wave(wave_index, pending, f"wave {wave_index + 1}/{len(self.plan.waves)}")
        for index, zero in enumerate(self.plan.zero):
            key = f"zero-{index}"
            saved = ledger.saved(key)
            if saved is not None:
                ledger.replay(saved)
            else:
                self.run_zero(key, zero)

    def run_zero(self, key: str, zero: ZeroPlan) -> None:
        """One SAE too large for a device: DeepSpeed ZeRO over several, through Ray Train."""
        from dictsweep.train.zero import train_zero

        spec, name = self.spec, zero.point.name
        log.info(f"{name}: ZeRO-{zero.stage} over {zero.workers} {zero.device} workers")
        try:
            done = train_zero(
                spec.data.uri,
                zero.point.params(),
                spec.train,
                spec.stream.seed,
                spec.stream.shuffle_shards,
                zero.workers,
                storage_uri=self.storage,
                name=name,
                metadata=self.metadata(zero.point),
                stage=zero.stage,
                offload=zero.offload,
                use_gpu=zero.device == "cuda",
            )
        except (RunError, InputError) as error:
            self.ledger.record_failure({name: f"ZeRO training failed: {error}"})
            return
        self.ledger.log_records([{"name": name, **entry} for entry in done["metric_history"]], key)
        self.ledger.record(
            key, {"finished": {name: {part: done[part] for part in ("metrics", "uri", "plot")}}, "failed": {}}
        )

    def run_wave(self, wave_index: int, trainers: list[TrainerPlan], label: str) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dictsweep.train.actor import Trainer

        spec = self.spec
        cuda = trainers[0].device == "cuda"
        gpus = spec.resources.gpus_per_trainer
        bundle = (
            {"GPU": gpus, "CPU": spec.resources.cpus_per_trainer} if cuda else {"CPU": spec.resources.cpus_per_trainer}
        )
        # PACK: trainers on as few nodes as fit, so a node's trainers share one read of the data
        group = placement_group([bundle] * len(trainers), strategy="PACK")
        ray.get(group.ready())
        threads = spec.resources.torch_threads or max(1, (os.cpu_count() or 1) // len(trainers))
        remote = ray.remote(Trainer)
        slots = []
        for bundle_index, plan in enumerate(trainers):
            key = f"w{wave_index}-t{plan.index}"
            retire(f"{spec.name}-{key}")
            actor = remote.options(
                name=f"{spec.name}-{key}",
                max_restarts=spec.resources.max_restarts,
                max_task_retries=0,
                num_gpus=gpus if cuda else 0,
                num_cpus=spec.resources.cpus_per_trainer,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle_index),
            ).remote(
                [e.spec() for e in plan.ensembles],
                self.dataset.d_model,
                spec.train,
                self.total_steps,
                self.input_scale,
                self.dataset.dtype,
                plan.device,
                threads,
                fs.join(self.storage, "checkpoints", f"{key}.pt"),
                self.target,
            )
            slots.append(Slot(key, plan, actor, bundle=bundle_index))
        streams = Streams(spec, self.dataset, self.total_steps, self.eval_steps)
        try:
            for slot in slots:
                self.locate(slot)
            log.info(f"{label}: placement {placement(slots)}")
            self.start_baseline_feed(slots[0].node)
            started = time.perf_counter()
            self.drive(slots, streams, label, group)
            self.record_throughput(slots, streams, started, gpus if cuda else 1 / len(slots))
        finally:
            for slot in slots:
                ray.kill(slot.actor, no_restart=True)
            streams.close()
            remove_placement_group(group)
        for slot in slots:
            if not slot.done:  # not saved in storage: `--resume` tries these trainers again
                self.ledger.record_failure({p.name: slot.error for p in slot.points})
                if slot.lost:  # its checkpoint waits in storage: this run is not over
                    self.ledger.result.resumable.update(p.name for p in slot.points)

    def record_throughput(self, slots: list[Slot], streams: Streams, started: float, share: float) -> None:
        """Add a wave to the sweep's stream and training-phase figures (`throughput`): its training phase
        ran from `started` to the last trainer's last training step; each trainer had `share` of a device."""
        import ray

        seconds = max((slot.trained_at for slot in slots if slot.trained_at), default=started) - started
        trainers = [
            trainer_entry(
                slot.key,
                ray.get(slot.actor.usage.remote()),
                max(0, self.total_steps - slot.first_step),
                self.spec.train.batch_rows,
                seconds,
                share,
            )
            for slot in slots
            if slot.alive
        ]
        self.ledger.result.stream = merge_stream_stats(self.ledger.result.stream, streams.stats(), trainers, seconds)

    def locate(self, slot: Slot) -> None:
        """Ask a (re)started trainer where it stands; its task sequence resumes there."""
        import ray

        deadline = time.time() + 600
        while True:
            try:
                status = ray.get(slot.actor.status.remote())
                break
            except ray.exceptions.ActorUnavailableError:
                if time.time() > deadline:  # restarting for ever: treat as dead
                    slot.alive, slot.error = False, f"trainer {slot.key} did not come back from a restart"
                    return
                time.sleep(0.5)  # Ray is restarting it
            except ray.exceptions.RayError as error:
                slot.alive, slot.error = False, f"trainer {slot.key} failed: {first_line(error)}"
                return
        self.placed(slot, status)

    def placed(self, slot: Slot, status: dict) -> None:
        """A trainer that answers: it goes on from its checkpoint's step, on the node it runs on now."""
        slot.node, slot.cursor, slot.restarting = status["node"], status["position"], None
        slot.first_step = status["position"] if slot.first_step is None else slot.first_step
        slot.in_flight.clear()
        self.ledger.result.placements.setdefault(slot.key, []).append(
            {"node": slot.node, "position": slot.cursor, "restored": status["restored"]}
        )
        if slot.lost_node is not None:
            where = "on the same node" if slot.node == slot.lost_node else f"on node {describe_node(slot.node)}"
            log.info(f"trainer {slot.key} restarted {where}, from step {slot.cursor}")
        with held_stop():  # points already stored are skipped: only what a dead driver missed
            self.ledger.log_records(status["replay"], slot.key)

    def drive(self, slots: list[Slot], streams: Streams, label: str, group) -> None:
        """Send every trainer its tasks in order, at most `batches_in_flight` ahead; collect results."""
        import ray

        from dictsweep.sweep.progress import RateEstimate, TrainingProgress, clock

        limit, total, last = self.spec.stream.batches_in_flight, self.total_steps, self.total_steps + self.eval_steps
        rows = self.spec.train.batch_rows
        estimate = RateEstimate(last)  # train and eval steps alike: a batch each
        with TrainingProgress(self.ledger.board) as progress:
            bar = progress.add_task(f"{label} training", total=last, rate="-", left=clock(None))
            while any(slot.alive and not slot.done for slot in slots):
                for slot in slots:
                    while (
                        slot.alive
                        and slot.restarting is None
                        and slot.cursor <= last
                        and len(slot.in_flight) < limit
                        and not (self.checkpoints_after(slot.cursor) and slot.in_flight)
                    ):
                        task = self.send(slot, slot.cursor, streams)
                        if task is None:
                            break  # its batch lies beyond the node's window budget: the slowest goes first
                        slot.in_flight.append((slot.cursor, task))
                        slot.cursor += 1
                heads = [slot.in_flight[0][1] for slot in slots if slot.alive and slot.in_flight]
                if heads:
                    ray.wait(heads, num_returns=1, timeout=5.0)
                else:
                    time.sleep(0.2)  # every trainer left is restarting
                check_stop()  # a stop signal that landed inside Ray goes on from here
                for slot in slots:
                    self.collect(slot)
                for slot, status in poll_restarts(slots, group):
                    self.placed(slot, status)
                if self.baseline_feed is not None:
                    self.baseline_feed.pump()  # never waits: the trainers go on whatever it does
                steps = min((min(s.cursor - len(s.in_flight), last) for s in slots if s.alive), default=last)
                self.advance(slots, streams)
                estimate.update(steps)
                progress.update(
                    bar,
                    completed=steps,
                    left=clock(estimate.seconds_left(steps)),
                    rate=f"{estimate.rate * rows:,.0f}" if estimate.rate else "-",
                    description=f"{label} {'training' if steps < total else 'evaluating'}",
                )
        self.ledger.tracker.flush()

    def advance(self, slots: list[Slot], streams: Streams) -> None:
        """Per node: release the windows its trainers have all passed, and read ahead of the slowest."""
        for node in {slot.node for slot in slots if slot.alive}:
            slowest = min(s.cursor - len(s.in_flight) for s in slots if s.alive and s.node == node)
            streams.advance(node, "train", slowest)
            if slowest >= self.total_steps:  # eval windows are read once every trainer there needs them
                streams.advance(node, "eval", slowest - self.total_steps)

    def send(self, slot: Slot, task: int, streams: Streams):
        """Submit task `task` of a trainer: a train step, an eval step, or the final export (None: its
        batch must wait for the node's slowest trainer)."""
        if task < self.total_steps + self.eval_steps:
            split, index = ("train", task) if task < self.total_steps else ("eval", task - self.total_steps)
            pieces = streams.pieces(slot.node, split, index)
            if pieces is None:
                return None
            if split == "train" and self.baseline_feed is not None:
                self.baseline_feed.offer(index, pieces)  # the same windows: no extra read or copy
            method = slot.actor.step if split == "train" else slot.actor.eval_step
            batches = self.total_steps if split == "train" else self.eval_steps
            upcoming = streams.pieces(slot.node, split, index + 1) if index + 1 < batches else None
            return method.remote(index, pieces, upcoming)  # the trainer moves `upcoming` while it steps
        metadata = {p.name: self.metadata(p) for p in slot.points}
        return slot.actor.finish.remote(self.storage, metadata, self.ground_truth)

    def collect(self, slot: Slot) -> None:
        """Take a trainer's finished tasks in order; on a crash, let Ray restart it and resume."""
        import ray

        while slot.alive and slot.in_flight and ray.wait([slot.in_flight[0][1]], timeout=0)[0]:
            task, ref = slot.in_flight.popleft()
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                slot.restarts += 1
                if slot.restarts > self.spec.resources.max_restarts:
                    slot.alive, slot.error = False, f"trainer {slot.key} failed: {first_line(error)}"
                    return
                restart(slot)  # Ray restarts it; its checkpoint says where to go on
                return
            except ray.exceptions.RayTaskError as error:  # a bug or bad data: restarting will not help
                bad_input = input_error(error)
                if bad_input is not None:  # a corrupt shard: every trainer would meet it; stop the sweep
                    raise bad_input from None
                slot.alive, slot.error = False, f"trainer {slot.key} failed: {first_line(error)}"
                return
            with held_stop():  # a finished task is recorded whole before a stop signal goes on
                if task < self.total_steps:
                    if task == self.total_steps - 1:
                        slot.trained_at = time.perf_counter()
                    for record in [r for r in value if "peak_device_bytes" in r]:
                        self.ledger.check_memory(slot.key, slot.plan, record["peak_device_bytes"])
                    self.ledger.log_records([r for r in value if "name" in r], slot.key)
                elif task == self.total_steps + self.eval_steps:
                    self.ledger.record(slot.key, value)
                    slot.done = True

    def checkpoints_after(self, task: int) -> bool:
        """Whether a trainer checkpoints at the end of train step `task` (the trainer's rule). Such a
        step is sent only once every earlier step's curve points are stored: a checkpoint is where a
        resumed trainer starts, and it never produces the points before it again."""
        if task >= self.total_steps:
            return False
        rows, every = self.spec.train.batch_rows, self.spec.train.checkpoint_every_tokens
        tokens = (task + 1) * rows
        return task + 1 == self.total_steps or bool(every and tokens // every != (tokens - rows) // every)

    def metadata(self, point: GridPoint) -> dict:
        """Export metadata of one SAE (SAELens `metadata` keys, our own under `dictsweep`)."""
        from dictsweep.store.models import export_names

        source = self.dataset.manifest.source or {}
        return {
            **export_names(source),
            "dataset_path": self.spec.data.uri,
            "context_size": source.get("context"),
            "dictsweep": {
                "sweep": self.spec.name,
                "point": point.name,
                **point.params(),
                "tokens": self.spec.train.tokens,
            },
        }

    # -- baselines (`baselines`): fed the train batches as the trainers get them ----------------------
    def start_baseline_feed(self, node: str | None) -> None:
        """Start the baseline sampler (fed from this wave on) unless there is none to fit or it runs already."""
        from dictsweep.sweep.baselines import planned_batches, start_feed

        spec = self.spec
        if (
            not spec.baselines
            or self.baseline_feed is not None
            or fs.exists(fs.join(self.storage, "baselines", "results.json"))
        ):
            return
        planned = planned_batches(self.total_steps, spec.train.batch_rows, spec.evaluation.baseline_rows)
        per_batch = min(spec.train.batch_rows, max(1, spec.evaluation.ica_rows // len(planned)))
        per_batch = per_batch if "ica" in spec.baselines else 0  # the sample is for FastICA alone
        retire(f"{spec.name}-baselines")
        self.baseline_feed = start_feed(
            f"{spec.name}-baselines",
            node,
            self.dataset.d_model,
            self.dataset.dtype,
            planned,
            per_batch,
            fs.join(self.storage, "baselines", "state.pt"),
            spec.stream.batches_in_flight,
        )


# -- helpers -------------------------------------------------------------------------------------------
def retire(name: str) -> None:
    """Kill a trainer left under this name by an earlier driver of the same sweep (one that died)."""
    import ray

    try:
        ray.kill(ray.get_actor(name), no_restart=True)
    except ValueError:
        return  # none: the usual case
    for _ in range(100):  # the name is free once Ray has buried the actor
        try:
            ray.get_actor(name)
        except ValueError:
            return
        time.sleep(0.1)


def input_error(error: BaseException) -> InputError | None:
    """The InputError (a corrupt or truncated shard) that a Ray task's failure comes from, if any:
    Ray wraps it once for each task it passed through (reader, broadcaster, trainer)."""
    import ray

    while isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    return error if isinstance(error, InputError) and not isinstance(error, ray.exceptions.RayError) else None
