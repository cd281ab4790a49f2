"""The Redis layout: the one place that knows key names.

Every key of an experiment carries the hash tag ``{experiment}``, so one experiment lives in
one Redis Cluster slot and one script call per batch writes all of it atomically, request
records included (feedback, which arrives with a request id alone, looks in each experiment).

Per arm (``variant@hash``), hash ``a:<arm>`` holds integer counters (``requests``, ``errors``,
``cancelled``, ``units``) and, per metric ``m``, ``m|n`` (count), ``m|s`` (Σx), and about the
metric's shift ``m|k`` (the first batch's mean, fixed once chosen; 0 for data older than shifts)
``m|t`` (Σ(x − k), kept only when k ≠ 0) and ``m|q`` (Σ(x − k)²), so that variances of values
around 1e12 keep their digits; plus the per-unit sums the delta method needs for ``unit: user``
experiments (and, for the design effect, for the primary metric of ``unit: request`` ones),
with Y_u about the same shift: ``m|uk`` (units with the metric), ``m|uyy`` (Σ Y_u²), ``m|unn``
(Σ N_u²), ``m|uyn`` (Σ Y_u·N_u). Hash ``h:<arm>`` holds the histogram, field ``m|<bucket>``.

Between looks: hash ``seq`` holds each comparison's running always-valid state, hash ``verdict``
the declared winner, its generation and the counters it was declared on (scripts.SAVE_STATE_LUA
merges a look into both).
"""

from __future__ import annotations

import functools
import hashlib

PREFIX = "abproxy"
BATCH_DEDUPE_TTL_S = 3600
"""A batch is replayed only after its reply was lost, at the recorder's next successful round:
seconds later, or once Redis answers again. Kept an hour, not for as long as requests are."""
UNIT_TTL_S = 90 * 24 * 3600
"""Per-user totals of a ``unit: user`` experiment are kept this long after the user's last
request or score: its statistics (the delta method) need a returning user's earlier totals. A
user returning later starts afresh (and counts as a new unit). Those of a ``unit: request``
experiment (its design effect alone) are kept ``feedback_ttl_s`` after the user's last request."""


def experiment_tag(experiment: str) -> str:
    return f"{PREFIX}:{{{experiment}}}"


def arms_key(experiment: str) -> str:
    return f"{experiment_tag(experiment)}:arms"


def stats_key(experiment: str, arm: str) -> str:
    return f"{experiment_tag(experiment)}:a:{arm}"


def hist_key(experiment: str, arm: str) -> str:
    return f"{experiment_tag(experiment)}:h:{arm}"


def unit_key(experiment: str, arm: str, unit_hash: str) -> str:
    return f"{experiment_tag(experiment)}:u:{arm}:{unit_hash}"


def unit_schemas_key(experiment: str) -> str:
    """The metric lists per-user totals are kept for, by a short id (:data:`_LUA_COMMON`)."""
    return f"{experiment_tag(experiment)}:us"


def feedback_key(experiment: str, request_id: str) -> str:
    return f"{experiment_tag(experiment)}:fb:{request_id}"


def agreement_prefix(experiment: str) -> str:
    """Hashes ``<prefix><judge>@<version>|<feedback name>``: field ``<judge's score>|<user's
    score>`` → how many requests got that pair (scripts: record_feedback.lua), for the rank
    correlation between a judge and the users."""
    return f"{experiment_tag(experiment)}:ag:"


def agreement_key(experiment: str, judge_metric: str, feedback: str) -> str:
    """``judge_metric`` as stored: ``judge.<name>@<version>``."""
    return f"{agreement_prefix(experiment)}{judge_metric}|{feedback}"


def sequential_key(experiment: str) -> str:
    """Running always-valid p-values, kept between looks so they never go back up."""
    return f"{experiment_tag(experiment)}:seq"


def promoted_key(experiment: str) -> str:
    """The variant ``abproxy promote`` made every replica serve to all new traffic."""
    return f"{experiment_tag(experiment)}:promoted"


def aliases_before_key(experiment: str) -> str:
    """Prompt Registry alias → the version it pointed at before the promotion moved it ('' for
    none): where ``promote --undo`` puts it back."""
    return f"{experiment_tag(experiment)}:aliases_before"


