"""Reading each cloud's metadata service: one Stream per notice endpoint, and cloud detection.

A Stream's ``read()`` makes one observation (one GET, or one GCE long-poll)
and returns a Notice or None; transport trouble becomes a MetadataError the
agent backs off on. Everything here is I/O; the meaning of the bodies is in
``clouds``.

    MetadataError
    ├── MetadataUnreachable   nothing accepts the connection, or it is dropped
    ├── MetadataTimeout       connected, but no answer in time (slow)
    └── MetadataBadAnswer     an HTTP status or body that is not part of the protocol
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import httpx

from . import clouds
from .mark import Notice

logger = logging.getLogger("spotrag.node_agent")

# Link-local addresses every instance reaches its own metadata at.
DEFAULT_BASE_URLS: dict[str, str] = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
AWS_TOKEN_TTL_S = 21600  # the longest IMDS allows: one PUT every 6 hours
AWS_TOKEN_REFRESH_MARGIN_S = 60


class MetadataError(Exception):
    """The metadata service could not be read this time."""


class MetadataUnreachable(MetadataError):
    """Nothing accepts the connection, or it is dropped before an answer."""


class MetadataTimeout(MetadataError):
    """The connection is up but the answer does not come in time."""


class MetadataBadAnswer(MetadataError):
    """An HTTP status or body the protocol does not have."""


def now_utc() -> datetime:
    return datetime.now(UTC)


async def _send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    timeout: httpx.Timeout | None = None,
) -> httpx.Response:
    """One request, with httpx's exceptions turned into the MetadataError tree."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    try:
        return await client.request(method, url, headers=headers, params=params, **kwargs)
    except httpx.TimeoutException as exc:
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            raise MetadataUnreachable(f"{what}: no connection to {url} ({type(exc).__name__})") from exc
        raise MetadataTimeout(f"{what}: {url} accepted the connection but did not answer in time") from exc
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        raise MetadataUnreachable(f"{what}: {url}: {exc or type(exc).__name__}") from exc


class Stream:
    """One notice endpoint. ``long_polls`` streams block in read() until something changes."""

    name: str
    long_polls: bool = False

    async def read(self) -> Notice | None:
        raise NotImplementedError


# --- AWS -------------------------------------------------------------------


class AwsImds:
    """IMDSv2: a session token from PUT, sent with every GET, renewed before it expires."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, *, ttl_s: int = AWS_TOKEN_TTL_S) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()  # both AWS streams share one token

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() >= self._expires:
                response = await _send(
                    self.client,
                    "PUT",
                    self.base_url + clouds.AWS_TOKEN_PATH,
                    what="IMDSv2 token",
                    headers={clouds.AWS_TOKEN_TTL_HEADER: str(self.ttl_s)},
                )
                if response.status_code != 200 or not response.text:
                    raise MetadataBadAnswer(
                        f"IMDSv2 token: PUT {clouds.AWS_TOKEN_PATH} answered {response.status_code}"
                    )
                self._token = response.text.strip()
                self._expires = time.monotonic() + max(1, self.ttl_s - AWS_TOKEN_REFRESH_MARGIN_S)
            return self._token

    async def get(self, path: str) -> str | None:
        """The item's text, or None when IMDS answers 404 (the item does not exist yet)."""
        for attempt in range(2):
            token = await self.token()
            response = await _send(
                self.client, "GET", self.base_url + path, what=path, headers={clouds.AWS_TOKEN_HEADER: token}
            )
            if response.status_code == 401 and attempt == 0:
                # The token expired or IMDS restarted: take a new one, once.
                async with self._lock:
                    if self._token == token:
                        self._token = None
                continue
            if response.status_code == 404:
                return None
            if response.status_code == 200:
                return response.text
            raise MetadataBadAnswer(f"GET {path} answered {response.status_code}")
        raise MetadataBadAnswer(f"GET {path}: IMDS refuses a fresh token (401)")


class AwsStream(Stream):
    def __init__(self, imds: AwsImds, path: str, parse: Callable[..., Notice | None], name: str) -> None:
        self.imds, self.path, self.parse, self.name = imds, path, parse, name

    async def read(self) -> Notice | None:
        return self.parse(await self.imds.get(self.path), detected=now_utc())


# --- GCE -------------------------------------------------------------------


class GceStream(Stream):
    """A GCE metadata value, long-polled: the server answers when it changes or after ``timeout_sec``.

    ``last_etag`` makes the server answer at once when the value changed
    between two polls, so no change is lost.
    """

    long_polls = True

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        path: str,
        parse: Callable[..., Notice | None],
        name: str,
        *,
        long_poll_s: int,
        request_timeout: float,
    ) -> None:
        self.client, self.url, self.parse, self.name = client, base_url.rstrip("/") + path, parse, name
        self.long_poll_s = long_poll_s
        self.request_timeout = request_timeout
        self.etag: str | None = None
        self.primed = False

    async def read(self) -> Notice | None:
        if not self.primed:
            # The first read answers at once with the current value and its ETag.
            params, read_timeout = {}, self.request_timeout
        else:
            params = {"wait_for_change": "true", "timeout_sec": str(self.long_poll_s)}
            if self.etag:
                params["last_etag"] = self.etag
            read_timeout = self.long_poll_s + self.request_timeout
        response = await _send(
            self.client,
            "GET",
            self.url,
            what=self.name,
            headers=clouds.GCE_HEADERS,
            params=params,
            timeout=httpx.Timeout(self.request_timeout, read=read_timeout),
        )
        if response.status_code != 200:
            self.primed = False
            raise MetadataBadAnswer(f"GET {self.url} answered {response.status_code}")
        self.etag, self.primed = response.headers.get("ETag"), True
        try:
            return self.parse(response.text, detected=now_utc())
        except clouds.UnrecognisedResponse as exc:
            raise MetadataBadAnswer(str(exc)) from exc


