"""A cloud instance metadata service on 127.0.0.1: AWS IMDSv2, GCE metadata or Azure IMDS.

It speaks the real paths, headers and answers of one cloud, so the node agent
talks to it exactly as to the link-local service of a spot instance::

    with MetadataServer('aws') as imds:
        ...                                 # spot/instance-action answers 404
        imds.interrupt()                    # now {"action": "terminate", "time": now + 2 min}
        imds.delay = 3.0                    # every answer waits 3 s (a slow endpoint)
        imds.down = True                    # connections are dropped without an answer
        imds.requests()                     # what was asked, and the status answered

What each cloud enforces, as the real one does:

- ``aws``: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
  (1-21600) gives a token; every GET without a valid one is 401 (IMDSv2
  required). ``/latest/meta-data/spot/instance-action`` and
  ``.../events/recommendations/rebalance`` are 404 until a notice.
- ``gcp``: every request needs ``Metadata-Flavor: Google`` (else 403); every
  answer carries that header and an ``ETag``; ``?wait_for_change=true``
  holds the request until the value changes (or differs from ``last_etag``),
  at most ``timeout_sec``. ``instance/preempted`` is ``FALSE`` and
  ``instance/maintenance-event`` ``NONE`` until a notice.
- ``azure``: every request needs ``Metadata: true`` and ``api-version``
  (else 400); ``/metadata/scheduledevents`` lists events with a
  ``DocumentIncarnation`` that grows with every change.

Paths of the other clouds answer 404, as they would on that instance.
"""

import dataclasses
import email.utils
import hashlib
import http.server
import json
import secrets
import socket
import threading
import time
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self

__all__ = ["CLOUDS", "MetadataRequest", "MetadataServer"]

CLOUDS = ("aws", "gcp", "azure")
Cloud = Literal["aws", "gcp", "azure"]

AWS_INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
GCE_PREFIX = "/computeMetadata/v1/"
GCE_PREEMPTED = GCE_PREFIX + "instance/preempted"
GCE_MAINTENANCE = GCE_PREFIX + "instance/maintenance-event"
AZURE_EVENTS = "/metadata/scheduledevents"
AZURE_COMPUTE = "/metadata/instance/compute"
AWS_MAX_TOKEN_TTL_S = 21600
GCE_MAX_WAIT_S = 300.0  # the real one holds longer; tests never need it


@dataclasses.dataclass(frozen=True)
class MetadataRequest:
    """One request as the server saw it; ``status`` is None when it was dropped (``down``)."""

    method: str
    path: str
    query: dict[str, str]
    status: int | None


