"""The sweep's records: its storage folder and its MLflow runs.

Storage under `<storage.dir>/`: `latest.json` names the newest run folder; each run folder
(`runs/<started>/`) holds `runs.json` (the MLflow run ids), `plan.json`, `results/<key>.json` (one
trainer's finished and failed SAEs, written as it finishes) and `complete.json` once the sweep is
done. `--resume` reads them back and logs nothing twice.
"""

from __future__ import annotations

import json
import logging
import os

from dictsweep.config import SweepSpec
from dictsweep.store import fs
from dictsweep.sweep.plan import Plan, TrainerPlan, plan_from_dict
from dictsweep.sweep.results import SAEResult, SweepResult
from dictsweep.track import STATUS_TAG, Tracker

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

    def __init__(self, spec: SweepSpec, plan: Plan, run_dir: str, resume: bool):
        self.spec, self.plan, self.storage = spec, plan, run_dir
        self.points = {p.name: p for p in plan.points}
        self.result = SweepResult(plan, export_dir=spec.export_dir)
        self.tracker = Tracker(spec.tracking.uri, spec.experiment)
        self.result.tracking_uri = self.tracker.uri
        self.runs = self.start_runs(resume)
        self.logged_tokens: dict[str, int] = {}

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

    def check_memory(self, key: str, plan: TrainerPlan, measured: int) -> None:
        """Compare a trainer's measured first step with the plan's memory model; warn when it is off."""
        planned, device = plan.used_bytes, plan.memory_bytes
        if measured > planned * 1.25 or measured > device * (1 - self.spec.resources.memory_headroom / 2):
            note = (f"trainer {key}: a step took {measured / 2**30:.2f} GiB, the plan expected "
                    f"{planned / 2**30:.2f} GiB of {device / 2**30:.1f} GiB; raise resources.memory_headroom "
                    f"or lower resources.max_members if it runs out of memory")
            log.warning(note)
            self.tracker.set_tags(self.tracker.parent_id, {f"dictsweep.memory.{key}": note})

    def log_records(self, records: list[dict]) -> None:
        """Training metrics from a trainer; records replayed after a restart are not logged twice."""
        for record in records:
            name, tokens = record["name"], record["tokens"]
            if tokens > self.logged_tokens.get(name, 0):
                self.logged_tokens[name] = tokens
                self.tracker.log_metrics(self.runs[name], record["metrics"], tokens)
        if len(self.tracker.queue) > 200:
            self.tracker.flush()

    def saved(self, key: str) -> dict | None:
        """A trainer's outcome recorded in storage by this run (or the run it resumes), if any."""
        saved = fs.join(self.storage, "results", f"{key}.json")
        return json.loads(fs.read_text(saved)) if fs.exists(saved) else None

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
            self.result.finished[name] = SAEResult(self.points[name], done["metrics"], done["uri"], self.runs[name],
                                                   done.get("plot"))
        self.result.failed.update(outcome["failed"])

    def complete(self) -> None:
        """Mark the run done: `--resume` starts the next one afresh."""
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
