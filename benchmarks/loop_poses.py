"""Loop poses on TUM fr1/desk against motion-capture ground truth: today's patch-centre poses next to the
local-feature poses of :mod:`pnv_ros.loop_pose`, with and without depth (issue 28).

    .venv/bin/python benchmarks/loop_poses.py [--data ../shared/data/tum_rgbd_fr1_desk] [--no-model]
        [--md docs/results/loop_poses.md] [--json docs/results/loop_poses.json]

Pairs (the rule, from the timestamps and ground truth only):

- revisit: for each frame q, the earlier frames m at least ``MIN_GAP_S`` (8 s) before it whose camera centre
  is within ``REVISIT_M`` (0.5 m) and whose orientation is within ``REVISIT_DEG`` (20 deg); of those, the one
  with the nearest camera centre. One pair per query frame that has any.
- control: for ``N_CONTROLS`` query frames spread evenly over the sequence (those with any candidate), the
  earlier frame at least 8 s before with the camera centre more than ``CONTROL_M`` (1 m) away or the
  orientation more than ``CONTROL_DEG`` (60 deg) off that is nearest in time (the most similar such frame).

Poses (parent = query, child = match, ``X_parent = R X_child + t``) are compared with the ground truth
``T_q^-1 T_m`` (TUM poses of the colour camera's optical centre in the world). Errors: rotation = angle of
``R_gt R^T``; direction = angle between ``t_gt`` and the estimate's direction; translation = ``|t_gt - t|``
(METRIC). NEES: ``e^T C^-1 e`` with e the error in the pose's own covariance coordinates: (w, dt) for METRIC
(6-D, ideal mean 6), w for the rotation (3-D, ideal 3), the direction's tangent coordinates (2-D, ideal 2).

Rows:

- ``patch (today)``: the pose before issue 28 (patch centres of the default model's verified matches,
  geometry.relative_pose with K on raw pixels, as that detector's _pose did);
- ``local, no depth`` / ``local, depth``: estimate_loop_pose on SIFT features (camera with distortion), with
  ``guided``: only local matches near the verified patch correspondences (``--no-model`` skips the model).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pnv_ros.camera_model import CameraModel
from pnv_ros.geometry import PoseType, RelativePose, relative_pose, rotation_log
from pnv_ros.local_features import LocalFeatures, depth_in_metres, extract_local_features
from pnv_ros.loop_pose import estimate_loop_pose

MIN_GAP_S = 8.0
REVISIT_M, REVISIT_DEG = 0.5, 20.0
CONTROL_M, CONTROL_DEG = 1.0, 60.0
N_CONTROLS = 20
#: fr1/desk's PNG depth: 5000 units per metre (TUM's file formats page)
TUM_DEPTH_SCALE = 5000.0


@dataclass
class Frame:
    stamp: str
    rgb: Path
    depth: Path
    pose: np.ndarray  # (4, 4) world <- camera


def _quat_to_matrix(q) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_quat(q).as_matrix()


def load_set(root: Path) -> tuple[list[Frame], CameraModel]:
    """Frames of a TUM-layout folder (associations.txt, groundtruth_at_rgb.txt) and its camera.yaml."""
    gt = {}
    for line in (root / "groundtruth_at_rgb.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        v = line.split()
        t = np.eye(4)
        t[:3, :3] = _quat_to_matrix([float(x) for x in v[4:8]])
        t[:3, 3] = [float(x) for x in v[1:4]]
        gt[v[0]] = t
    frames = []
    for line in (root / "associations.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        v = line.split()
        if v[0] in gt:
            frames.append(Frame(v[0], root / v[1], root / v[3], gt[v[0]]))
    frames.sort(key=lambda f: float(f.stamp))
    return frames, CameraModel.load_yaml(root / "camera.yaml")


def _angle_deg(r: np.ndarray) -> float:
    return float(np.degrees(np.linalg.norm(rotation_log(r))))


def build_pairs(frames: list[Frame]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(revisits, controls) as (query index, match index) pairs, by the module docstring's rule."""
    ts = np.array([float(f.stamp) for f in frames])
    c = np.array([f.pose[:3, 3] for f in frames])
    revisits, control_cands = [], []
    for q, fq in enumerate(frames):
        earlier = np.flatnonzero(ts <= ts[q] - MIN_GAP_S)
        if len(earlier) == 0:
            continue
        dist = np.linalg.norm(c[earlier] - c[q], axis=1)
        ang = np.array([_angle_deg(fq.pose[:3, :3].T @ frames[m].pose[:3, :3]) for m in earlier])
        ok = (dist <= REVISIT_M) & (ang <= REVISIT_DEG)
        if ok.any():
            revisits.append((q, int(earlier[ok][np.argmin(dist[ok])])))
        far = (dist > CONTROL_M) | (ang > CONTROL_DEG)
        if far.any():
            control_cands.append((q, int(earlier[far].max())))
    pick = np.linspace(0, len(control_cands) - 1, min(N_CONTROLS, len(control_cands))).round().astype(int)
    return revisits, [control_cands[i] for i in sorted(set(pick.tolist()))]


