"""Baselines in a sweep: fitted on the same train batches as the SAEs, then evaluated on the same
eval rows with the same metrics, exported and recorded like them.

Feeding. One `BaselineSampler` actor (a quarter CPU and one torch thread, on the first trainer's
node) gets the very batch references the trainers get, for the planned batches only: whole batches
spread evenly over the train stream, up to `evaluation.baseline_rows` rows. It adds each to a
streaming covariance (PCA) and keeps an equal share of its rows for FastICA (up to
`evaluation.ica_rows`). The driver's `BaselineFeed` keeps at most `stream.batches_in_flight` of its
calls queued, as for a trainer; planned batches beyond that wait in the driver as references (the
batch stays in the object store, shared with the trainers). Nothing waits on it while trainers
train: `offer` and `pump` never block, and no batch is produced for it alone. With every planned
batch in, it saves its sums to `<storage>/baselines/state.pt`, which a resumed driver reuses.

Fitting and evaluation (`fit_baselines`, one Ray task once the SAEs are done, on a device of the
trainers' kind): PCA from the covariance, FastICA on the sample (whitened by the sample's own
PCA), random unit directions and the neuron basis. Each becomes top-k dictionaries
(`sae.baselines.baseline_dictionary`) at k matched to each selected SAE's eval L0 (rounded,
deduplicated) and at the complete k = n_atoms (an exact reconstruction: a check on the whole
path). They are scored on the SAEs' eval rows (the first eval_steps x batch_rows rows of the eval
shards, in order: the eval stream is not shuffled) by `train.evaluate.Evaluator`, which sees them
through `DictionaryStack`, and exported to `<storage>/baselines/<name>/`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from dictsweep.sae.baselines import (
    Basis,
    StreamingPCA,
    baseline_dictionary,
    fast_ica,
    fit_pca,
    ica_basis,
    identity_basis,
    matched_k,
    pca_basis,
    random_basis,
)
from dictsweep.sae.export import Dictionary, dictionary_files
from dictsweep.sae.metrics import mmcs_ground_truth
from dictsweep.errors import InputError
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.stream.actors import BatchPieces, whole_batch
from dictsweep.train.actor import batch_tensor
from dictsweep.train.checkpoint import checkpoint_bytes, read_checkpoint
from dictsweep.train.evaluate import Evaluator

KINDS = ("pca", "ica", "random", "identity")
RANDOM_SEED = 0  # the random basis's directions
ICA_CHUNK_ROWS = 65_536  # rows per matmul in a FastICA pass over the sample


def planned_batches(total_steps: int, batch_rows: int, max_rows: int) -> list[int]:
    """Indices of the train batches the baselines see: up to `max_rows` rows, spread evenly."""
    count = min(total_steps, max(1, max_rows // batch_rows))
    return [step * total_steps // count for step in range(count)]


def read_sampler_state(state_uri: str) -> dict:
    """A sampler state that `BaselineSampler.save` wrote (an InputError naming the file otherwise)."""
    state = read_checkpoint(fs.read_bytes(state_uri), state_uri)
    try:
        return {**state, "sample": {int(index): rows for index, rows in state["sample"].items()}}
    except (KeyError, AttributeError, ValueError) as error:
        raise InputError(f"{state_uri}: not a baseline sampler state ({error!r}); delete it to sample afresh") from None


# -- on the cluster: the sampler ------------------------------------------------------------------
class BaselineSampler:
    """Streaming covariance and a bounded row sample of the planned train batches (a Ray actor)."""

    def __init__(self, d_model: int, data_dtype: str, planned: list[int], sample_per_batch: int, state_uri: str):
        torch.set_num_threads(1)  # a bystander beside the trainers: one core at most
        self.data_dtype, self.planned, self.state_uri = data_dtype, set(planned), state_uri
        self.sample_per_batch = sample_per_batch
        self.pca = StreamingPCA(d_model)
        self.sample: dict[int, Tensor] = {}  # batch index -> its first rows, stored dtype
        self.busy_seconds = 0.0
        if fs.exists(state_uri):
            state = read_sampler_state(state_uri)
            self.pca.count, self.pca.sum, self.pca.sum_outer = state["count"], state["sum"], state["sum_outer"]
            self.sample = state["sample"]

    def add(self, index: int, batch: np.ndarray | BatchPieces) -> int:
        """Take planned batch `index` (again: ignored); returns how many planned batches are in.
        The batch comes whole or as window pieces (as trainers get it)."""
        if index in self.planned and index not in self.sample:
            start = time.perf_counter()
            if isinstance(batch, list):
                batch = whole_batch(batch)
            x = batch_tensor(batch, self.data_dtype)  # [batch_rows, d_model], read-only shared memory
            self.pca.update(x)
            self.sample[index] = x[: self.sample_per_batch].clone()
            if len(self.sample) == len(self.planned):
                self.save()
            self.busy_seconds += time.perf_counter() - start
        return len(self.sample)

    def save(self) -> None:
        """The sampler's state as a checkpoint file (safetensors + JSON: nothing in it is code)."""
        fs.write_bytes(
            self.state_uri,
            checkpoint_bytes(
                {
                    "count": self.pca.count,
                    "sum": self.pca.sum,
                    "sum_outer": self.pca.sum_outer,
                    "sample": {str(index): rows for index, rows in self.sample.items()},
                }
            ),
        )

    def status(self) -> dict:
        """Planned batches taken, seconds spent on them, and the node."""
        import ray

        return {
            "done": sorted(self.sample),
            "busy_seconds": self.busy_seconds,
            "node": ray.get_runtime_context().get_node_id(),
        }


