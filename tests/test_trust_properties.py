"""Property-based and fuzz tests: no mutation of a signed manifest verifies,
and arbitrary bytes only ever produce typed errors."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicerunner.errors import MalformedError, VerificationError
from devicerunner.transport import reports, topics
from devicerunner.trust import manifest
from devicerunner.trust import verify as trust
from tests.trustsim import Repo, verify

REPO = Repo()
ROOT = REPO.root()
GOOD = REPO.release()
GOOD_ENV = json.loads(GOOD)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rejected(data: bytes) -> bool:
    try:
        verify(REPO, data, root=ROOT)
    except VerificationError:
        return True
    return False


def test_the_unmutated_manifest_verifies() -> None:
    assert verify(REPO, GOOD, root=ROOT).sequence == 5


@SETTINGS
@given(st.integers(min_value=0, max_value=len(GOOD) - 1), st.integers(min_value=1, max_value=255))
def test_no_flipped_byte_verifies(pos: int, xor: int) -> None:
    data = bytearray(GOOD)
    data[pos] ^= xor
    mutated = bytes(data)
    try:
        same = json.loads(mutated) == GOOD_ENV
    except ValueError:
        same = False
    if same:  # flipped insignificant whitespace into other whitespace: same document
        return
    assert _rejected(mutated)


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:  # type: ignore[type-arg]
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((*prefix, i))
            out.extend(_paths(v, (*prefix, i)))
    return out


SIGNED_PATHS = _paths(GOOD_ENV["signed"])
VALUES = st.one_of(
    st.integers(), st.text(max_size=20), st.booleans(), st.none(), st.lists(st.integers(), max_size=3)
)


@SETTINGS
@given(st.sampled_from(SIGNED_PATHS), VALUES)
def test_no_changed_field_verifies(path: tuple, value: object) -> None:  # type: ignore[type-arg]
    env = json.loads(GOOD)
    target = env["signed"]
    for k in path[:-1]:
        target = target[k]
    if target[path[-1]] == value:
        return
    target[path[-1]] = value
    assert _rejected(json.dumps(env).encode())


@SETTINGS
@given(st.sets(st.integers(min_value=0, max_value=1), max_size=2))
def test_dropping_any_signature_fails_the_threshold(keep: set[int]) -> None:
    env = json.loads(GOOD)
    if len(keep) == 2:
        return
    env["signatures"] = [env["signatures"][i] for i in sorted(keep)]
    assert _rejected(json.dumps(env).encode())


@SETTINGS
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_as_manifest_give_typed_errors(data: bytes) -> None:
    assert _rejected(data)


@SETTINGS
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_as_root_give_typed_errors(data: bytes) -> None:
    try:
        trust.load_trusted_root(data)
    except VerificationError:
        return
    raise AssertionError("random bytes verified as a root")


# st.text() never yields lone surrogates, but a JSON "\ud800" escape does, and
# str.encode() then raises UnicodeEncodeError: the fuzz must produce them.
LONE_SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])


def _texts(max_size: int) -> st.SearchStrategy[str]:
    with_surrogate = st.builds(
        lambda a, s, b: a + s + b,
        st.text(max_size=max_size // 2),
        LONE_SURROGATES,
        st.text(max_size=max_size // 2),
    )
    return st.text(max_size=max_size) | with_surrogate


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _texts(10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts(8), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("where", ["value", "key"])
def test_lone_surrogate_escape_in_an_envelope_is_a_typed_error(where: str) -> None:
    env = json.loads(GOOD)
    if where == "value":
        env["signed"]["version"] = "\ud800"
    else:
        env["signed"]["\ud800"] = 1
    data = json.dumps(env).encode()  # ensure_ascii: the surrogate travels as a "\ud800" escape
    assert b"\\ud800" in data
    with pytest.raises(MalformedError):
        manifest.parse_envelope(data, manifest.MAX_MANIFEST_BYTES, "manifest")
    assert _rejected(data)


@SETTINGS
@given(JSONISH)
def test_fuzz_structured_json_as_manifest_and_root_give_typed_errors(obj: object) -> None:
    for doc in (
        obj,
        {"signed": obj, "signatures": []},
        {"signed": obj, "signatures": [{"keyid": "0" * 64, "sig": "0" * 128}]},
    ):
        data = json.dumps(doc).encode()
        assert _rejected(data)
        with contextlib.suppress(VerificationError):
            trust.load_trusted_root(data)
        with contextlib.suppress(VerificationError):
            manifest.parse_manifest(data)


@pytest.mark.parametrize("last", ["\u00b2", "\u0661", "\uff11", "\ud800", "9" * 5000, "-1", ""])
def test_chunk_topic_with_a_non_ascii_or_huge_index_is_not_a_chunk(last: str) -> None:
    # "\u00b2".isdigit() is True but int("\u00b2") raises ValueError; 5,000 digits
    # exceed int()'s limit. A topic is foreign input: None, never an exception.
    assert topics.parse_chunk("p", f"p/artifacts/x/{last}") is None


@SETTINGS
@given(_texts(40))
def test_fuzz_topics_parse_to_a_chunk_or_none(tail: str) -> None:
    for topic in (tail, f"p/{tail}", f"p/artifacts/x/{tail}", f"p/artifacts/{tail}"):
        r = topics.parse_chunk("p", topic)
        assert r is None or (isinstance(r[0], str) and isinstance(r[1], int) and r[1] >= 0)
        where = topics.parse_device_topic("p", topic)
        assert where is None or where[1] in ("status", "events")
        msg = reports.Reader("p").read(topic, tail.encode("utf-8", "surrogatepass"))  # never raises
        assert msg is None or isinstance(msg, reports.DeviceStatus | reports.DeviceEvent)
