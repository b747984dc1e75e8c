"""A reference pose-graph backend for the loops: GTSAM (PyPI ``gtsam``) factors, iSAM2 optimisation. No ROS.

Variables: one ``Pose3`` per keyframe, the keyframe's **camera optical frame** in the map frame
(``T_map_cam``: ``X_map = T X_cam``), keyed by the keyframe id. The map frame is the odometry frame at the
first keyframe (a tight prior fixes it there), so before any loop the optimised poses are the odometry poses.

Factors:

- **odometry**: ``BetweenFactorPose3(previous, current, inv(T_prev) T_cur)`` between consecutive keyframes (in
  the order they are added), Gaussian. Covariance in Pose3's tangent order ``(omega, v)`` (rad, m; body axes of
  the current keyframe's camera): given by the caller (e.g. from the odometry message) or
  :meth:`PoseGraphSettings.odometry_covariance`, sigmas growing with the step (a drift model).
- **loops** (:class:`~pnv_ros.geometry.RelativePose`: parent = query camera, child = matched camera,
  ``X_query = R X_match + t``, docs/poses.md), each under a robust kernel:

  - ``METRIC``: ``BetweenFactorPose3(query, match, Pose3(R, t))``, covariance
    :func:`pnv_ros.loop_pose.gtsam_pose3_covariance` (6 DoF);
  - ``ROTATION_AND_DIRECTION``: GTSAM's ``EssentialMatrixConstraint(query, match, E(R, d))``, the exact 5-DoF
    constraint of a monocular pose (rotation + translation direction, no scale); its error is
    ``(omega_body, a_gtsam)`` with ``omega_body = R^T w`` and ``a_gtsam = B_gtsam^T B a`` (``B`` the pose's
    ``tangent_basis``, ``B_gtsam`` the ``Unit3``'s basis), so the covariance is ``J C J^T`` with
    ``J = blockdiag(R^T, B_gtsam^T B)``;
  - ``ROTATION_ONLY``: ``BetweenFactorPose3(query, match, Pose3(R, 0))`` whose square-root information has
    zero translation rows (GTSAM reads them as infinite sigmas): it constrains the relative rotation alone,
    ``R^T C R`` in body axes, and nothing of the translation. (Pose3's local coordinates give the rotation
    part from the rotations only, so the unknown translation does not leak in.)

Robust kernel: **Cauchy** by default (``noiseModel.mEstimator.Cauchy``), on the whitened error's norm ``e``
(the square root of the Mahalanobis distance), weight ``k^2 / (k^2 + e^2)``. Cauchy, not Huber: Huber's
influence stays constant for large errors (a wrong loop 50 sigmas off still pulls with the force of a 1.345
sigma one, for ever), Cauchy's falls as ``1/e``, so a wrong loop fades while right loops, which agree with each
other and with odometry, keep their weight as the graph converges. ``k`` is per factor dimension ``n``:
``sqrt(chi2.ppf(0.95, n))`` (3.55 for 6 DoF, 3.33 for 5, 2.80 for 3): a loop at the 95 % quantile of its own
covariance keeps half its weight. ``huber`` (same ``k``) and ``none`` are settings.

Optimisation: ``gtsam.ISAM2`` updated with each keyframe and each loop; robust factors are reweighted at
relinearisation, so ``relinearizeSkip`` is 1 and, after a loop, up to :data:`LOOP_ITERATIONS` more updates
iterate the reweighted solution until nothing is relinearised.

The graph is saved as an ``.npz`` (:mod:`pnv_ros.storage`, atomic, never pickled): the keyframes' odometry
poses, stamps and odometry covariances, the loops' measurements and covariances, the optimised poses. Loading
rebuilds the same factors and re-optimises from the saved optimised poses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gtsam
import numpy as np
from scipy.stats import chi2

from pnv_ros.errors import ConfigError, MapError, UnknownPlaceError
from pnv_ros.geometry import PoseType, RelativePose, rotation_log, tangent_basis
from pnv_ros.storage import read_npz, to_json, write_npz_atomic

#: The file's format tag and version (meta "format", "version").
FILE_FORMAT = "pnv_ros pose graph"
FILE_VERSION = 1

#: Sigma (rad, m) of the prior that fixes the first keyframe at its odometry pose (the map frame's origin):
#: a gauge fix, far below any measurement's sigma.
PRIOR_SIGMA = 1e-6

#: Sigma (rad, m) of the weak prior that anchors the first keyframe of a later segment (a new odometry frame:
#: after a restart that loaded the graph, or an odometry reset) at its odometry pose until a loop ties it to the
#: map: against a loop's centimetres it pulls with a millionth of the loop's information, so the loop moves it
#: anywhere; finite so that the segment is determined before its first loop. (3 rad, 100 m made iSAM2 report an
#: indeterminate system next to the 1e-6 gauge prior in test_pose_graph's restart test; 1 rad, 10 m does not.)
SEGMENT_PRIOR_SIGMA = (1.0, 10.0)

#: Robust kernels the loop factors may use.
KERNELS = ("cauchy", "huber", "none")

#: Probability of the chi-square quantile that sets the kernel's ``k`` (see the module docstring).
KERNEL_QUANTILE = 0.95

#: At most this many extra iSAM2 updates after a loop is added (each relinearises and reweights the robust
#: factors once); they stop early when an update relinearises no variable (converged to RELINEARIZE_THRESHOLD).
LOOP_ITERATIONS = 10

#: iSAM2 relinearisation threshold (rad / m on the tangent): GTSAM's default is 0.1. Measured on
#: test_pose_graph's square (50 keyframes, 9 loops): 0.01 leaves the optimum 0.4 mm from a graph rebuilt from
#: the same factors (iSAM2 stops relinearising within the threshold) and a direction loop 10 % off its
#: fit; 0.001 agrees to 1e-6 m at twice the time (60 ms for the whole square).
RELINEARIZE_THRESHOLD = 0.001

#: A loop above ``max_loop_error`` is removed only while at least this many other loops sit within their
#: kernel's ``k`` (a consistent map contradicts it). Without them a large error says as much about the odometry:
#: the first true loop after a long drift under overconfident odometry covariances ends 15 to 300 sigmas off
#: before later loops pull the graph over (benchmarks/pose_graph_fr1_desk.py, default settings).
MIN_SUPPORT = 2

#: iSAM2's factorization: QR, not GTSAM's default Cholesky. Cholesky squares the condition number: on a straight
#: run with no loop (default drift model, a keyframe every 0.5 m) the lateral uncertainty grows to hundreds of
#: metres against the 1e-6 gauge prior and Cholesky reported an indeterminate system after 504 m (0.15 m spacing:
#: 301 m); QR ran 2,000 m, at the same speed here (1,000 keyframes in 0.9 s both).
FACTORIZATION = "QR"

#: The smallest sigma (rad, m) a loop or odometry covariance may claim (its smallest eigenvalue's square root): a
#: micro-radian or micrometre is finer than any camera or odometry measures; smaller ones only make the system
#: ill-conditioned (a loop with a 1e-10 rad sigma stopped iSAM2).
MIN_SIGMA = 1e-6

#: Loop types the graph takes, with the dimension of their factor's error.
LOOP_DIMS = {PoseType.METRIC: 6, PoseType.ROTATION_AND_DIRECTION: 5, PoseType.ROTATION_ONLY: 3}


def kernel_k(dim: int) -> float:
    """The robust kernel's ``k`` for a ``dim``-dimensional factor: ``sqrt(chi2.ppf(KERNEL_QUANTILE, dim))``."""
    return float(np.sqrt(chi2.ppf(KERNEL_QUANTILE, dim)))


