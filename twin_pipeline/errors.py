"""One error hierarchy. Every error names the file and record it is about, where there is one."""

from __future__ import annotations


class TwinPipelineError(Exception):
    """Root of every error twin-pipeline raises on purpose."""

    def __init__(self, message: str, *, path: str | None = None, position: str | None = None):
        self.path = path
        self.position = position
        where = ""
        if path:
            where = f"{path}"
            if position:
                where += f" [{position}]"
            where += ": "
        super().__init__(f"{where}{message}")


class ConfigError(TwinPipelineError):
    """A file under assets/, expectations/ or policies/ (or TWIN_HOME) is missing or invalid."""


class MappingError(TwinPipelineError):
    """A source record cannot be read or mapped into the twin."""


class StoreError(TwinPipelineError):
    """The DuckDB twin store cannot be opened, locked or written."""


class KeyMaterialError(TwinPipelineError):
    """A key is missing, unreadable or does not match the store."""


class PolicyViolation(TwinPipelineError):
    """An action is refused by an access or de-identification policy."""


class AccessDenied(PolicyViolation):
    """A user or role may not do what was asked."""


class ExpectationFailure(TwinPipelineError):
    """A blocking data-quality expectation failed."""


class SignatureError(TwinPipelineError):
    """A signature or hash chain does not verify."""
