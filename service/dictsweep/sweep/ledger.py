"""The sweep's records: its storage folder and its MLflow runs.

Storage under `<storage.dir>/`: `lease.json` (the driver writing it, `lease`), `latest.json` names
the newest run folder; each run folder (`runs/<started>-<random>/`) holds `runs.json` (the MLflow run
ids), `plan.json`, `results/<key>.json` (one trainer's finished and failed SAEs, written as it
finishes), `points/<trainer>/<tokens>.json` (training-curve points, stored before MLflow is sent
them) and `complete.json` once the sweep is done. `--resume` reads them back, sends MLflow what an
earlier driver did not, and logs nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from dictsweep.config import SweepSpec
from dictsweep.errors import RunError
from dictsweep.store import fs
from dictsweep.sweep.lease import Lease
from dictsweep.sweep.plan import Plan, TrainerPlan, plan_from_dict
from dictsweep.sweep.points import store_points, stored_points
from dictsweep.sweep.progress import SaeBoard
from dictsweep.sweep.results import SAEResult, SweepResult
from dictsweep.track import ERROR_TAG, STATUS_TAG, STOPPED_TAG, Tracker
from dictsweep.track_views import EVAL_STEP, dataset_input
from dictsweep.train.evaluate import in_eval_units

STOP_PATIENCE_SECONDS = 30.0  # a stopped driver waits this long for MLflow to take what it holds

log = logging.getLogger(__name__)


def latest_run(storage_dir: str) -> str | None:
    """The newest run folder of a sweep's storage, if any."""
    latest_uri = fs.join(storage_dir, "latest.json")
    return json.loads(fs.read_text(latest_uri))["run"] if fs.exists(latest_uri) else None


def mark_latest(storage_dir: str, run_dir: str) -> None:
    fs.write_text(fs.join(storage_dir, "latest.json"), json.dumps({"run": run_dir}))


def is_complete(run_dir: str) -> bool:
    return fs.exists(fs.join(run_dir, "complete.json"))


def saved_plan(run_dir: str) -> Plan:
    return plan_from_dict(json.loads(fs.read_text(fs.join(run_dir, "plan.json"))))


