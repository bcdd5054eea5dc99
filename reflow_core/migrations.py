"""Migrations that keep configs written by older versions loading: old grid fields, orchestration settings."""
from __future__ import annotations


def legacy_grids(raw: dict) -> dict:
    """Configs written before the time grid became one tagged union (flat `grid`, `rho`, `rhos`, `times` fields)
    read as the union, so an existing run reopens with the same identity."""
    if not isinstance(raw, dict):
        return raw  # not a config at all: pydantic's error says so
    raw = dict(raw)
    for section in ("pairs", "eval"):
        sec = raw.get(section)
        if not isinstance(sec, dict) or not ({"rho", "rhos", "times"} & sec.keys()) or isinstance(sec.get("grid"), dict):
            continue
        sec = dict(sec)
        kind, rho, rhos, times = sec.pop("grid", None), sec.pop("rho", None), sec.pop("rhos", None), sec.pop("times", None)
        if times is not None:
            sec["grid"] = {"kind": "list", "times": times}
        elif kind == "rho":
            per_nfe = dict(zip(sec.get("nfes", []), rhos)) if rhos is not None else None
            sec["grid"] = {"kind": "rho", **({"rho": rho} if rho is not None else {}),
                           **({"per_nfe": per_nfe} if per_nfe else {})}
        elif kind is not None:
            sec["grid"] = {"kind": kind}
        raw[section] = sec
    return raw


# settings only the orchestration reads (flows/params.py): a config or preset may carry them under these keys (older
# configs all do); the torch core's schema leaves them out, so they are dropped here and read by the flow
ORCHESTRATION_KEYS = ("pairs.engine", "pairs.dask_address", "tracking.mlflow_uri", "tracking.experiment",
                      "tracking.system_metrics")


def without_orchestration(raw: dict) -> dict:
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for key in ORCHESTRATION_KEYS:
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and name in raw[section]:
            raw[section] = {k: v for k, v in raw[section].items() if k != name}
    if raw.get("tracking") == {}:
        del raw["tracking"]
    return raw
