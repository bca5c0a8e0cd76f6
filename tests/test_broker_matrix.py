"""The broker matrix: on each real broker (on loopback), a release published
before the device connects reaches it and commits through every artifact
source that broker supports, and `fleet status` shows it — including brokers
that never deliver retained messages on wildcards (RabbitMQ) or keep none at
all (Mosquitto configured like a constrained managed broker).
docs/operations.md keeps the same table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.device.daemon import Daemon
from devicerunner.fleet.artifacts import ArtifactDir, ArtifactServer
from devicerunner.fleet.broker import EmbeddedBroker
from devicerunner.fleet.rollout import Policy, RolloutController
from devicerunner.transport import operator, topics
from devicerunner.transport.settings import parse_url
from devicerunner.trust import manifest
from tests.brokers import CONSTRAINED, Mosquitto, RabbitMQ, free_port, rabbitmq_server
from tests.conftest import until
from tests.devicekit import Events, Kit
from tests.httphost import HttpHost
from tests.test_delivery import cdc_bundle, padded

_n = iter(range(10**6))


def fresh_prefix() -> str:
    """The brokers live for the whole module: each test gets its own topic tree."""
    return f"dr/m{next(_n)}"


# broker -> (keeps retained messages, shared subscriptions, sources that work)
MATRIX: dict[str, tuple[bool, bool, tuple[str, ...]]] = {
    "mosquitto": (True, True, ("retained", "mqtt", "http")),
    "constrained": (False, True, ("mqtt", "http")),
    "rabbitmq": (True, False, ("retained", "mqtt", "http")),
    "amqtt": (True, False, ("retained", "mqtt", "http")),
}
CASES = [(b, s) for b, (_, _, sources) in MATRIX.items() for s in sources]


class Brokers:
    """One broker of each kind per module, started on first use (RabbitMQ takes ~10 s)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: dict[str, Any] = {}

    def url(self, kind: str) -> str:
        if kind not in self.running:
            if kind == "mosquitto":
                self.running[kind] = Mosquitto(self.root / kind).start()
            elif kind == "constrained":
                self.running[kind] = Mosquitto(self.root / kind, extra=CONSTRAINED).start()
            elif kind == "rabbitmq":
                if rabbitmq_server() is None:
                    pytest.skip("rabbitmq-server is not installed (scripts/test installs it)")
                self.running[kind] = RabbitMQ(self.root / kind).start()
            else:
                eb = EmbeddedBroker("127.0.0.1", free_port())
                eb.start()
                self.running[kind] = eb
        return str(self.running[kind].url)

    def stop(self) -> None:
        for b in self.running.values():
            b.stop()


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    b = Brokers(tmp_path_factory.mktemp("brokers"))
    yield b
    b.stop()


def device_config(url: str, retained: bool, source: str, prefix: str, http_url: str | None = None) -> str:
    extra = f"""
[broker]
url = "{url}"
prefix = "{prefix}"
retain = {str(retained).lower()}
download_stall_s = 5
reconnect_min_s = 0.1
reconnect_max_s = 1.0

[artifacts]
sources = ["{source}"]
request_documents = {str(not retained).lower()}
"""
    return extra + (f'http_url = "{http_url}"\n' if http_url else "")


@pytest.mark.parametrize(("kind", "source"), CASES)
def test_release_published_before_the_device_connects_commits_and_shows_in_fleet_status(
    tmp_path: Path, brokers: Brokers, kind: str, source: str
) -> None:
    retained, shared, _ = MATRIX[kind]
    url = brokers.url(kind)
    p = fresh_prefix()
    art = tmp_path / "artifacts"
    http = HttpHost(art).start() if source == "http" else None
    kit = Kit(tmp_path / "dev", extra_config=device_config(url, retained, source, p, http and http.url))
    data = cdc_bundle(kit, padded(2, 5, 150_000), 1)
    (tmp_path / "b.bundle").write_bytes(data)
    ArtifactDir(art).add_bundle(tmp_path / "b.bundle")
    s = parse_url(url)
    with open(tmp_path / "b.bundle", "rb") as f:
        operator.publish_bundle_file(s, f, p, retain=retained)  # before the device is there
    server = None
    if source == "mqtt" or not retained:
        server = ArtifactServer(s, p, art, share=shared).start()
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        done = ev.wait("DOWNLOADED", 1, timeout_s=60)
        assert done["sources"] == [source]
        ev.wait("COMMITTED", 1, timeout_s=30)
        fleet = operator.fleet_status(s, p, quiet_s=0.3, spread_s=1.0)
        app = fleet["dev-1"].apps["app"]
        assert (app.sequence, app.phase) == (1, "COMMITTED"), fleet
    finally:
        d.stop()
        if server is not None:
            server.stop()
        if http is not None:
            http.stop()


