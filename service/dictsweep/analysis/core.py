"""The pass behind SAEBench's core metrics (`sae.saebench`): every dictionary over the same eval
rows of a dataset, in batches, on raw activations. An SAE is measured against its input; a
transcoder against the row's `target`, by its whole output (`forward`, with its skip path)."""

from __future__ import annotations

import torch

from dictsweep.errors import InputError
from dictsweep.sae.export import Dictionary
from dictsweep.sae.saebench import CoreSums, core_metrics, weight_metrics
from dictsweep.store.dataset import ActivationDataset

CORE_BATCH_ROWS = 2048  # SAEBench's batch: 16 prompts of 128 tokens (the legacy explained variance is per batch)


def core_sums(
    dataset: ActivationDataset,
    dictionaries: dict[str, Dictionary],
    rows: int | None,
    device: str,
    batch_rows: int = CORE_BATCH_ROWS,
) -> dict[str, CoreSums]:
    """`CoreSums` of each dictionary over the first `rows` eval rows (all when None), shards in
    manifest order; each row's context from the `seq` column where the shards have one."""
    sums = {name: CoreSums(sae.W_dec.shape[0], sae.W_dec.shape[1], device) for name, sae in dictionaries.items()}
    budget = dataset.n_eval_rows if rows is None else min(rows, dataset.n_eval_rows)
    seen = 0
    for index in range(len(dataset.shards("eval"))):
        if seen >= budget:
            break
        acts, columns = dataset.read_shard(index, "eval", columns=True)
        seqs = torch.from_numpy(columns["seq"].astype("int64")) if "seq" in columns else None
        for start in range(0, len(acts), batch_rows):
            take = min(batch_rows, len(acts) - start, budget - seen)
            if take <= 0:
                break
            x = acts[start : start + take].float().to(device)  # [B, d_model]
            target = columns["target"][start : start + take].float().to(device) if "target" in columns else None
            batch_seqs = seqs[start : start + take] if seqs is not None else None
            with torch.no_grad():
                for name, sae in dictionaries.items():
                    latents = sae.encode(x)  # [B, n_latents]
                    reference = target if sae.transcoder else x  # [B, d_out]
                    sums[name].add(reference, sae.output(x, latents), latents, batch_seqs)
            seen += take
    if seen == 0:
        raise InputError(f"{dataset.uri}: the eval split has no rows; the core metrics are measured on eval rows")
    return sums


def check_widths(name: str, sae: Dictionary, dataset: ActivationDataset) -> None:
    """InputError unless the dictionary reads the dataset's rows and writes what it is measured against:
    the rows again (an SAE), or their `target` (a transcoder)."""
    d_in, d_out = sae.W_enc.shape[0], sae.W_dec.shape[1]
    wanted = dataset.d_target if sae.transcoder else dataset.d_model
    if d_in != dataset.d_model:
        raise InputError(
            f"dictionary {name} has d_in={d_in} but dataset {dataset.uri} has "
            f"d_model={dataset.d_model}: it was trained on other activations"
        )
    if d_out != wanted:  # a transcoder's (an SAE's W_dec is [d_sae, d_in], checked when it is read)
        has = f"a target of width {dataset.d_target}" if dataset.d_target else "no target column"
        raise InputError(
            f"dictionary {name} is a transcoder of d_out={d_out} but dataset {dataset.uri} has {has}: "
            "a transcoder is measured against the target of the dataset it was trained on"
        )


def core_results(
    dataset: ActivationDataset,
    dictionaries: dict[str, Dictionary],
    rows: int | None,
    device: str,
) -> dict[str, dict]:
    """Per dictionary, `core_metrics` ({"metrics": by category, "details": per latent}) over the eval rows."""
    for name, sae in dictionaries.items():
        check_widths(name, sae, dataset)
    sums = core_sums(dataset, dictionaries, rows, device)
    return {
        name: core_metrics(sums[name], weight_metrics(sae.W_enc, sae.W_dec, sae.b_enc, same_space=not sae.transcoder))
        for name, sae in dictionaries.items()
    }
