"""First-letter feature absorption, as SAEBench's `absorption` eval computes it (its
`k_sparse_probing.py`, `feature_absorption_calculator.py` and `main.py`), on the harvested
dataset's own rows instead of ICL spelling prompts.

The examples are rows whose token is a whole alphabetic word (`analysis.labels`), labelled with its
first letter; words (token ids), not rows, are split into train and test, as SAEBench splits its
vocabulary, and each word keeps at most `per_word` rows. Then, per SAE:
1. ground-truth probes: one logistic probe per letter (one-vs-rest, classes balanced) on the dense
   activations; a letter counts when its probe's test F1 exceeds `min_probe_f1`;
2. an L1-penalised one-vs-rest probe on the SAE latents (Adam, SAEBench's schedule) ranks latents per
   letter; for k = 1 .. max_k a logistic probe on the top k (classes balanced): the letter's main
   latents are the top k for the last k whose test F1 rose by more than `f1_jump` over k - 1;
3. over the letter's test rows its probe detects: the absorption fraction (the part of the probe
   projection carried by up to 3 other latents aligned with the probe, not by the main latents) and
   full absorption (main latents silent, one other latent aligned with the probe carries >= 40%);
4. `mean_absorption_fraction_score`, `mean_full_absorption_score`, `mean_num_split_features` and
   their standard deviations over the counted letters (at least `min_letters` of them, else none).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch
from torch import Tensor

from dictsweep.analysis.labels import LETTERS
from dictsweep.analysis.probing import fit_logistic

EPS = 1e-8
FULL_COS, FRACTION_COS, PROJECTION_SHARE, MOST_ABSORBERS, TOP_FEATURES = 0.025, 0.1, 0.4, 3, 10


def word_split(tokens: np.ndarray, letters: np.ndarray, per_word: int, test_fraction: float, seed: int):
    """Row indices (train, test) of the whole-word rows: words split at random, at most `per_word` rows each."""
    generator = np.random.default_rng(seed)
    rows = np.flatnonzero(letters >= 0)
    words = np.unique(tokens[rows])
    test_words = set(generator.permutation(words)[: int(round(test_fraction * len(words)))].tolist())
    kept, seen = ([], []), {}
    for row in generator.permutation(rows):
        word = int(tokens[row])
        if seen.get(word, 0) < per_word:
            seen[word] = seen.get(word, 0) + 1
            kept[word in test_words].append(int(row))
    return np.sort(np.array(kept[0], dtype=np.int64)), np.sort(np.array(kept[1], dtype=np.int64))


def balanced_weights(positive: Tensor) -> Tensor:
    """sklearn's class_weight="balanced": n / (2 n_class) per row."""
    count = positive.double().sum()
    n = len(positive)
    return torch.where(positive, n / (2 * count.clamp_min(1)), n / (2 * (n - count).clamp_min(1))).double()


def f1(truth: Tensor, predicted: Tensor) -> float:
    true_positive = float((truth & predicted).sum())
    denominator = float(truth.sum()) + float(predicted.sum())
    return 2 * true_positive / denominator if denominator else 0.0


def one_vs_rest(letters: Tensor) -> Tensor:
    """`[26, rows]` True where a row's letter is that letter."""
    return letters[None, :] == torch.arange(len(LETTERS), device=letters.device)[:, None]


def ground_truth_probes(x: Tensor, letters: Tensor) -> tuple[Tensor, Tensor]:
    """One-vs-rest letter probes on dense activations (classes balanced): weights `[26, d]`, biases `[26]`."""
    weights = torch.zeros(len(LETTERS), x.shape[1], dtype=torch.float64, device=x.device)
    biases = torch.zeros(len(LETTERS), dtype=torch.float64, device=x.device)  # a letter absent: never predicted
    for i, positive in enumerate(one_vs_rest(letters)):
        if positive.any() and not positive.all():
            weights[i], biases[i] = fit_logistic(x, positive, sample_weight=balanced_weights(positive))
    return weights, biases


def l1_probe_weights(
    latents: Tensor, letters: Tensor, seed: int, l1_decay: float = 0.01, epochs: int = 50, batch_rows: int = 4096
) -> Tensor:
    """SAEBench's `train_sparse_multi_probe`: a one-vs-rest linear probe `[26, n_latents]` trained with
    Adam (lr 0.01 decaying to 1e-5, weight decay 1e-6), positive-weighted BCE, plus l1_decay x the mean
    over letters of |weights| summed over latents."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.nn.functional.one_hot(letters.clamp_min(0), len(LETTERS)).float().to(latents.device)
    positives = targets.sum(0)
    pos_weight = (len(targets) - positives) / positives.clamp_min(1)
    probe = torch.nn.Linear(latents.shape[1], len(LETTERS)).to(latents.device)
    with torch.no_grad():  # nn.Linear's initialisation, drawn from our generator
        bound = 1 / math.sqrt(latents.shape[1])
        probe.weight.copy_(torch.rand(probe.weight.shape, generator=generator) * 2 * bound - bound)
        probe.bias.copy_(torch.rand(probe.bias.shape, generator=generator) * 2 * bound - bound)
    steps = epochs * math.ceil(len(latents) / batch_rows)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.01, weight_decay=1e-6)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(math.log(1e-5 / 0.01) / steps))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(latents), generator=generator).to(latents.device)
            for start in range(0, len(latents), batch_rows):
                rows = order[start : start + batch_rows]
                loss = loss_fn(probe(latents[rows]), targets[rows])
                loss = loss + l1_decay * probe.weight.abs().sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return probe.weight.detach()


def main_latents(f1_by_k: list[float], latents_by_k: list[list[int]], f1_jump: float) -> list[int]:
    """SAEBench's feature split: the latents of the last k whose F1 beat the previous best by `f1_jump`."""
    best, chosen = -100.0, []
    for score, latents in zip(f1_by_k, latents_by_k):
        if score > best + f1_jump:
            best, chosen = score, latents
        else:
            break
    return chosen