# --- Azure -----------------------------------------------------------------


class AzureStream(Stream):
    """Scheduled Events, polled. The first call of a VM's life may take minutes while Azure enables them."""

    name = "scheduledevents"

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client, self.base_url = client, base_url.rstrip("/")
        self.vm_name: str | None = None
        self._named = False

    async def _vm_name(self) -> str | None:
        # Events come for every VM of the set; ours are the ones naming this VM.
        response = await _send(
            self.client,
            "GET",
            self.base_url + clouds.AZURE_NAME_PATH,
            what="compute/name",
            headers=clouds.AZURE_HEADERS,
            params={"api-version": clouds.AZURE_INSTANCE_API_VERSION, "format": "text"},
        )
        if response.status_code == 200 and response.text.strip():
            return response.text.strip()
        logger.warning(
            "Azure IMDS gave no VM name (%s); taking every scheduled event as this VM's", response.status_code
        )
        return None

    async def read(self) -> Notice | None:
        if not self._named:
            self.vm_name = await self._vm_name()
            self._named = True
        response = await _send(
            self.client,
            "GET",
            self.base_url + clouds.AZURE_EVENTS_PATH,
            what="scheduledevents",
            headers=clouds.AZURE_HEADERS,
            params={"api-version": clouds.AZURE_EVENTS_API_VERSION},
        )
        if response.status_code != 200:
            raise MetadataBadAnswer(f"GET {clouds.AZURE_EVENTS_PATH} answered {response.status_code}")
        try:
            return clouds.parse_azure_scheduled_events(response.text, detected=now_utc(), vm_name=self.vm_name)
        except clouds.UnrecognisedResponse as exc:
            raise MetadataBadAnswer(str(exc)) from exc


def streams_for(
    cloud: str, client: httpx.AsyncClient, base_url: str, *, long_poll_s: int, request_timeout: float
) -> list[Stream]:
    if cloud == "aws":
        imds = AwsImds(client, base_url)
        return [
            AwsStream(imds, clouds.AWS_INSTANCE_ACTION_PATH, clouds.parse_aws_instance_action, "spot/instance-action"),
            AwsStream(imds, clouds.AWS_REBALANCE_PATH, clouds.parse_aws_rebalance, "rebalance"),
        ]
    if cloud == "gcp":
        return [
            GceStream(client, base_url, path, parse, name, long_poll_s=long_poll_s, request_timeout=request_timeout)
            for path, parse, name in (
                (clouds.GCE_PREEMPTED_PATH, clouds.parse_gce_preempted, "preempted"),
                (clouds.GCE_MAINTENANCE_PATH, clouds.parse_gce_maintenance_event, "maintenance-event"),
            )
        ]
    if cloud == "azure":
        return [AzureStream(client, base_url)]
    raise ValueError(f"unknown cloud {cloud!r}")


# --- detection ---------------------------------------------------------------

Probe = Literal["yes", "no", "slow"]


@dataclass(frozen=True)
class Detection:
    cloud: str | None
    probes: dict[str, Probe]

    @property
    def slow(self) -> bool:
        """Something accepted a connection without answering: a cloud, slow to start (or an IMDS hop limit)."""
        return self.cloud is None and "slow" in self.probes.values()


async def _probe(client: httpx.AsyncClient, cloud: str, base_url: str, timeout: float) -> Probe:
    base = base_url.rstrip("/")
    try:
        if cloud == "aws":
            response = await _send(
                client,
                "PUT",
                base + clouds.AWS_TOKEN_PATH,
                what="probe aws",
                headers={clouds.AWS_TOKEN_TTL_HEADER: "60"},
                timeout=httpx.Timeout(timeout),
            )
            return "yes" if response.status_code == 200 and response.text.strip() else "no"
        if cloud == "gcp":
            response = await _send(
                client,
                "GET",
                base + clouds.GCE_ID_PATH,
                what="probe gcp",
                headers=clouds.GCE_HEADERS,
                timeout=httpx.Timeout(timeout),
            )
            # The header proves it is GCE's server and not anything else on port 80.
            return (
                "yes" if response.status_code == 200 and response.headers.get("Metadata-Flavor") == "Google" else "no"
            )
        response = await _send(
            client,
            "GET",
            base + clouds.AZURE_NAME_PATH,
            what="probe azure",
            headers=clouds.AZURE_HEADERS,
            timeout=httpx.Timeout(timeout),
            params={"api-version": clouds.AZURE_INSTANCE_API_VERSION, "format": "text"},
        )
        return "yes" if response.status_code == 200 else "no"
    except MetadataTimeout:
        return "slow"
    except MetadataError:
        return "no"


async def detect_cloud(client: httpx.AsyncClient, base_urls: Mapping[str, str], *, timeout: float) -> Detection:
    """Probe every cloud at once, each briefly; the first that answers like itself wins (AWS, GCP, Azure order)."""
    order = ("aws", "gcp", "azure")
    results = await asyncio.gather(*(_probe(client, cloud, base_urls[cloud], timeout) for cloud in order))
    probes = dict(zip(order, results, strict=False))
    return Detection(next((cloud for cloud in order if probes[cloud] == "yes"), None), probes)
