"""Trajectories: stamped camera poses, a seeded odometry drift model, and trajectory errors. No ROS.

A :class:`Trajectory` is N stamped poses of one camera's optical frame in a world frame (TUM's convention:
``t tx ty tz qx qy qz qw``, the camera centre and its orientation, world from camera). Files are read by
:mod:`pnv_ros.tum`.

**Drift model** (:class:`DriftModel`, ``pnv bag make --drift``): odometry made from ground truth for sequences
that have none (TUM RGB-D has none). It acts like a visual-inertial odometry, whose errors are a heading (yaw)
about gravity and a scale, both growing with the distance travelled. Walking the trajectory pose by pose, with
``dp_k = p_k - p_(k-1)`` (world frame) and ``d_k = |dp_k|`` metres:

- heading error ``psi_k = psi_(k-1) + yaw_per_m * d_k + N(0, sigma_yaw^2 * d_k)`` (rad; a bias plus a random
  walk per metre);
- odometry position ``o_k = o_(k-1) + Rz(psi_k) ((1 + scale_error) dp_k + N(0, sigma_m^2 * d_k I))``;
- odometry orientation ``Rz(psi_k) R_k``;

``Rz`` turns about ``up`` (TUM's motion-capture frame: +z). ``o_0 = p_0``, ``psi_0 = 0``. The noise is drawn
from ``numpy.random.default_rng(seed)``: the same model and trajectory give the same odometry. Noise variances
grow with the distance (not the number of poses), so the model does not depend on the frame rate.

**Errors** go through ``evo`` (M. Grupp, github.com/MichaelGrupp/evo): :func:`ate_rmse` (absolute trajectory
error: positions after the SE(3) Umeyama alignment of the estimate to the ground truth, no scale, as TUM's
``evaluate_ate.py`` and ``evo_ape --align``), :func:`rpe` (relative pose error over a distance ``delta_m``).
:func:`loop_transform_errors` scores METRIC loop poses (:class:`pnv_ros.geometry.RelativePose`) against the
ground-truth relative pose, with their NEES.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pnv_ros.errors import PnvError
from pnv_ros.geometry import PoseType, RelativePose, rotation_log

#: A stamp this close (s) to a trajectory pose takes that pose's neighbourhood as measured, whatever the gaps
#: around it (a ground-truth file given at the frames' own stamps, as data/tum_fr1_desk_pairs'): half the 20 ms
#: of TUM RGB-D's associate.py.
SAMPLE_TOLERANCE_S = 0.01


class TrajectoryError(PnvError, ValueError):
    """A trajectory cannot be used: stamps not increasing, bad quaternions, stamps outside its time, too few poses."""


#: how far outside a trajectory's first and last stamps a pose is still taken (the end pose), seconds: TUM's
#: associate.py pairs colour and depth within 0.02 s
END_TOLERANCE_S = 0.02
#: how far a quaternion's norm may be from 1 in a file: TUM writes 4 decimals, so the norm of a unit quaternion
#: is off by up to ~2e-4; 1e-2 catches a wrong column order (a position read as a quaternion) and not rounding
QUATERNION_NORM_TOLERANCE = 1e-2


@dataclass(frozen=True, eq=False)
class Trajectory:
    """N stamped poses (world from camera optical frame).

    Attributes:
        stamps: (N,) float64 seconds, strictly increasing.
        positions: (N, 3) float64 metres.
        quaternions: (N, 4) float64 unit quaternions x, y, z, w (scipy's and ROS's order; TUM's too).

    Raises:
        TrajectoryError: shapes that do not fit, non-finite values, stamps not strictly increasing, a quaternion
            whose norm is not 1 within ``QUATERNION_NORM_TOLERANCE`` (they are normalised when within).
    """

    stamps: np.ndarray
    positions: np.ndarray
    quaternions: np.ndarray

    def __post_init__(self) -> None:
        s = np.asarray(self.stamps, np.float64).reshape(-1)
        p = np.asarray(self.positions, np.float64)
        q = np.asarray(self.quaternions, np.float64)
        if p.shape != (len(s), 3) or q.shape != (len(s), 4):
            raise TrajectoryError(
                f"a trajectory of {len(s)} stamps needs ({len(s)}, 3) positions and (N, 4) "
                f"quaternions, got {p.shape} and {q.shape}"
            )
        if not (np.isfinite(s).all() and np.isfinite(p).all() and np.isfinite(q).all()):
            raise TrajectoryError("a trajectory holds a value that is not finite")
        if len(s) > 1 and not (np.diff(s) > 0).all():
            k = int(np.flatnonzero(np.diff(s) <= 0)[0])
            raise TrajectoryError(f"trajectory stamps must increase: pose {k + 1} ({s[k + 1]:.6f}) after {s[k]:.6f}")
        n = np.linalg.norm(q, axis=1)
        bad = np.flatnonzero(np.abs(n - 1) > QUATERNION_NORM_TOLERANCE)
        if bad.size:
            raise TrajectoryError(
                f"pose {int(bad[0])}: quaternion {q[bad[0]].tolist()} has norm {n[bad[0]]:.4f}, not 1"
            )
        q = q / n[:, None]
        for name, a in (("stamps", s), ("positions", p), ("quaternions", q)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    def __len__(self) -> int:
        return len(self.stamps)

    @property
    def rotations(self) -> np.ndarray:
        """(N, 3, 3) rotation matrices, world from camera."""
        from scipy.spatial.transform import Rotation

        return Rotation.from_quat(self.quaternions).as_matrix()

    def matrices(self) -> np.ndarray:
        """(N, 4, 4) homogeneous poses, world from camera."""
        m = np.tile(np.eye(4), (len(self), 1, 1))
        m[:, :3, :3] = self.rotations
        m[:, :3, 3] = self.positions
        return m

    def path_length(self) -> float:
        """Metres travelled (sum of the distances between consecutive positions)."""
        return float(np.linalg.norm(np.diff(self.positions, axis=0), axis=1).sum())

    def at(
        self, stamps: Iterable[float], tolerance_s: float = END_TOLERANCE_S, max_gap_s: float | None = None
    ) -> Trajectory:
        """The poses at ``stamps`` (seconds, increasing): positions linear, orientations slerp between the two
        neighbouring poses; a stamp up to ``tolerance_s`` before the first / after the last takes that end pose.
        ``max_gap_s``: refuse a stamp whose two neighbouring poses are further apart (a motion-capture dropout:
        interpolating across it makes up a pose), unless it is within :data:`SAMPLE_TOLERANCE_S` of one of them.

        Raises:
            TrajectoryError: a stamp further outside the trajectory's time, or in a gap wider than ``max_gap_s``,
                or a trajectory of one pose asked for another stamp.
        """
        from scipy.spatial.transform import Rotation, Slerp

        t = np.asarray(list(stamps), np.float64).reshape(-1)
        lo, hi = self.stamps[0], self.stamps[-1]
        out = np.flatnonzero((t < lo - tolerance_s) | (t > hi + tolerance_s))
        if out.size:
            raise TrajectoryError(
                f"{out.size} stamp(s) lie outside the trajectory's time {lo:.6f}..{hi:.6f} s "
                f"(+- {tolerance_s:g} s), e.g. {t[out[0]]:.6f}: the trajectory does not cover the sequence"
            )
        tc = np.clip(t, lo, hi)
        if max_gap_s is not None and len(self) > 1:
            right = np.clip(np.searchsorted(self.stamps, tc), 1, len(self) - 1)
            gap = self.stamps[right] - self.stamps[right - 1]
            near = np.minimum(tc - self.stamps[right - 1], self.stamps[right] - tc) <= SAMPLE_TOLERANCE_S
            bad = np.flatnonzero((gap > max_gap_s) & ~near)
            if bad.size:
                i = bad[0]
                raise TrajectoryError(
                    f"{bad.size} stamp(s) fall in gaps of the trajectory wider than {max_gap_s:g} s, e.g. "
                    f"{t[i]:.6f} in {self.stamps[right[i] - 1]:.6f}..{self.stamps[right[i]]:.6f} s: no pose to compare"
                )
        if len(self) == 1:
            return Trajectory(t, np.repeat(self.positions, len(t), 0), np.repeat(self.quaternions, len(t), 0))
        pos = np.stack([np.interp(tc, self.stamps, self.positions[:, i]) for i in range(3)], axis=1)
        rot = Slerp(self.stamps, Rotation.from_quat(self.quaternions))(tc)
        return Trajectory(t, pos, rot.as_quat())

    @classmethod
    def from_matrices(cls, stamps: Sequence[float], matrices: np.ndarray) -> Trajectory:
        """From (N,) stamps and (N, 4, 4) world-from-camera poses."""
        from scipy.spatial.transform import Rotation

        m = np.asarray(matrices, np.float64)
        return cls(np.asarray(stamps, np.float64), m[:, :3, 3], Rotation.from_matrix(m[:, :3, :3]).as_quat())


@dataclass(frozen=True)
class DriftModel:
    """The seeded odometry drift model of the module doc.

    Attributes (defaults: a drift whose position ATE on TUM fr1/desk's 191 frames, 9.3 m in 23 s, is 0.21 m after
    alignment (0.205-0.223 over seeds 0-4), like a weak visual odometry; issue 29 asks for at least 0.15 m there):
        yaw_per_m: heading bias, rad per metre travelled (0.08 rad/m = 4.6 deg/m).
        scale_error: relative error of each step's length (0.05 = 5 % too long).
        sigma_m: position random walk, m per sqrt(m) travelled.
        sigma_yaw: heading random walk, rad per sqrt(m) travelled.
        seed: numpy Generator seed of the noise.
        up: (3,) axis the heading turns about, in the world frame (TUM motion capture: +z).
    """

    yaw_per_m: float = 0.08
    scale_error: float = 0.05
    sigma_m: float = 0.005
    sigma_yaw: float = 0.005
    seed: int = 0
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)

    @classmethod
    def parse(cls, spec: str) -> DriftModel:
        """``key=value,...`` over the attribute names (``up`` as ``x:y:z``); '' = the defaults.

        Raises:
            TrajectoryError: an unknown key or a value that is not a number.
        """
        kw: dict[str, Any] = {}
        floats = ("yaw_per_m", "scale_error", "sigma_m", "sigma_yaw")
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in (*floats, "seed", "up"):
                raise TrajectoryError(
                    f"drift {item!r}: unknown key {key!r} (yaw_per_m, scale_error, sigma_m, sigma_yaw, seed, up)"
                )
            try:
                if key == "seed":
                    kw[key] = int(value)
                elif key == "up":
                    kw[key] = tuple(float(v) for v in value.split(":"))
                else:
                    kw[key] = float(value)
            except ValueError:
                kind = "an integer" if key == "seed" else "a number"
                raise TrajectoryError(f"drift {item!r}: {value!r} is not {kind}") from None
        model = cls(**kw)
        values = (model.yaw_per_m, model.scale_error, model.sigma_m, model.sigma_yaw, *model.up)
        if not np.all(np.isfinite(values)):
            raise TrajectoryError(f"drift {spec!r}: every value must be finite")
        if len(model.up) != 3 or not np.linalg.norm(model.up) > 0 or min(model.sigma_m, model.sigma_yaw) < 0:
            raise TrajectoryError(f"drift {spec!r}: up must be 3 numbers not all 0, sigmas not negative")
        if not -1.0 < model.scale_error < 1.0:
            raise TrajectoryError(f"drift {spec!r}: scale_error must be in (-1, 1) (a fraction of each step)")
        return model

    def apply(self, truth: Trajectory) -> Trajectory:
        """Odometry from the ground truth ``truth`` (same stamps), as the module doc says."""
        from scipy.spatial.transform import Rotation

        rng = np.random.default_rng(self.seed)
        up = np.asarray(self.up, np.float64) / np.linalg.norm(self.up)
        p, rots = truth.positions, Rotation.from_quat(truth.quaternions)
        pos = np.empty_like(p)
        quat = np.empty_like(truth.quaternions)
        pos[0], quat[0], psi = p[0], truth.quaternions[0], 0.0
        for k in range(1, len(truth)):
            dp = p[k] - p[k - 1]
            d = float(np.linalg.norm(dp))
            psi += self.yaw_per_m * d + self.sigma_yaw * np.sqrt(d) * rng.standard_normal()
            rz = Rotation.from_rotvec(psi * up)
            step = (1 + self.scale_error) * dp + self.sigma_m * np.sqrt(d) * rng.standard_normal(3)
            pos[k] = pos[k - 1] + rz.apply(step)
            quat[k] = (rz * rots[k]).as_quat()
        return Trajectory(truth.stamps, pos, quat)


# -- errors ------------------------------------------------------------------------------------
def to_evo(traj: Trajectory):
    """evo's ``PoseTrajectory3D`` of ``traj`` (a new object: evo's ``align`` changes it in place)."""
    from evo.core.trajectory import PoseTrajectory3D

    q = traj.quaternions
    return PoseTrajectory3D(
        positions_xyz=np.array(traj.positions),
        orientations_quat_wxyz=np.array(q[:, [3, 0, 1, 2]]),  # evo's order: w, x, y, z
        timestamps=np.array(traj.stamps),
    )


def _same_stamps(truth: Trajectory, estimate: Trajectory, what: str) -> None:
    if len(estimate) != len(truth) or not np.allclose(estimate.stamps, truth.stamps, rtol=0, atol=1e-6):
        raise TrajectoryError(
            f"{what}: the estimate ({len(estimate)} poses) and the ground truth ({len(truth)}) must be at the same "
            f"stamps: sample the ground truth with Trajectory.at(estimate.stamps)"
        )


def ate_rmse(truth: Trajectory, estimate: Trajectory) -> float:
    """Position ATE RMSE, metres, of ``estimate`` against ``truth`` (same stamps) after the SE(3) Umeyama
    alignment of the estimate to the truth (no scale): evo's ``APE`` on the translation part.

    Raises:
        TrajectoryError: stamps that differ, or fewer than 3 poses (an alignment needs 3).
    """
    from evo.core import metrics

    _same_stamps(truth, estimate, "ATE")
    if len(truth) < 3:
        raise TrajectoryError(f"ATE needs at least 3 poses to align, got {len(truth)}")
    ref, est = to_evo(truth), to_evo(estimate)
    est.align(ref, correct_scale=False)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    return float(ape.get_statistic(metrics.StatisticsType.rmse))


#: RPE distance, metres: TUM's evaluate_rpe and evo_rpe report drift over a fixed distance; 1 m is a tenth of
#: fr1/desk's path and several keyframes apart
RPE_DELTA_M = 1.0


def rpe(truth: Trajectory, estimate: Trajectory, delta_m: float = RPE_DELTA_M) -> dict[str, float]:
    """Relative pose error RMSE over every pose pair ``delta_m`` metres of path apart (evo's ``RPE``, all pairs,
    no alignment; TUM's evaluate_rpe.py also takes all pairs):
    ``{"translation_rmse_m", "rotation_rmse_deg", "pairs"}``; NaN values and 0 pairs when the path is shorter.

    Raises:
        TrajectoryError: stamps that differ.
    """
    from evo.core import metrics
    from evo.core.units import Unit

    _same_stamps(truth, estimate, "RPE")
    out: dict[str, float] = {}
    for key, rel in (
        ("translation_rmse_m", metrics.PoseRelation.translation_part),
        ("rotation_rmse_deg", metrics.PoseRelation.rotation_angle_deg),
    ):
        r = metrics.RPE(rel, delta=delta_m, delta_unit=Unit.meters, all_pairs=True)
        try:
            r.process_data((to_evo(truth), to_evo(estimate)))
        except metrics.MetricsException:  # no pair that far apart
            return {"translation_rmse_m": float("nan"), "rotation_rmse_deg": float("nan"), "pairs": 0}
        out[key] = float(r.get_statistic(metrics.StatisticsType.rmse))
        out["pairs"] = len(r.error)
    return out


@dataclass(frozen=True)
class LoopTransformError:
    """One METRIC loop pose against the ground truth (query = parent, match = child; docs/poses.md).

    Attributes:
        translation_error_m: ``|t_true - t|``.
        rotation_error_deg: the angle of ``R_true R^T``.
        nees: ``e^T C^-1 e`` with ``e = (w, dt)``, ``R_true = exp([w]x) R``, ``t_true = t + dt``, C the pose's
            (6, 6) covariance (expected value 6 when C is right).
    """

    translation_error_m: float
    rotation_error_deg: float
    nees: float


def loop_transform_error(pose: RelativePose, world_query: np.ndarray, world_match: np.ndarray) -> LoopTransformError:
    """The error of a METRIC ``pose`` given the ground-truth (4, 4) world-from-camera poses of its two keyframes.

    Raises:
        TrajectoryError: a pose that is not METRIC.
    """
    if pose.type != PoseType.METRIC or pose.translation is None:
        raise TrajectoryError(f"a {pose.type.name} loop pose has no translation to score")
    true = np.linalg.inv(world_query) @ world_match  # match camera in query camera: X_q = R X_m + t
    w = rotation_log(true[:3, :3] @ pose.rotation.T)
    dt = true[:3, 3] - pose.translation
    e = np.concatenate([w, dt])
    return LoopTransformError(
        float(np.linalg.norm(dt)), float(np.degrees(np.linalg.norm(w))), float(e @ np.linalg.solve(pose.covariance, e))
    )


def loop_transform_summary(errors: Sequence[LoopTransformError]) -> dict[str, float | int]:
    """``count``, ``median_translation_error_m``, ``median_rotation_error_deg``, ``p95_translation_error_m``,
    ``p95_rotation_error_deg`` and ``nees_mean`` of METRIC loop errors (NaN without any)."""
    if not errors:
        nan = float("nan")
        return {
            "count": 0,
            "median_translation_error_m": nan,
            "median_rotation_error_deg": nan,
            "p95_translation_error_m": nan,
            "p95_rotation_error_deg": nan,
            "nees_mean": nan,
        }
    t = np.array([e.translation_error_m for e in errors])
    r = np.array([e.rotation_error_deg for e in errors])
    return {
        "count": len(errors),
        "median_translation_error_m": float(np.median(t)),
        "median_rotation_error_deg": float(np.median(r)),
        "p95_translation_error_m": float(np.percentile(t, 95)),
        "p95_rotation_error_deg": float(np.percentile(r, 95)),
        "nees_mean": float(np.mean([e.nees for e in errors])),
    }
