"""Errors that name the input, the rule it broke and what to do; the CLI prints them without a traceback."""


class FashionTaggerError(Exception):
    """Base of every error the CLI reports as a one-line message."""


class DataError(FashionTaggerError, ValueError):
    """Input data that breaks a rule (schema, layout, vocabulary)."""


class QualityGateError(DataError):
    """Validation finished but the data fails a quality gate (too many rejects, too few rows)."""


class SourceError(FashionTaggerError):
    """A dataset source that cannot be fetched (credentials, network, layout)."""
