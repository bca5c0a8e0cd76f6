"""Artifact delivery: HTTP(S) mirrors (good, hostile, slow, swapped), fallback
between sources, and deltas for free (content-defined chunks reused by hash)."""

from __future__ import annotations

import io
import json
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devicerunner.device import config
from devicerunner.device.daemon import Daemon
from devicerunner.errors import ConfigError
from devicerunner.fleet.artifacts import ArtifactDir, ArtifactServer
from devicerunner.transport import operator, topics
from devicerunner.transport.channel import STATUS_REPLY_BURST
from devicerunner.transport.settings import parse_url
from devicerunner.transport.sources.base import ChunkRef, FetchJob, SourceError
from devicerunner.transport.sources.http import HttpSource
from devicerunner.trust import chunking, manifest
from devicerunner.trust import verify as trust
from devicerunner.update.downloads import refs
from tests.brokers import Mosquitto
from tests.conftest import ROOT, until
from tests.devicekit import Events, Kit, counter_module
from tests.httphost import HttpHost
from tests.test_mqtt import Listener, _make_pki, _publish, mqtt_kit


def padded(step: int, seed: int, n: int) -> bytes:
    """A valid app with ``n`` bytes of seeded noise in a trailing custom section."""
    payload = b"\x03pad" + random.Random(seed).randbytes(n)
    size, leb = len(payload), bytearray()
    while True:
        b, size = size & 0x7F, size >> 7
        leb.append(b | (0x80 if size else 0))
        if not size:
            break
    return counter_module(step) + b"\x00" + bytes(leb) + payload


def cdc_bundle(kit: Kit, module: bytes, sequence: int, **kw: Any) -> bytes:
    return kit.bundle(module, sequence, artifact=chunking.artifact_of(io.BytesIO(module)), **kw)


class MemorySink:
    """The Sink interface in memory, verifying like the device's chunk store."""

    def __init__(self, m: manifest.Manifest, held: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.m = m
        self.got: dict[int, bytes] = {}
        self.refusals: list[int] = []
        self.want = set(range(len(m.artifact.chunks))) - set(held)

    def deliver(self, ref: ChunkRef, data: bytes) -> bool:
        trust.verify_chunk(self.m, ref.index, data)
        if ref.index not in self.want:
            return False
        self.want.discard(ref.index)
        self.got[ref.index] = data
        return True

    def missing(self) -> frozenset[int]:
        return frozenset(self.want)

    def refused(self, ref: ChunkRef, error: Exception) -> None:
        self.refusals.append(ref.index)


def fetch(src: HttpSource, m: manifest.Manifest, sink: MemorySink) -> SourceError | None:
    ended = threading.Event()
    result: list[SourceError | None] = []

    def on_end(_j: FetchJob, err: SourceError | None) -> None:
        result.append(err)
        ended.set()

    wanted = tuple(r for r in refs(m) if r.index in sink.missing())
    src.start(FetchJob(m.artifact.sha256, m.artifact.size, wanted, sink, on_end))
    assert ended.wait(30), "the source never reported its end"
    return result[0]


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[ArtifactDir, manifest.Manifest, bytes]]:
    kit = Kit(tmp_path / "kit")
    module = padded(3, 1, 200_000)
    (tmp_path / "b.bundle").write_bytes(cdc_bundle(kit, module, 1))
    d = ArtifactDir(tmp_path / "artifacts")
    m = d.add_bundle(tmp_path / "b.bundle")
    yield d, m, module


def host(d: ArtifactDir, mode: str) -> HttpHost:
    return HttpHost(d.root, mode).start()


def test_http_mirror_serves_only_the_missing_chunks_by_range(mirror: Any) -> None:
    d, m, module = mirror
    h = host(d, "good")
    try:
        held = set(range(0, len(m.artifact.chunks), 2))
        sink = MemorySink(m, held)
        assert fetch(HttpSource(h.url), m, sink) is None
        assert not sink.missing()
        assert len(h.requests) == len(m.artifact.chunks) - len(held)  # resume: held chunks never asked for
        for i, data in sink.got.items():
            off, n = m.artifact.span(i)
            assert data == module[off : off + n]
    finally:
        h.stop()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("corrupt", "artifact_mismatch"),  # a hostile mirror: bytes the manifest does not pin
        ("oversize", "artifact_mismatch"),  # an endless body is cut at the chunk's size
        ("swap", "mirror_changed"),  # the mirror swapped to another file between chunks
        ("redirect_loop", "too_many_redirects"),
        ("no_range", "bad_response"),  # a 200 with the whole file is never read
        ("down", "bad_response"),
    ],
)
def test_hostile_or_broken_mirror_fails_the_source_and_nothing_bad_is_kept(
    mirror: Any, mode: str, reason: str
) -> None:
    d, m, _ = mirror
    h = host(d, mode)
    try:
        sink = MemorySink(m)
        err = fetch(HttpSource(h.url, max_redirects=3), m, sink)
        assert err is not None and err.reason == reason, err
        for i, data in sink.got.items():  # whatever was kept is exactly what the manifest pins
            trust.verify_chunk(m, i, data)
        if mode == "redirect_loop":
            assert len(h.requests) == 4  # the first request and 3 redirects, no more
    finally:
        h.stop()