def absorption_of_row(
    act_projection: float, latent_projection: Tensor, latent_acts: Tensor, cosines: Tensor, main: list[int]
) -> tuple[float, bool]:
    """SAEBench's absorption fraction and full absorption of one row (`calculate_absorption`)."""
    main_projection = float(latent_projection[main].sum())
    others = torch.ones(len(latent_projection), dtype=torch.bool)
    others[main] = False
    others &= (cosines >= FRACTION_COS) & (latent_projection > 0)
    candidates = latent_projection[others]
    absorbing = float(candidates.topk(min(MOST_ABSORBERS, candidates.numel())).values.sum())
    if main_projection >= act_projection or absorbing / act_projection < PROJECTION_SHARE:
        fraction = 0.0
    elif main_projection <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(absorbing, act_projection - main_projection)
        fraction = float(np.clip(absorbed / (absorbed + main_projection), 0.0, 1.0))
    top = latent_projection.topk(min(TOP_FEATURES, len(latent_projection))).indices
    full = (
        all(float(latent_acts[i]) < EPS for i in main)
        and float(cosines[top[0]]) >= FULL_COS
        and act_projection >= 0
        and float(latent_projection[top[0]]) / act_projection >= PROJECTION_SHARE
    )
    return fraction, full


def absorption(
    sae, data: dict, probes: tuple[Tensor, Tensor], settings: dict, device: str
) -> tuple[dict[str, float], list[dict], str | None]:
    """One SAE's absorption: (metrics, per-letter details, why it was not measured or None).

    `data`: "train_x", "test_x" `[rows, d]`, "train_letters", "test_letters" `[rows]`; `probes`:
    `ground_truth_probes`; `settings`: max_k, f1_jump, min_probe_f1, min_letters, seed."""
    weights, biases = probes
    test_x, test_letters = data["test_x"].to(device), data["test_letters"].to(device)
    probe_scores = test_x.double() @ weights.t() + biases  # [rows, 26]
    with torch.no_grad():
        train_latents = sae.encode(data["train_x"].to(device)).float()
        test_latents = sae.encode(test_x).float()
    ranking = l1_probe_weights(train_latents, data["train_letters"].to(device), settings["seed"])
    train_letters = data["train_letters"].to(device)
    unit = torch.nn.functional.normalize
    cosines = unit(weights.float(), dim=-1) @ unit(sae.W_dec.float(), dim=-1).t()  # [26, n_latents]
    positive = one_vs_rest(train_letters)  # [26, rows]
    both = positive.any(1) & ~positive.all(1)  # a letter missing from the train rows is not fitted (weights 0)
    balance = torch.stack([balanced_weights(p) for p in positive]) * both[:, None]
    f1_by_k, latents_by_k = [], []  # per k: per letter
    for k in range(1, min(settings["max_k"], ranking.shape[1]) + 1):
        chosen = ranking.topk(k, dim=-1).indices  # [26, k]
        probe = fit_logistic(train_latents.t()[chosen].transpose(1, 2), positive, sample_weight=balance)
        predicted = probe.scores(test_latents.t()[chosen].transpose(1, 2)) > 0  # [26, test rows]
        f1_by_k.append([f1(test_letters == i, predicted[i]) for i in range(len(LETTERS))])
        latents_by_k.append(chosen.tolist())
    details, kept = [], []
    for index, letter in enumerate(LETTERS):
        truth = test_letters == index
        probe_f1 = f1(truth, probe_scores[:, index] > 0)
        detected = torch.nonzero(truth & (probe_scores[:, index] > 0)).flatten()
        if probe_f1 <= settings["min_probe_f1"] or not len(detected):
            continue
        main = main_latents([row[index] for row in f1_by_k], [row[index] for row in latents_by_k], settings["f1_jump"])
        direction = weights[index].float() / weights[index].float().norm()
        fractions, full = [], 0
        for row in detected.tolist():
            fraction, is_full = absorption_of_row(
                float(test_x[row].float() @ direction),
                (test_latents[row] * cosines[index]).cpu(),
                test_latents[row].cpu(),
                cosines[index].cpu(),
                main,
            )
            fractions.append(fraction)
            full += is_full
        kept.append(letter)
        details.append(
            {
                "first_letter": letter,
                "mean_absorption_fraction": sum(fractions) / len(detected),
                "full_absorption_rate": full / len(detected),
                "num_full_absorption": full,
                "num_probe_true_positives": len(detected),
                "num_split_features": len(main),
            }
        )
    if len(kept) < max(settings["min_letters"], 2):
        return (
            {},
            details,
            f"{len(kept)} letters with a probe F1 above {settings['min_probe_f1']} (needs {settings['min_letters']})",
        )
    fractions = [d["mean_absorption_fraction"] for d in details]
    rates = [d["full_absorption_rate"] for d in details]
    splits = [d["num_split_features"] for d in details]
    return (
        {
            "mean_absorption_fraction_score": statistics.mean(fractions),
            "mean_full_absorption_score": statistics.mean(rates),
            "mean_num_split_features": statistics.mean(splits),
            "std_dev_absorption_fraction_score": statistics.stdev(fractions),
            "std_dev_full_absorption_score": statistics.stdev(rates),
            "std_dev_num_split_features": statistics.stdev(splits),
        },
        details,
        None,
    )
