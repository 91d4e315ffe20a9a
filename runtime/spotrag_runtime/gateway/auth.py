"""API keys from a mounted Secret: one file per key, every value a valid key.

The folder is re-read when anything in it changes (Kubernetes swaps the
``..data`` symlink on update, which changes the folder's entries), checked at
most once a second, so rotating the Secret needs no restart. Keys are compared
in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# How often, at most, the key folder is checked for changes.
RECHECK_SECONDS = 1.0
_NOT_READ = object()


class APIKeyStore:
    def __init__(self, directory: str | Path, *, recheck_seconds: float = RECHECK_SECONDS) -> None:
        self.directory = Path(directory)
        self._recheck_seconds = recheck_seconds
        self._keys: tuple[bytes, ...] = ()
        self._signature: object = _NOT_READ
        self._checked_at = float("-inf")
        self._refresh()

    def _folder_signature(self) -> object:
        try:
            entries = sorted(os.scandir(self.directory), key=lambda entry: entry.name)
        except OSError:
            return None
        signature = []
        for entry in entries:
            if entry.name.startswith("."):  # the Secret volume's ..data and timestamped folders
                continue
            try:
                stat = entry.stat()  # follows the symlinks a Secret volume uses
            except OSError:
                continue
            signature.append((entry.name, stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(signature)

    def _refresh(self) -> None:
        signature = self._folder_signature()
        if signature == self._signature:
            return
        keys = []
        for name, *_ in signature or ():
            try:
                value = (self.directory / name).read_bytes().strip()
            except OSError:
                continue  # not a readable file (a folder, or removed since the listing)
            if value:
                keys.append(value)
        if signature is None:
            log.warning("API key folder %s cannot be read: every request will be refused", self.directory)
        elif not keys:
            log.warning("API key folder %s holds no key: every request will be refused", self.directory)
        else:
            log.info("loaded %d API key(s) from %s", len(keys), self.directory)
        self._keys = tuple(keys)
        self._signature = signature

    def is_valid(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries an accepted key."""
        now = time.monotonic()
        if now - self._checked_at >= self._recheck_seconds:
            self._checked_at = now
            self._refresh()
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        offered = token.strip().encode()
        # Compare with every key, without stopping at a match, so timing says nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(offered, key)
        return matched
