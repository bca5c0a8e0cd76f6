"""Files on disk are untrusted input: every state file is checked by size,
nesting, type and integrity on load, and anything wrong takes the corruption
path (rebuild from the committed slots, logged), never a crash."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicerunner.device.daemon import Daemon
from devicerunner.runtime.statefile import seal
from devicerunner.update.slots import AppSlots
from devicerunner.update.state import AppState
from devicerunner.update.updater import install_bundle
from tests.devicekit import Events, Kit, counter_module


@pytest.fixture(scope="module")
def committed_twice(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    """A device whose app committed sequence 1 (slot a) then 2 (slot b), then a
    rolled-back sequence 3 is in bad_sequences: a state worth protecting."""
    kit = Kit(tmp_path_factory.mktemp("dev") / "dev")
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        for seq in (1, 2):
            install_bundle(kit.state_dir, kit.bundle(counter_module(seq), seq, trial_ticks=3))
            ev.wait("COMMITTED", seq)
    finally:
        d.stop()
    slots = AppSlots(kit.state_dir, "app")
    st, _ = slots.load()
    slots.save(st.mark_bad(3, "trial_failed: dr_tick trapped"))
    return kit


@pytest.fixture
def kit(committed_twice: Kit, tmp_path: Path) -> Iterator[Kit]:
    """A private copy of the committed device for each test."""
    import shutil

    copy = Kit(tmp_path / "dev", release_keys=committed_twice.release_keys, root_key=committed_twice.root_key)
    shutil.rmtree(copy.state_dir, ignore_errors=True)
    shutil.copytree(committed_twice.state_dir, copy.state_dir)
    yield copy


def _state_path(kit: Kit) -> Path:
    return kit.state_dir / "apps" / "app" / "state.json"


def _rewrite(kit: Kit, **changes: object) -> None:
    """A well-formed, correctly sealed state.json with some fields changed (as an
    operator's editor or a buggy older version might leave it)."""
    obj = json.loads(_state_path(kit).read_bytes())
    obj.pop("sha256")
    obj.update(changes)
    _state_path(kit).write_bytes(seal(obj))


def test_committed_fixture_state(kit: Kit) -> None:
    st, why = AppSlots(kit.state_dir, "app").load()
    assert why is None
    assert (st.active, st.active_sequence, st.highest_sequence, st.bad) == ("b", 2, 2, frozenset({3}))


@pytest.mark.parametrize(
    "changes",
    [
        {"trial_attempts": "1"},  # crashed the daemon with a TypeError
        {"phase": "TRIAL", "pending": "a", "pending_sequence": 3, "trial_attempts": "1"},
        {"highest_sequence": 2.5},
        {"highest_sequence": True},
        {"highest_sequence": -1},
        {"bad_sequences": ["3"]},
        {"bad_sequences": {"٣": "x"}},
        {"active": "c"},
        {"last_error": {"nested": 1}},
        {"pending": "a", "pending_sequence": None},
        {"unknown_field": 1},
        {"schema": 2},
    ],
)
def test_state_json_with_a_wrong_type_or_shape_is_rebuilt_from_the_committed_slot(
    kit: Kit, changes: dict[str, object]
) -> None:
    _rewrite(kit, **changes)
    st, why = AppSlots(kit.state_dir, "app").load()
    assert why is not None and "state.json unreadable" in why
    assert (st.active, st.active_sequence, st.highest_sequence, st.phase) == ("b", 2, 2, "COMMITTED")
    d = Daemon(kit.cfg)
    d.start()  # no TypeError: the app runs its committed version
    try:
        assert d.scheduler.apps["app"].spec.sequence == 2
    finally:
        d.stop()


@pytest.mark.parametrize("content", [b"[" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_deeply_nested_state_json_is_rebuilt_not_a_recursion_error(kit: Kit, content: bytes) -> None:
    _state_path(kit).write_bytes(content)
    st, why = AppSlots(kit.state_dir, "app").load()
    assert why is not None and "nested" in why
    assert st.active_sequence == 2


def test_huge_state_json_is_refused_before_it_is_read(kit: Kit) -> None:
    with open(_state_path(kit), "r+b") as f:
        f.truncate(1536 * 1024 * 1024)  # 1.5 GB, sparse: reading it would take 1.5 GB of RAM
    st, why = AppSlots(kit.state_dir, "app").load()
    assert why is not None and "more than" in why
    assert st.active_sequence == 2


def test_no_single_bit_flip_of_state_json_is_accepted_silently(kit: Kit) -> None:
    """114 of 2,416 random bit flips used to change highest_sequence unnoticed
    (a digit flipped into another digit still parses). Every bit, every position:
    the flipped file is either refused (rebuilt, with a reason) or means the same."""
    path = _state_path(kit)
    original = path.read_bytes()
    good, _ = AppSlots(kit.state_dir, "app").load()
    silent = []
    for i in range(len(original) * 8):
        flipped = bytearray(original)
        flipped[i // 8] ^= 1 << (i % 8)
        path.write_bytes(bytes(flipped))
        st, why = AppSlots(kit.state_dir, "app").load()  # a fresh reader: as at boot
        if why is None and st != good:
            silent.append((i, st))
    path.write_bytes(original)
    assert silent == [], f"{len(silent)} of {len(original) * 8} flips accepted silently: {silent[:3]}"


def test_state_written_before_sealing_is_still_read(kit: Kit) -> None:
    # A device updated from a version without the sha256: its state is kept.
    obj = json.loads(_state_path(kit).read_bytes())
    obj.pop("sha256")
    obj.pop("last_error_sequence")  # as old: that field came after the seal
    _state_path(kit).write_text(json.dumps(obj, indent=2))
    st, why = AppSlots(kit.state_dir, "app").load()
    assert why is None and st.bad == frozenset({3})


def test_active_manifest_missing_a_field_falls_back_to_the_other_good_slot(kit: Kit) -> None:
    # The manifest of the active slot (b) loses a field but stays JSON; its module
    # still matches. It used to stop the app; slot a (committed, sequence 1) is good.
    man = kit.state_dir / "apps" / "app" / "slots" / "b" / "manifest.json"
    env = json.loads(man.read_bytes())
    del env["signed"]["version"]
    man.write_text(json.dumps(env))
    d = Daemon(kit.cfg)
    d.start()
    try:
        app = d.scheduler.apps["app"]
        assert app.spec.sequence == 1
        assert "app" not in d.failed
    finally:
        d.stop()
    st, _ = AppSlots(kit.state_dir, "app").load()
    assert (st.active, st.active_sequence) == ("a", 1)


@pytest.mark.parametrize("marker", [b"\xd9\xa3\n", b"1_0\n", b"+2\n", b"9" * 40])
def test_committed_marker_must_be_ascii_digits(kit: Kit, marker: bytes) -> None:
    (kit.state_dir / "apps" / "app" / "slots" / "a" / "committed").write_bytes(marker)
    assert AppSlots(kit.state_dir, "app").committed_sequence("a") is None


def test_app_state_round_trips() -> None:
    st = AppState(active="a", active_sequence=7, highest_sequence=7, phase="COMMITTED").mark_bad(
        8, "x" * 10_000
    )
    again = AppState.from_json(st.to_json())
    assert again == AppState(**{**st.__dict__, "bad_sequences": {"8": "x" * 4096}})


def test_oversized_inbox_bundle_is_refused_unread_and_set_aside(kit: Kit) -> None:
    import resource

    inbox = kit.state_dir / "inbox"
    inbox.mkdir(exist_ok=True)
    huge = inbox / "0000-huge.bundle"
    with open(huge, "wb") as f:
        f.truncate(1536 * 1024 * 1024)  # 1.5 GB, sparse: read whole it was 1.5 GB of RSS
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = Daemon(kit.cfg)
    ev = Events(d)
    d.start()
    try:
        rejected = ev.wait("REJECTED")
    finally:
        d.stop()
    assert rejected["reason"] == "too_large" and "limit" in rejected["reason_text"]
    assert (inbox / "failed" / huge.name).exists() and not huge.exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib < 200 * 1024


def test_install_refuses_an_oversized_bundle_before_reading_it(kit: Kit, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    huge = tmp_path / "huge.bundle"
    with open(huge, "wb") as f:
        f.truncate(1536 * 1024 * 1024)
    r = run_cli("install", "--config", str(kit.config_path), str(huge))
    assert r.returncode == 1 and "is 1610612736 bytes, the limit is" in r.stderr, r.stderr
    assert not list((kit.state_dir / "inbox").glob("*.bundle"))


def test_refused_inbox_file_that_cannot_be_set_aside_is_not_processed_again(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    # As on a read-only state dir: the refused file can neither move nor go. It
    # used to be refused again (an event and a log line) on every 0.25 s scan.
    import logging
    import time

    inbox = kit.state_dir / "inbox"
    inbox.mkdir(exist_ok=True)
    (inbox / "failed").write_bytes(b"")  # inbox/failed/ cannot be created: moves fail
    (inbox / "0001-garbage.bundle").write_bytes(b"not a bundle")
    d = Daemon(kit.cfg)
    ev = Events(d)
    with caplog.at_level(logging.INFO, "devicerunner.update.updater"):
        d.start()
        try:
            ev.wait("REJECTED")
            scans = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:  # 8 inbox scans at 0.25 s
                d.updater.submit(lambda: None)  # each submit is followed by a scan
                assert d.updater.idle.wait(5)
                scans += 1
                time.sleep(0.05)
        finally:
            d.stop()
    assert scans >= 8
    assert len([e for e in ev.items if e["phase"] == "REJECTED"]) == 1
    stuck = [r for r in caplog.records if "skipping it while it is unchanged" in r.getMessage()]
    assert len(stuck) == 1


@pytest.mark.parametrize(
    "content",
    [
        seal({"time_floor": 10**30}),  # a floor in the far future expires every release
        seal({"time_floor": "1e999"}),
        seal({"time_floor": True}),
        b'{"time_floor": 1700000000, "sha256": "00"}',
        b"[" * 100_000,
    ],
)
def test_damaged_time_floor_is_rebuilt_from_the_committed_slots(kit: Kit, content: bytes) -> None:
    from devicerunner.trust.manifest import parse_manifest
    from devicerunner.trust.store import TrustStore

    path = kit.state_dir / "trust" / "state.json"
    good = TrustStore(kit.state_dir, kit.cfg.trust_root).time_floor
    issued = [
        parse_manifest((kit.state_dir / "apps" / "app" / "slots" / s / "manifest.json").read_bytes()).issued
        for s in ("a", "b")
    ]
    assert good == max(issued)
    path.write_bytes(content)
    assert TrustStore(kit.state_dir, kit.cfg.trust_root).time_floor == max(issued)


def test_planted_or_damaged_downloads_are_removed_not_fatal(kit: Kit) -> None:
    from devicerunner.update.downloads import DownloadStore

    bad_json = kit.state_dir / "downloads" / ("a" * 64)
    bad_json.mkdir(parents=True)
    (bad_json / "manifest.json").write_bytes(b"[" * 100_000)
    misplaced = kit.state_dir / "downloads" / ("b" * 64)  # a real manifest under another hash
    misplaced.mkdir()
    (misplaced / "manifest.json").write_bytes((kit.state_dir / "apps/app/slots/a/manifest.json").read_bytes())
    assert DownloadStore(kit.state_dir).pending() == []
    assert not bad_json.exists() and not misplaced.exists()


def test_oversized_rollout_file_is_ignored_and_the_daemon_starts(kit: Kit) -> None:
    path = kit.state_dir / "apps" / "app" / "rollout.json"
    with open(path, "wb") as f:
        f.truncate(1536 * 1024 * 1024)
    d = Daemon(kit.cfg)
    d.start()
    try:
        assert "app" in d.scheduler.apps and "app" not in d.rollouts.documents
    finally:
        d.stop()


def test_inbox_listing_is_reused_only_while_the_directory_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inbox is polled several times a second: a listing is reused while the
    directory's times stand still, and every added or removed file is seen."""
    from devicerunner.runtime import fsutil

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.bundle").write_bytes(b"x")
    listings: list[str] = []
    real_listdir = fsutil.os.listdir

    def counting_listdir(path: Path) -> list[str]:
        listings.append(str(path))
        return real_listdir(path)

    monkeypatch.setattr(fsutil.os, "listdir", counting_listdir)
    view = fsutil.DirListing(inbox)
    assert view.names() == ["a.bundle"]
    # A change in the same clock tick as the listing may not move the mtime:
    # a listing taken that soon after a change is never reused.
    assert view.names() == ["a.bundle"] and len(listings) == 2
    # Time passes: the directory was last changed 10 s ago (set explicitly, so
    # that the next change moves the mtime whatever the clock's granularity).
    now = fsutil.time.time_ns()
    os.utime(inbox, ns=(now - 10 * 10**9, now - 10 * 10**9))
    monkeypatch.setattr(fsutil.time, "time_ns", lambda: now + 5 * 10**9)
    assert view.names() == ["a.bundle"] and len(listings) == 3  # settled now: kept
    assert view.names() == ["a.bundle"] and len(listings) == 3  # reused: a stat, no listing
    (inbox / "b.config").write_bytes(b"y")
    assert view.names() == ["a.bundle", "b.config"] and len(listings) == 4
    assert view.paths(".bundle") == [inbox / "a.bundle"]
    (inbox / "a.bundle").unlink()
    assert view.names() == ["b.config"]
    # whatever a file system does with its times, a listing is never older than max_age_s
    always = fsutil.DirListing(inbox, max_age_s=0.0)
    n = len(listings)
    always.names()
    always.names()
    assert len(listings) == n + 2


def test_inbox_listing_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    from devicerunner.runtime.fsutil import DirListing

    view = DirListing(tmp_path / "gone")
    assert view.names() == []
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "x.bundle").write_bytes(b"")
    assert view.paths(".bundle") == [tmp_path / "gone" / "x.bundle"]


@pytest.mark.parametrize("earlier", ["refused", "clean"])
def test_a_download_start_clears_an_earlier_refusal_on_disk_and_writes_nothing_else(
    kit: Kit, earlier: str
) -> None:
    """DOWNLOADING is shown, not written (the download store resumes after a
    power cut) -- but an error an earlier refusal left (REJECTED, its sequence)
    is cleared on disk: a restart must not bring it back, or a rollout would
    count the device as failed for the release it is taking."""
    from dataclasses import replace

    from devicerunner.trust import bundle as bundles
    from devicerunner.trust.manifest import parse_manifest
    from devicerunner.update.events import Phase

    slots = AppSlots(kit.state_dir, "app")
    st, _ = slots.load()
    if earlier == "refused":
        slots.save(replace(st, phase=Phase.REJECTED, last_error="expired", last_error_sequence=4))
    before = _state_path(kit).read_bytes()
    man, _module = bundles.unpack(kit.bundle(counter_module(4), 4))
    d = Daemon(kit.cfg)
    d.start()
    try:
        d.updater.note_downloading(parse_manifest(man), resumed=0)
        assert d.updater.idle.wait(5) and d.updater.slots["app"].load()[0].phase == Phase.DOWNLOADING
        on_disk, _ = AppSlots(kit.state_dir, "app").load()  # what a restart would read
    finally:
        d.stop()
    if earlier == "refused":
        assert on_disk.last_error is None and on_disk.last_error_sequence is None
    else:
        assert _state_path(kit).read_bytes() == before  # nothing to clear: no write
        assert on_disk.phase == Phase.COMMITTED