def load_local(frame: Frame, camera: CameraModel) -> tuple[LocalFeatures, float]:
    """SIFT features with depth points of one frame, and the extraction time (s)."""
    import cv2

    img = cv2.cvtColor(cv2.imread(str(frame.rgb), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    depth = depth_in_metres(cv2.imread(str(frame.depth), cv2.IMREAD_UNCHANGED), "16UC1", TUM_DEPTH_SCALE)
    t = time.perf_counter()
    f = extract_local_features(img, camera, depth)
    return f, time.perf_counter() - t


def without_depth(f: LocalFeatures) -> LocalFeatures:
    """The features of a camera without depth (the "no depth" rows take it from both keyframes)."""
    return LocalFeatures(f.keypoints, f.descriptors, f.rays, None)


def pose_errors(pose: RelativePose | None, truth: np.ndarray) -> dict:
    """Errors and NEES of a pose against the ground-truth (4, 4) ``T_q^-1 T_m``."""
    if pose is None:
        return {"type": "NONE"}
    r_gt, t_gt = truth[:3, :3], truth[:3, 3]
    w = rotation_log(r_gt @ pose.rotation.T)  # R_gt = exp([w]x) R
    out = {
        "type": pose.type.name,
        "inliers": pose.inliers,
        "rot_deg": float(np.degrees(np.linalg.norm(w))),
        "nees_rot": float(w @ np.linalg.solve(pose.rotation_covariance, w)),
    }
    d_gt = t_gt / np.linalg.norm(t_gt)
    if pose.type != PoseType.ROTATION_ONLY and np.linalg.norm(pose.direction) > 0:
        out["dir_deg"] = float(np.degrees(np.arccos(np.clip(d_gt @ pose.direction, -1.0, 1.0))))
    if pose.type == PoseType.ROTATION_AND_DIRECTION:
        a = _tangent_coordinates(pose, d_gt)
        e = np.concatenate([w, a])
        out["nees_dir"] = float(a @ np.linalg.solve(pose.covariance[3:, 3:], a))
        out["nees_joint"] = float(e @ np.linalg.solve(pose.covariance, e))
    if pose.type == PoseType.METRIC:
        dt = t_gt - pose.translation
        e = np.concatenate([w, dt])
        out["trans_cm"] = float(100 * np.linalg.norm(dt))
        out["nees6"] = float(e @ np.linalg.solve(pose.covariance, e))
        out["nees_trans"] = float(dt @ np.linalg.solve(pose.translation_covariance, dt))
    return out


def patch_pairs_of(det, a, b, k: np.ndarray) -> tuple[float, np.ndarray, RelativePose | None, float]:
    """Score, the verified patch correspondences (M, 4) image px (xq, yq, xm, ym) of the scale with the most
    inliers (LoopClosureDetector.patch_pairs), the patch-centre pose of the code before issue 28 (its
    detector's ``_pose``: geometry.relative_pose on those centres, raw pixels, None under 8), and the time of
    scoring + that pose (s)."""
    t = time.perf_counter()
    with det.lock:
        pm = det.matcher_for(None)
        sc = pm.score(a, [b], details=True)
        score = float(pm.absolute(sc.raw)[0])
    pairs = det.patch_pairs(a.image_size, b.image_size, sc.details[0])
    pose = None
    if len(pairs) >= 8:
        try:
            pose = relative_pose(pairs[:, :2], pairs[:, 2:], k)
        except (ValueError, np.linalg.LinAlgError):
            pose = None
    return score, pairs, pose, time.perf_counter() - t


def _stat(rows: list[dict], key: str) -> tuple[float, float]:
    v = np.array([r[key] for r in rows if key in r])
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(np.median(v)), float(np.percentile(v, 90))


def summarize(name: str, rows: list[dict]) -> dict:
    """One table row: counts by type, error medians / p90, NEES means, ms per pair."""
    got = [r for r in rows if r["type"] != "NONE"]
    out = {"method": name, "pairs": len(rows), "none": len(rows) - len(got)}
    for t in ("METRIC", "ROTATION_AND_DIRECTION", "ROTATION_ONLY"):
        out[t] = sum(r["type"] == t for r in rows)
    for key in ("rot_deg", "dir_deg", "trans_cm"):
        out[key] = _stat(got, key)
    for key in ("nees_rot", "nees_dir", "nees6", "nees_trans"):
        v = [r[key] for r in got if key in r]
        out[key] = float(np.mean(v)) if v else float("nan")
    out["ms"] = float(np.mean([r["ms"] for r in rows])) if rows else float("nan")
    return out


def run_local(pairs, feats, frames, camera, patch, depth: bool, radius: float | None) -> list[dict]:
    """estimate_loop_pose on every pair (guided by the patch pairs within ``radius`` px, or not: None); rows
    of :func:`pose_errors` with ``ms``."""
    import pnv_ros.loop_pose as lp

    guided, saved = radius is not None, lp.GUIDANCE_RADIUS_PX
    lp.GUIDANCE_RADIUS_PX = radius if guided else saved
    rows = []
    for q, m in pairs:
        fq, fm = (feats[q], feats[m]) if depth else (without_depth(feats[q]), without_depth(feats[m]))
        pp = patch[(q, m)][1] if guided else None
        t = time.perf_counter()
        pose = estimate_loop_pose(fq, fm, camera, pp)
        ms = 1e3 * (time.perf_counter() - t)
        truth = np.linalg.inv(frames[q].pose) @ frames[m].pose
        rows.append({**pose_errors(pose, truth), "ms": ms, "q": frames[q].stamp, "m": frames[m].stamp})
    lp.GUIDANCE_RADIUS_PX = saved
    return rows


def run_patch(pairs, frames, camera, root: Path, min_score: float | None) -> dict:
    """Patch features of the frames in ``pairs`` (default model, speed preset as the CLI's default),
    today's poses and the patch correspondences: {(q, m): (score, patch_pairs, row)}."""
    from pnv_ros.detector import LoopClosureDetector
    from pnv_ros.engines.spec import RuntimeSpec
    from pnv_ros.extract import open_extractor

    ex = open_extractor(None, "speed", RuntimeSpec(device="cpu"))
    det = LoopClosureDetector(ex)
    idx = sorted({i for p in pairs for i in p})
    pf = dict(zip(idx, ex.extract([str(frames[i].rgb) for i in idx]), strict=True))
    out = {}
    for q, m in pairs:
        score, pp, pose, dt = patch_pairs_of(det, pf[q], pf[m], camera.matrix)
        truth = np.linalg.inv(frames[q].pose) @ frames[m].pose
        row = {**pose_errors(pose, truth), "ms": 1e3 * dt, "score": score}
        out[(q, m)] = (score, pp, row)
    return out


def _fmt(v: tuple[float, float] | float, digits: int = 1) -> str:
    if isinstance(v, tuple):
        return " / ".join("-" if not np.isfinite(x) else f"{x:.{digits}f}" for x in v)
    return "-" if not np.isfinite(v) else f"{v:.{digits}f}"


def table(summaries: list[dict]) -> list[str]:
    """Markdown table of :func:`summarize` rows."""
    lines = [
        "| method | pairs | NONE | METRIC / R+D / R-only | rot deg (med / p90) | dir deg (med / p90) | "
        "trans cm (med / p90) | NEES rot (3) | NEES dir (2) | NEES 6-D (6) | ms / pair |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['method']} | {s['pairs']} | {s['none']} | {s['METRIC']} / {s['ROTATION_AND_DIRECTION']} / "
            f"{s['ROTATION_ONLY']} | {_fmt(s['rot_deg'], 2)} | {_fmt(s['dir_deg'])} | {_fmt(s['trans_cm'])} | "
            f"{_fmt(s['nees_rot'])} | {_fmt(s['nees_dir'])} | {_fmt(s['nees6'])} | {_fmt(s['ms'], 0)} |"
        )
    return lines


# -- calibration (--calibrate): how loop_pose's METRIC_*, DIRECTION_* and ROTATION_* constants were fitted ----
def _tangent_coordinates(pose: RelativePose, d: np.ndarray) -> np.ndarray:
    """(2,) coordinates along ``tangent_basis`` of the unit vector d (the sphere's log map at the estimate:
    length = angle to it), defined for any angle (a division by d . direction would blow up past 90 deg)."""
    b = pose.tangent_basis.T @ d
    n = float(np.linalg.norm(b))
    ang = float(np.arccos(np.clip(d @ pose.direction, -1.0, 1.0)))
    return b / n * ang if n > 1e-12 else np.zeros(2)


def _error_vector(pose: RelativePose, truth: np.ndarray) -> np.ndarray:
    """The ground truth's error in the pose's covariance coordinates: (w, dt), (w, a) or w."""
    w = rotation_log(truth[:3, :3] @ pose.rotation.T)
    if pose.type == PoseType.METRIC:
        return np.concatenate([w, truth[:3, 3] - pose.translation])
    if pose.type == PoseType.ROTATION_AND_DIRECTION:
        return np.concatenate([w, _tangent_coordinates(pose, truth[:3, 3] / np.linalg.norm(truth[:3, 3]))])
    return w


def _scaled(c: np.ndarray, x: np.ndarray, blocks: tuple[int, ...]) -> np.ndarray:
    """``D C D + diag(floor^2)`` with x = (log scale, log floor) per block, as loop_pose.calibrated."""
    from pnv_ros.loop_pose import calibrated

    return calibrated(c, blocks, tuple(np.exp(x[0::2])), tuple(np.exp(x[1::2])))


def fit_calibration(data: list[tuple[np.ndarray, np.ndarray]], blocks: tuple[int, ...]) -> np.ndarray:
    """Maximum likelihood (e ~ N(0, D C D + F)) of per-block (log variance scale, log floor) over (e, C)."""
    from scipy.optimize import minimize

    def nll(x):
        tot = 0.0
        for e, c in data:
            s = _scaled(c, x, blocks)
            tot += 0.5 * (e @ np.linalg.solve(s, e) + np.linalg.slogdet(s)[1])
        return tot

    x0 = np.tile([0.0, np.log(0.005)], len(blocks))
    return minimize(nll, x0, method="Nelder-Mead", options={"maxiter": 8000, "xatol": 1e-5, "fatol": 1e-7}).x


def _nees(data, x, blocks) -> np.ndarray:
    return np.array([e @ np.linalg.solve(_scaled(c, x, blocks), e) for e, c in data])


def calibrate(frames, feats, camera, revisits) -> dict:
    """Fit the covariance constants with loop_pose's calibration turned off (scale 1, floor 0): METRIC and
    ROTATION_AND_DIRECTION on the revisits, ROTATION_ONLY on consecutive frames (fr1/desk's only pairs with
    too little parallax). Prints the fit, the NEES means and a two-fold cross-validation."""
    import pnv_ros.loop_pose as lp

    saved = {n: getattr(lp, n) for n in ("METRIC_SCALE", "METRIC_FLOOR", "DIRECTION_SCALE", "DIRECTION_FLOOR")}
    saved |= {"ROTATION_SCALE": lp.ROTATION_SCALE, "ROTATION_FLOOR": lp.ROTATION_FLOOR}
    lp.METRIC_SCALE, lp.METRIC_FLOOR = (1.0, 1.0), (0.0, 0.0)
    lp.DIRECTION_SCALE, lp.DIRECTION_FLOOR = (1.0, 1.0), (0.0, 0.0)
    lp.ROTATION_SCALE, lp.ROTATION_FLOOR = 1.0, 0.0
    data: dict[str, list] = {"METRIC": [], "ROTATION_AND_DIRECTION": [], "ROTATION_ONLY": []}
    try:
        consecutive = [(i + 1, i) for i in range(len(frames) - 1) if i in feats and i + 1 in feats]
        for pairs, depth in ((revisits, True), (revisits, False), (consecutive, False)):
            for q, m in pairs:
                fq, fm = (feats[q], feats[m]) if depth else (without_depth(feats[q]), without_depth(feats[m]))
                pose = estimate_loop_pose(fq, fm, camera)
                if pose is not None and (pairs is consecutive) == (pose.type == PoseType.ROTATION_ONLY):
                    truth = np.linalg.inv(frames[q].pose) @ frames[m].pose
                    data[pose.type.name].append((_error_vector(pose, truth), pose.covariance.copy()))
    finally:
        for n, v in saved.items():
            setattr(lp, n, v)
    out = {}
    for name, blocks in (("METRIC", (3, 3)), ("ROTATION_AND_DIRECTION", (3, 2)), ("ROTATION_ONLY", (3,))):
        d = data[name]
        if len(d) < 4:
            continue
        x = fit_calibration(d, blocks)
        cv = [
            float(_nees(b, fit_calibration(a, blocks), blocks).mean())
            for a, b in ((d[0::2], d[1::2]), (d[1::2], d[0::2]))
        ]
        out[name] = {
            "pairs": len(d),
            "scale": np.exp(x[0::2]).round(2).tolist(),
            "floor": np.exp(x[1::2]).round(5).tolist(),
            "nees_mean": float(_nees(d, x, blocks).mean()),
            "nees_mean_2fold": cv,
        }
        print(name, out[name], flush=True)
    return out


def main() -> None:
    import common

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(common.REPO.parent / "shared" / "data" / "tum_rgbd_fr1_desk"))
    ap.add_argument("--no-model", action="store_true", help="skip the patch model (no today's row, no guidance)")
    ap.add_argument("--calibrate", action="store_true", help="fit loop_pose's covariance constants (slow: all frames)")
    ap.add_argument("--radii", default="96", help="guidance radii to measure, px (comma-separated)")
    ap.add_argument("--md", default=str(common.RESULTS / "loop_poses.md"))
    ap.add_argument("--json", default=str(common.RESULTS / "loop_poses.json"))
    a = ap.parse_args()
    root = Path(a.data)
    frames, camera = load_set(root)
    revisits, controls = build_pairs(frames)
    print(f"{len(frames)} frames, {len(revisits)} revisit pairs, {len(controls)} controls", flush=True)
    idx = sorted({i for p in revisits + controls for i in p})
    if a.calibrate:
        idx = list(range(len(frames)))
    feats, t_ex = {}, []
    for i in idx:
        feats[i], dt = load_local(frames[i], camera)
        t_ex.append(dt)
    record = common.header(
        data=str(root), revisits=len(revisits), controls=len(controls), sift_ms=1e3 * float(np.mean(t_ex))
    )
    if a.calibrate:
        record["calibration"] = calibrate(frames, feats, camera, revisits)
    patch = None if a.no_model else run_patch(revisits + controls, frames, camera, root, None)
    radii = [float(r) for r in a.radii.split(",") if r.strip()]
    summaries, rows_all = [], {}
    for kind, pairs in (("revisit", revisits), ("control", controls)):
        variants = [("local, depth", True, None), ("local, no depth", False, None)]
        if patch is not None:
            for r in radii:
                variants += [(f"local guided {r:g} px, depth", True, r), (f"local guided {r:g} px, no depth", False, r)]
            rows = [patch[p][2] for p in pairs]
            rows_all[f"{kind}: patch (today)"] = rows
            summaries.append(summarize(f"{kind}: patch (today)", rows))
        for name, depth, radius in variants:
            rows = run_local(pairs, feats, frames, camera, patch, depth, radius)
            rows_all[f"{kind}: {name}"] = rows
            summaries.append(summarize(f"{kind}: {name}", rows))
    lines = table(summaries)
    print("\n".join(lines))
    record["summaries"] = summaries
    record["rows"] = rows_all
    common.write_json(a.json, record)
    common.write_md(a.md, page(record, patch, revisits, controls, lines))


def page(record: dict, patch: dict | None, revisits, controls, lines: list[str]) -> list[str]:
    """The generated results page."""
    from pnv_ros.config import DetectorParams

    out = [
        "# Loop poses on TUM fr1/desk (generated by benchmarks/loop_poses.py)",
        "",
        f"`{record['command']}`, {record['date']}; {common_machine_line(record)}.",
        "",
        f"{record['revisits']} revisit pairs, {record['controls']} non-revisit controls (rule: the script's docstring). "
        f"SIFT extraction {record['sift_ms']:.0f} ms per frame (1000 keypoints, depth points), once per keyframe; "
        "ms / pair is the pose alone (for `patch (today)`: patch scoring included).",
        "",
        *lines,
        "",
        "NEES: means over the pairs with a pose; rot: 3-D of w; dir: 2-D tangent coordinates (ROTATION_AND_DIRECTION); "
        "6-D: (w, dt) of METRIC. Ideal means in the header. Errors against T_q^-1 T_m of the motion-capture poses.",
    ]
    if patch is not None:
        ms = DetectorParams().min_score
        sr = np.array([patch[p][0] for p in revisits])
        sc = np.array([patch[p][0] for p in controls])
        out += [
            "",
            f"Patch scores (default model, speed preset): revisits median {np.median(sr):.3f}, "
            f"{int((sr >= ms).sum())} of {len(sr)} at or above min_score {ms}; controls max {sc.max():.3f}, "
            f"{int((sc >= ms).sum())} of {len(sc)} at or above it (the detector publishes no pose below it).",
        ]
    return out


def common_machine_line(record: dict) -> str:
    import common

    return common.machine_line(record["machine"])


if __name__ == "__main__":
    main()
