"""Arms stopped for harm (the contract's "harm stops an arm"): a treatment whose always-valid
interval shows harm beyond a guardrail's margin gets no new traffic on any replica from then on
(its units are served by the control, counted in Prometheus only), until an operator resumes it.
Every look stops what it finds harmful (:func:`stop_harmful_arms`); a resumed arm is never stopped
again on its own, since the evidence that stopped it stays."""

from __future__ import annotations

import logging
import time
from typing import Any

from abproxy.analysis.analyse import Analysis
from abproxy.catalog import ExperimentPlan
from abproxy.errors import Conflict, NotFound, StoreUnavailable
from abproxy.recording import store
from abproxy.recording.overrides import Stop

log = logging.getLogger("abproxy.analysis.stops")


async def stop_harmful_arms(
    redis: Any, plan: ExperimentPlan, analysis: Analysis, stops: dict[str, Stop]
) -> dict[str, Stop]:
    """Stop every treatment whose guardrail shows harm (unless the experiment says not to, or
    the arm was stopped or resumed before); the experiment's stops after it."""
    if not plan.settings.stop_on_harm:
        return stops
    stops = dict(stops)
    for name, verdict in analysis.verdict.arms.items():
        arm = plan.arms[name].arm_id
        if not verdict.harmed or arm in stops:
            continue
        stop = Stop(name, verdict.harmed[0], time.time())
        try:
            with store.reachable():
                stopped = await store.stop_arm(redis, plan.name, arm, stop)
        except StoreUnavailable as error:
            log.warning("could not stop variant %s of experiment %s (%s); the next look tries again", name, plan.name, error)
            continue
        if not stopped:
            continue  # another replica stopped it a moment ago, or it was resumed: the next look shows which
        log.warning(
                "experiment %s: variant %s stopped, its users now get the control %s: harm beyond the margin of %s "
                "shown (abproxy resume %s %s gives it its traffic back)",
            plan.name, name, plan.settings.control_name, stop.reason, plan.name, name,
        )  # fmt: skip
        stops[arm] = stop
    return stops


async def resume(redis: Any, plan: ExperimentPlan, variant: str) -> Stop:
    """Give a stopped variant its traffic back on every replica (within their refresh)."""
    arm = plan.arms.get(variant)
    if arm is None:
        raise NotFound(f"experiment {plan.name!r} has no variant {variant!r}", "variant_not_found")
    with store.reachable():
        resumed = await store.resume_arm(redis, plan.name, arm.arm_id, time.time())
    if resumed is None:
        raise Conflict(f"variant {variant!r} of experiment {plan.name!r} is not stopped", "not_stopped")
    log.warning("experiment %s: variant %s resumed: it gets its share of new traffic again", plan.name, variant)
    return resumed
