from .stream import MixtureStream
