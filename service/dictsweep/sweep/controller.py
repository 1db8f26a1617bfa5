"""The driver of a sweep: plan, start actors, stream batches, record, select, export.

Each trainer works through one sequence of tasks: train batches 0..T-1, eval batches 0..E-1, then
`finish` (metrics and export). The driver keeps at most `batches_in_flight` of them queued per
trainer (backpressure) and hands every trainer on a node the same batch references from that
node's broadcaster. A trainer that crashes is restarted by Ray from its checkpoint; the driver asks
where it stands and sends the batches from there. Every SAE is recorded in MLflow and in the
sweep's storage as soon as its trainer finishes, so a later failure loses nothing that finished,
and `--resume` picks a sweep up where its driver stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dictsweep.config import SweepSpec
from dictsweep.errors import InputError, RunError
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.sweep.plan import GridPoint, Plan, TrainerPlan, ZeroPlan, grid_points, make_plan, plan_from_dict
from dictsweep.sweep.select import select
from dictsweep.track import SELECTED_TAG, STATUS_TAG, Tracker

INDEX_METRICS = ("fvu", "mse", "l0", "dead_fraction", "mmcs_ground_truth")


@dataclass
class SweepResult:
    """What a sweep produced: per point its metrics (finished) or its error (failed)."""

    plan: Plan
    finished: dict[str, dict] = field(default_factory=dict)  # name -> {"point", "metrics", "uri", "run_id"}
    failed: dict[str, str] = field(default_factory=dict)  # name -> why
    selected: set[str] = field(default_factory=set)
    export_dir: str = ""
    tracking_uri: str = ""
    stream: dict = field(default_factory=dict)
    baselines: list[dict] = field(default_factory=list)  # {"name", "kind", "k", "n_atoms", "metrics", "uri", "run_id"}


# -- data, cluster and plan ---------------------------------------------------------------------------
def absolute(uri: str) -> str:
    """Local paths made absolute (actors may run elsewhere); URIs with a scheme unchanged."""
    return uri if "://" in uri and not uri.startswith("file://") else os.path.abspath(uri.removeprefix("file://"))


def pin_paths(spec: SweepSpec) -> SweepSpec:
    """The spec with every local path absolute, taken from the working directory now."""
    spec = spec.model_copy(deep=True)
    spec.data.uri = absolute(spec.data.uri)
    spec.export.dir = absolute(spec.export_dir)
    spec.storage.dir = absolute(spec.storage_dir)
    return spec


def open_dataset(spec: SweepSpec) -> ActivationDataset:
    """The sweep's dataset; with `data.synth` set, write it first if the prefix holds none."""
    if spec.data.synth is not None and not fs.exists(fs.join(spec.data.uri, "manifest.json")):
        from dictsweep.store.synth import synth_dataset

        print(f"writing synthetic dataset to {spec.data.uri} ...", flush=True)
        synth_dataset(spec.data.uri, spec.data.synth)
    return ActivationDataset.open(spec.data.uri)


