"""The harvest's driver: checks, the plan and contexts/, workers (here or Ray actors) with a progress
bar, and each hook's manifest last."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from dictsweep.cluster import start_ray
from dictsweep.errors import DictsweepError, InputError, RunError
from dictsweep.store.contexts import CONTEXT_FILE_TOKENS, write_contexts
from dictsweep.store.harvest.config import PLAN_KEYS, WORK_DIR, HarvestConfig
from dictsweep.store.harvest.text import check_text_source
from dictsweep.store.harvest.tokens import Block, make_blocks, pack_contexts, tokenizer_template
from dictsweep.store.harvest.worker import BlockHarvester, read_json

if TYPE_CHECKING:
    from dictsweep.store.manifest import Manifest


class HarvestResult(NamedTuple):
    """What a harvest wrote."""

    manifests: dict[str, Manifest]  # hook -> its dataset's manifest
    prefixes: dict[str, str]  # hook -> its dataset's prefix
    n_contexts: int  # contexts in the plan (train and eval)
    tokens: int  # tokens fed to the model by this run (less after a resume)
    seconds: float  # wall time of this run's workers: model loading, forward passes, writes
    tokens_per_s: float  # forward-and-write rate once the workers had loaded the model


def hook_prefixes(config: HarvestConfig) -> dict[str, str]:
    """hook -> dataset prefix: `--out` for one hook, `--out/<hook>` for several."""
    from dictsweep.store import fs

    out = config.out.rstrip("/") or config.out
    if len(config.hooks) == 1:
        return {config.hooks[0]: out}
    return {hook: fs.join(out, hook) for hook in config.hooks}


def harvest(config: HarvestConfig, overwrite: bool = False, progress: bool = True) -> HarvestResult:
    """Harvest `config.hooks` of `config.model` over `config.text` into datasets (see the module doc)."""
    from dictsweep.store import fs
    from dictsweep.store.manifest import MANIFEST_NAME
    from dictsweep.store.models import hub_name, is_local

    check_text_source(config)
    # workers (Ray actors) may start elsewhere than this process's working directory
    if "://" not in config.out:
        config = config.model_copy(update={"out": os.path.abspath(os.path.expanduser(config.out))})
    if not config.model_name:  # named before a local folder becomes an absolute path
        config = config.model_copy(update={"model_name": hub_name(config.model)})
    if is_local(config.model):
        config = config.model_copy(update={"model": os.path.abspath(os.path.expanduser(config.model))})
    structure = _check_model(config)
    prefixes = hook_prefixes(config)
    root = config.out.rstrip("/") or config.out
    done = [hook for hook, prefix in prefixes.items() if fs.exists(fs.join(prefix, MANIFEST_NAME))]
    if overwrite:
        _clean(root, prefixes)
    elif len(done) == len(prefixes):
        raise InputError(
            f"{config.out} already holds the harvested dataset(s) ({MANIFEST_NAME}); "
            "choose another --out or pass --overwrite"
        )
    plan = read_json(fs.join(root, WORK_DIR, "plan.json"))
    settings = json.loads(json.dumps(config.plan_settings()))  # as stored: tuples become lists
    if plan is not None:  # a plan from before target hooks existed had none
        plan["settings"].setdefault("target_hooks", [])
    if plan is not None and plan["settings"] != settings:
        differ = ", ".join(
            f"{key}: {plan['settings'].get(key)!r} there, {settings[key]!r} now"
            for key in PLAN_KEYS
            if plan["settings"].get(key) != settings[key]
        )
        raise InputError(
            f"{config.out} holds an unfinished harvest with other settings ({differ}); "
            "rerun with those settings to resume it, or pass --overwrite to start again"
        )
    if plan is None and done and not overwrite:
        raise InputError(
            f"{', '.join(prefixes[hook] for hook in done)} already hold(s) a dataset "
            f"({MANIFEST_NAME}) not made by an unfinished harvest here; choose another --out "
            "or pass --overwrite"
        )
    if plan is None:
        plan = _make_plan(config, root, prefixes, structure)
    blocks = make_blocks(plan["n_contexts"], config)
    records = {block.key: read_json(fs.join(root, WORK_DIR, f"{block.key}.json")) for block in blocks}
    pending = [block for block in blocks if not _complete(records[block.key])]
    tokens_total = sum(_block_tokens(block, plan, config.context) for block in pending)
    started = time.perf_counter()
    done_tokens, rate = _run(config, plan, prefixes, pending, tokens_total, progress)
    seconds = time.perf_counter() - started
    manifests = _write_manifests(config, root, prefixes, blocks, plan, getattr(structure.config, "model_type", None))
    filesystem, path = fs.resolve(fs.join(root, WORK_DIR))
    if filesystem.exists(path):
        filesystem.rm(path, recursive=True)
    return HarvestResult(manifests, prefixes, plan["n_contexts"], done_tokens, seconds, rate)


def _check_model(config: HarvestConfig):
    """The model's structure (meta device): every hook must name a module, context fit the model."""
    from dictsweep.store.models import find_module, load_structure

    structure = load_structure(config.model)
    for hook in config.hooks:
        find_module(structure, hook)
    for target in config.target_hooks:
        find_module(structure, target, option="--target-hook")
    limit = getattr(structure.config, "max_position_embeddings", None)
    if isinstance(limit, int) and config.context > limit:
        raise InputError(f"--context {config.context}: {config.model} takes at most {limit} positions")
    return structure