@dataclass(frozen=True)
class PoseGraphSettings:
    """The backend's settings (the node's ``pose_graph`` parameters).

    The default odometry model, used when the caller gives no covariance for a step: sigmas of a step that
    moves ``d`` metres and turns ``a`` radians are ``sigma_t = translation_floor_m + translation_per_m * d``
    (each axis) and ``sigma_r = rotation_floor_rad + rotation_per_rad * a + rotation_per_m * d``. Defaults
    (5 % of the distance, 1.1 deg per metre, 5 % of the turn) are a generic visual or wheel odometry's
    drift, conservative against KITTI-class visual odometry (about 1 % and 0.3 deg / 100 m there); set them
    to your odometry's.

    ``max_loop_error`` (sigmas): after each loop the graph is optimised and a loop whose whitened error norm
    (:meth:`PoseGraph.loop_errors`) is still above it is removed from the graph, the worst first, then the graph
    is optimised again (RTAB-Map's ``RGBD/OptimizeMaxError`` check, in the same units), provided at least
    :data:`MIN_SUPPORT` other loops agree with the map (within their kernel's ``k``). The kernel alone lets a
    wrong loop keep a small pull (``k^2 / e`` in sigmas); on a 16-keyframe graph that was 12 % of the ATE. 10:
    an error norm of 10 has a chance below 1e-17 for a 6-DoF loop with an honest covariance; measured on TUM
    fr1/desk's accepted loops (7 to 35 of them, covariances calibrated to NEES 6), true loops end at most 1.9 and
    injected wrong loops at 38 to 223.
    """

    translation_floor_m: float = field(
        default=0.002, metadata={"range": (1e-6, 10.0), "help": "odometry: translation sigma of any step (m)"}
    )
    translation_per_m: float = field(
        default=0.05, metadata={"range": (0.0, 10.0), "help": "odometry: translation sigma per metre moved"}
    )
    rotation_floor_rad: float = field(
        default=0.002, metadata={"range": (1e-6, 3.2), "help": "odometry: rotation sigma of any step (rad)"}
    )
    rotation_per_rad: float = field(
        default=0.05, metadata={"range": (0.0, 10.0), "help": "odometry: rotation sigma per radian turned"}
    )
    rotation_per_m: float = field(
        default=0.02, metadata={"range": (0.0, 10.0), "help": "odometry: rotation sigma per metre moved (rad / m)"}
    )
    max_loop_error: float = field(
        default=10.0,
        metadata={
            "range": (0.0, 1e6),
            "help": "a loop whose whitened error at the optimum exceeds this (sigmas) is removed (0: never)",
        },
    )
    robust_kernel: str = field(
        default="cauchy",
        metadata={
            "choices": KERNELS,
            "help": "robust kernel of the loop factors: cauchy (a wrong loop fades) | huber | none",
        },
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if "range" in f.metadata:
                lo, hi = f.metadata["range"]
                if not (isinstance(v, (int, float)) and lo <= v <= hi):
                    raise ConfigError(f"pose graph setting {f.name}={v!r} is outside [{lo}, {hi}]")
            elif v not in f.metadata["choices"]:
                raise ConfigError(f"pose graph setting {f.name}={v!r}: choose one of {', '.join(KERNELS)}")

    def odometry_covariance(self, step: np.ndarray) -> np.ndarray:
        """(6, 6) diagonal covariance of an odometry step ``step`` (4, 4; ``inv(T_prev) T_cur``) in Pose3's
        tangent order (rad^2, m^2)."""
        d = float(np.linalg.norm(step[:3, 3]))
        a = float(np.linalg.norm(rotation_log(step[:3, :3])))
        st = self.translation_floor_m + self.translation_per_m * d
        sr = self.rotation_floor_rad + self.rotation_per_rad * a + self.rotation_per_m * d
        return np.diag([sr**2] * 3 + [st**2] * 3)


@dataclass(frozen=True, eq=False)
class Loop:
    """A loop as the graph stores it: ``between(query, match)`` measured, in the contract's convention.

    ``vector``: METRIC the translation (m), ROTATION_AND_DIRECTION the unit direction, ROTATION_ONLY zeros.
    ``covariance``: the RelativePose's (6, 6) / (5, 5) / (3, 3) covariance of ``(w, dt)`` / ``(w, a)`` / ``w``.
    """

    query_id: int
    match_id: int
    type: PoseType
    rotation: np.ndarray
    vector: np.ndarray
    covariance: np.ndarray

    @classmethod
    def from_pose(cls, query_id: int, match_id: int, pose: RelativePose) -> Loop:
        """The loop of a :class:`RelativePose` (raises :class:`ConfigError` for type NONE)."""
        if pose.type not in LOOP_DIMS:
            raise ConfigError(f"a {pose.type.name} pose constrains nothing")
        vector = {
            PoseType.METRIC: pose.translation,
            PoseType.ROTATION_AND_DIRECTION: pose.direction,
            PoseType.ROTATION_ONLY: np.zeros(3),
        }[pose.type]
        return cls(int(query_id), int(match_id), pose.type, pose.rotation, np.asarray(vector, float), pose.covariance)

    def gtsam_covariance(self) -> np.ndarray:
        """The covariance in the factor's own error coordinates (see the module docstring)."""
        r = np.asarray(self.rotation)
        if self.type == PoseType.METRIC:
            j = np.zeros((6, 6))
            j[:3, :3] = j[3:, 3:] = r.T
        elif self.type == PoseType.ROTATION_AND_DIRECTION:
            j = np.zeros((5, 5))
            j[:3, :3] = r.T
            j[3:, 3:] = gtsam.Unit3(self.vector).basis().T @ tangent_basis(self.vector)
        else:
            j = r.T
        return j @ self.covariance @ j.T

    def factor(self, kernel: str) -> gtsam.NonlinearFactor:
        """The GTSAM factor between keys ``query_id`` and ``match_id`` under ``kernel`` (one of KERNELS)."""
        dim = LOOP_DIMS[self.type]
        cov = self.gtsam_covariance()
        rot = gtsam.Rot3(np.asarray(self.rotation))
        if self.type == PoseType.ROTATION_ONLY:
            sqrt_info = np.zeros((6, 6))
            sqrt_info[:3, :3] = np.linalg.cholesky(np.linalg.inv(cov)).T
            noise = gtsam.noiseModel.Gaussian.SqrtInformation(sqrt_info)
        else:
            noise = gtsam.noiseModel.Gaussian.Covariance(cov)
        if kernel != "none":
            est = gtsam.noiseModel.mEstimator
            m = (est.Cauchy if kernel == "cauchy" else est.Huber).Create(kernel_k(dim))
            noise = gtsam.noiseModel.Robust.Create(m, noise)
        if self.type == PoseType.ROTATION_AND_DIRECTION:
            e = gtsam.EssentialMatrix(rot, gtsam.Unit3(self.vector))
            return gtsam.EssentialMatrixConstraint(self.query_id, self.match_id, e, noise)
        return gtsam.BetweenFactorPose3(self.query_id, self.match_id, gtsam.Pose3(rot, self.vector), noise)


class PoseGraph:
    """Keyframes (odometry poses), odometry and loop factors, and their iSAM2 optimum.

    Poses are (4, 4) homogeneous ``T_frame_cam`` of the keyframe's camera optical frame: odometry poses in
    the odometry frame, optimised ones in the map frame. Ids are the detector's keyframe ids (GTSAM keys).
    """

    def __init__(self, settings: PoseGraphSettings | None = None) -> None:
        self.settings = settings or PoseGraphSettings()
        params = gtsam.ISAM2Params()
        params.setRelinearizeThreshold(RELINEARIZE_THRESHOLD)
        params.relinearizeSkip = 1
        params.setFactorization(FACTORIZATION)
        self._params = params
        self._isam = gtsam.ISAM2(params)
        self._ids: list[int] = []
        self._index: dict[int, int] = {}
        self._stamps: list[int] = []
        self._odometry: list[np.ndarray] = []
        self._odometry_cov: list[np.ndarray] = []
        self._loops: list[Loop] = []
        self._loop_factor: list[int] = []  # iSAM2's index of each loop's factor
        self._rejected: list[Loop] = []
        self._estimate = gtsam.Values()

    # -- building ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[int]:
        """Keyframe ids in the order they were added."""
        return list(self._ids)

    @property
    def loops(self) -> list[Loop]:
        """The loops in the graph, in the order they were added (without the rejected ones)."""
        return list(self._loops)

    @property
    def rejected_loops(self) -> list[Loop]:
        """The loops removed for an error above ``settings.max_loop_error`` (see :class:`PoseGraphSettings`)."""
        return list(self._rejected)

    def __contains__(self, kf_id: int) -> bool:
        return int(kf_id) in self._index

    def add_keyframe(
        self,
        kf_id: int,
        stamp_ns: int,
        pose: np.ndarray,
        covariance: np.ndarray | None = None,
        new_segment: bool = False,
    ) -> None:
        """Add keyframe ``kf_id`` (its image's stamp, integer ns) at odometry pose ``pose`` (4, 4), linked to the
        previous one.

        covariance: (6, 6) of the odometry step from the previous keyframe in Pose3's tangent order (rad^2,
        m^2), or None for the settings' model. The first keyframe gets a prior instead.
        new_segment: the pose is in another odometry frame than the previous keyframe's (a restart after
            :meth:`load`, an odometry reset): no odometry factor; a weak prior (:data:`SEGMENT_PRIOR_SIGMA`)
            at ``pose`` holds the segment until a loop ties it to the map.

        Raises:
            MapError: ``kf_id`` already in the graph.
            ConfigError: a pose that is not a finite rigid transform, a covariance that is not (6, 6)
                symmetric positive definite.
        """
        kf_id = int(kf_id)
        if kf_id in self._index:
            raise MapError(f"keyframe {kf_id} is already in the pose graph")
        pose = _check_pose(pose, f"keyframe {kf_id}'s odometry pose")
        linked = bool(self._ids) and not new_segment
        if not linked:
            covariance = np.zeros((6, 6))  # a prior instead (PRIOR_SIGMA, SEGMENT_PRIOR_SIGMA): marks it in files
        elif covariance is None:
            covariance = self.settings.odometry_covariance(np.linalg.inv(self._odometry[-1]) @ pose)
        else:
            covariance = _check_covariance(covariance, 6, f"keyframe {kf_id}'s odometry covariance")
        self._insert(kf_id, int(stamp_ns), pose, covariance, initial=None)

    def _insert(self, kf_id: int, stamp_ns: int, pose: np.ndarray, cov: np.ndarray, initial: np.ndarray | None) -> None:
        """Add the keyframe's variable and factor; ``cov`` all zeros = a segment start (a prior)."""
        graph = gtsam.NonlinearFactorGraph()
        values = gtsam.Values()
        if self._ids and np.any(cov):
            prev = self._ids[-1]
            step = np.linalg.inv(self._odometry[-1]) @ pose
            noise = gtsam.noiseModel.Gaussian.Covariance(cov)
            graph.add(gtsam.BetweenFactorPose3(prev, kf_id, gtsam.Pose3(step), noise))
            guess = self._estimate.atPose3(prev).matrix() @ step if initial is None else initial
        else:
            sigmas = [PRIOR_SIGMA] * 6 if not self._ids else [SEGMENT_PRIOR_SIGMA[0]] * 3 + [SEGMENT_PRIOR_SIGMA[1]] * 3
            noise = gtsam.noiseModel.Diagonal.Sigmas(np.array(sigmas))
            graph.add(gtsam.PriorFactorPose3(kf_id, gtsam.Pose3(pose), noise))
            guess = pose if initial is None else initial
        values.insert(kf_id, gtsam.Pose3(guess))
        self._update(graph, values, f"keyframe {kf_id}")
        self._ids.append(kf_id)
        self._index[kf_id] = len(self._ids) - 1
        self._stamps.append(stamp_ns)
        self._odometry.append(pose)
        self._odometry_cov.append(cov)
        self._estimate = self._isam.calculateEstimate()

    def add_loop(self, query_id: int, match_id: int, pose: RelativePose | Loop) -> bool:
        """Add a loop: ``pose`` is the matched keyframe's camera in the query keyframe's camera (docs/poses.md).
        Returns False when the loop (or an earlier one) was removed again for its error at the optimum (see
        :class:`PoseGraphSettings` ``max_loop_error``; :attr:`rejected_loops`), True when it stays.

        Raises:
            UnknownPlaceError: a keyframe id not in the graph (add keyframes first).
            ConfigError: a pose of type NONE, or one whose covariance is not symmetric positive definite.
        """
        loop = pose if isinstance(pose, Loop) else Loop.from_pose(query_id, match_id, pose)
        loop = dataclasses.replace(loop, query_id=int(query_id), match_id=int(match_id))
        for k in (loop.query_id, loop.match_id):
            if k not in self._index:
                raise UnknownPlaceError(f"keyframe {k} is not in the pose graph (a loop arrived before it)")
        if loop.query_id == loop.match_id:
            raise ConfigError(f"a loop from keyframe {loop.query_id} to itself")
        what = f"loop {loop.query_id}->{loop.match_id}"
        _check_pose(_rigid(loop.rotation, loop.vector), f"{what}'s pose")
        if loop.type == PoseType.ROTATION_AND_DIRECTION and abs(np.linalg.norm(loop.vector) - 1.0) > 1e-6:
            raise ConfigError(f"{what}'s direction is not a unit vector")
        _check_covariance(loop.covariance, LOOP_DIMS[loop.type], f"{what}'s covariance")
        graph = gtsam.NonlinearFactorGraph()
        graph.add(loop.factor(self.settings.robust_kernel))
        index = self._update(graph, gtsam.Values(), what).getNewFactorsIndices()[0]
        self._loops.append(loop)
        self._loop_factor.append(int(index))
        try:
            self.optimize(LOOP_ITERATIONS)
        except RuntimeError as e:  # GTSAM refused the system with this loop: the graph as it was before it
            self._loops.pop()
            self._loop_factor.pop()
            self._rebuild()
            raise ConfigError(f"{what} refused: GTSAM: {_first_line(e)}") from None
        return self._reject_outliers() is not loop

    def _update(self, graph: gtsam.NonlinearFactorGraph, values: gtsam.Values, what: str) -> gtsam.ISAM2Result:
        """One iSAM2 update with new factors; a GTSAM error (an indeterminate system) leaves the graph as it was
        (rebuilt from its keyframes and loops) and raises :class:`ConfigError`."""
        try:
            return self._isam.update(graph, values)
        except RuntimeError as e:
            self._rebuild()
            raise ConfigError(f"{what} refused: GTSAM: {_first_line(e)}") from None

    def _rebuild(self) -> None:
        """A fresh iSAM2 with the stored keyframes and loops, started from the last estimate (after a GTSAM error
        left the old one unusable)."""
        start = {k: self._estimate.atPose3(k).matrix() for k in self._ids if self._estimate.exists(k)}
        items = list(zip(self._ids, self._stamps, self._odometry, self._odometry_cov))
        loops = list(self._loops)
        self._isam = gtsam.ISAM2(self._params)
        self._ids, self._index, self._stamps, self._odometry, self._odometry_cov = [], {}, [], [], []
        self._loops, self._loop_factor, self._estimate = [], [], gtsam.Values()
        for kf_id, stamp, pose, cov in items:
            self._insert(kf_id, stamp, pose, cov, initial=start.get(kf_id))
        for loop in loops:
            graph = gtsam.NonlinearFactorGraph()
            graph.add(loop.factor(self.settings.robust_kernel))
            self._loop_factor.append(int(self._isam.update(graph, gtsam.Values()).getNewFactorsIndices()[0]))
            self._loops.append(loop)
            self.optimize(LOOP_ITERATIONS)  # after each, as they came (a robust optimum depends on the path)

    def _reject_outliers(self) -> Loop | None:
        """Remove the loops above ``max_loop_error`` at the optimum, the worst first, re-optimising after each;
        returns the last one removed (None: none)."""
        gate, last = self.settings.max_loop_error, None
        while gate > 0 and self._loops:
            errors = self.loop_errors()
            worst = int(np.argmax(errors))
            if errors[worst] <= gate:
                break
            dims = np.array([LOOP_DIMS[lp.type] for lp in self._loops])
            support = sum(e <= kernel_k(d) for e, d in zip(errors, dims))
            if support < MIN_SUPPORT:  # no consistent loops yet: the graph may still be bending towards it
                break
            last = self._loops.pop(worst)
            self._rejected.append(last)
            self._isam.update(gtsam.NonlinearFactorGraph(), gtsam.Values(), [self._loop_factor.pop(worst)])
            self.optimize(LOOP_ITERATIONS)
        return last

    def optimize(self, iterations: int = LOOP_ITERATIONS) -> int:
        """Run up to ``iterations`` more iSAM2 updates (each relinearises and reweights the robust factors once),
        stopping at the first that relinearises nothing; returns how many ran."""
        n = 0
        while n < iterations:
            n += 1
            if self._isam.update().getVariablesRelinearized() == 0:
                break
        self._estimate = self._isam.calculateEstimate()
        return n

    # -- results ----------------------------------------------------------------------------------
    def pose(self, kf_id: int) -> np.ndarray:
        """(4, 4) optimised ``T_map_cam`` of keyframe ``kf_id`` (raises :class:`UnknownPlaceError`)."""
        if int(kf_id) not in self._index:
            raise UnknownPlaceError(f"keyframe {kf_id} is not in the pose graph")
        return self._estimate.atPose3(int(kf_id)).matrix()

    def optimized_poses(self) -> np.ndarray:
        """(n, 4, 4) optimised poses in the order of :attr:`ids`."""
        return np.array([self._estimate.atPose3(k).matrix() for k in self._ids]).reshape(-1, 4, 4)

    @property
    def segment_starts(self) -> list[int]:
        """Ids of the keyframes that start a segment (the first, and each ``new_segment``)."""
        return [k for k, c in zip(self._ids, self._odometry_cov) if not np.any(c)]

    def odometry_poses(self) -> np.ndarray:
        """(n, 4, 4) odometry poses in the order of :attr:`ids`."""
        return np.array(self._odometry).reshape(-1, 4, 4)

    def stamp(self, kf_id: int) -> int:
        """The image stamp (ns) of keyframe ``kf_id`` (raises :class:`UnknownPlaceError`)."""
        if int(kf_id) not in self._index:
            raise UnknownPlaceError(f"keyframe {kf_id} is not in the pose graph")
        return self._stamps[self._index[int(kf_id)]]

    @property
    def stamps(self) -> np.ndarray:
        """(n,) keyframe stamps, integer ns (int64), in the order of :attr:`ids`."""
        return np.array(self._stamps, dtype=np.int64)

    def map_to_odom(self) -> np.ndarray:
        """(4, 4) ``T_map_odom`` = newest keyframe's ``T_map_cam inv(T_odom_cam)`` (identity when empty).

        The camera extrinsic cancels, so this is also the map -> odom transform of the robot's base frame."""
        if not self._ids:
            return np.eye(4)
        return self.pose(self._ids[-1]) @ np.linalg.inv(self._odometry[-1])

    def loop_errors(self) -> np.ndarray:
        """(m,) each loop's whitened error norm ``e`` (sqrt of its Mahalanobis distance) at the optimum; the
        Cauchy weight is ``k^2 / (k^2 + e^2)`` (:func:`kernel_k`): a loop with ``e >> k`` is treated as wrong."""
        out = [np.sqrt(2.0 * loop.factor("none").error(self._estimate)) for loop in self._loops]
        return np.array(out, dtype=np.float64)

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the graph to ``path`` (.npz, atomic; raises :class:`~pnv_ros.errors.OutputError`)."""
        m = len(self._loops)
        cov = np.zeros((m, 6, 6))
        for i, loop in enumerate(self._loops):
            d = LOOP_DIMS[loop.type]
            cov[i, :d, :d] = loop.covariance
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "settings": dataclasses.asdict(self.settings)}
        arrays = {
            "meta": np.array(to_json(meta, indent=None)),
            "keyframe_ids": np.array(self._ids, dtype=np.int64),
            "stamps": self.stamps,
            "odometry": self.odometry_poses(),
            "odometry_covariance": np.array(self._odometry_cov, dtype=np.float64).reshape(-1, 6, 6),
            "optimized": self.optimized_poses(),
            "loop_query": np.array([lp.query_id for lp in self._loops], dtype=np.int64),
            "loop_match": np.array([lp.match_id for lp in self._loops], dtype=np.int64),
            "loop_type": np.array([int(lp.type) for lp in self._loops], dtype=np.int64),
            "loop_rotation": np.array([lp.rotation for lp in self._loops], dtype=np.float64).reshape(-1, 3, 3),
            "loop_vector": np.array([lp.vector for lp in self._loops], dtype=np.float64).reshape(-1, 3),
            "loop_covariance": cov,
        }
        write_npz_atomic(Path(path), arrays, sync=True)

    @classmethod
    def load(cls, path: str | Path, settings: PoseGraphSettings | None = None) -> PoseGraph:
        """Read a graph written by :meth:`save` and re-optimise it (from its saved optimised poses).

        settings: None = the file's own; else these (e.g. another robust kernel); the saved odometry
        covariances are kept either way.

        Raises:
            MapError: the file is missing, unreadable, of another format or version, or inconsistent
                (shapes, non-finite values, non-rotations, duplicate ids, loops naming unknown keyframes).
        """
        data, meta = read_npz(Path(path), MapError, "pose graph")
        if meta.get("format") != FILE_FORMAT or meta.get("version") != FILE_VERSION:
            raise MapError(
                f"pose graph {path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                f"not {FILE_FORMAT!r} version {FILE_VERSION}"
            )
        try:
            return cls._from_arrays(data, meta, settings)
        except (ConfigError, MapError, UnknownPlaceError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise MapError(f"pose graph {path} is inconsistent: {e}") from None

    @classmethod
    def _from_arrays(cls, data: dict[str, np.ndarray], meta: dict[str, Any], settings: PoseGraphSettings | None):
        if settings is None:
            settings = PoseGraphSettings(**meta["settings"])
        ids = _array(data, "keyframe_ids", (-1,), np.integer)
        n = len(ids)
        if len(set(ids.tolist())) != n:
            raise ValueError("duplicate keyframe ids")
        stamps = _array(data, "stamps", (n,), np.integer)
        odom = _array(data, "odometry", (n, 4, 4), np.floating)
        odom_cov = _array(data, "odometry_covariance", (n, 6, 6), np.floating)
        optimized = _array(data, "optimized", (n, 4, 4), np.floating)
        lq = _array(data, "loop_query", (-1,), np.integer)
        m = len(lq)
        lm = _array(data, "loop_match", (m,), np.integer)
        lt = _array(data, "loop_type", (m,), np.integer)
        lr = _array(data, "loop_rotation", (m, 3, 3), np.floating)
        lv = _array(data, "loop_vector", (m, 3), np.floating)
        lc = _array(data, "loop_covariance", (m, 6, 6), np.floating)
        graph = cls(settings)
        for i in range(n):
            what = f"keyframe {int(ids[i])}"
            pose = _check_pose(odom[i], f"{what}'s odometry pose")
            start = _check_pose(optimized[i], f"{what}'s optimised pose")
            start_segment = i == 0 or not np.any(odom_cov[i])
            cov = np.zeros((6, 6)) if start_segment else _check_covariance(odom_cov[i], 6, f"{what}'s covariance")
            graph._insert(int(ids[i]), int(stamps[i]), pose, cov, initial=start)
        for j in range(m):
            if int(lt[j]) not in {int(t) for t in LOOP_DIMS}:
                raise ValueError(f"loop {j} has type {int(lt[j])}")
            t = PoseType(int(lt[j]))
            d = LOOP_DIMS[t]
            loop = Loop(int(lq[j]), int(lm[j]), t, lr[j], lv[j], lc[j, :d, :d])
            graph.add_loop(loop.query_id, loop.match_id, loop)
        return graph


def odometry_step_covariance(prev: np.ndarray, cur: np.ndarray, rotation: np.ndarray) -> np.ndarray | None:
    """The covariance of an odometry step from two ``nav_msgs/Odometry`` pose covariances, or None.

    prev, cur: (6, 6) pose covariances of the previous and the current keyframe's odometry messages, ROS order
    (x, y, z, rx, ry, rz), in the odometry frame's axes (``header.frame_id``). A dead-reckoning odometry's
    covariance grows by the step's: ``cur - prev`` (first order, the growth from the step alone).
    rotation: (3, 3) the current camera's rotation in the odometry frame (``R_odom_cam``): the step's error is
    in the camera's (body) axes in GTSAM's Pose3 tangent.

    Returns the (6, 6) step covariance in Pose3 order (rotation, translation; rad^2, m^2), or None when the
    messages carry none (all zero), a constant one (``cur - prev`` zero) or one that shrank (not positive
    definite): then the drift model applies (the node's parameters).
    """
    d = np.asarray(cur, np.float64) - np.asarray(prev, np.float64)
    if not (np.all(np.isfinite(d)) and np.any(d)):
        return None
    order = [3, 4, 5, 0, 1, 2]  # ROS (trans, rot) -> Pose3 (rot, trans)
    a = np.zeros((6, 6))
    a[:3, :3] = a[3:, 3:] = np.asarray(rotation, np.float64).T
    c = a @ d[np.ix_(order, order)] @ a.T
    c = 0.5 * (c + c.T)
    try:
        np.linalg.cholesky(c)
    except np.linalg.LinAlgError:
        return None
    return c


# -- checks -----------------------------------------------------------------------------------------
def _array(data: dict[str, np.ndarray], name: str, shape: tuple[int, ...], kind: type) -> np.ndarray:
    if name not in data:
        raise ValueError(f"array {name!r} is missing")
    a = np.asarray(data[name])
    if not np.issubdtype(a.dtype, kind):
        raise ValueError(f"array {name!r} has dtype {a.dtype}")
    if a.ndim != len(shape) or any(w not in (-1, s) for w, s in zip(shape, a.shape)):
        raise ValueError(f"array {name!r} has shape {a.shape}, not {tuple(shape)}")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise ValueError(f"array {name!r} holds NaN or infinity")
    return a


def pose_matrix(position: Any, quaternion_xyzw: Any) -> np.ndarray:
    """(4, 4) from a position (3,) and a quaternion (x, y, z, w), normalised here (ROS messages, parameters)."""
    from scipy.spatial.transform import Rotation

    q = np.asarray(quaternion_xyzw, dtype=np.float64)
    return _rigid(Rotation.from_quat(q / np.linalg.norm(q)).as_matrix(), position)


def _rigid(rotation: Any, translation: Any) -> np.ndarray:
    """(4, 4) from a (3, 3) and a (3,) (unchecked)."""
    p = np.eye(4)
    p[:3, :3] = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    p[:3, 3] = np.asarray(translation, dtype=np.float64).reshape(3)
    return p


def _check_pose(pose: Any, what: str) -> np.ndarray:
    """A finite (4, 4) rigid transform (rotation orthonormal to 1e-6, det +1, last row 0 0 0 1)."""
    p = np.asarray(pose, dtype=np.float64)
    if p.shape != (4, 4) or not np.all(np.isfinite(p)):
        raise ConfigError(f"{what} is not a finite (4, 4) matrix")
    r = p[:3, :3]
    if not (np.allclose(r.T @ r, np.eye(3), atol=1e-6) and np.linalg.det(r) > 0 and np.allclose(p[3], [0, 0, 0, 1])):
        raise ConfigError(f"{what} is not a rigid transform (rotation, translation; last row 0 0 0 1)")
    return p.copy()


def _check_covariance(cov: Any, dim: int, what: str) -> np.ndarray:
    """A finite, symmetric, positive definite (dim, dim) matrix."""
    c = np.asarray(cov, dtype=np.float64)
    if c.shape != (dim, dim) or not np.all(np.isfinite(c)):
        raise ConfigError(f"{what} is not a finite ({dim}, {dim}) matrix")
    if not np.allclose(c, c.T, rtol=1e-9, atol=1e-15 + 1e-9 * float(np.abs(c).max())):
        raise ConfigError(f"{what} is not symmetric")
    try:
        np.linalg.cholesky(c)
    except np.linalg.LinAlgError:
        raise ConfigError(f"{what} is not positive definite") from None
    smallest = float(np.sqrt(max(np.linalg.eigvalsh(c)[0], 0.0)))
    if smallest < MIN_SIGMA:
        raise ConfigError(f"{what} claims a sigma of {smallest:.1e}, below MIN_SIGMA {MIN_SIGMA:g}: not a measurement")
    return c


def _first_line(e: Exception) -> str:
    """A GTSAM error's message in one line (its text spans several)."""
    return " ".join(str(e).split())[:300]