def start_ray(address: str | None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), or start a local Ray for this process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # logical CPUs above the real cores: trainers thread themselves, readers mostly wait on I/O
        ray.init(address="local", num_cpus=2 * max(2, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=True, logging_level="warning")


def cluster_devices(spec: SweepSpec) -> tuple[str, int, int]:
    """(device kind, device count, memory per device) from the Ray cluster and the spec."""
    import ray

    start_ray(None)

    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = spec.resources.device
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise InputError("resources.device: 'cuda' asked for, but the Ray cluster has no GPUs")
    share = spec.resources.gpus_per_trainer if device == "cuda" else 1.0
    count = spec.resources.trainers or (int(gpus / share) if device == "cuda" else 1)
    if spec.resources.device_memory_gb:
        memory = int(spec.resources.device_memory_gb * 2**30)
    elif device == "cuda":
        memory = ray.get(ray.remote(num_gpus=1)(_gpu_memory).remote())
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    return device, count, int(memory * share)  # a trainer plans with its share of the device


def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def given_devices(spec: SweepSpec) -> tuple[str, int, int] | None:
    """The devices the spec names outright (kind, count and memory), for planning without a cluster."""
    resources = spec.resources
    if resources.device != "auto" and resources.trainers and resources.device_memory_gb:
        return resources.device, resources.trainers, int(resources.device_memory_gb * 2**30)
    return None


def plan_sweep(spec: SweepSpec, d_model: int, device: str, n_devices: int, memory: int) -> Plan:
    resources = spec.resources
    return make_plan(grid_points(spec), d_model, spec.train.batch_rows, device, n_devices, memory,
                     resources.max_members, resources.memory_headroom, resources.zero, resources.zero_stage,
                     resources.zero_offload, resources.zero_workers)


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

    @property
    def points(self) -> list[GridPoint]:
        return [p for e in self.plan.ensembles for p in e.points]


class SweepRun:
    """One run of a sweep (or its resumption) on a Ray cluster."""

    def __init__(self, spec: SweepSpec, dataset: ActivationDataset, plan: Plan, run_dir: str, resume: bool):
        self.spec, self.dataset, self.plan = spec, dataset, plan
        self.storage = run_dir
        self.total_steps = spec.train.tokens // spec.train.batch_rows
        self.eval_steps = min(spec.train.eval_tokens, dataset.n_eval_rows) // spec.train.batch_rows
        if self.total_steps == 0:
            raise InputError(f"train.tokens ({spec.train.tokens}) is less than one batch ({spec.train.batch_rows} rows)")
        if self.eval_steps == 0:
            raise InputError(f"{dataset.uri}: the eval split has {dataset.n_eval_rows} rows, fewer than one batch of "
                             f"{spec.train.batch_rows}; final metrics need held-out rows")
        self.input_scale = math.sqrt(dataset.d_model / dataset.mean_sq_norm())
        truth = dataset.ground_truth()
        self.ground_truth = truth.numpy() if truth is not None else None
        self.points = {p.name: p for p in plan.points}
        self.result = SweepResult(plan, export_dir=spec.export_dir)
        self.tracker = Tracker(spec.tracking.uri, spec.experiment)
        self.result.tracking_uri = self.tracker.uri
        self.runs = self.start_runs(resume)
        self.logged_tokens: dict[str, int] = {}
        self.baseline_feed = None  # sweep.baselines.BaselineFeed, from the first wave this driver runs

    # -- tracking ---------------------------------------------------------------------------------------
    def start_runs(self, resume: bool) -> dict[str, str]:
        """MLflow runs of the sweep and of every SAE (reused when resuming); saved in storage."""
        saved_uri = fs.join(self.storage, "runs.json")
        if resume and fs.exists(saved_uri):
            saved = json.loads(fs.read_text(saved_uri))
            self.tracker.parent_id = saved["parent"]
            return saved["saes"]
        tracker, spec = self.tracker, self.spec
        tracker.start_sweep(spec.name, flatten(spec.model_dump(mode="json")),
                            tags={"dictsweep.dataset": spec.data.uri, "dictsweep.job_id": os.environ.get("DICTSWEEP_JOB_ID", ""),
                                  "dictsweep.storage": self.storage})
        runs = {name: tracker.start_sae(name, {**p.params(), "dataset": spec.data.uri, "tokens": spec.train.tokens,
                                               "batch_rows": spec.train.batch_rows})
                for name, p in self.points.items()}
        fs.write_text(saved_uri, json.dumps({"parent": tracker.parent_id, "saes": runs}, indent=1))
        fs.write_text(fs.join(self.storage, "plan.json"), json.dumps(self.plan.to_dict(), indent=1))
        return runs

    def check_memory(self, slot: Slot, measured: int) -> None:
        """Compare a trainer's measured first step with the plan's memory model; warn when it is off."""
        planned, device = slot.plan.used_bytes, slot.plan.memory_bytes
        if measured > planned * 1.25 or measured > device * (1 - self.spec.resources.memory_headroom / 2):
            note = (f"trainer {slot.key}: a step took {measured / 2**30:.2f} GiB, the plan expected "
                    f"{planned / 2**30:.2f} GiB of {device / 2**30:.1f} GiB; raise resources.memory_headroom "
                    f"or lower resources.max_members if it runs out of memory")
            print(note, flush=True)
            self.tracker.set_tags(self.tracker.parent_id, {f"dictsweep.memory.{slot.key}": note})

    def log_records(self, records: list[dict]) -> None:
        """Training metrics from a trainer; records replayed after a restart are not logged twice."""
        for record in records:
            name, tokens = record["name"], record["tokens"]
            if tokens > self.logged_tokens.get(name, 0):
                self.logged_tokens[name] = tokens
                self.tracker.log_metrics(self.runs[name], record["metrics"], tokens)
        if len(self.tracker.queue) > 200:
            self.tracker.flush()

    def record(self, key: str, outcome: dict) -> None:
        """A trainer's finished and failed SAEs: into storage (for `--resume`), then MLflow."""
        fs.write_text(fs.join(self.storage, "results", f"{key}.json"), json.dumps(outcome, indent=1))
        self.absorb(outcome)
        tracker = self.tracker
        for name, done in outcome["finished"].items():
            run = self.runs[name]
            tracker.log_metrics(run, {f"eval/{k}": v for k, v in done["metrics"].items()}, self.spec.train.tokens)
            tracker.log_folder(run, lambda local, uri=done["uri"]: fs.download_folder(uri, local))
            if done.get("plot"):
                tracker.log_bytes(run, fs.read_bytes(done["plot"]), "density_and_norms.png", "plots")
            tracker.set_tags(run, {STATUS_TAG: "finished"})
            tracker.end_run(run)
        self.record_failure(outcome["failed"])

    def record_failure(self, failed: dict[str, str]) -> None:
        self.result.failed.update(failed)
        for name, why in failed.items():
            self.tracker.set_tags(self.runs[name], {STATUS_TAG: "failed", "dictsweep.error": why[:4000]})
            self.tracker.end_run(self.runs[name], failed=True)
        self.tracker.flush()

    def absorb(self, outcome: dict) -> None:
        for name, done in outcome["finished"].items():
            self.result.finished[name] = {"point": self.points[name], **done, "run_id": self.runs[name]}
        self.result.failed.update(outcome["failed"])

    # -- waves ------------------------------------------------------------------------------------------
    def run(self) -> SweepResult:
        for wave_index, wave in enumerate(self.plan.waves):
            slots = []
            for trainer in wave:
                key = f"w{wave_index}-t{trainer.index}"
                saved = fs.join(self.storage, "results", f"{key}.json")
                if fs.exists(saved):  # finished before the driver stopped: already recorded
                    self.absorb(json.loads(fs.read_text(saved)))
                else:
                    slots.append(key)
            if slots:
                self.run_wave(wave_index, [t for t in wave if f"w{wave_index}-t{t.index}" in slots],
                              f"wave {wave_index + 1}/{len(self.plan.waves)}")
        for index, zero in enumerate(self.plan.zero):
            key = f"zero-{index}"
            saved = fs.join(self.storage, "results", f"{key}.json")
            if fs.exists(saved):
                self.absorb(json.loads(fs.read_text(saved)))
            else:
                self.run_zero(key, zero)
        return self.result

    def run_zero(self, key: str, zero: ZeroPlan) -> None:
        """One SAE too large for a device: DeepSpeed ZeRO over several, through Ray Train."""
        from dictsweep.train.zero import train_zero

        spec, name = self.spec, zero.point.name
        print(f"{name}: ZeRO-{zero.stage} over {zero.workers} {zero.device} workers", flush=True)
        try:
            done = train_zero(spec.data.uri, zero.point.params(), spec.train, spec.stream.seed,
                              spec.stream.shuffle_shards, zero.workers, storage_uri=self.storage, name=name,
                              metadata=self.metadata(zero.point), stage=zero.stage, offload=zero.offload,
                              use_gpu=zero.device == "cuda")
        except (RunError, InputError) as error:
            self.record_failure({name: f"ZeRO training failed: {error}"})
            return
        self.log_records([{"name": name, **entry} for entry in done["metric_history"]])
        self.record(key, {"finished": {name: {part: done[part] for part in ("metrics", "uri", "plot")}}, "failed": {}})

    def run_wave(self, wave_index: int, trainers: list[TrainerPlan], label: str) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dictsweep.train.actor import Trainer

        spec = self.spec
        cuda = trainers[0].device == "cuda"
        gpus = spec.resources.gpus_per_trainer
        bundle = {"GPU": gpus, "CPU": spec.resources.cpus_per_trainer} if cuda else {"CPU": spec.resources.cpus_per_trainer}
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
                name=f"{spec.name}-{key}", max_restarts=spec.resources.max_restarts, max_task_retries=0,
                num_gpus=gpus if cuda else 0, num_cpus=spec.resources.cpus_per_trainer,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle_index)).remote(
                [e.spec() for e in plan.ensembles], self.dataset.d_model, spec.train, self.total_steps,
                self.input_scale, self.dataset.dtype, plan.device, threads,
                fs.join(self.storage, "checkpoints", f"{key}.pt"))
            slots.append(Slot(key, plan, actor))
        streams = Streams(spec, self.dataset)
        try:
            for slot in slots:
                self.locate(slot)
            self.start_baseline_feed(slots[0].node)
            self.drive(slots, streams, label)
            self.result.stream = merge_stream_stats(self.result.stream, streams.stats(), [
                ray.get(slot.actor.data_wait.remote()) for slot in slots if slot.alive])
        finally:
            for slot in slots:
                ray.kill(slot.actor, no_restart=True)
            streams.close()
            remove_placement_group(group)
        for slot in slots:
            if not slot.done:  # not saved in storage: `--resume` tries these trainers again
                self.record_failure({p.name: slot.error for p in slot.points})

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
        slot.node, slot.cursor = status["node"], status["position"]
        slot.in_flight.clear()

    def drive(self, slots: list[Slot], streams: "Streams", label: str) -> None:
        """Send every trainer its tasks in order, at most `batches_in_flight` ahead; collect results."""
        import ray
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        limit, total, last = self.spec.stream.batches_in_flight, self.total_steps, self.total_steps + self.eval_steps
        start, rows = time.perf_counter(), self.spec.train.batch_rows
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn()) as progress:
            bar = progress.add_task(f"{label} training", total=total, rate="-")
            while any(slot.alive and not slot.done for slot in slots):
                for slot in slots:
                    while slot.alive and slot.cursor <= last and len(slot.in_flight) < limit:
                        slot.in_flight.append((slot.cursor, self.send(slot, slot.cursor, streams)))
                        slot.cursor += 1
                heads = [slot.in_flight[0][1] for slot in slots if slot.alive and slot.in_flight]
                if heads:
                    ray.wait(heads, num_returns=1, timeout=5.0)
                for slot in slots:
                    self.collect(slot)
                if self.baseline_feed is not None:
                    self.baseline_feed.pump()  # never waits: the trainers go on whatever it does
                steps = min((min(s.cursor - len(s.in_flight), total) for s in slots if s.alive), default=total)
                streams.forget(min((s.cursor - len(s.in_flight) for s in slots if s.alive), default=last))
                seconds = max(time.perf_counter() - start, 1e-9)
                progress.update(bar, completed=steps, rate=f"{steps * rows / seconds:,.0f}")
        self.tracker.flush()

    def send(self, slot: Slot, task: int, streams: "Streams"):
        """Submit task `task` of a trainer: a train step, an eval step, or the final export."""
        if task < self.total_steps:
            batch = streams.batch(slot.node, "train", task)
            if self.baseline_feed is not None:
                self.baseline_feed.offer(task, batch)  # the same reference: no extra read or copy
            return slot.actor.step.remote(task, batch)
        if task < self.total_steps + self.eval_steps:
            index = task - self.total_steps
            return slot.actor.eval_step.remote(index, streams.batch(slot.node, "eval", index))
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
                self.locate(slot)  # waits for Ray's restart; the checkpoint says where to go on
                return
            except ray.exceptions.RayTaskError as error:  # a bug or bad data: restarting will not help
                slot.alive, slot.error = False, f"trainer {slot.key} failed: {first_line(error)}"
                return
            if task < self.total_steps:
                for record in [r for r in value if "peak_device_bytes" in r]:
                    self.check_memory(slot, record["peak_device_bytes"])
                self.log_records([r for r in value if "name" in r])
            elif task == self.total_steps + self.eval_steps:
                self.record(slot.key, value)
                slot.done = True

    def metadata(self, point: GridPoint) -> dict:
        """Export metadata of one SAE (SAELens `metadata` keys, our own under `dictsweep`)."""
        source = self.dataset.manifest.source or {}
        return {"model_name": source.get("model"), "hook_name": source.get("hook"),
                "dataset_path": self.spec.data.uri, "context_size": source.get("context"),
                "dictsweep": {"sweep": self.spec.name, "point": point.name, **point.params(),
                              "tokens": self.spec.train.tokens}}

    # -- the end ----------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Select; fit the baselines and splice the selected dictionaries into the source model (where
        asked for); export the selected dictionaries with index.json, register them, log sweep
        metrics and the Pareto plot."""
        spec, tracker, result = self.spec, self.tracker, self.result
        result.selected = select({name: {"n_latents": r["point"].n_latents, "metrics": r["metrics"]}
                                  for name, r in result.finished.items()})
        result.baselines = self.fit_baselines()
        spliced = self.splice(result.baselines)
        entries = []
        for name in sorted(result.selected):
            outcome = result.finished[name]
            fs.copy_folder(outcome["uri"], fs.join(spec.export_dir, name))
            entries.append(index_entry(name, outcome["point"], outcome["metrics"], selected=True))
            entries[-1]["metrics"].update(spliced.get(name, {}))
            if spec.export.registry:
                tracker.register(spec.name, outcome["run_id"], {**outcome["point"].params(), **outcome["metrics"]})
        for name, outcome in result.finished.items():
            tracker.set_tags(outcome["run_id"], {SELECTED_TAG: str(name in result.selected).lower()})
        fs.write_text(fs.join(spec.export_dir, "index.json"), json.dumps(entries, indent=2))
        summary = {"saes_finished": len(result.finished), "saes_failed": len(result.failed),
                   "saes_selected": len(result.selected), **mmcs_between_sizes(result)}
        if result.stream:
            summary["data_wait_fraction"] = result.stream["data_wait_fraction"]
            summary["bytes_read_per_node"] = float(np.mean(result.stream["bytes_read_per_node"]))
            print(f"stream: {summary['bytes_read_per_node'] / 1e6:,.1f} MB read per node; trainers waited for "
                  f"data {summary['data_wait_fraction']:.1%} of the time", flush=True)
        tracker.log_metrics(tracker.parent_id, summary, 0)
        self.plot()
        for baseline in result.baselines:
            tracker.end_run(baseline["run_id"])
        tracker.end_run(tracker.parent_id, failed=bool(result.failed))
        tracker.flush(patience=600)
        fs.write_text(fs.join(self.storage, "complete.json"), json.dumps({"failed": sorted(result.failed)}))

    # -- baselines, spliced evaluation and the Pareto plot (`baselines`, `evaluation`) -------------------
    def start_baseline_feed(self, node: str | None) -> None:
        """Start the baseline sampler (fed from this wave on) unless there is none to fit or it runs already."""
        from dictsweep.sweep.baselines import planned_batches, start_feed

        spec = self.spec
        if (not spec.baselines or self.baseline_feed is not None
                or fs.exists(fs.join(self.storage, "baselines", "results.json"))):
            return
        planned = planned_batches(self.total_steps, spec.train.batch_rows, spec.evaluation.baseline_rows)
        per_batch = min(spec.train.batch_rows, max(1, spec.evaluation.ica_rows // len(planned)))
        per_batch = per_batch if "ica" in spec.baselines else 0  # the sample is for FastICA alone
        retire(f"{spec.name}-baselines")
        self.baseline_feed = start_feed(f"{spec.name}-baselines", node, self.dataset.d_model, self.dataset.dtype,
                                        planned, per_batch, fs.join(self.storage, "baselines", "state.pt"),
                                        spec.stream.batches_in_flight)

    def fit_baselines(self) -> list[dict]:
        """Baselines fitted on the sampled stream, matched to the selected SAEs' L0, evaluated,
        exported and recorded in MLflow (read back from storage when a resumed sweep did it before)."""
        import ray

        from dictsweep.sweep.baselines import fit_baselines

        spec, result, tracker = self.spec, self.result, self.tracker
        saved = fs.join(self.storage, "baselines", "results.json")
        if not spec.baselines:
            return []
        if fs.exists(saved):
            return json.loads(fs.read_text(saved))
        self.start_baseline_feed(None)  # every wave finished before this driver (a resume)
        feed, streams = self.baseline_feed, Streams(spec, self.dataset)

        def batch(index: int):  # a planned batch no trainer got; only the sampler holds on to it
            ref = streams.batch(node, "train", index)
            streams.forget(index + 2)
            return ref

        try:
            node = ray.get(feed.actor.status.remote())["node"] if not feed.error else None
            feed.drain(batch)
            if not feed.error:  # what the sampler cost beside the trainers, and how far it lagged
                tracker.log_metrics(tracker.parent_id, {
                    "baselines.sampler_seconds": ray.get(feed.actor.status.remote())["busy_seconds"],
                    "baselines.feed_most_waiting": feed.most_waiting}, 0)
        except ray.exceptions.RayError as error:
            feed.fail(error)
        finally:
            streams.close()
            ray.kill(feed.actor, no_restart=True)
        device, threads = self.finish_device()
        try:
            if feed.error:
                raise RunError(feed.error)
            task = ray.remote(fit_baselines).options(num_gpus=int(device == "cuda"),
                                                     num_cpus=spec.resources.cpus_per_trainer, max_retries=0)
            baselines = ray.get(task.remote(
                fs.join(self.storage, "baselines", "state.pt"), spec.baselines,
                [result.finished[name]["metrics"]["l0"] for name in sorted(result.selected)], spec.data.uri,
                self.eval_steps * spec.train.batch_rows, spec.train.batch_rows,
                self.baseline_metadata(), self.storage, self.ground_truth,
                device, threads))
        except (RunError, ray.exceptions.RayError) as error:  # the SAEs stand without their baselines
            print(f"baselines failed, none recorded: {first_line(error)}", flush=True)
            tracker.set_tags(tracker.parent_id, {"dictsweep.baselines": f"failed: {first_line(error)}"})
            return []
        for baseline in baselines:
            run = tracker.start_sae(baseline["name"], {"kind": baseline["kind"], "k": baseline["k"],
                                                       "n_atoms": baseline["n_atoms"], "dataset": spec.data.uri,
                                                       **baseline["fit"]}, role="baseline")
            tracker.log_metrics(run, {f"eval/{key}": value for key, value in baseline["metrics"].items()}, 0)
            tracker.log_folder(run, lambda local, uri=baseline["uri"]: fs.download_folder(uri, local))
            baseline["run_id"] = run
        tracker.flush()
        fs.write_text(saved, json.dumps(baselines, indent=1))
        return baselines

    def baseline_metadata(self) -> dict:
        """Export metadata of a baseline: the SAEs' (`metadata`) without a grid point."""
        source = self.dataset.manifest.source or {}
        return {"model_name": source.get("model"), "hook_name": source.get("hook"),
                "dataset_path": self.spec.data.uri, "context_size": source.get("context"),
                "dictsweep": {"sweep": self.spec.name, "tokens": self.spec.train.tokens}}

    def splice(self, baselines: list[dict]) -> dict[str, dict]:
        """Loss recovered of every selected SAE (and baseline) spliced into the dataset's source model,
        logged to their runs; {} with a printed note where it cannot run (synthetic data)."""
        import ray

        from dictsweep.sweep.splice import splice_eval, splice_source

        spec, result, tracker = self.spec, self.result, self.tracker
        runs = {name: result.finished[name]["run_id"] for name in sorted(result.selected)}
        uris = {name: result.finished[name]["uri"] for name in runs}
        if spec.evaluation.splice_baselines:
            runs.update({baseline["name"]: baseline["run_id"] for baseline in baselines})
            uris.update({baseline["name"]: baseline["uri"] for baseline in baselines})
        source = splice_source(self.dataset)
        if not spec.evaluation.splice or not uris or isinstance(source, str):
            if spec.evaluation.splice and isinstance(source, str):
                print(f"spliced evaluation skipped: {source}", flush=True)
                tracker.set_tags(tracker.parent_id, {"dictsweep.splice": f"skipped: {source}"})
            return {}
        device, threads = self.finish_device()
        print(f"splicing {len(uris)} dictionaries into {source.model} at {source.hook} ...", flush=True)
        task = ray.remote(splice_eval).options(num_gpus=int(device == "cuda"),
                                               num_cpus=spec.resources.cpus_per_trainer, max_retries=0)
        try:
            outcome = ray.get(task.remote(spec.data.uri, uris, spec.evaluation.splice_tokens, device, threads))
        except ray.exceptions.RayError as error:  # e.g. the source model is not loadable here
            print(f"spliced evaluation skipped: {first_line(error)}", flush=True)
            tracker.set_tags(tracker.parent_id, {"dictsweep.splice": f"skipped: {first_line(error)}"})
            return {}
        tracker.set_tags(tracker.parent_id, {"dictsweep.splice": f"{outcome.kind} from the {outcome.head}, "
                                             f"{outcome.tokens} tokens of {outcome.contexts} held-out contexts"})
        for name, metrics in outcome.metrics.items():
            tracker.log_metrics(runs[name], {f"eval/{key}": value for key, value in metrics.items()},
                                spec.train.tokens if name in result.finished else 0)
            if name in result.finished:
                result.finished[name]["metrics"].update(metrics)
        for baseline in baselines:
            baseline["metrics"].update(outcome.metrics.get(baseline["name"], {}))
        return outcome.metrics

    def finish_device(self) -> tuple[str, int]:
        """Where end-of-sweep work runs (the trainers' device kind, now free) and its torch threads
        (0: every core of the node it lands on)."""
        devices = {t.device for wave in self.plan.waves for t in wave} | {z.device for z in self.plan.zero}
        return "cuda" if "cuda" in devices else "cpu", self.spec.resources.torch_threads

    def plot(self) -> None:
        """The Pareto plot: `pareto.png` in the export folder and on the sweep's run."""
        from dictsweep.sweep.report import pareto_plot

        result = self.result
        saes = [{**r["point"].params(), "l0": r["metrics"]["l0"], "fvu": r["metrics"]["fvu"],
                 "selected": name in result.selected} for name, r in result.finished.items()]
        baselines = [{"kind": b["kind"], "k": b["k"], "l0": b["metrics"]["l0"], "fvu": b["metrics"]["fvu"]}
                     for b in result.baselines]
        png = pareto_plot(saes, baselines, title=f"{self.spec.name}: eval L0 against FVU")
        fs.write_bytes(fs.join(self.spec.export_dir, "pareto.png"), png)
        self.tracker.log_bytes(self.tracker.parent_id, png, "pareto.png")


