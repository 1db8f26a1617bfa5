"""Analysis of trained dictionaries: per-latent statistics over a dataset, the feature browser,
matches between dictionaries, latents as steering vectors. Reads dictionaries and datasets only.

Notebook use::

    from dictsweep import load_dictionary
    from dictsweep.analysis import top_contexts, feature_matches, steer
"""

__all__ = ["feature_matches", "steer", "top_contexts"]


def __getattr__(name: str):
    # imported on first use, so that the CLI's help (which reads analysis.config) needs no torch
    if name == "feature_matches":
        from dictsweep.analysis.directions import feature_matches

        return feature_matches
    if name == "steer":
        from dictsweep.analysis.steering import steer

        return steer
    if name == "top_contexts":
        from dictsweep.analysis.notebook import top_contexts

        return top_contexts
    raise AttributeError(f"module 'dictsweep.analysis' has no attribute {name!r}")
