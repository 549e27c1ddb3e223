"""`open_store`: a storage location as a user writes it (a local folder or s3://bucket/prefix) to a `Store`.

Anything else that looks like a URL is refused with one line, never taken for a folder named after it.
"""

from __future__ import annotations

import re
from pathlib import Path

from fashion_tagger.core.errors import ConfigError, SourceError
from fashion_tagger.core.layout import is_url
from fashion_tagger.storage.base import KEY_RULE, Store, check_key
from fashion_tagger.storage.local import LocalStore
from fashion_tagger.storage.s3 import S3Store

ACCEPTED_LOCATIONS = "a local folder (e.g. /data/fashion-tagger) or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)"
# A bucket of lowercase letters, digits, dots and hyphens, as data.sources reads a dataset's URL (the server has
# the last word on the finer rules).
_S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,62})(?:/(?P<prefix>.*))?$")


def open_store(location: str | Path) -> Store:
    """The store at LOCATION: a Path or a plain path is a LocalStore, s3://bucket/prefix an S3Store."""
    if isinstance(location, Path):
        return LocalStore(location)
    text = location.strip()
    if not text:
        raise ConfigError(f"the storage location is empty: use {ACCEPTED_LOCATIONS}")
    if not is_url(text):
        return LocalStore(text)
    match = _S3_URL.match(text)
    if not match:
        raise ConfigError(f"storage location {location!r} is not supported: use {ACCEPTED_LOCATIONS}")
    try:
        prefix = check_key(match.group("prefix") or "", prefix=True)
    except SourceError:
        raise ConfigError(f"storage location {location!r} has a prefix that is not {KEY_RULE}: use "
                          f"{ACCEPTED_LOCATIONS}") from None
    return S3Store(match.group("bucket"), prefix)