class Streams:
    """One broadcaster per node and the batch references handed out, kept while a trainer may need them."""

    def __init__(self, spec: SweepSpec, dataset: ActivationDataset):
        self.spec, self.dataset = spec, dataset
        self.broadcasters: dict[str, object] = {}
        self.refs: dict[tuple, object] = {}  # (node, split, index) -> batch reference

    def batch(self, node: str, split: str, index: int):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from dictsweep.stream.actors import Broadcaster

        if node not in self.broadcasters:
            stream = self.spec.stream
            self.broadcasters[node] = Broadcaster.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                max_restarts=-1, max_task_retries=-1).remote(
                self.dataset.uri, self.spec.train.batch_rows, stream.shuffle_shards, stream.seed, stream.readers_per_node)
        key = (node, split, index)
        if key not in self.refs:
            self.refs[key] = self.broadcasters[node].batch.remote(index, split)
        return self.refs[key]

    def forget(self, slowest_task: int) -> None:
        """Drop references to train batches every trainer has passed (the store can free them)."""
        for key in [k for k in self.refs if k[1] == "train" and k[2] < slowest_task - 1]:
            del self.refs[key]

    def stats(self) -> list[dict]:
        import ray

        return ray.get([b.stats.remote() for b in self.broadcasters.values()])

    def close(self) -> None:
        import ray

        for broadcaster in self.broadcasters.values():
            ray.kill(broadcaster, no_restart=True)
        self.refs.clear()


