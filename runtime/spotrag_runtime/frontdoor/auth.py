"""API keys at the front door: the gateway's key folder (one file per key,
re-read when the Secret changes), plus which key it was, so that a key can be
limited to some models (``apiKeys.models`` in the config: key name → models;
the key's name is its file name, i.e. its key in the Secret)."""

from __future__ import annotations

import hmac

from spotrag_runtime.gateway.auth import APIKeyStore


class KeyRing(APIKeyStore):
    _named: tuple[tuple[str, bytes], ...] = ()

    def _refresh(self) -> None:
        signature = self._folder_signature()
        if signature == self._signature:
            return
        super()._refresh()
        named = []
        for name, *_ in signature or ():
            try:
                value = (self.directory / name).read_bytes().strip()
            except OSError:
                continue
            if value:
                named.append((name, value))
        self._named = tuple(named)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key an ``Authorization`` header carries, or None."""
        if not self.is_valid(authorization):  # also re-reads the folder when due
            return None
        offered = (authorization or "").partition(" ")[2].strip().encode()
        found = None
        for name, key in self._named:  # every key compared: timing says nothing
            if hmac.compare_digest(offered, key):
                found = name
        return found