def _clean(root: str, prefixes: dict[str, str]) -> None:
    """Remove a previous harvest at `root`: manifests first (so nothing half-old reads as a dataset)."""
    from dictsweep.store import fs
    from dictsweep.store.manifest import MANIFEST_NAME

    for prefix in prefixes.values():
        fs.remove(fs.join(prefix, MANIFEST_NAME))
    parts = [fs.join(prefix, part) for prefix in prefixes.values() for part in ("train", "eval", "contexts")]
    for uri in parts + [fs.join(root, WORK_DIR)]:
        filesystem, path = fs.resolve(uri)
        if filesystem.exists(path):
            filesystem.rm(path, recursive=True)


def _make_plan(config: HarvestConfig, root: str, prefixes: dict[str, str], structure) -> dict:
    """Tokenise and pack the text, write contexts/ under every prefix, then the plan (last)."""
    from dictsweep.store import fs
    from dictsweep.store.models import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    template = tokenizer_template(tokenizer)
    offsets, tokens = pack_contexts(config, tokenizer, template)
    per_file = max(1, CONTEXT_FILE_TOKENS // config.context)
    for prefix in prefixes.values():
        write_contexts(prefix, offsets, tokens, per_file)
    plan = {
        "settings": config.plan_settings(),
        "root": root,
        "n_contexts": len(offsets) - 1,
        "n_tokens": int(len(tokens)),
        "last_context_tokens": int(offsets[-1] - offsets[-2]),
        "contexts_per_file": per_file,
        "special_ids": template.special_ids,
        "pad_id": template.pad_id,
        "template": {"prefix": template.prefix, "suffix": template.suffix, "separator": template.separator},
        "model_class": type(structure).__name__,
    }
    fs.write_text(fs.join(root, WORK_DIR, "plan.json"), json.dumps(plan, indent=1))
    return plan


def _complete(record: dict | None) -> bool:
    return record is not None and "n_shards" in record and len(record["shards"]) == record["n_shards"]


def _block_tokens(block: Block, plan: dict, context: int) -> int:
    """Tokens a block feeds to the model: full contexts, but the last context may be shorter."""
    last = plan["n_contexts"] - 1
    return len(block.seqs) * context - (context - plan["last_context_tokens"]) * int(last in block.seqs)


def _resolve_device(config: HarvestConfig) -> tuple[str, int]:
    """(device, workers) for this run."""
    import torch

    if config.device != "auto":
        device = config.device
    elif config.address is not None:
        import ray

        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and config.address is None and not torch.cuda.is_available():
        raise InputError("--device cuda: no GPU is visible here; use --device cpu or auto")
    if config.workers:
        return device, config.workers
    if device == "cuda":
        gpus = torch.cuda.device_count() if config.address is None else None
        if gpus is None:
            import ray

            gpus = int(ray.cluster_resources().get("GPU", 1))
        return device, max(1, gpus)
    return device, 1


def _run(
    config: HarvestConfig, plan: dict, prefixes: dict[str, str], pending: list[Block], tokens_total: int, progress: bool
) -> tuple[int, float]:
    """Run the pending blocks on the workers with a progress bar: (tokens fed to the model, tokens/s)."""
    if not pending:
        return 0, 0.0
    ray_started, actors = False, []
    try:
        if config.address is not None:
            ray_started = _init_ray(config.address)
        device, workers = _resolve_device(config)
        workers = min(workers, len(pending))
        if workers > 1 or config.address is not None:
            ray_started = _init_ray("local") or ray_started
            runners, actors = _ray_runners(config, plan, prefixes, device, workers)
        else:
            runners = [BlockHarvester(config, plan, prefixes, device).run_block]
        columns = [
            TextColumn("harvest"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tokens"),
            RateColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("harvest", total=tokens_total)
            done, first = 0, None  # the rate is timed from the first batch (the model is loaded)

            def on_event(event: dict) -> None:
                nonlocal done, first
                if "tokens" in event:
                    done += event["tokens"]
                    bar.update(task, advance=event["tokens"])
                    first = first or (time.perf_counter(), done)

            _run_blocks(runners, pending, on_event)
        elapsed = time.perf_counter() - first[0] if first else 0.0
        return done, (done - first[1]) / elapsed if elapsed > 0 else 0.0
    finally:
        if actors or ray_started:
            import ray

            for actor in actors:
                ray.kill(actor)
            if ray_started:
                ray.shutdown()


def _init_ray(address: str) -> bool:
    """Connect to `address` ("local": start Ray on this machine's CPUs) unless connected; True if now."""
    try:
        return start_ray(address, num_cpus=os.cpu_count() or 1, log_to_driver=False)
    except RunError as error:  # a local Ray that did not start
        raise RunError(f"{error} --workers 1 runs without Ray") from None


def _ray_runners(config: HarvestConfig, plan: dict, prefixes: dict[str, str], device: str, workers: int):
    """One Ray actor per worker (a GPU each, or an equal share of this machine's CPUs)."""
    import ray

    cpus = os.cpu_count() or 1
    if device == "cuda":
        options, threads = {"num_gpus": 1, "num_cpus": 1}, 0
    elif config.address is not None:
        options, threads = {"num_cpus": 1}, 0
    else:
        options, threads = {"num_cpus": cpus / workers}, max(1, cpus // workers)
    actor_class = ray.remote(BlockHarvester)
    actors = [actor_class.options(**options).remote(config, plan, prefixes, device, threads) for _ in range(workers)]

    def runner(actor) -> Callable[[Block], Iterator[dict]]:
        return lambda block: (ray.get(ref) for ref in actor.run_block.remote(block))

    return [runner(actor) for actor in actors], actors


def _run_blocks(
    runners: list[Callable[[Block], Iterator[dict]]], blocks: list[Block], on_event: Callable[[dict], None]
) -> None:
    """Each runner takes the next block until none is left; events reach `on_event` here."""
    if len(runners) == 1:
        try:
            for block in blocks:
                for event in runners[0](block):
                    on_event(event)
        except Exception as error:
            raise _worker_error(error) from None
        return
    todo: queue.Queue = queue.Queue()
    for block in blocks:
        todo.put(block)
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def loop(runner) -> None:
        try:
            while not stop.is_set():
                try:
                    block = todo.get_nowait()
                except queue.Empty:
                    break
                for event in runner(block):
                    events.put(("event", event))
        except BaseException as error:  # reported to the driver thread, which raises it
            events.put(("error", error))
        finally:
            events.put(("done", None))

    threads = [threading.Thread(target=loop, args=(runner,), daemon=True) for runner in runners]
    for thread in threads:
        thread.start()
    finished = 0
    while finished < len(threads):
        try:
            kind, value = events.get(timeout=0.5)
        except queue.Empty:
            continue
        if kind == "event":
            on_event(value)
        elif kind == "error":
            stop.set()
            raise _worker_error(value)
        else:
            finished += 1


def _worker_error(error: BaseException) -> BaseException:
    """A Ray worker's own error out of Ray's wrapper (a RunError if it is not ours); others as they are."""
    if not type(error).__module__.startswith("ray."):
        return error
    cause = getattr(error, "cause", None)
    if isinstance(cause, DictsweepError):
        return cause
    return RunError(f"a harvest worker failed: {type(cause or error).__name__}: {cause or error}")


def _write_manifests(
    config: HarvestConfig,
    root: str,
    prefixes: dict[str, str],
    blocks: list[Block],
    plan: dict,
    model_type: str | None = None,
) -> dict[str, Manifest]:
    """Every hook's manifest from the blocks' progress records (the last write of a harvest);
    `model_type`: the model's family (`config.model_type`), for portable hook names in exports."""
    from dictsweep.store import fs
    from dictsweep.store.dataset import write_manifest
    from dictsweep.store.manifest import ShardInfo

    records = [read_json(fs.join(root, WORK_DIR, f"{block.key}.json")) for block in blocks]
    missing = [block.key for block, record in zip(blocks, records) if not _complete(record)]
    if missing:
        raise RunError(
            f"blocks {', '.join(missing[:5])} are unfinished after the workers returned; "
            "rerun the same command to finish them"
        )
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifests, targets = {}, config.targets()
    for hook, prefix in prefixes.items():
        shards = {"train": [], "eval": []}
        total_sq, total_target_sq, d_models, d_targets = 0.0, 0.0, set(), set()
        for record in records:
            d_models.update([record["d_model"][hook]] if record["n_shards"] else [])
            d_targets.update([record["d_model"][targets[hook]]] if record["n_shards"] and hook in targets else [])
            for shard in sorted(record["shards"], key=lambda shard: shard["index"]):
                entry = shard["hooks"][hook]
                shards[record["split"]].append(
                    ShardInfo(
                        path=shard["path"],
                        rows=shard["rows"],
                        bytes=entry["bytes"],
                        sha256=entry["sha256"],
                        blake3=entry.get("blake3"),  # None in records of a harvest begun before it
                    )
                )
                total_sq += entry["sum_sq_norm"]
                total_target_sq += entry.get("target_sum_sq_norm", 0.0)
        if len(d_models) != 1 or len(d_targets) > 1:
            raise RunError(f"--hook {hook}: blocks report output widths {sorted(d_models | d_targets)}; expected one")
        n_rows = sum(shard.rows for shard in shards["train"])
        source = {
            "model": config.model,
            "model_name": config.model_name,
            "model_type": model_type,
            "hook": hook,
            **({"target_hook": targets[hook]} if hook in targets else {}),
            "dataset": config.text,
            "context": config.context,
            "created": created,
            "max_tokens": config.max_tokens,
            "seed": config.seed,
            "include_special": config.include_special,
            "n_contexts": plan["n_contexts"],
            "template": plan["template"],
        }
        manifests[hook] = write_manifest(
            prefix,
            d_models.pop(),
            config.dtype,
            shards["train"],
            shards["eval"],
            source=source,
            stats={
                "mean_sq_norm": total_sq / max(n_rows, 1),
                **({"target_mean_sq_norm": total_target_sq / max(n_rows, 1)} if d_targets else {}),
            },
            d_target=d_targets.pop() if d_targets else None,
        )
    return manifests


class RateColumn(ProgressColumn):
    """Tokens per second in the progress bar."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tokens/s" if speed else "- tokens/s")
