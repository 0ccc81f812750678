"""Finding what a request names: a model, and one of its versions or labels.

Owns the seam every front end (REST in `_app`, gRPC in `_grpc`) uses to turn
`(name, version, label)` into the `Servable` that answers, and TF Serving's
wording when there is none ("Servable not found for request: ..."), which
clients and readiness probes look for. Which versions are loaded, and when,
stays in `_repository` and the model registry.
"""

from __future__ import annotations

from typing import Any, Protocol

from keras_tandem.server._repository import Servable, ServedModel


class ServableNotFound(LookupError):
    """No model, version or label matches a request (REST 404, gRPC NOT_FOUND).

    Args:
        message: TF Serving's wording, e.g.
            `Servable not found for request: Specific(mlp, 3)`.
        unavailable: True when the model is known but has no version loaded
            yet (REST answers 503 then, gRPC UNAVAILABLE).
    """

    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.message = message
        self.unavailable = unavailable


class UnknownLabel(ServableNotFound):
    """A request names a version label the model does not have.

    TF Serving answers these with INVALID_ARGUMENT (REST 400), not NOT_FOUND:
    "Unrecognized servable version label: canary".
    """


def request_text(name: str, version: int | None = None, label: str | None = None) -> str:
    """TF Serving's name for what a request asked for: `Latest(m)`, `Specific(m, 3)`, ..."""
    if label is not None:
        return f"Specific({name}, {label})"
    if version is not None:
        return f"Specific({name}, {version})"
    return f"Latest({name})"


class ModelLookup(Protocol):
    """What the front ends need from the server's models."""

    def names(self) -> list[str]:
        """The model names served now."""
        ...

    def resolve(self, name: str, version: int | None = None,
                label: str | None = None) -> tuple[ServedModel, Servable]:
        """The servable answering `name` (its newest version, or `version`, or `label`).

        Raises:
            ServableNotFound: unknown model, version or label, or nothing loaded yet.
        """
        ...

    def status(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """TF Serving's `model_version_status` entries (newest first).

        Raises:
            ServableNotFound: unknown model ("Could not find any versions of model X"),
                or an unknown version.
        """
        ...


def resolve_in(served: ServedModel | None, name: str, version: int | None = None,
               label: str | None = None) -> tuple[ServedModel, Servable]:
    """`ModelLookup.resolve` for one model (None: no model of that name).

    Raises:
        ServableNotFound: see `ModelLookup.resolve`; `UnknownLabel` for a label
            the model does not have.
    """
    if served is None:
        raise ServableNotFound("Servable not found for request: "
                               + request_text(name, version, label))
    if label is not None:
        version = served.version_of_label(label)
        if version is None:
            raise UnknownLabel(f"Unrecognized servable version label: {label}")
    if version is None:
        servable = served.current
        if servable is None:
            raise ServableNotFound(f"Servable not found for request: Latest({name}): model "
                                   f"'{name}' has no version loaded yet.", unavailable=True)
        return served, servable
    servable = served.get(version)
    if servable is None:
        raise ServableNotFound("Servable not found for request: " + request_text(name, version))
    return served, servable


def status_in(served: ServedModel | None, name: str,
              version: int | None = None) -> list[dict[str, Any]]:
    """`ModelLookup.status` for one model (None: no model of that name)."""
    if served is None:
        raise ServableNotFound(f"Could not find any versions of model {name}")
    entries = served.status(version)
    if not entries:
        raise ServableNotFound(
            "Servable not found for request: " + request_text(name, version)
            if version is not None else f"Could not find any versions of model {name}")
    return entries


class SingleModel:
    """A `ModelLookup` over one `ServedModel`.

    Args:
        served: the model.
    """

    def __init__(self, served: ServedModel):
        self.served = served

    def names(self) -> list[str]:
        """The one model name."""
        return [self.served.name]

    def resolve(self, name: str, version: int | None = None,
                label: str | None = None) -> tuple[ServedModel, Servable]:
        """The servable answering; see `ModelLookup.resolve`."""
        return resolve_in(self.served if name == self.served.name else None, name, version,
                          label)

    def status(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """See `ModelLookup.status`."""
        return status_in(self.served if name == self.served.name else None, name, version)