def test_slow_loris_mirror_is_cut_by_the_chunk_deadline(mirror: Any) -> None:
    d, m, _ = mirror
    h = host(d, "slow")
    try:
        src = HttpSource(h.url, chunk_timeout_s=0.5, min_bytes_per_s=10**9, read_timeout_s=5)
        err = fetch(src, m, MemorySink(m))
        assert err is not None and err.reason == "too_slow"
    finally:
        h.stop()


def test_artifact_url_must_be_http_or_https() -> None:
    with pytest.raises(SourceError, match="http"):
        HttpSource("ftp://example.invalid/x")


# -- end to end: fallback and deltas --------------------------------------------------------


def test_hostile_http_mirror_falls_back_to_retained_chunks_and_commits(
    tmp_path: Path, broker: Mosquitto
) -> None:
    art = tmp_path / "artifacts"
    h = HttpHost(art, "corrupt").start()
    kit = mqtt_kit(
        tmp_path, broker.url, extra=f'\n[artifacts]\nsources = ["http", "retained"]\nhttp_url = "{h.url}"\n'
    )
    module = padded(3, 2, 100_000)
    data = cdc_bundle(kit, module, 1)
    (tmp_path / "b.bundle").write_bytes(data)
    ArtifactDir(art).add_bundle(tmp_path / "b.bundle")
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        _publish(broker.url, data)
        failed = ev.wait("SOURCE_FAILED", 1)
        assert (failed["source"], failed["reason"]) == ("http", "artifact_mismatch")
        done = ev.wait("DOWNLOADED", 1)
        assert done["sources"] == ["http", "retained"]
        ev.wait("COMMITTED", 1)
    finally:
        d.stop()
        h.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


def test_second_build_fetches_only_the_changed_chunks_and_an_unrelated_one_fetches_all(
    tmp_path: Path, broker: Mosquitto
) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        v1 = padded(1, 7, 1_000_000)
        _publish(broker.url, cdc_bundle(kit, v1, 1))
        first = ev.wait("DOWNLOADED", 1, timeout_s=60)
        ev.wait("COMMITTED", 1, timeout_s=30)
        assert first["bytes_reused"] == 0
        v2 = padded(2, 7, 1_000_000)  # another function body, the same everything else
        _publish(broker.url, cdc_bundle(kit, v2, 2))
        delta = ev.wait("DOWNLOADED", 2, timeout_s=60)
        ev.wait("COMMITTED", 2, timeout_s=30)
        assert delta["bytes_fetched"] <= 0.10 * len(v2), delta
        assert delta["bytes_fetched"] + delta["bytes_reused"] == len(v2)
        v3 = padded(3, 8, 1_000_000)  # unrelated content
        _publish(broker.url, cdc_bundle(kit, v3, 3))
        other = ev.wait("DOWNLOADED", 3, timeout_s=60)
        assert other["bytes_fetched"] >= 0.95 * len(v3), other
    finally:
        d.stop()


def test_flood_of_status_requests_cannot_make_the_fleet_flood_the_broker(
    tmp_path: Path, broker: Mosquitto
) -> None:
    kit = mqtt_kit(tmp_path, broker.url)
    d = Daemon(kit.cfg)
    d.start()
    try:
        assert d.channel.wait_connected(10)
        s = parse_url(broker.url)
        with operator.Session(s) as sess:
            for i in range(10):  # anyone may publish on the request topic; each one is handled
                operator.request_status(sess, "dr/v1", spread_s=0.0)
                assert until(lambda n=i + 1: d.channel.stats["status_requests"] == n)
        assert d.channel.stats["status_replies"] == STATUS_REPLY_BURST
    finally:
        d.stop()


