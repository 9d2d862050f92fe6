"""The run's settings as one frozen object: the parsed flags after seed-script aliases were
mapped (train/args.py) and, later, after the DeepSpeed JSON settled the shared numbers
(train/ds_config.py). Nothing mutates it; a later stage makes a new one with `replace`."""
from __future__ import annotations


class TrainConfig:
    """Attribute access to the settings; frozen (assignment raises)."""

    __slots__ = ("_values",)

    def __init__(self, values: dict):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"TrainConfig has no setting {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"TrainConfig is frozen: use .replace({name}=...)")

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig({**self._values, **changes})

    def as_dict(self) -> dict:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"TrainConfig({self._values!r})"