@pytest.mark.parametrize("kind", list(MATRIX))
def test_staged_rollout_finds_the_device_and_completes(tmp_path: Path, brokers: Brokers, kind: str) -> None:
    """The controller learns who is out there from statuses — retained ones, or
    answers to its status request where the broker delivers none (RabbitMQ)."""
    retained, shared, sources = MATRIX[kind]
    url = brokers.url(kind)
    p = fresh_prefix()
    source = sources[0]
    art = tmp_path / "artifacts"
    kit = Kit(tmp_path / "dev", extra_config=device_config(url, retained, source, p))
    rollout_key = Ed25519PrivateKey.generate()
    now = int(time.time())
    signed = manifest.root_signed(
        version=1,
        issued=now - 60,
        expires=now + 86400,
        role_keys={
            "root": [kit.root_key.public_key()],
            "release": [k.public_key() for k in kit.release_keys],
            "rollout": [rollout_key.public_key()],
        },
        thresholds={"root": 1, "release": 2, "rollout": 1},
    )
    (kit.dir / "root.json").write_bytes(manifest.sign_envelope(signed, [kit.root_key]))
    s = parse_url(url)
    server = ArtifactServer(s, p, art, share=shared).start() if source == "mqtt" else None
    d = Daemon(kit.cfg)
    events: list[dict[str, Any]] = []
    d.start()
    try:
        assert d.channel.wait_connected(15)
        # the device is there once it answers (its subscriptions are in place)
        assert until(lambda: "dev-1" in operator.fleet_status(s, p, quiet_s=0.2, spread_s=0.5), 20)
        data = cdc_bundle(kit, padded(3, 6, 50_000), 1, rollout_percent=0)
        ctl = RolloutController(
            s,
            p,
            data,
            rollout_key,
            Policy((50, 100), 30.0, 10.0, 1, 60.0),
            events.append,
            retain=retained,
            artifact_dir=art,
        )
        result = ctl.run(discover_s=1.0)
        assert events[0]["event"] == "published" and events[0]["devices"] == 1, events[0]
        assert (result["result"], result["committed"], result["eligible"]) == ("completed", 1, 1), result
    finally:
        d.stop()
        if server is not None:
            server.stop()


@pytest.mark.parametrize("server", ["running", "started-after-the-device-asked"])
def test_device_on_a_broker_without_retain_learns_root_rotations_it_missed(
    tmp_path: Path, brokers: Brokers, server: str
) -> None:
    """Roots v2 and v3 were published (live, and into the artifact directory)
    while the device was away; on connecting it asks for the documents, gets
    the chain (each step on a topic of its own: v3 must not replace the v2 it
    needs) and walks it, verifying each step like a retained root. A server
    that starts after the device asked is asked again (no retained request)."""
    url = brokers.url("constrained")
    p = fresh_prefix()
    art = tmp_path / "artifacts"
    kit = Kit(tmp_path / "dev", extra_config=device_config(url, False, "mqtt", p))
    now = int(time.time())
    d_art = ArtifactDir(art)
    for version in (2, 3):
        signed = manifest.root_signed(
            version=version,
            issued=now - 60 + version,
            expires=now + 86400,
            role_keys={
                "root": [kit.root_key.public_key()],
                "release": [k.public_key() for k in kit.release_keys],
            },
            thresholds={"root": 1, "release": 2},
        )
        root = manifest.sign_envelope(signed, [kit.root_key])
        d_art.put_document(f"trust/roots/{version}", root)
        d_art.put_document("trust/root", root)
    srv = ArtifactServer(parse_url(url), p, art)
    if server == "running":
        srv.start()
    asked: list[bytes] = []
    probe = operator.Session(parse_url(url))
    probe.__enter__()
    probe.client.on_message = lambda _c, _u, m: asked.append(bytes(m.payload))
    probe.client.subscribe(topics.documents_request(p, "dev-1"), 1)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        if server != "running":
            assert until(lambda: len(asked) >= 1, 15)  # asked while nobody listened: gone
            srv.start()
        ev.wait("ROOT_ROTATED", timeout_s=20)
        assert until(lambda: d.trust.root is not None and d.trust.root.version == 3, 20)
    finally:
        d.stop()
        srv.stop()
        probe.__exit__()
