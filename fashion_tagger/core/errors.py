"""The error contract: bad input fails now, transient faults are retried.

Every error the project understands is a `FashionTaggerError` and says which kind it is:
- bad input (`BadInputError`: configuration, data, a run or model that cannot be used as it is): the CLI prints
  one line and exits with `BAD_INPUT_EXIT_CODE`; an Airflow task fails at once, without retries, since a
  retry would meet the same input;
- transient (`TransientError`: network, a hub or registry that did not answer, a killed process): the CLI exits
  with `TRANSIENT_EXIT_CODE`, and Airflow retries the task.
Anything else is a bug: a traceback, exit code 1, and Airflow retries it too (it may be a fault of the machine).
"""

from __future__ import annotations

BAD_INPUT_EXIT_CODE = 2
TRANSIENT_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"


class FashionTaggerError(Exception):
    """Base of every error the CLI reports as a one-line message."""

    exit_code = BAD_INPUT_EXIT_CODE

    @property
    def retryable(self) -> bool:
        return self.exit_code != BAD_INPUT_EXIT_CODE


class BadInputError(FashionTaggerError, ValueError):
    """Input that breaks a rule: retrying cannot fix it."""


class TransientError(FashionTaggerError):
    """A fault outside the input (network, hub, registry, a killed process): worth retrying."""

    exit_code = TRANSIENT_EXIT_CODE


class ConfigError(BadInputError):
    """A configuration file, override or trigger parameter that does not fit the schema."""


class DataError(BadInputError):
    """Input data that breaks a rule (schema, layout, vocabulary)."""


class QualityGateError(DataError):
    """Validation finished but the data fails a quality gate (too many rejects, too few rows)."""


class SourceError(BadInputError):
    """A dataset source that cannot be used as given (unknown form, missing folder, missing credentials)."""


class SourceUnavailableError(TransientError):
    """A dataset source that did not answer or broke off (network, Kaggle, S3): retried."""


class ScratchFullError(TransientError):
    """A worker's scratch folder without the space a stage needs: retried, and a retry succeeds once there is."""


class RunError(BadInputError):
    """A run folder that is missing, incomplete for the stage asked, or busy with another process."""


class ModelError(BadInputError):
    """A model, checkpoint or weights file that cannot be used as given (wrong file, unknown backbone)."""


class ModelUnavailableError(TransientError):
    """Weights or a registered model that could not be fetched (hub, registry, artifact store): retried."""


def first_line(exc: BaseException) -> str:
    """An exception as one line, `Type: first line of its message`, as error columns and messages show it."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