# -- in the driver: the feed ----------------------------------------------------------------------
class BaselineFeed:
    """Hands the sampler the planned batch references, at most `limit` calls queued (never blocks)."""

    def __init__(self, actor, planned: list[int], done: list[int], limit: int):
        self.actor, self.limit = actor, limit
        self.wanted = set(planned) - set(done)  # planned batches not yet offered
        self.waiting: deque = deque()  # (index, ref) offered, not yet sent
        self.in_flight: deque = deque()  # refs of add() calls
        self.error = ""
        self.most_waiting = 0  # the deepest the driver-side queue got (reported)

    @property
    def complete(self) -> bool:
        return not (self.wanted or self.waiting or self.in_flight) and not self.error

    def offer(self, index: int, ref) -> None:
        """Train batch `index` as a trainer gets it; kept only if planned and not yet offered."""
        if index in self.wanted and not self.error:
            self.wanted.discard(index)
            self.waiting.append((index, ref))
            self.most_waiting = max(self.most_waiting, len(self.waiting))
            self.pump()

    def pump(self) -> None:
        """Collect finished calls (without waiting) and send waiting batches while there is room."""
        import ray

        while self.in_flight and ray.wait([self.in_flight[0]], timeout=0)[0]:
            try:
                ray.get(self.in_flight.popleft())
            except ray.exceptions.RayError as error:
                self.fail(error)
                return
        while self.waiting and len(self.in_flight) < self.limit:
            index, ref = self.waiting.popleft()
            self.in_flight.append(self.actor.add.remote(index, ref))

    def drain(self, batch: Callable[[int], object] | None = None) -> None:
        """Block until every offered batch is taken; with `batch(index)` (a ref), also offer the
        planned batches no trainer got, `limit` at a time (a resumed or failed sweep)."""
        import ray

        while (self.waiting or self.in_flight or (batch and self.wanted)) and not self.error:
            while batch and self.wanted and len(self.waiting) + len(self.in_flight) < self.limit:
                self.offer(min(self.wanted), batch(min(self.wanted)))
            if self.in_flight:
                ray.wait([self.in_flight[0]], timeout=5.0)
            self.pump()

    def fail(self, error: BaseException) -> None:
        lines = [line for line in str(error).splitlines() if line.strip()]
        self.error = f"baseline sampler failed: {lines[-1][:500] if lines else type(error).__name__}"
        self.wanted.clear()
        self.waiting.clear()
        self.in_flight.clear()


def start_feed(
    name: str,
    node: str | None,
    d_model: int,
    data_dtype: str,
    planned: list[int],
    sample_per_batch: int,
    state_uri: str,
    limit: int,
) -> BaselineFeed:
    """The sampler actor (on `node` when given, softly) and its feed, resumed from `state_uri`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options = {"name": name, "num_cpus": 0.25, "max_restarts": 0}
    if node is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    actor = (
        ray.remote(BaselineSampler).options(**options).remote(d_model, data_dtype, planned, sample_per_batch, state_uri)
    )
    feed = BaselineFeed(actor, planned, [], limit)
    try:
        feed.wanted -= set(ray.get(actor.status.remote())["done"])
    except ray.exceptions.RayError as error:
        feed.fail(error)
    return feed


# -- Evaluator's view of baseline dictionaries ----------------------------------------------------
class StackOutput(NamedTuple):
    """What `Evaluator` reads from an ensemble's forward pass."""

    sae_out: Tensor
    """Reconstructions, `[K, B, d_model]`."""
    fire_counts: Tensor
    """Rows of the batch on which each latent fired, `[K, n_latents]`."""


class DictionaryStack(nn.Module):
    """Exported dictionaries of one width, seen by `Evaluator` as an ensemble on raw inputs (scale 1)."""

    def __init__(self, dictionaries: list[Dictionary]):
        super().__init__()
        self.dictionaries = nn.ModuleList(dictionaries)
        self.n_members = len(dictionaries)
        self.n_latents, self.d_model = dictionaries[0].W_dec.shape
        self.register_buffer("input_scale", torch.tensor(1.0))

    @property
    def W_enc(self) -> Tensor:  # Evaluator places its sums on this tensor's device
        return self.dictionaries[0].W_enc

    def forward(self, x: Tensor) -> StackOutput:
        latents = [dictionary.encode(x) for dictionary in self.dictionaries]  # K x [B, n_latents]
        return StackOutput(
            torch.stack([d.decode(z) for d, z in zip(self.dictionaries, latents)]),
            torch.stack([(z > 0).sum(0, dtype=torch.float32) for z in latents]),
        )


