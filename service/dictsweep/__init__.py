"""dictsweep: sparse-autoencoder sweeps over language-model activations."""

__version__ = "0.1.0"


def load_dictionary(path_or_uri: str):
    """Load an exported dictionary (SAELens v6 folder, local or object-store URI) as a torch module
    with `encode`, `decode` and `forward`."""
    from dictsweep.sae.export import read_dictionary
    from dictsweep.store import fs

    def read(name: str) -> bytes | None:
        uri = fs.join(path_or_uri, name)
        return fs.read_bytes(uri) if fs.exists(uri) else None

    return read_dictionary(read, path_or_uri)


__all__ = ["load_dictionary", "__version__"]
