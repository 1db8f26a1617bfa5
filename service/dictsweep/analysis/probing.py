"""Sparse probing on a harvested dataset's own tokens, as SAEBench's `sparse_probing` eval scores it.

Each task of `analysis.labels` is a balanced binary dataset (as SAEBench's `prepare_probe_data`):
its positive rows and as many negative rows drawn at random, from the train split to fit and the
eval split (held-out contexts) to test. On each:
- `llm_test_accuracy`: a logistic-regression probe on the dense activations: the ceiling;
- `llm_top_{k}_test_accuracy`: the same on the k activation dimensions whose class means differ most;
- `sae_top_{k}_test_accuracy`: the same on the k SAE latents whose class means differ most
  (SAEBench's `get_top_k_mean_diff_mask`: |mean over positives - mean over negatives|, train rows).
Each metric is the mean test accuracy over the tasks. The probe is `fit_logistic`: sklearn's
default LogisticRegression objective (L2, C = 1, unpenalised intercept) solved by L-BFGS in torch,
so it runs on the GPU beside the dictionaries and the product needs no scikit-learn.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from dictsweep.analysis.labels import BASE_TASKS, LETTERS


class Probe(NamedTuple):
    """Logistic probes: `weight` `[d]` and `bias` `[]`, or `[P, d]` and `[P]` for P probes."""

    weight: Tensor
    bias: Tensor

    def scores(self, x: Tensor) -> Tensor:
        """Logits of rows `x [N, d]`: `[N]`, or `[N, P]` for P probes (`[P, N, d]` rows: `[P, N]`)."""
        x = x.to(self.weight.dtype)
        if x.dim() == 3:
            return (x @ self.weight[:, :, None]).squeeze(-1) + self.bias[:, None]
        return x @ self.weight.t() + self.bias


def logistic_loss(x: Tensor, signs: Tensor, weights: Tensor, params: Tensor, C: float) -> Tensor:
    """Per probe: sum_i w_i log(1 + exp(-s_i (x_i.v + b))) + |v|^2 / (2C); `params` `[P, d + 1]`
    (v, then b), `x` `[N, d]` (shared) or `[P, N, d]`, `signs`, `weights` `[P, N]`."""
    logits = Probe(params[:, :-1], params[:, -1]).scores(x)
    margins = signs * (logits if x.dim() == 3 else logits.t())  # [P, N]
    return (weights * torch.nn.functional.softplus(-margins)).sum(-1) + params[:, :-1].pow(2).sum(-1) / (2 * C)


def fit_logistic(
    x: Tensor, y: Tensor, C: float = 1.0, sample_weight: Tensor | None = None, max_iter: int = 500
) -> Probe:
    """sklearn's LogisticRegression (`penalty="l2"`, C, unpenalised intercept, optional sample
    weights) in float64 on `x`'s device; `y` in {0, 1}.

    One probe: `x [N, d]`, `y [N]`, solved by L-BFGS (any width). Several independent probes of few
    columns at once: `x [P, N, k]`, `y [P, N]` (`sample_weight` of `y`'s shape; 0 drops a row, e.g.
    padding), solved by Newton's method with step halving, batched (k + 1 unknowns each)."""
    x = x.double()
    signs = y.double().to(x.device) * 2 - 1
    weights = torch.ones_like(signs) if sample_weight is None else sample_weight.double().to(x.device)
    if x.dim() == 3:
        return newton_logistic(x, signs, weights, C)
    params = torch.zeros(1, x.shape[-1] + 1, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [params], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = logistic_loss(x, signs[None], weights[None], params, C).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    params = params.detach()
    return Probe(params[0, :-1], params[0, -1])


def newton_logistic(x: Tensor, signs: Tensor, weights: Tensor, C: float, steps: int = 100) -> Probe:
    """`fit_logistic` of P probes on their own rows `x [P, N, k]` by Newton's method."""
    count, _, width = x.shape
    design = torch.cat([x, torch.ones_like(x[..., :1])], -1)  # [P, N, k + 1]
    penalty = torch.full((width + 1,), 1 / C, dtype=x.dtype, device=x.device)
    penalty[-1] = 0  # the intercept is not penalised
    targets = (signs + 1) / 2  # [P, N]
    params = torch.zeros(count, width + 1, dtype=x.dtype, device=x.device)
    loss = logistic_loss(x, signs, weights, params, C)
    for iteration in range(steps):
        p = torch.sigmoid((design @ params[:, :, None]).squeeze(-1))  # [P, N]
        gradient = (design * (weights * (p - targets))[..., None]).sum(1) + penalty * params
        curvature = weights * p * (1 - p)
        hessian = design.transpose(1, 2) @ (design * curvature[..., None]) + torch.diag(penalty)
        step = torch.linalg.solve(hessian + 1e-12 * torch.eye(width + 1, dtype=x.dtype, device=x.device), gradient)
        scale = torch.ones(count, 1, dtype=x.dtype, device=x.device)
        for _ in range(30):  # halve the step of every probe whose loss would rise
            trial = logistic_loss(x, signs, weights, params - scale * step, C)
            worse = trial > loss + 1e-12 * loss.abs()
            if not worse.any():
                break
            scale = torch.where(worse[:, None], scale / 2, scale)
        params, loss = params - scale * step, trial
        if float((scale * step).abs().max()) < 1e-9:
            break
    return Probe(params[:, :-1], params[:, -1])


def accuracy(probe: Probe, x: Tensor, y: Tensor) -> float:
    return float(((probe.scores(x) > 0) == y.to(x.device).bool()).double().mean())


def mean_difference_top_k(x: Tensor, y: Tensor, k: int) -> Tensor:
    """SAEBench's latent choice: the k columns whose mean over positives and negatives differ most."""
    labels = y.to(x.device).bool()
    difference = (x[labels].double().mean(0) - x[~labels].double().mean(0)).abs()
    return torch.argsort(difference, descending=True, stable=True)[:k]


class Task(NamedTuple):
    """One balanced binary task: row indices into the train and test rows, and their labels."""

    name: str
    train: np.ndarray
    train_y: np.ndarray
    test: np.ndarray
    test_y: np.ndarray


def balanced(positive: np.ndarray, generator: np.random.Generator, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of at most `most` / 2 positives and as many negatives (shuffled), and their labels."""
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    count = min(len(pos), len(neg), most // 2)
    rows = np.concatenate([generator.permutation(pos)[:count], generator.permutation(neg)[:count]])
    labels = np.concatenate([np.ones(count, bool), np.zeros(count, bool)])
    order = generator.permutation(len(rows))
    return rows[order], labels[order]


def probing_tasks(
    train: dict, test: dict, first_letters: int, rows_per_task: int, min_examples: int, seed: int
) -> tuple[list[Task], list[str]]:
    """The base tasks and the `first_letters` commonest first-letter tasks with at least `min_examples`
    positives in both splits (labels from `labels.row_labels`), and notes on the tasks left out."""
    generator = np.random.default_rng(seed)
    counts = np.bincount(train["letter"][train["letter"] >= 0], minlength=len(LETTERS))
    letters = [int(i) for i in np.argsort(-counts, kind="stable")[:first_letters]]
    wanted = {name: (train[name], test[name]) for name in BASE_TASKS}
    wanted |= {
        f"first_letter_{LETTERS[i]}": (train["letter"] == i, test["letter"] == i) for i in letters
    }  # against every other row
    tasks, notes = [], []
    for name, (train_positive, test_positive) in wanted.items():
        few = min(train_positive.sum(), (~train_positive).sum(), test_positive.sum(), (~test_positive).sum())
        if few < min_examples:
            notes.append(f"task {name} left out: {few} examples in its smallest class (fewer than {min_examples})")
            continue
        train_rows, train_y = balanced(train_positive, generator, rows_per_task)
        test_rows, test_y = balanced(test_positive, generator, rows_per_task)
        tasks.append(Task(name, train_rows, train_y, test_rows, test_y))
    return tasks, notes


def padded(x: Tensor, tasks: list[Task], split: str, columns: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per task its rows of `split` and `columns`, zero-padded to one length: x `[T, N, k]`, y and
    row weights (0 on padding) `[T, N]`."""
    rows = [getattr(task, split) for task in tasks]
    labels = [getattr(task, f"{split}_y") for task in tasks]
    length = max(len(r) for r in rows)
    x_out = torch.zeros(len(tasks), length, len(columns[0]), dtype=x.dtype, device=x.device)
    y_out = torch.zeros(len(tasks), length, dtype=torch.bool)
    w_out = torch.zeros(len(tasks), length, dtype=torch.float64)
    for i, (r, y, c) in enumerate(zip(rows, labels, columns)):
        x_out[i, : len(r)] = x[torch.from_numpy(r).to(x.device)][:, c]
        y_out[i, : len(r)] = torch.from_numpy(y)
        w_out[i, : len(r)] = 1
    return x_out, y_out, w_out


def probe_accuracies(
    train_x: Tensor, test_x: Tensor, tasks: list[Task], ks: list[int], prefix: str, dense: bool
) -> dict[str, dict[str, float]]:
    """Per task: `{prefix}_test_accuracy` (all columns; where `dense`) and `{prefix}_top_{k}_test_accuracy`."""
    results = {task.name: {} for task in tasks}
    if dense:
        for task in tasks:
            probe = fit_logistic(train_x[task.train], torch.from_numpy(task.train_y))
            results[task.name][f"{prefix}_test_accuracy"] = accuracy(
                probe, test_x[task.test], torch.from_numpy(task.test_y)
            )
    for k in ks:
        if not tasks or k > train_x.shape[1]:
            continue
        columns = [
            mean_difference_top_k(train_x[torch.from_numpy(t.train)], torch.from_numpy(t.train_y), k).cpu()
            for t in tasks
        ]
        x, y, w = padded(train_x, tasks, "train", columns)
        probe = fit_logistic(x, y, sample_weight=w)
        x, y, w = padded(test_x, tasks, "test", columns)
        right = ((probe.scores(x) > 0).cpu() == y).double() * w  # [T, N]
        for i, task in enumerate(tasks):
            results[task.name][f"{prefix}_top_{k}_test_accuracy"] = float(right[i].sum() / w[i].sum())
    return results


def mean_over_tasks(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """SAEBench's per-metric average over datasets."""
    names = sorted({name for row in per_task.values() for name in row})
    return {name: float(np.mean([row[name] for row in per_task.values() if name in row])) for name in names}