# -- fitting, evaluating and exporting (a Ray task) -----------------------------------------------
def fit_bases(state: dict, kinds: list[str], device: str) -> tuple[dict[str, Basis], dict[str, dict]]:
    """The bases of `kinds` from the sampler's saved state, and what each fit reports."""
    streaming = StreamingPCA(len(state["sum"]))
    streaming.count, streaming.sum, streaming.sum_outer = state["count"], state["sum"], state["sum_outer"]
    pca = streaming.finish()
    bases, info = {}, {}
    for kind in kinds:
        info[kind] = {"fit_rows": streaming.count}
        if kind == "pca":
            bases[kind] = pca_basis(pca)
        elif kind == "random":
            bases[kind] = random_basis(pca, seed=RANDOM_SEED)
        elif kind == "identity":
            bases[kind] = identity_basis(pca)
        elif kind == "ica":
            sample = torch.cat([state["sample"][index] for index in sorted(state["sample"])]).float().to(device)
            ica = fast_ica(
                lambda: sample.split(ICA_CHUNK_ROWS),  # noqa: B023 (called before the loop moves on)
                pca=fit_pca(sample.split(ICA_CHUNK_ROWS)),
                seed=RANDOM_SEED,
                device=device,
            )
            bases[kind] = ica_basis(ica)
            info[kind] = {"fit_rows": len(sample), "ica_iterations": ica.n_iter, "ica_converged": ica.converged}
        else:
            raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(KINDS)}")
    return {
        kind: Basis(*(t.to(device) if isinstance(t, Tensor) else t for t in basis)) for kind, basis in bases.items()
    }, info


def eval_batches(dataset: ActivationDataset, rows: int, batch_rows: int, device: str):
    """The first `rows` rows of the eval shards in order, as float32 batches of `batch_rows`."""
    left, pending = rows, []
    for index in range(len(dataset.shards("eval"))):
        if left <= 0:
            break
        part = dataset.read_shard(index, "eval")[:left]
        left -= len(part)
        pending.append(part)
        joined = torch.cat(pending) if len(pending) > 1 else pending[0]
        whole = len(joined) // batch_rows * batch_rows
        for start in range(0, whole, batch_rows):
            yield joined[start : start + batch_rows].to(device=device, dtype=torch.float32)
        pending = [joined[whole:]] if whole < len(joined) else []


def fit_baselines(
    state_uri: str,
    kinds: list[str],
    target_l0s: list[float],
    dataset_uri: str,
    eval_rows: int,
    batch_rows: int,
    metadata: dict,
    storage_uri: str,
    ground_truth: np.ndarray | None,
    device: str = "cpu",
    threads: int = 0,
) -> list[dict]:
    """Fit, build, evaluate and export every baseline with `threads` torch threads (0: every core
    here); one result per dictionary: {"name", "kind", "k", "n_atoms", "metrics", "uri", "fit"}."""
    torch.set_num_threads(threads or os.cpu_count() or 1)  # a Ray task gets one thread by default
    state = read_sampler_state(state_uri)
    bases, info = fit_bases(state, kinds, device)
    dataset = ActivationDataset.open(dataset_uri)
    # a copy: Ray hands the driver's array over read-only
    features = torch.tensor(ground_truth, device=device) if ground_truth is not None else None
    results = []
    for kind, basis in bases.items():
        n_atoms = len(basis.atoms)
        ks = sorted({matched_k(l0, basis) for l0 in target_l0s} | {n_atoms})
        built = [
            baseline_dictionary(basis, k, {**metadata, "dictsweep": {**metadata.get("dictsweep", {}), "k": k}})
            for k in ks
        ]
        stack = DictionaryStack([Dictionary(config, weights) for config, weights in built]).to(device)
        evaluator = Evaluator(stack)
        for x in eval_batches(dataset, eval_rows, batch_rows, device):
            evaluator.add(x)
        frequencies = torch.log10((evaluator.fires / max(evaluator.rows, 1)).clamp_min(1e-10))  # [K, n]
        for member, ((config, weights), k, metrics) in enumerate(zip(built, ks, evaluator.results())):
            if features is not None:
                metrics.update(mmcs_ground_truth(weights["W_dec"], features))
            name = f"{kind}-k{k}"
            config["metadata"]["dictsweep"].update({"metrics": metrics, **info[kind]})
            folder = fs.join(storage_uri, "baselines", name)
            fs.write_files(folder, dictionary_files(config, weights, frequencies[member]))
            results.append(
                {
                    "name": name,
                    "kind": kind,
                    "k": k,
                    "n_atoms": n_atoms,
                    "metrics": metrics,
                    "uri": folder,
                    "fit": info[kind],
                }
            )
    return results
