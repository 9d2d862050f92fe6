"""tokenmill trainer side; `from train import MixtureStream` still works (imported on first use,
so `python -m train --help` does not pay for torch and numba)."""


def __getattr__(name):
    if name == "MixtureStream":
        from .stream import MixtureStream
        return MixtureStream
    raise AttributeError(f"module 'train' has no attribute {name!r}")
