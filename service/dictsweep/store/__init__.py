"""Activation datasets (format "dictsweep.activations/1"): manifest, shards, reading, writing, synth.

Modules: `fs` (URIs to fsspec filesystems), `manifest`, `shards` (the one Arrow encoder/decoder),
`dataset` (ActivationDataset, DatasetWriter), `synth` (synthetic data with ground truth).
Nothing is imported here, so that `import dictsweep.store.synth` for the CLI stays light.
"""
