"""The node agent's loop: watch the cloud's notice endpoints, mark the Node.

One task per notice endpoint (``metadata.Stream``) observes; one marker task
writes. Observations only update ``active`` and wake the marker, so a slow or
failing API server never delays reading the metadata, and a burst of equal
observations costs no writes (``plan_mark`` says "keep").

Failure handling: every endpoint and the API server back off on their own
(from the poll interval, doubling, up to ``max_backoff``) and log once per
change of state (down, slow, bad answer, back), never per attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Literal

import httpx
import kubernetes

from spotrag_runtime.kube import api_client

from .mark import CLOUDS, Notice, rfc3339
from .metadata import (
    DEFAULT_BASE_URLS,
    MetadataError,
    MetadataTimeout,
    MetadataUnreachable,
    Stream,
    detect_cloud,
    now_utc,
    streams_for,
)
from .node import STALE_GRACE, NodeMarker, NodeMarkError, plan_mark

logger = logging.getLogger("spotrag.node_agent")

DEFAULT_POLL_INTERVAL_S = 2.0
DEFAULT_REQUEST_TIMEOUT_S = 2.0
DEFAULT_LONG_POLL_S = 60
DEFAULT_DETECT_TIMEOUT_S = 2.0
DEFAULT_MAX_BACKOFF_S = 10.0  # short: a GCE notice is 30 s, an endpoint back must be read again soon


class AgentConfigError(Exception):
    """The agent cannot start as configured (a clear message for the CLI)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentConfig:
    node_name: str
    cloud: Literal["auto", "aws", "gcp", "azure"] = "auto"
    metadata_url: str | None = None  # one base URL for every cloud (a stand-in); None: each cloud's own
    kubeconfig: str | None = None  # None: in-cluster, else the default kubeconfig
    poll_interval: float = DEFAULT_POLL_INTERVAL_S
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    long_poll_s: int = DEFAULT_LONG_POLL_S
    detect_timeout: float = DEFAULT_DETECT_TIMEOUT_S
    max_backoff: float = DEFAULT_MAX_BACKOFF_S
    no_cloud: Literal["exit", "wait"] = "exit"

    def __post_init__(self) -> None:
        if not self.node_name:
            raise AgentConfigError("no node name: pass --node-name or set NODE_NAME (downward API spec.nodeName)")
        if self.cloud not in ("auto", *CLOUDS):
            raise AgentConfigError(f"cloud {self.cloud!r} is not one of auto, {', '.join(CLOUDS)}")
        for name in ("poll_interval", "request_timeout", "detect_timeout", "max_backoff"):
            if getattr(self, name) <= 0:
                raise AgentConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.long_poll_s < 1:
            raise AgentConfigError(f"long_poll_s must be at least 1, got {self.long_poll_s}")

    def base_urls(self) -> dict[str, str]:
        if self.metadata_url:
            return {cloud: self.metadata_url for cloud in CLOUDS}
        return dict(DEFAULT_BASE_URLS)


