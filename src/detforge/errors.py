"""The DetforgeError family: errors meant for people, printed by the CLI without a traceback.

Every error names where the problem is (file, line, field) and, where it can, what to do about it.
"""

from __future__ import annotations


class DetforgeError(Exception):
    """Base of every error detforge raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.field = field
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"{self.path}" + (f":{self.line}" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        text = (", ".join(where) + ": " if where else "") + self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ManifestError(DetforgeError):
    """A manifest line that cannot be used: bad JSON, a missing field, an impossible box."""


class FormatError(DetforgeError):
    """A COCO, VOC or YOLO file (or a predictions file) that cannot be read."""


class StorageError(DetforgeError):
    """A local path or an s3:// object that cannot be read or written."""


class ConfigError(DetforgeError):
    """A hyperparameter, option or setting that is missing, unknown or out of range."""


class ModelError(DetforgeError):
    """A model, run folder or deploy folder that cannot be loaded or used."""


class MissingDependencyError(DetforgeError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str):
    """Import an optional module, or raise an error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"this needs the Python package '{module.split('.')[0]}', which is not installed",
            hint=f"pip install 'detforge[{extra}]'",
        ) from exc
