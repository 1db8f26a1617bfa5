"""Grid keys that a single architecture reads, beside the ones every sweep has: `GridConfig` takes them
in, so an architecture with a setting of its own adds its key here (and declares it in its `sae/` file)."""

from __future__ import annotations

from pydantic import BaseModel, Field

MATRYOSHKA_PREFIXES = (0.0625, 0.25)  # matryoshka_batchtopk's default prefixes (sae/ reads them here: no torch)


class ArchitectureKeys(BaseModel):
    """Grid keys of one architecture each (lists: the grid is their product with the others)."""

    matryoshka_prefixes: list[list[float] | float] = Field(
        [list(MATRYOSHKA_PREFIXES)],
        min_length=1,
        description="matryoshka_batchtopk: nested prefix widths of each SAE as fractions of n_latents, increasing (the whole dictionary is the last prefix); each value is one SAE's list (a bare number: one prefix).",
    )