def stopped_key(experiment: str) -> str:
    """Arms stopped for harm: arm id → :class:`Stop` as JSON. A resumed arm keeps its entry,
    marked resumed: it is never stopped again on its own."""
    return f"{experiment_tag(experiment)}:stopped"


def verdict_key(experiment: str) -> str:
    """The declared winner (``winner``: its arm), ``generation`` (bumped at each declaration),
    ``context`` (what it was decided on: primary metric, control, guardrails, α, MDE), ``since``
    (the arms' counters when it was declared), ``revoked`` and the sample-ratio test's ``srm``."""
    return f"{experiment_tag(experiment)}:verdict"


def runs_key(experiment: str) -> str:
    """MLflow ids: ``experiment_id``, ``summary`` and one run id per arm."""
    return f"{experiment_tag(experiment)}:runs"


def batch_key(experiment: str, batch_id: str) -> str:
    return f"{experiment_tag(experiment)}:batch:{batch_id}"


def request_key(experiment: str, request_id: str) -> str:
    return f"{experiment_tag(experiment)}:req:{request_id}"


def alias_prefix(experiment: str) -> str:
    """Hash buckets ``<prefix><hour>:<level>:<bucket>`` of the upstream's response ids: field and
    bucket from the id's hash (ids.response_hash); value, ids.alias_value, or '' when two requests
    got that response id. An hour's aliases fill 1, 4, 16... buckets (level 0, 1, 2...) as they
    grow in number, so each holds at most about 48 and stays a small listpack
    (``hash-max-listpack-entries``, 128 by default): a bucket key costs ~130 B, an entry ~60 B."""
    return f"{experiment_tag(experiment)}:r:"


def alias_counts_key(experiment: str) -> str:
    """Hash: hour → aliases written in it (which bucket levels a reader must try)."""
    return f"{experiment_tag(experiment)}:rc"


ALIAS_FIRST_BUCKET = 64
ALIAS_MAX_LEVEL = 8


def alias_level(count: int) -> int:
    """The level of an hour's ``count``-th alias: level L holds those past 64·4^(L−1) up to
    64·4^L, in 4^L buckets."""
    level, limit = 0, ALIAS_FIRST_BUCKET
    while count > limit and level < ALIAS_MAX_LEVEL:
        level += 1
        limit *= 4
    return level


def alias_key(experiment: str, hour: int | str, level: int, number: int) -> str:
    return f"{alias_prefix(experiment)}{hour}:{level}:{number % 4**level}"


def response_key(experiment: str, response_id: str) -> str:
    """An alias: the upstream's own response id (``chatcmpl-...``) → the request id."""
    return f"{experiment_tag(experiment)}:resp:{response_id}"


def sequential_field(arm: str, other_arm: str, metric: str) -> str:
    """Field of :func:`sequential_key` for ``arm`` − ``other_arm`` on one metric (the other arm
    is the control, or for head-to-head comparisons another treatment), so an edited arm (a new
    hash) starts afresh."""
    return f"{arm}|{other_arm}|{metric}"


# Flush coordination, shared by every experiment: one hash tag of its own, so that on a Redis
# Cluster the three keys live in one slot like an experiment's do.
FLUSH_TAG = f"{PREFIX}:{{flush}}"
FLUSH_LOCK_KEY = f"{FLUSH_TAG}:lock"
"""Held by the one flush running, with a TTL."""
FLUSH_INTERVAL_KEY = f"{FLUSH_TAG}:interval"
"""Taken by the one replica that flushes in this interval."""
FLUSH_FENCE_KEY = f"{FLUSH_TAG}:fence"
"""A counter: the fencing token of each flush, which is also MLflow's ``step``."""
LEGACY_FLUSH_FENCE_KEY = f"{PREFIX}:flush:fence"


@functools.lru_cache(maxsize=65_536)  # the request path (signed ids) and the recorder ask for each request
def hash_unit(unit_id: str) -> str:
    """Unit ids are the app's user ids: keep them out of key names."""
    return hashlib.sha256(unit_id.encode()).hexdigest()[:32]