def test_power_cut_mid_http_download_resumes_without_refetching_held_chunks(
    tmp_path: Path, broker: Mosquitto
) -> None:
    art = tmp_path / "artifacts"
    h = HttpHost(art, "throttled").start()
    kit = mqtt_kit(tmp_path, broker.url, extra=f'\n[artifacts]\nsources = ["http"]\nhttp_url = "{h.url}"\n')
    data = cdc_bundle(kit, padded(3, 11, 2_000_000), 1)
    (tmp_path / "b.bundle").write_bytes(data)
    m = ArtifactDir(art).add_bundle(tmp_path / "b.bundle")
    n = len(m.artifact.chunks)
    _publish(broker.url, data)  # retained release; chunks only on the mirror
    dl_dir = kit.state_dir / "downloads" / m.artifact.sha256
    cmd = [sys.executable, "-m", "devicerunner.cli.main", "run", "--config", str(kit.config_path)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        assert until(lambda: len(list(dl_dir.glob("*.chunk"))) >= n // 3, 60)
    finally:
        p.send_signal(signal.SIGKILL)  # a power cut, mid-download
        p.wait(10)
    held = len(list(dl_dir.glob("*.chunk")))
    assert 0 < held < n
    asked_before = len(h.requests)
    events = Listener(broker.url, topics.events("dr/v1", "dev-1"))
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        done = events.wait_event("DOWNLOADED", 1, timeout_s=60)
        events.wait_event("COMMITTED", 1)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
        events.close()
        h.stop()
    assert (done["chunks_resumed"], done["chunks_fetched"]) == (held, n - held)
    assert len(h.requests) - asked_before == n - held  # not one held chunk asked for again


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"sources": ["retained", "ftp"]}, "artifacts.sources: unknown source 'ftp'"),
        ({"sources": ["http"]}, "artifacts.http_url: is required"),
        ({"sources": ["mqtt", "mqtt"]}, "listed twice"),
        ({"http_url": "file:///etc/passwd"}, "artifacts.http_url: must be an http"),
        ({"window": 0}, "artifacts.window"),
        ({"request_documents": "yes"}, "artifacts.request_documents: must be true or false"),
        ({"mirror": "x"}, "artifacts.mirror: unknown key"),
    ],
)
def test_bad_artifact_source_config_is_refused_naming_the_key(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    doc = {"device": {"id": "d", "hardware": "h", "state_dir": "s"}, "artifacts": table}
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.parse(doc, tmp_path, tmp_path / "device.toml")


def test_https_mirror_is_verified_and_never_downgraded_to_plain_http(mirror: Any, tmp_path: Path) -> None:
    d, m, _ = mirror
    pki = _make_pki(tmp_path)
    tls = (pki["server"], pki["server_key"])
    good = HttpHost(d.root, "good", tls=tls).start()
    plain = HttpHost(d.root, "good").start()
    downgrade = HttpHost(d.root, "redirect_elsewhere", tls=tls, elsewhere=plain.url).start()
    try:
        assert fetch(HttpSource(good.url, ca_file=pki["ca"]), m, MemorySink(m)) is None
        err = fetch(HttpSource(good.url), m, MemorySink(m))  # a CA the system store does not know
        assert err is not None and err.reason == "source_unavailable" and "CERTIFICATE" in str(err).upper()
        err = fetch(HttpSource(downgrade.url, ca_file=pki["ca"]), m, MemorySink(m))
        assert err is not None and err.reason == "tls_downgrade", err
    finally:
        for h in (good, plain, downgrade):
            h.stop()


def test_request_response_download_asks_within_its_window_and_never_twice(
    tmp_path: Path, broker: Mosquitto
) -> None:
    art = tmp_path / "artifacts"
    kit = mqtt_kit(tmp_path, broker.url, extra='\n[artifacts]\nsources = ["mqtt"]\nwindow = 4\n')
    data = cdc_bundle(kit, padded(3, 12, 300_000), 1)
    (tmp_path / "b.bundle").write_bytes(data)
    m = ArtifactDir(art).add_bundle(tmp_path / "b.bundle")
    requests = Listener(broker.url, topics.artifact_request("dr/v1", "dev-1"))
    server = ArtifactServer(parse_url(broker.url), "dr/v1", art).start()
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        assert d.channel.wait_connected(10)
        _publish(broker.url, data)  # the release (and retained chunks this device never asks for)
        done = ev.wait("DOWNLOADED", 1, timeout_s=30)
        ev.wait("COMMITTED", 1)
    finally:
        d.stop()
        server.stop()
        requests.close()
    asked = [json.loads(p)["chunks"] for _, p in requests.messages]
    assert all(len(a) <= 4 for a in asked), asked
    flat = [i for a in asked for i in a]
    assert sorted(flat) == list(range(len(m.artifact.chunks)))  # every chunk, once
    assert done["sources"] == ["mqtt"] and done["chunks_fetched"] == len(m.artifact.chunks)
