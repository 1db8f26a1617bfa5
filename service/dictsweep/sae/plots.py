"""End-of-training pictures of one SAE: feature density and decoder norms, as PNG bytes.

Figures are built on matplotlib's Agg canvas directly (no pyplot, no global state), so this works
in any process and thread without a display. Logging them (MLflow) is the caller's business.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

NEVER_FIRED = -10.0  # what `FiringTracker.log10_frequency` gives a latent that never fired


def decoder_norm_stats(decoder: Tensor) -> dict[str, float]:
    """Norms of the decoder rows `[n_latents, d_model]`: mean, std, min, max."""
    norms = decoder.detach().float().norm(dim=-1)
    return {
        "decoder_norm_mean": float(norms.mean()),
        "decoder_norm_std": float(norms.std(correction=0)),
        "decoder_norm_min": float(norms.min()),
        "decoder_norm_max": float(norms.max()),
    }


def histogram_range(values: Tensor) -> tuple[float, float] | None:
    """A range for `hist` that is never empty: unit-norm decoders give norms all equal to 1, shown
    within +-5% of that value (a narrower range would need 4-5 digit tick labels that overlap)."""
    if values.numel() == 0:
        return None
    low, high = float(values.min()), float(values.max())
    pad = max(0.05 * max(abs(low), abs(high)), 0.05) if high - low < 1e-3 * max(1.0, abs(high)) else 0.0
    return low - pad, high + pad


def member_plot(log10_frequency: Tensor, decoder: Tensor, title: str = "") -> bytes:
    """PNG bytes of `member_figure`."""
    buffer = io.BytesIO()
    member_figure(log10_frequency, decoder, title).savefig(buffer, format="png")
    return buffer.getvalue()


def member_figure(log10_frequency: Tensor, decoder: Tensor, title: str = "") -> Figure:
    """One SAE: histogram of log10 firing frequency (never-fired latents counted apart) and
    histogram of decoder row norms with their statistics."""
    frequency = log10_frequency.detach().float().cpu()  # [n_latents]
    fired = frequency[frequency > NEVER_FIRED]
    norms = decoder.detach().float().norm(dim=-1).cpu()  # [n_latents]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    density, norm_axes = figure.subplots(1, 2)
    density.hist(fired.numpy(), bins=50, range=histogram_range(fired), color="tab:blue")
    density.set_xlabel("log10 firing frequency")
    density.set_ylabel("latents")
    density.set_title(f"feature density ({len(frequency) - len(fired)} of {len(frequency)} never fired)")
    norm_axes.hist(norms.numpy(), bins=50, range=histogram_range(norms), color="tab:orange")
    norm_axes.set_xlabel("decoder row norm")
    norm_axes.xaxis.set_major_locator(MaxNLocator(nbins=5))  # few, short labels: they never overlap
    norm_axes.ticklabel_format(axis="x", useOffset=False)
    stats = decoder_norm_stats(decoder)
    norm_axes.set_title(
        "mean {decoder_norm_mean:.3g}, std {decoder_norm_std:.2g}, "
        "min {decoder_norm_min:.3g}, max {decoder_norm_max:.3g}".format(**stats)
    )
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