def run_sweep(spec: SweepSpec, address: str | None = None, plan_only: bool = False,
              resume: bool = False) -> SweepResult | Plan:
    """Run (or only plan, or resume) a sweep. Raises RunError, with what finished, if any SAE failed.

    Each run keeps its working files in `<storage.dir>/runs/<started>/`; `latest.json` names the
    newest, which `resume` continues unless it completed.
    """
    spec = pin_paths(spec)
    dataset = open_dataset(spec)
    if plan_only and given_devices(spec):  # planning for a cluster this machine is not part of
        return plan_sweep(spec, dataset.d_model, *given_devices(spec))
    start_ray(address)
    latest_uri = fs.join(spec.storage_dir, "latest.json")
    latest = json.loads(fs.read_text(latest_uri))["run"] if fs.exists(latest_uri) else None
    if resume and latest and not fs.exists(fs.join(latest, "complete.json")):
        run_dir, plan = latest, plan_from_dict(json.loads(fs.read_text(fs.join(latest, "plan.json"))))
    else:
        if resume:
            print(f"nothing to resume under {spec.storage_dir}: starting the sweep afresh", flush=True)
        resume = False
        run_dir = fs.join(spec.storage_dir, "runs", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        plan = plan_sweep(spec, dataset.d_model, *cluster_devices(spec))
    if plan_only:
        return plan
    if plan.unplaced:
        raise InputError("grid: these SAEs fit no device: " + "; ".join(
            f"{name} {why}" for name, why in sorted(plan.unplaced.items())))
    sweep = SweepRun(spec, dataset, plan, run_dir, resume)
    fs.write_text(latest_uri, json.dumps({"run": run_dir}))
    try:
        result = sweep.run()
        sweep.finish()
    except BaseException:
        sweep.tracker.flush()
        raise
    if result.failed:
        raise RunError(f"{len(result.failed)} of {len(sweep.points)} SAEs failed: "
                       + "; ".join(f"{name}: {why[:200]}" for name, why in sorted(result.failed.items()))
                       + f". The {len(result.finished)} finished ones are exported and logged.", result=result)
    return result


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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def merge_stream_stats(total: dict, readers: list[dict], trainers: list[dict]) -> dict:
    """Bytes read per node and the trainers' data-wait, summed over waves."""
    total = dict(total) or {"bytes_read_per_node": [], "wait_seconds": 0.0, "busy_seconds": 0.0}
    total["bytes_read_per_node"] = total["bytes_read_per_node"] + [r["bytes_read"] for r in readers]
    total["wait_seconds"] += sum(t["wait_seconds"] for t in trainers)
    total["busy_seconds"] += sum(t["busy_seconds"] for t in trainers)
    seconds = total["wait_seconds"] + total["busy_seconds"]
    total["data_wait_fraction"] = total["wait_seconds"] / seconds if seconds else 0.0
    return total


def mmcs_between_sizes(result: SweepResult) -> dict[str, float]:
    """MMCS between consecutive dictionary sizes of each architecture, both ways.

    Each size is represented by its finished dictionary whose eval L0 is nearest the architecture's
    median, so that the comparison is at like sparsity.
    """
    from dictsweep import load_dictionary
    from dictsweep.sae.metrics import mmcs

    metrics = {}
    for architecture in sorted({r["point"].architecture for r in result.finished.values()}):
        runs = {n: r for n, r in result.finished.items() if r["point"].architecture == architecture}
        median_l0 = float(np.median([r["metrics"]["l0"] for r in runs.values()]))
        by_size = {}
        for name, run in sorted(runs.items()):
            size, best = run["point"].n_latents, by_size.get(run["point"].n_latents)
            if best is None or abs(run["metrics"]["l0"] - median_l0) < abs(best["metrics"]["l0"] - median_l0):
                by_size[size] = run
        sizes = sorted(by_size)
        for small, large in zip(sizes, sizes[1:]):
            forward, backward = mmcs(load_dictionary(by_size[small]["uri"]).W_dec,
                                     load_dictionary(by_size[large]["uri"]).W_dec)
            metrics[f"mmcs_sizes.{architecture}.n{small}_in_n{large}"] = forward
            metrics[f"mmcs_sizes.{architecture}.n{large}_in_n{small}"] = backward
    return metrics


def index_entry(name: str, point: GridPoint, metrics: dict, selected: bool) -> dict:
    """One entry of index.json (DESIGN.md): folder, grid point, selected, eval metrics (the DESIGN's
    keys always, null where not measured, then any others measured, such as loss_recovered)."""
    return {"path": name, **point.params(), "selected": selected,
            "metrics": {**{key: metrics.get(key) for key in INDEX_METRICS}, **metrics}}


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested spec -> {"train.tokens": ...} for MLflow params."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
