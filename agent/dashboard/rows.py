"""A device's row of the fleet view: its rollout in short, trouble, order, ages, the summary."""

from __future__ import annotations

from typing import Any

from edgefleet.protocol import OFFLINE, ONLINE, STOPPED, Rollout

STALE: str = "stale"
UNKNOWN: str = "unknown"
# Worst first: the order a fleet page lists devices in by default.
STATE_RANK = {OFFLINE: 0, STALE: 1, UNKNOWN: 2, STOPPED: 3, ONLINE: 4}
# What changes in a row with the clock alone (the rest only with a message or a state).
AGE_FIELDS = ("age_s", "metrics_age_s", "prediction_age_s")


def _num(value: object) -> float | None:
    """A JSON number, or None (a device's fields are never trusted to be numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _rollout(state: dict[str, Any]) -> dict[str, Any]:
    out = {key: state.get(key) for key in ("state", "progress", "reason", "name", "version", "ts")}
    shadow = state.get("shadow")
    if isinstance(shadow, dict):
        out["shadow"] = {
            key: shadow.get(key) for key in ("samples", "target", "agreement", "latency_ratio")
        }
        out["awaiting_decision"] = bool(state.get("awaiting_decision"))
    return out


def _delegate_kind(delegate: object) -> str:
    if not isinstance(delegate, dict):
        return ""
    return str(delegate.get("type") or delegate.get("kind") or delegate.get("name") or "")


def in_trouble(row: dict[str, Any]) -> bool:
    """Up, but something an operator should look at: a failed rollout, throttling, a state
    directory that refuses writes."""
    rollout = row["rollout"] or {}
    if row["throttled"] or row.get("state_dir_full"):
        return True
    return rollout.get("state") in (Rollout.FAILED, Rollout.ROLLED_BACK)


def worst_first(row: dict[str, Any], age_s: float | None = None) -> tuple[int, int, float, str]:
    """Sort key: state rank, trouble, longest silent; ``age_s`` when the row has none yet."""
    age = row.get("age_s", age_s)
    return (
        STATE_RANK.get(row["state"], 2),
        0 if in_trouble(row) else 1,
        -(age or 0.0),
        row["device"],
    )


def _age_fields(ages: tuple[float | None, ...]) -> str:
    """The closing part of a row's JSON: its ages, then the brace."""
    values = ("null" if v is None else repr(v) for v in ages)
    return "".join(f',"{name}":{v}' for name, v in zip(AGE_FIELDS, values, strict=True)) + "}"


def _age(now: float, ts: object) -> float | None:
    value = _num(ts)
    return round(max(0.0, now - value), 1) if value is not None else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by state, model version and delegate; the fleet's fps; who is throttled."""
    by_state: dict[str, int] = {}
    by_model: dict[str, int] = {}
    by_delegate: dict[str, int] = {}
    rollouts: dict[str, int] = {}
    for row in rows:
        by_state[row["state"]] = by_state.get(row["state"], 0) + 1
        model = row["model"]
        key = f"{model['name']} v{model['version']}" if model else "none"
        by_model[key] = by_model.get(key, 0) + 1
        delegate = row["delegate"] or "none"
        by_delegate[delegate] = by_delegate.get(delegate, 0) + 1
        rollout = row["rollout"]
        if rollout and rollout.get("state") not in (None, *Rollout.TERMINAL):  # in progress only
            rollouts[rollout["state"]] = rollouts.get(rollout["state"], 0) + 1
    return {
        "devices": len(rows),
        "shadow": _shadow_summary(rows),
        "by_state": by_state,
        "by_model": by_model,
        "by_delegate": by_delegate,
        "rollouts": rollouts,
        "fps_total": round(sum(r["fps"] or 0.0 for r in rows), 1),
        "throttled": sum(bool(r["throttled"]) for r in rows),
        "not_converged": sum(not r["converged"] for r in rows),
    }


def _shadow_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per release in a shadow phase (or just decided): how the devices' agreements spread."""
    found: dict[str, list[float]] = {}
    for row in rows:
        rollout = row["rollout"] or {}
        agreement = (rollout.get("shadow") or {}).get("agreement")
        if isinstance(agreement, (int, float)):
            key = f"{rollout.get('name')} v{rollout.get('version')}"
            found.setdefault(key, []).append(float(agreement))
    return {
        key: {
            "devices": len(values),
            "min": min(values),
            "median": sorted(values)[len(values) // 2],
            "max": max(values),
        }
        for key, values in found.items()
    }