class Ledger:
    """One run's records: `result` gathers every SAE recorded, in storage and MLflow alike."""

    def __init__(
        self,
        spec: SweepSpec,
        plan: Plan,
        run_dir: str,
        resume: bool,
        lease: Lease | None = None,
        input_scale: float = 1.0,
        width: int = 0,
    ):
        """`input_scale` and `width` (0: d_model): the training scale over raw, and the width, of what the
        dictionaries reconstruct (a transcoder's: its target's); training curves are logged in raw units."""
        self.spec, self.plan, self.storage, self.lease = spec, plan, run_dir, lease
        self.input_scale, self.width = input_scale, width or plan.d_model
        self.points = {p.name: p for p in plan.points}
        self.result = SweepResult(plan, export_dir=spec.export_dir)
        self.tracker = Tracker(spec.tracking.uri, spec.experiment)
        self.result.tracking_uri = self.tracker.uri
        self.runs = self.start_runs(resume)
        self.logged_tokens: dict[str, int] = {}  # SAE name -> tokens of its last point stored and queued
        self.open_runs: set[str] = set()  # runs an earlier driver of this run left open in MLflow
        self.board = SaeBoard()  # the console's best and worst SAE, from the same records
        if resume:
            self.catch_up()

    def catch_up(self) -> None:
        """Resuming: reopen the runs a stopped driver marked KILLED (or FAILED, where their trainer
        recorded no outcome: it trains again, e.g. one lost with its node), and send MLflow every
        stored curve point that an earlier driver did not (runs it ended got everything: the queue is
        in order)."""
        tracker = self.tracker
        statuses = tracker.statuses()
        recorded = self.recorded()
        again = {self.runs[name] for name in self.points if name not in recorded} | {tracker.parent_id}
        self.open_runs = {
            run for run, status in statuses.items() if status not in ("FINISHED", "FAILED") or run in again
        }
        for run in self.open_runs:
            if statuses[run] != "RUNNING":
                tracker.reopen(run)
        sent = 0
        for name, points in stored_points(self.storage).items():
            if name in self.runs:
                self.logged_tokens[name] = max(points)
                if self.runs[name] in self.open_runs:
                    sent += tracker.log_missing(self.runs[name], points)
        if sent:
            log.info(f"resuming: {sent} stored curve points that MLflow never got are sent now")
        tracker.flush()

    def check_lease(self) -> None:
        """RunError once another driver took the sweep over: this one writes nothing more."""
        if self.lease is not None:
            self.lease.check()

    def start_runs(self, resume: bool) -> dict[str, str]:
        """MLflow runs of the sweep and of every SAE (reused when resuming); saved in storage."""
        saved_uri = fs.join(self.storage, "runs.json")
        if resume and fs.exists(saved_uri):
            saved = json.loads(fs.read_text(saved_uri))
            self.tracker.parent_id = saved["parent"]
            return saved["saes"]
        tracker, spec = self.tracker, self.spec
        tracker.start_sweep(
            spec.name,
            flatten(spec.model_dump(mode="json")),
            tags={
                "dictsweep.dataset": spec.data.uri,
                "dictsweep.job_id": os.environ.get("DICTSWEEP_JOB_ID", ""),
                "dictsweep.storage": self.storage,
            },
        )
        runs = {
            name: tracker.start_sae(
                name,
                {
                    **p.params(),
                    "dataset": spec.data.uri,
                    "tokens": spec.train.tokens,
                    "batch_rows": spec.train.batch_rows,
                },
            )
            for name, p in self.points.items()
        }
        fs.write_text(saved_uri, json.dumps({"parent": tracker.parent_id, "saes": runs}, indent=1))
        fs.write_text(fs.join(self.storage, "plan.json"), json.dumps(self.plan.to_dict(), indent=1))
        return runs

    def log_dataset(self, uri: str, manifest) -> None:
        """Queue the activation dataset as the input of the sweep's run and of every SAE's (the runs
        table's Dataset column); MLflow keeps one input per run and dataset, so a resumed sweep adds none."""
        fields = dataset_input(uri, manifest)
        for run_id in [self.tracker.parent_id, *self.runs.values()]:
            self.tracker.log_dataset(run_id, fields)

    def check_memory(self, key: str, plan: TrainerPlan, measured: int) -> None:
        """Compare a trainer's measured first step with the plan's memory model; warn when it is off."""
        planned, device = plan.used_bytes, plan.memory_bytes
        if measured > planned * 1.25 or measured > device * (1 - self.spec.resources.memory_headroom / 2):
            note = (
                f"trainer {key}: a step took {measured / 2**30:.2f} GiB, the plan expected "
                f"{planned / 2**30:.2f} GiB of {device / 2**30:.1f} GiB; raise resources.memory_headroom "
                f"or lower resources.max_members if it runs out of memory"
            )
            log.warning(note)
            self.tracker.set_tags(self.tracker.parent_id, {f"dictsweep.memory.{key}": note})

    def log_records(self, records: list[dict], trainer: str) -> None:
        """Training metrics from a trainer: stored, then queued for MLflow; records a restarted trainer
        replays are neither stored nor logged twice."""
        new = [record for record in records if record["tokens"] > self.logged_tokens.get(record["name"], 0)]
        new = [{**record, "metrics": in_eval_units(record["metrics"], self.width, self.input_scale)} for record in new]
        self.board.add(new)
        if new:
            self.check_lease()
            store_points(self.storage, trainer, new)  # before MLflow: a driver that dies loses none
        for record in new:
            self.logged_tokens[record["name"]] = record["tokens"]
            self.tracker.log_metrics(self.runs[record["name"]], record["metrics"], record["tokens"])
        if len(self.tracker.queue) > 200:
            self.tracker.flush()

    def recorded(self) -> set[str]:
        """The SAEs of every outcome in storage (finished or failed for good)."""
        keys = [f"w{w}-t{t.index}" for w, wave in enumerate(self.plan.waves) for t in wave]
        outcomes = [self.saved(key) for key in keys + [f"zero-{z}" for z in range(len(self.plan.zero))]]
        return {name for outcome in outcomes if outcome for part in ("finished", "failed") for name in outcome[part]}

    def saved(self, key: str) -> dict | None:
        """A trainer's outcome recorded in storage by this run (or the run it resumes), if any."""
        saved = fs.join(self.storage, "results", f"{key}.json")
        return json.loads(fs.read_text(saved)) if fs.exists(saved) else None

    def record(self, key: str, outcome: dict) -> None:
        """A trainer's finished and failed SAEs: into storage (for `--resume`), then MLflow."""
        self.check_lease()
        fs.write_text(fs.join(self.storage, "results", f"{key}.json"), json.dumps(outcome, indent=1))
        self.absorb(outcome)
        self.send(outcome)

    def replay(self, outcome: dict) -> None:
        """A trainer's outcome that an earlier driver stored: MLflow gets what that driver did not send."""
        self.absorb(outcome)
        self.send(outcome, only=self.open_runs)

    def send(self, outcome: dict, only: set[str] | None = None) -> None:
        """Queue an outcome's eval metrics, dictionaries, tags and run ends (of the runs in `only`, when
        given: then only the eval metrics the runs lack)."""
        tracker, tokens = self.tracker, self.spec.train.tokens
        for name, done in outcome["finished"].items():
            run = self.runs[name]
            if only is not None and run not in only:
                continue
            points = {EVAL_STEP: {f"eval/{k}": v for k, v in done["metrics"].items()}}
            if "l1_coef" in done:  # steered to an L0 target: the coefficient it ended with, on its curve
                points[tokens] = {"l1_coef": done["l1_coef"]}
            for step, metrics in points.items():
                if only is None:
                    tracker.log_metrics(run, metrics, step)
                else:
                    tracker.log_missing(run, {step: metrics})
            tracker.log_folder(run, lambda local, uri=done["uri"]: fs.download_folder(uri, local))
            if done.get("plot"):
                tracker.log_bytes(run, fs.read_bytes(done["plot"]), "density_and_norms.png", "plots")
            tracker.set_tags(run, {STATUS_TAG: "finished"})
            tracker.end_run(run)
        self.record_failure(
            {name: why for name, why in outcome["failed"].items() if only is None or self.runs[name] in only}
        )

    def record_failure(self, failed: dict[str, str]) -> None:
        self.result.failed.update(failed)
        for name, why in failed.items():
            self.tracker.set_tags(self.runs[name], {STATUS_TAG: "failed", ERROR_TAG: why[:4000]})
            self.tracker.end_run(self.runs[name], failed=True)
        self.tracker.flush()

    def stop(self, status: str, why: str) -> None:
        """The driver stops before the end: end the sweep run and every SAE run not recorded yet as
        `status` (KILLED when stopped by a signal, FAILED on an error) after what the tracker holds,
        so that none stays RUNNING; storage keeps every curve point for `--resume`."""
        tracker, result = self.tracker, self.result
        recorded = set(result.finished) | set(result.failed)
        for name, run in self.runs.items():
            if name not in recorded:
                if status == "FAILED":
                    tracker.set_tags(run, {ERROR_TAG: why[:4000]})
                tracker.end_run(run, status=status)
        tracker.set_tags(tracker.parent_id, {STOPPED_TAG: why[:4000]})
        tracker.end_run(tracker.parent_id, status=status)
        try:
            tracker.flush(patience=STOP_PATIENCE_SECONDS)
        except RunError as error:
            log.warning(f"not recorded in MLflow before stopping: {error}")

    def close_abandoned(self, run_dir: str) -> None:
        """End as KILLED the runs that a dead driver's unfinished run (which this one replaces) left RUNNING."""
        saved = fs.join(run_dir, "runs.json")
        if not fs.exists(saved):
            return
        parent = json.loads(fs.read_text(saved))["parent"]
        abandoned = [run for run, status in self.tracker.statuses(parent).items() if status == "RUNNING"]
        for run in abandoned:
            self.tracker.end_run(run, status="KILLED")
        if abandoned:
            log.info(f"{len(abandoned)} MLflow runs left RUNNING by the unfinished run {run_dir} are marked KILLED")
        self.tracker.flush()

    def absorb(self, outcome: dict) -> None:
        for name, done in outcome["finished"].items():
            point = self.points[name]
            if "l1_coef" in done:  # steered to an L0 target: its point carries the final coefficient
                point = dataclasses.replace(point, l1_coef=float(done["l1_coef"]))
            self.result.finished[name] = SAEResult(
                point, done["metrics"], done["uri"], self.runs[name], done.get("plot")
            )
        self.result.failed.update(outcome["failed"])

    def complete(self) -> None:
        """Mark the run done: `--resume` starts the next one afresh; not while trainers lost with their
        node have SAEs to finish (`--resume` continues this run and them)."""
        if self.result.resumable:
            return
        fs.write_text(fs.join(self.storage, "complete.json"), json.dumps({"failed": sorted(self.result.failed)}))


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested spec -> {"train.tokens": ...} for MLflow params."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