def _aws_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class MetadataServer:
    """One instance's metadata service, for one cloud. Thread-safe; start it, point the agent at ``url``."""

    def __init__(
        self,
        cloud: Cloud,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        vm_name: str = "spot-vm-0",
        instance_id: str = "i-0a1b2c3d4e5f60718",
    ) -> None:
        if cloud not in CLOUDS:
            raise ValueError(f"cloud {cloud!r} is not one of {', '.join(CLOUDS)}")
        self.cloud = cloud
        self.host, self.port = host, port
        self.vm_name, self.instance_id = vm_name, instance_id
        self.delay = 0.0  # seconds every answer waits before it is sent
        self.down = False  # drop every request without an answer
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._items: dict[str, str] = {}  # path → body; AWS: absent is 404
        self._azure_events: list[dict[str, Any]] = []
        self._azure_incarnation = 1
        self._tokens: dict[str, float] = {}  # IMDSv2 token → monotonic expiry
        self._requests: list[MetadataRequest] = []
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.clear()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("the metadata server is already started")
        self._closing.clear()
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"metadata-{self.cloud}:{self.port}"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None or self._httpd is None:
            return
        self._closing.set()
        with self._changed:
            self._changed.notify_all()  # ends held GCE long-polls
        self._httpd.shutdown()
        self._thread.join()
        with self._changed:
            connections = list(self._connections)
        for connection in connections:  # idle keep-alive connections would hold their threads
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()  # joins the request threads
        self._httpd, self._thread = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # --- notices -------------------------------------------------------------------------------

    def clear(self) -> None:
        """No notice: what a healthy instance shows."""
        with self._changed:
            self._items = {}
            if self.cloud == "aws":
                self._items["/latest/meta-data/instance-id"] = self.instance_id
                self._items["/latest/meta-data/instance-life-cycle"] = "spot"
            elif self.cloud == "gcp":
                self._items[GCE_PREFIX + "instance/id"] = str(
                    int(hashlib.sha1(self.vm_name.encode()).hexdigest()[:15], 16)
                )
                self._items[GCE_PREFIX + "instance/name"] = self.vm_name
                self._items[GCE_PREFIX + "instance/scheduling/provisioning-model"] = "SPOT"
                self._items[GCE_PREEMPTED] = "FALSE"
                self._items[GCE_MAINTENANCE] = "NONE"
            else:
                self._azure_events = []
                self._azure_incarnation += 1
            self._changed.notify_all()

    def interrupt(self, *, at: datetime | None = None, action: str = "terminate") -> None:
        """The cloud takes the instance back: AWS instance-action, GCE preempted, Azure Preempt.

        ``at`` is when it goes (default: the cloud's notice from now); GCE's
        answer carries no time.
        """
        now = datetime.now(UTC)
        if self.cloud == "aws":
            when = at or now + timedelta(seconds=120)
            self.set_item(AWS_INSTANCE_ACTION, json.dumps({"action": action, "time": _aws_time(when)}))
        elif self.cloud == "gcp":
            self.set_item(GCE_PREEMPTED, "TRUE")
        else:
            self.add_azure_event("Preempt", not_before=at or now + timedelta(seconds=30))

    def rebalance(self, *, notice_time: datetime | None = None) -> None:
        """AWS's rebalance recommendation (AWS only)."""
        if self.cloud != "aws":
            raise ValueError(f"a rebalance recommendation is an AWS notice; this server is {self.cloud}")
        self.set_item(AWS_REBALANCE, json.dumps({"noticeTime": _aws_time(notice_time or datetime.now(UTC))}))

    def maintenance(
        self,
        *,
        at: datetime | None = None,
        gce_value: str = "TERMINATE_ON_HOST_MAINTENANCE",
        azure_event_type: str = "Redeploy",
    ) -> None:
        """Host maintenance: GCE maintenance-event, an Azure Reboot/Redeploy event (not AWS)."""
        if self.cloud == "gcp":
            self.set_item(GCE_MAINTENANCE, gce_value)
        elif self.cloud == "azure":
            self.add_azure_event(azure_event_type, not_before=at or datetime.now(UTC) + timedelta(minutes=10))
        else:
            raise ValueError("AWS announces maintenance as scheduled events, not modelled here")

    def set_item(self, path: str, body: str | None) -> None:
        """Set the body a GET of ``path`` answers (None: 404), e.g. a malformed notice."""
        with self._changed:
            if body is None:
                self._items.pop(path, None)
            else:
                self._items[path] = body
            self._changed.notify_all()

    def add_azure_event(
        self,
        event_type: str,
        *,
        not_before: datetime | str | None = None,
        resources: list[str] | None = None,
        status: str = "Scheduled",
        event_id: str | None = None,
    ) -> str:
        """Add a Scheduled Event (Preempt, Terminate, Reboot, Redeploy, Freeze); returns its EventId.

        ``not_before`` as a datetime is written the way Azure does (RFC 1123);
        a string is written as is. ``resources`` default to this VM.
        """
        if self.cloud != "azure":
            raise ValueError(f"scheduled events are Azure notices; this server is {self.cloud}")
        event_id = event_id or str(uuid.uuid4()).upper()
        if isinstance(not_before, datetime):
            not_before = email.utils.format_datetime(not_before.astimezone(UTC), usegmt=True)
        event = {
            "EventId": event_id,
            "EventStatus": status,
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": [self.vm_name] if resources is None else resources,
            "NotBefore": not_before or "",
            "Description": f"{event_type} scheduled by the box",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        with self._changed:
            self._azure_events.append(event)
            self._azure_incarnation += 1
            self._changed.notify_all()
        return event_id

    # --- observation ---------------------------------------------------------------------------

    def requests(self) -> list[MetadataRequest]:
        with self._changed:
            return list(self._requests)

    # --- answering (request threads) -------------------------------------------------------------

    def _record(self, method: str, path: str, query: dict[str, str], status: int | None) -> None:
        with self._changed:
            self._requests.append(MetadataRequest(method, path, query, status))

    def _answer(self, method: str, path: str, query: dict[str, str], headers: Any) -> tuple[int, dict[str, str], str]:
        if self.cloud == "aws":
            return self._answer_aws(method, path, headers)
        if self.cloud == "gcp":
            return self._answer_gce(method, path, query, headers)
        return self._answer_azure(method, path, query, headers)

    def _answer_aws(self, method: str, path: str, headers: Any) -> tuple[int, dict[str, str], str]:
        text = {"Content-Type": "text/plain"}
        if path == "/latest/api/token":
            if method != "PUT":
                return 405, text, "Method Not Allowed"
            ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= AWS_MAX_TOKEN_TTL_S:
                return 400, text, "Bad Request"
            token = secrets.token_urlsafe(32)
            with self._changed:
                self._tokens[token] = time.monotonic() + int(ttl)
            return 200, {**text, "X-aws-ec2-metadata-token-ttl-seconds": ttl}, token
        if not path.startswith("/latest/"):
            return 404, text, "Not Found"
        if method != "GET":
            return 405, text, "Method Not Allowed"
        with self._changed:
            expiry = self._tokens.get(headers.get("X-aws-ec2-metadata-token", ""))
            body = self._items.get(path)
        if expiry is None or expiry < time.monotonic():
            return 401, text, "Unauthorized"
        if body is None:
            return 404, text, "Not Found"
        return 200, text, body

    def _answer_gce(
        self, method: str, path: str, query: dict[str, str], headers: Any
    ) -> tuple[int, dict[str, str], str]:
        base = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
        if not path.startswith(GCE_PREFIX):
            return 404, base, "Not Found"
        if headers.get("Metadata-Flavor") != "Google":
            return 403, base, "Missing Metadata-Flavor:Google header."
        if method != "GET":
            return 405, base, "Method Not Allowed"
        wait = query.get("wait_for_change", "").lower() == "true"
        last_etag = query.get("last_etag")
        try:
            timeout = min(float(query.get("timeout_sec", GCE_MAX_WAIT_S)), GCE_MAX_WAIT_S)
        except ValueError:
            return 400, base, "Bad timeout_sec"
        with self._changed:
            body = self._items.get(path)
            if body is None:
                return 404, base, "Not Found"
            if wait:
                # Hold until the value differs from what the client has (its ETag, or
                # the value when it asked), the time is up, or the server stops.
                seen = last_etag or _etag(body)
                deadline = time.monotonic() + timeout
                while _etag(self._items.get(path, "")) == seen and not self._closing.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                body = self._items.get(path, "")
        return 200, {**base, "ETag": _etag(body)}, body

    def _answer_azure(
        self, method: str, path: str, query: dict[str, str], headers: Any
    ) -> tuple[int, dict[str, str], str]:
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        if not path.startswith("/metadata/"):
            return 404, json_type, json.dumps({"error": "Not found"})
        if headers.get("Metadata", "").lower() != "true":
            return 400, json_type, json.dumps({"error": "Bad request. Required metadata header not specified"})
        if not query.get("api-version"):
            return 400, json_type, json.dumps({"error": "Bad request. api-version was not specified in the request"})
        if method != "GET":
            return 405, json_type, json.dumps({"error": "Method not allowed"})
        compute = {"name": self.vm_name, "vmId": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.vm_name)), "priority": "Spot"}
        if path == AZURE_EVENTS:
            with self._changed:
                document = {"DocumentIncarnation": self._azure_incarnation, "Events": list(self._azure_events)}
            return 200, json_type, json.dumps(document)
        if path in ("/metadata/instance", AZURE_COMPUTE):
            body = {"compute": compute} if path == "/metadata/instance" else compute
            return 200, json_type, json.dumps(body)
        if path.startswith(AZURE_COMPUTE + "/") and path.rsplit("/", 1)[1] in compute:
            value = compute[path.rsplit("/", 1)[1]]
            if query.get("format") == "text":
                return 200, {"Content-Type": "text/plain; charset=utf-8"}, value
            return 200, json_type, json.dumps(value)
        return 404, json_type, json.dumps({"error": "Not found"})


def _etag(body: str) -> str:
    return hashlib.sha1(body.encode()).hexdigest()[:16]


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = False  # joined on stop: no thread outlives the server
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler], owner: MetadataServer
    ) -> None:
        self.owner = owner
        super().__init__(address, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real services
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.owner._changed:
            self.server.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.owner._changed:
            self.server.owner._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the client went away first

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests() is the log

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        owner = self.server.owner
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if owner.down:
            owner._record(method, url.path, query, None)
            self.close_connection = True  # no answer at all: the client sees the connection drop
            return
        if owner.delay > 0 and owner._closing.wait(owner.delay):
            self.close_connection = True
            return
        status, headers, body = owner._answer(method, url.path, query, self.headers)
        owner._record(method, url.path, query, status)
        data = body.encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (its timeout) before the answer
