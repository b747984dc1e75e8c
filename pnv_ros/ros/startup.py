"""The node's detector, assembled from its startup parameters. No rclpy: values come through a getter.

The startup (read-only) parameters of :mod:`pnv_ros.ros.params` pick the preset, the model (refitted on
``vocabulary_images`` when given), the engine and the map storage; the detector parameters its settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pnv_ros.config import load_preset
from pnv_ros.detector import LoopClosureDetector
from pnv_ros.engines.spec import RuntimeSpec
from pnv_ros.extract import open_extractor
from pnv_ros.fleet.member import FleetMember
from pnv_ros.model.registry import resolve_checkpoint
from pnv_ros.ros import params as P


def detector_from_parameters(value: Callable[[str], Any], log: Callable[[str], object]) -> LoopClosureDetector:
    """The detector of the parameter values ``value(name)`` gives (the table's names), progress to ``log``.

    Raises PnvError (ConfigError, CheckpointError, EngineError, ...) when the model or engine cannot be had.
    """
    g = value
    preset = load_preset(g("preset"), g("config_file") or None)
    ckpt = resolve_checkpoint(g("checkpoint") or None, announce=log)
    if g("vocabulary_images"):
        ckpt = refit_vocabulary(ckpt, g, log)
    runtime = RuntimeSpec(
        device=g("device") or None,
        engine=g("engine"),
        precision=g("precision") or None,
        engine_file=g("engine_file") or None,
        bf16=g("bfloat16"),
    )
    extractor = open_extractor(ckpt, preset, runtime, log=log)
    return LoopClosureDetector(
        extractor,
        P.detector_params({n: g(n) for n in P.DETECTOR_NAMES}),
        index_kind=g("index_kind"),
        patch_dtype=g("patch_dtype"),
        memory_budget_mb=g("memory_budget_mb"),
    )


def fleet_from_parameters(detector: LoopClosureDetector, value: Callable[[str], Any]) -> FleetMember | None:
    """With ``fleet_dsn``: a :class:`FleetMember` for ``robot_id`` joined to the detector (nothing connects yet:
    a database that is down at start is a WARN, not a failed start); None without. Raises FleetError (no
    robot_id, bad settings) and ConfigError when the fleet extra is not installed."""
    if not value("fleet_dsn"):
        return None
    import importlib.util

    from pnv_ros.errors import ConfigError
    from pnv_ros.fleet.member import FleetMember, FleetSettings

    if importlib.util.find_spec("psycopg") is None or importlib.util.find_spec("pgvector") is None:
        raise ConfigError("fleet_dsn needs the fleet extra: pip install 'pnv_ros[fleet]' (psycopg, pgvector)")
    settings = FleetSettings(
        value("fleet_dsn"),
        value("robot_id"),
        top_n=value("fleet_top_n"),
        deadline_s=value("fleet_deadline_s"),
    )
    m = detector.map
    member = FleetMember(
        settings,
        dim=detector.extractor.dim,
        preset=detector.preset,
        model_id=detector.model_id,
        patch_dtype=m.patch_dtype.name,
        lock=detector.lock,
    )
    detector.join_fleet(member)
    return member


#: Seconds the node waits at shutdown for the fleet uploads still pending (~10 ms each when the database answers).
FLEET_FLUSH_S = 10.0
#: Seconds each fleet thread (uploads, queries) then gets to finish its call: 2 s (a call on a database that answers
#: takes ~10-40 ms; one stuck on a hung database is left to its daemon thread, so the shutdown stays bounded).
CLOSE_WAIT_S = 2.0


def close_fleet(member: FleetMember, warn: Callable[[str], object], wait_s: float = FLEET_FLUSH_S) -> None:
    """At shutdown: wait up to ``wait_s`` for the pending uploads, say how many are left, stop the threads."""
    if not member.outbox.flush(wait_s):
        left = member.outbox.status().pending
        warn(f"fleet: {left} keyframes not uploaded at shutdown (database unreachable): a saved map sends them")
    member.close(CLOSE_WAIT_S)


def refit_vocabulary(ckpt: Path, value: Callable[[str], Any], log: Callable[[str], object]) -> Path:
    """The checkpoint with its vocabulary refitted on vocabulary_images (cached: once per model and files)."""
    from pnv_ros.model.refit import refit_cached

    r = refit_cached(
        ckpt,
        value("vocabulary_images"),
        topic=value("vocabulary_topic") or None,
        bit_depth=value("bit_depth") or None,
        log=log,
    )
    log(
        f"vocabulary {'refitted' if r.refitted else 'from the cache'} in {r.seconds:.1f} s: "
        f"{Path(ckpt).name} on {r.describe()}"
    )
    return r.path


def ready_message(detector: LoopClosureDetector, value: Callable[[str], Any], image_topic: str) -> str:
    """The node's line once it runs: preset, model, image topic and its QoS, and the backbone when not torch's."""
    ex, g = detector.extractor, value
    backbone = ex.backend.describe() if ex.backend is not None else f"torch {ex.precision}"
    return (
        f"loop_closure ready: preset {detector.preset.name}, model {detector.model_id}, "
        f"{image_topic} ({g('image_qos')}, depth {g('image_qos_depth')})"
        + (", bfloat16 backbone" if g("bfloat16") else "")
        + (f", backbone on {backbone}" if g("engine") != "torch" else "")
    )
