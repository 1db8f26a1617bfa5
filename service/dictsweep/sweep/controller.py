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
from dictsweep.sweep.plan import GridPoint, Plan, TrainerPlan, grid_points, make_plan, plan_from_dict
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

    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = spec.resources.device
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise InputError("resources.device: 'cuda' asked for, but the Ray cluster has no GPUs")
    count = spec.resources.trainers or (gpus if device == "cuda" else 1)
    if spec.resources.device_memory_gb:
        memory = int(spec.resources.device_memory_gb * 2**30)
    elif device == "cuda":
        memory = ray.get(ray.remote(num_gpus=1)(_gpu_memory).remote())
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    return device, count, memory


def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def plan_sweep(spec: SweepSpec, d_model: int, device: str, n_devices: int, memory: int) -> Plan:
    return make_plan(grid_points(spec), d_model, spec.train.batch_rows, device, n_devices, memory,
                     spec.resources.max_members, spec.resources.memory_headroom)


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
        return self.result

    def run_wave(self, wave_index: int, trainers: list[TrainerPlan], label: str) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dictsweep.train.actor import Trainer

        spec = self.spec
        cuda = trainers[0].device == "cuda"
        bundle = {"GPU": 1, "CPU": spec.resources.cpus_per_trainer} if cuda else {"CPU": spec.resources.cpus_per_trainer}
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
                num_gpus=1 if cuda else 0, num_cpus=spec.resources.cpus_per_trainer,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle_index)).remote(
                [e.spec() for e in plan.ensembles], self.dataset.d_model, spec.train, self.total_steps,
                self.input_scale, self.dataset.dtype, plan.device, threads,
                fs.join(self.storage, "checkpoints", f"{key}.pt"))
            slots.append(Slot(key, plan, actor))
        streams = Streams(spec, self.dataset)
        try:
            for slot in slots:
                self.locate(slot)
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
                steps = min((min(s.cursor - len(s.in_flight), total) for s in slots if s.alive), default=total)
                streams.forget(min((s.cursor - len(s.in_flight) for s in slots if s.alive), default=last))
                seconds = max(time.perf_counter() - start, 1e-9)
                progress.update(bar, completed=steps, rate=f"{steps * rows / seconds:,.0f}")
        self.tracker.flush()

    def send(self, slot: Slot, task: int, streams: "Streams"):
        """Submit task `task` of a trainer: a train step, an eval step, or the final export."""
        if task < self.total_steps:
            return slot.actor.step.remote(task, streams.batch(slot.node, "train", task))
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
                self.log_records(value)
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
        """Select, export the selected dictionaries with index.json, register them, log sweep metrics."""
        spec, tracker, result = self.spec, self.tracker, self.result
        result.selected = select({name: {"n_latents": r["point"].n_latents, "metrics": r["metrics"]}
                                  for name, r in result.finished.items()})
        entries = []
        for name in sorted(result.selected):
            outcome = result.finished[name]
            fs.copy_folder(outcome["uri"], fs.join(spec.export_dir, name))
            entries.append(index_entry(name, outcome["point"], outcome["metrics"], selected=True))
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
        tracker.log_metrics(tracker.parent_id, summary, 0)
        tracker.end_run(tracker.parent_id, failed=bool(result.failed))
        tracker.flush(patience=600)
        fs.write_text(fs.join(self.storage, "complete.json"), json.dumps({"failed": sorted(result.failed)}))


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
    """One entry of index.json (DESIGN.md): folder, grid point, selected, eval metrics."""
    return {"path": name, **point.params(), "selected": selected,
            "metrics": {key: metrics.get(key) for key in INDEX_METRICS}}


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested spec -> {"train.tokens": ...} for MLflow params."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
