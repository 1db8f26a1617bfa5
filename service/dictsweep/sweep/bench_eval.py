"""`dictsweep bench eval`: what the end-of-sweep evaluation costs per SAE beside training it.

Training: the SAE-samples/s of one `topk` SAE of the same shape (`bench train`, one member, random
sparse batches), turned into seconds for `tokens` training tokens. Evaluation, on the dataset itself
for a bench dictionary of that size (`analysis.bench`): the core metrics' pass over the eval rows the
sweep would read, and with probing, the part shared by every SAE of a sweep (labels, dense probes,
letter probes: paid once) and the part paid per SAE (k-sparse probes, absorption). The ratio is the
per-SAE evaluation over the per-SAE training: what the evaluation adds to a sweep.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch


def bench_eval(
    uri: str, n_latents: int, k: int, tokens: int, eval_rows: int | None, probing: bool, device: str
) -> dict:
    from dictsweep import load_dictionary
    from dictsweep.analysis.bench import bench_dictionary
    from dictsweep.analysis.config import EvalConfig
    from dictsweep.analysis.core import core_results
    from dictsweep.analysis.evaluation import probe_dictionary, probing_data, probing_source
    from dictsweep.store.dataset import ActivationDataset
    from dictsweep.train.bench import bench_train

    dataset = ActivationDataset.open(uri)
    trained = bench_train(dataset.d_model, n_latents, 1024, 1, 10, "topk", ("bmm",), False, device, rounds=2, k=k)
    samples_per_s = trained["sae_samples_per_s"]
    train_seconds = tokens / samples_per_s
    with tempfile.TemporaryDirectory() as scratch:
        folder = bench_dictionary(os.path.join(scratch, "bench"), dataset, n_latents, firing=k / n_latents)
        sae = load_dictionary(folder).to(device)
        start = time.perf_counter()
        core_results(dataset, {"bench": sae}, eval_rows, device)
        core_seconds = time.perf_counter() - start
        shared = per_sae = 0.0
        if probing and probing_source(dataset) is None:
            config = EvalConfig(target="bench", data=uri)
            start = time.perf_counter()
            data = probing_data(dataset, config, device)
            shared = time.perf_counter() - start
            start = time.perf_counter()
            probe_dictionary(sae, data, config, device)
            per_sae = time.perf_counter() - start
    rows = dataset.n_eval_rows if eval_rows is None else min(eval_rows, dataset.n_eval_rows)
    evaluation = core_seconds + per_sae
    return {
        "d_model": dataset.d_model,
        "n_latents": n_latents,
        "k": k,
        "device": device,
        "threads": torch.get_num_threads(),
        "train_tokens": tokens,
        "train_sae_samples_per_s": round(samples_per_s, 1),
        "train_seconds_per_sae": round(train_seconds, 3),
        "eval_rows": rows,
        "core_seconds_per_sae": round(core_seconds, 3),
        "probing": bool(probing and shared),
        "probing_shared_seconds": round(shared, 3),
        "probing_seconds_per_sae": round(per_sae, 3),
        "eval_seconds_per_sae": round(evaluation, 3),
        "eval_to_train_ratio": round(evaluation / train_seconds, 4),
    }
