"""Metrics of a dictionary: reconstruction, sparsity, latent health and feature recovery.

One module computes every number the product reports, in training, evaluation and selection.
Functions take a leading member dimension where noted and return one value per member.
"""

from __future__ import annotations

import torch
from torch import Tensor


def variance(x: Tensor) -> Tensor:
    """Total variance of rows about their mean, summed over d_model, per row: `[..., B, d] -> [...]`."""
    return (x - x.mean(-2, keepdim=True)).pow(2).sum(-1).mean(-1)


def variance_from_moments(x_sum: Tensor, x_sq_sum: Tensor, rows: int) -> Tensor:
    """`variance` of `rows` rows from their sum `[..., d]` and their summed squares `[...]` (sums that
    add up over batches and workers)."""
    return (x_sq_sum - x_sum.pow(2).sum(-1) / rows) / rows


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error summed over d_model, averaged over rows: `[..., B, d] -> [...]`, float32 also under
    autocast (the training loss)."""
    return (x_hat.float() - x).pow(2).sum(-1).mean(-1)


def mse(error: Tensor | float, d_model: int, input_scale: float = 1.0) -> Tensor | float:
    """Mean squared error per element of raw activations (the eval metric `mse`), from a `squared_error`
    (summed over d_model) on the training scale, where inputs are multiplied by `input_scale`."""
    return error / (d_model * input_scale**2)


def fvu(x: Tensor, x_hat: Tensor, error: Tensor | None = None) -> Tensor:
    """Fraction of variance unexplained: squared error over total variance (about the batch mean);
    `error`: `squared_error(x, x_hat)` where it is already computed."""
    return (squared_error(x, x_hat) if error is None else error) / variance(x)


def fvu_from_moments(error: Tensor, x_sum: Tensor, x_sq_sum: Tensor, rows: int) -> Tensor:
    """`fvu` from the `squared_error` and the moments of the `rows` rows (`variance_from_moments`), in
    the error's dtype."""
    return error / variance_from_moments(x_sum, x_sq_sum, rows).to(error.dtype)


def l0_from_counts(fire_counts: Tensor, rows: int) -> Tensor:
    """Mean number of active latents per row from each latent's firing count: `[..., n] -> [...]`."""
    return fire_counts.sum(-1) / rows


def dead_fraction(fire_counts: Tensor) -> Tensor:
    """Fraction of latents that fired on no row: `[..., n] -> [...]`."""
    return (fire_counts == 0).float().mean(-1)


class FiringTracker:
    """Per-latent firing over a sliding window of tokens, for dead and dense fractions.

    A latent is dead when it has not fired in the last `window_tokens` tokens; dense when it fired
    on more than `dense_threshold` of the tokens of the last completed window.
    """

    def __init__(
        self,
        n_members: int,
        n_latents: int,
        window_tokens: int,
        dense_threshold: float = 0.1,
        device: torch.device | str = "cpu",
    ):
        self.window_tokens, self.dense_threshold = window_tokens, dense_threshold
        self.tokens_seen = 0
        self.last_fired = torch.zeros(n_members, n_latents, dtype=torch.long, device=device)  # token index
        self.window_counts = torch.zeros(n_members, n_latents, device=device)  # fires this window
        self.window_start = 0
        self.frequency = torch.zeros(n_members, n_latents, device=device)  # of the last full window
        self.total_counts = torch.zeros(n_members, n_latents, dtype=torch.float64, device=device)

    def update(self, fire_counts: Tensor, tokens: int) -> None:
        """Record one batch: `fire_counts [K, n]` rows on which each latent fired, out of `tokens`."""
        self.tokens_seen += tokens
        # where, not a masked assignment: no host-device sync
        self.last_fired = torch.where(fire_counts > 0, self.tokens_seen, self.last_fired)
        self.window_counts += fire_counts
        self.total_counts += fire_counts
        if self.tokens_seen - self.window_start >= self.window_tokens:
            self.frequency = self.window_counts / (self.tokens_seen - self.window_start)
            self.window_counts = torch.zeros_like(self.window_counts)
            self.window_start = self.tokens_seen

    def dead_mask(self, window_tokens: int | None = None) -> Tensor:
        """`[K, n]` True where a latent has not fired within the window (none before a window has passed);
        `window_tokens` replaces the tracker's window (AuxK's is shorter)."""
        window = window_tokens or self.window_tokens
        if self.tokens_seen < window:
            return torch.zeros_like(self.last_fired, dtype=torch.bool)
        return self.tokens_seen - self.last_fired >= window

    def revive(self, latents: Tensor) -> None:
        """Count `latents [K, n]` (e.g. just resampled) as having fired now: a fresh window each."""
        self.last_fired = torch.where(latents, self.tokens_seen, self.last_fired)

    def dead_fraction(self) -> Tensor:
        """Fraction of latents dead, per member `[K]`."""
        return self.dead_mask().float().mean(-1)

    def dense_fraction(self) -> Tensor:
        """Fraction of latents firing on more than `dense_threshold` of tokens, per member `[K]`."""
        return (self.frequency > self.dense_threshold).float().mean(-1)

    def log10_frequency(self) -> Tensor:
        """Log10 firing frequency of every latent over all tokens seen, `[K, n]` (-10 for never)."""
        frequency = self.total_counts / max(self.tokens_seen, 1)
        return torch.log10(frequency.clamp_min(1e-10)).float()

    def state_dict(self) -> dict:
        return {key: value for key, value in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def max_cosine(a: Tensor, b: Tensor, chunk: int = 4096, exclude_self: bool = False) -> Tensor:
    """For each row of `a [n_a, d]`, its largest cosine similarity with any row of `b [n_b, d]`;
    `exclude_self`: `b` is `a`, and each row's best is over the other rows (-1 when there is none)."""
    a = torch.nn.functional.normalize(a.detach().float(), dim=-1)
    b = torch.nn.functional.normalize(b.detach().float(), dim=-1)
    best = []
    for number, part in enumerate(a.split(chunk)):
        sims = part @ b.t()  # [chunk, n_b]
        if exclude_self:
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + number * chunk] = -torch.inf
        best.append(sims.max(-1).values)
    return torch.cat(best).clamp_min(-1.0) if exclude_self else torch.cat(best)


def mmcs(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Mean max cosine similarity both ways: (averaged over rows of a, averaged over rows of b)."""
    return float(max_cosine(a, b).mean()), float(max_cosine(b, a).mean())


def mmcs_ground_truth(decoder: Tensor, features: Tensor) -> dict[str, float]:
    """Recovery of ground-truth features by a decoder `[n_latents, d]`.

    `mmcs_ground_truth`: mean over true features of the best cosine with a learned atom (recovery);
    `mmcs_learned`: mean over learned atoms of the best cosine with a true feature (precision).
    """
    over_learned, over_truth = mmcs(decoder, features)
    return {"mmcs_ground_truth": over_truth, "mmcs_learned": over_learned}