class _Backoff:
    def __init__(self, first: float, ceiling: float) -> None:
        self.first, self.ceiling = first, max(first, ceiling)
        self.delay = first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.ceiling, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class _StateLog:
    """Logs a component's state only when it changes."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    def report(self, component: str, state: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        if self.states.get(component) != state:
            self.states[component] = state
            logger.log(level, message, *args)

    def ok(self, component: str, message: str, *args: object) -> None:
        if self.states.get(component, "ok") != "ok":
            logger.info(message, *args)
        self.states[component] = "ok"


def _describe(notice: Notice) -> str:
    return f"{notice.kind} ({notice.cloud}: {notice.ref}), deadline {rfc3339(notice.deadline)}"


class Agent:
    """Runs until ``stop`` is set; ``run()`` returns the process's exit code."""

    def __init__(
        self, config: AgentConfig, *, api_client_factory: Callable[[], kubernetes.client.ApiClient] | None = None
    ) -> None:
        self.config = config
        self._api_client_factory = api_client_factory or (lambda: api_client(config.kubeconfig))
        self.cloud: str | None = None
        self.active: dict[str, Notice | None] = {}  # per endpoint, what it shows now
        self.current: Notice | None = None  # the mark on the Node as last read or written
        self.marker: NodeMarker | None = None
        self.streams: list[Stream] = []
        self._wake = asyncio.Event()
        self._log = _StateLog()

    async def run(self, stop: asyncio.Event) -> int:
        # trust_env=False: an HTTP(S)_PROXY meant for the internet must never carry link-local metadata calls.
        async with httpx.AsyncClient(trust_env=False, timeout=self.config.request_timeout) as client:
            self.cloud = self.config.cloud if self.config.cloud != "auto" else await self._detect(client, stop)
            if self.cloud is None:
                if stop.is_set():
                    return 0
                if self.config.no_cloud == "wait":
                    await stop.wait()
                return 0
            try:
                api_client = self._api_client_factory()
            except (kubernetes.config.ConfigException, OSError, ValueError) as exc:
                raise AgentConfigError(f"cannot load Kubernetes credentials: {exc}") from exc
            try:
                return await self._watch_and_mark(client, api_client, stop)
            finally:
                api_client.close()

    async def _watch_and_mark(
        self, client: httpx.AsyncClient, api_client: kubernetes.client.ApiClient, stop: asyncio.Event
    ) -> int:
        assert self.cloud is not None
        self.marker = NodeMarker(api_client, self.config.node_name, request_timeout=(self.config.request_timeout, 5.0))
        base_url = self.config.base_urls()[self.cloud]
        self.streams = streams_for(
            self.cloud,
            client,
            base_url,
            long_poll_s=self.config.long_poll_s,
            request_timeout=self.config.request_timeout,
        )
        logger.info(
            "watching %s interruption notices at %s (%s) for node %s",
            self.cloud,
            base_url,
            ", ".join(s.name for s in self.streams),
            self.config.node_name,
        )
        tasks = [asyncio.create_task(self._watch(s), name=f"watch {s.name}") for s in self.streams]
        tasks.append(asyncio.create_task(self._mark_loop(), name="mark"))
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    task.result()  # a loop ended by itself: a bug; let it be seen
            logger.info("stopping")
            return 0
        finally:
            for task in (stopper, *tasks):
                task.cancel()
            await asyncio.gather(stopper, *tasks, return_exceptions=True)

    async def _detect(self, client: httpx.AsyncClient, stop: asyncio.Event) -> str | None:
        urls = self.config.base_urls()
        backoff = _Backoff(self.config.poll_interval, self.config.max_backoff)
        while not stop.is_set():
            detection = await detect_cloud(client, urls, timeout=self.config.detect_timeout)
            if detection.cloud:
                logger.info("this instance runs on %s", detection.cloud)
                return detection.cloud
            probed = ", ".join(f"{cloud} at {urls[cloud]}: {result}" for cloud, result in detection.probes.items())
            if not detection.slow:
                logger.info("no cloud metadata service answers (%s): not a cloud instance, nothing to watch", probed)
                return None
            # Something accepted the connection and said nothing: a cloud still starting, or AWS
            # IMDSv2 with hop limit 1 dropping answers to pods (use hostNetwork or hop limit 2).
            self._log.report(
                "detect", "slow", "metadata accepts connections but does not answer (%s); retrying", probed
            )
            try:
                await asyncio.wait_for(stop.wait(), backoff.next())
            except TimeoutError:
                pass
        return None

    async def _watch(self, stream: Stream) -> None:
        backoff = _Backoff(self.config.poll_interval, self.config.max_backoff)
        component = f"metadata {stream.name}"
        while True:
            started = time.monotonic()
            try:
                notice = await stream.read()
            except MetadataError as exc:
                state = (
                    "slow"
                    if isinstance(exc, MetadataTimeout)
                    else "down"
                    if isinstance(exc, MetadataUnreachable)
                    else "bad answer"
                )
                self._log.report(
                    component,
                    state,
                    "%s is %s: %s; retrying with backoff (at most %gs)",
                    component,
                    state,
                    exc,
                    self.config.max_backoff,
                )
                await asyncio.sleep(backoff.next())
                continue
            self._log.ok(component, "%s answers again", component)
            backoff.reset()
            changed = self._observe(stream.name, notice)
            if stream.long_polls and changed:
                continue
            # Polled endpoints wait a poll interval; so does a long-poll that came back at
            # once with no change (a server that does not hold requests must not be hammered).
            rest = self.config.poll_interval - (time.monotonic() - started if stream.long_polls else 0.0)
            if rest > 0:
                await asyncio.sleep(rest)

    def _observe(self, stream: str, notice: Notice | None) -> bool:
        """Record what an endpoint shows; True when that changed (a first answer counts as a change).

        The same notice seen again keeps its first detection time, and with it
        any deadline derived from it: that is what makes a notice mark once.
        """
        first = stream not in self.active
        previous = self.active.get(stream)
        if notice is not None and notice.same_notice(previous):
            return False
        changed = first or notice != previous
        self.active[stream] = notice
        if notice is not None:
            logger.warning("%s notice: %s", stream, _describe(notice))
            if notice.warning:
                logger.warning("%s notice: %s", stream, notice.warning)
        elif previous is not None:
            logger.info("%s: the notice is gone", stream)
        if changed:
            self._wake.set()
        return changed

    async def _mark_loop(self) -> None:
        assert self.marker is not None
        backoff = _Backoff(self.config.poll_interval, self.config.max_backoff)
        known = False  # whether self.current reflects the Node
        self._wake.set()
        while True:
            self._wake.clear()
            timeout: float | None = None
            try:
                if not known:
                    self.current = await asyncio.to_thread(self.marker.current)
                    known = True
                plan = plan_mark(
                    self.current, self.active.values(), now_utc(), all_observed=len(self.active) == len(self.streams)
                )
                if plan.action != "keep":
                    sent = await asyncio.to_thread(self.marker.write, plan.notice)
                    if plan.notice is None:
                        logger.info(
                            "node %s: removed the stale mark %s",
                            self.config.node_name,
                            _describe(self.current) if self.current else "",
                        )
                    elif sent:
                        logger.warning("node %s marked: %s", self.config.node_name, _describe(plan.notice))
                    self.current = plan.notice
                self._log.ok("kubernetes", "Kubernetes API answers again; node %s is up to date", self.config.node_name)
                backoff.reset()
                if self.current is not None:
                    # Look again once the mark could have gone stale.
                    timeout = max(
                        self.config.poll_interval, (self.current.deadline + STALE_GRACE - now_utc()).total_seconds()
                    )
            except NodeMarkError as exc:
                known = False
                self._log.report(
                    "kubernetes",
                    f"error {exc.status}",
                    "%s; retrying with backoff (at most %gs)",
                    exc,
                    self.config.max_backoff,
                )
                timeout = backoff.next()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
