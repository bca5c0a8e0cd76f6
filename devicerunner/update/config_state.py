"""The state of an app's signed configuration, and its transitions (pure).

``apps/<app>/config/state.json`` is the commit point of an app's config
(update.config_updates writes it); these functions decide what each step
changes. Pure: they take the state, a verified document and ``now``-free
facts, and return the new state; they never touch files or the clock.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, replace

from devicerunner.errors import VerificationError
from devicerunner.trust.appconfig import ConfigDoc, ConfigHistory
from devicerunner.trust.manifest import RolloutDoc
from devicerunner.trust.verify import in_rollout
from devicerunner.update.events import Reason
from hostfuncs.config import AppSettings


class ConfigPhase(enum.StrEnum):
    IDLE = "IDLE"
    STAGED = "STAGED"
    TRIAL = "TRIAL"
    COMMITTED = "COMMITTED"
    ROLLED_BACK = "ROLLED_BACK"
    REJECTED = "REJECTED"


IDLE, STAGED, TRIAL, COMMITTED, ROLLED_BACK, REJECTED = (
    ConfigPhase.IDLE,
    ConfigPhase.STAGED,
    ConfigPhase.TRIAL,
    ConfigPhase.COMMITTED,
    ConfigPhase.ROLLED_BACK,
    ConfigPhase.REJECTED,
)
FAILED = "FAILED"
"""An event only (staging hit an I/O error; the document is tried again)."""
PHASES = tuple(ConfigPhase)
MAX_BAD = 256
MAX_REMEMBERED = 32
"""Digests of refused documents kept on disk (authenticated ones)."""


@dataclass(frozen=True)
class ConfigState:
    schema: int = 1
    phase: str = IDLE
    active_version: int = 0
    active_sha256: str | None = None
    candidate_version: int | None = None
    candidate_sha256: str | None = None
    trial_attempts: int = 0
    highest_version: int = 0
    bad_versions: dict[str, str] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    last_error: str | None = None
    last_reason: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> ConfigState:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("schema") != 1:
            raise ValueError("not a schema-1 config state")
        known = set(cls.__dataclass_fields__)
        st = cls(**{k: v for k, v in obj.items() if k in known})
        ints = (st.active_version, st.trial_attempts, st.highest_version)
        if (
            st.phase not in PHASES
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ints)
            or not isinstance(st.bad_versions, dict)
            or not isinstance(st.rejected, list)
            or not isinstance(st.candidate_version, int | None)
        ):
            raise ValueError("invalid field types in config state")
        return st

    @property
    def bad(self) -> frozenset[int]:
        return frozenset(int(v) for v in self.bad_versions)

    def history(self) -> ConfigHistory:
        return ConfigHistory(self.highest_version, self.bad)


def plan_stage(st: ConfigState, doc: ConfigDoc) -> ConfigState:
    """Stage ``doc``. The same candidate again (a trial interrupted by a crash,
    tried again at boot) keeps its attempts: every crash counts."""
    same = st.candidate_version == doc.version and st.candidate_sha256 == doc.digest
    return replace(
        st,
        phase=st.phase if same and st.phase == TRIAL else STAGED,
        candidate_version=doc.version,
        candidate_sha256=doc.digest,
        trial_attempts=st.trial_attempts if same else 0,
        rejected=[d for d in st.rejected if d != doc.digest],
        last_error=None,
        last_reason=None,
    )


def plan_commit(st: ConfigState) -> ConfigState:
    v = st.candidate_version or 0
    return replace(
        st,
        phase=COMMITTED,
        active_version=v,
        active_sha256=st.candidate_sha256,
        candidate_version=None,
        candidate_sha256=None,
        trial_attempts=0,
        highest_version=max(st.highest_version, v),
        last_error=None,
        last_reason=None,
    )


def plan_rollback(st: ConfigState, reason: str, why: str = Reason.TRIAL_FAILED) -> ConfigState:
    bad = dict(st.bad_versions)
    bad[str(st.candidate_version)] = reason
    while len(bad) > MAX_BAD:  # bounded: the oldest (lowest) go first
        bad.pop(str(min(int(v) for v in bad)))
    return replace(
        st,
        phase=ROLLED_BACK,
        candidate_version=None,
        candidate_sha256=None,
        trial_attempts=0,
        bad_versions=bad,
        last_error=reason,
        last_reason=why,
    )


def plan_reject(st: ConfigState, digest: str, e: VerificationError) -> ConfigState:
    """An authentic document refused for a reason other than its trial: remember
    the digest (bounded), refuse nothing else."""
    kept = [d for d in st.rejected if d != digest][-(MAX_REMEMBERED - 1) :]
    rejected = [*kept, digest]
    return replace(st, rejected=rejected, last_error=str(e), last_reason=e.reason)


def plan_boot(st: ConfigState, attempts: int) -> tuple[ConfigState, bool, str | None]:
    """(state, try the candidate again?, note)."""
    if st.phase == TRIAL and st.candidate_version is not None:
        if st.trial_attempts >= attempts:
            reason = f"config trial interrupted by a crash or power loss ({st.trial_attempts} attempt(s))"
            return plan_rollback(st, reason, Reason.TRIAL_INTERRUPTED), False, reason
        return st, True, "config trial interrupted; trying again"
    if st.phase == STAGED and st.candidate_version is not None:
        return st, True, "staged config found; verifying it again"
    return st, False, None


def eligible(device_id: str, doc: ConfigDoc, rollout: RolloutDoc | None) -> bool:
    """Is this device in the config's rollout now? A config rollout document for
    this exact version overrides the document's own percent; paused stops it."""
    if (
        rollout is not None
        and rollout.kind == "config"
        and rollout.app == doc.app
        and rollout.channel == doc.channel
        and rollout.sequence == doc.version
    ):
        return not rollout.paused and in_rollout(device_id, rollout.salt, rollout.percent)
    return in_rollout(device_id, doc.targets.rollout_salt, doc.targets.rollout_percent)


def settings_of(doc: ConfigDoc) -> AppSettings:
    return AppSettings(doc.version, doc.settings, doc.settings_bytes)
