"""Where a checkpoint's pose error comes from: how much of each true camera rotation the camera
head predicts, on validation loops and on loops of the checkpoint's own last training pool.

    python benchmarks/pose_diagnosis.py --out docs/benchmarks/pose_diagnosis_cpu.json

Each loop (300 frames at 112x84 unless told otherwise) is streamed with the full cache in chunks
of 4, as ``benchmarks/quality.py`` does. Per loop: the pose metrics of ``stac_backend.metrics``
(ATE and RPE after Sim(3); over every pair of frames, with no alignment, VGGT's AUC@30 and the
median rotation / translation-direction errors). Then, for the pairs of frames ``lag`` frames apart
(and the pairs of frame 0, the model's world frame, with every later frame), the predicted
relative rotation's angle against the true one, grouped by the true angle:

* ``gain``: median of predicted angle / true angle (1: the camera head turns as far as the camera);
* ``error_deg``: median angle between the predicted and the true relative rotation.

And the direction of the turn: for every frame that has turned 20 to 90 degrees from frame 0,
whether the predicted turn (as a rotation vector, axis times angle) points against the true one
(a negative dot product). Larger turns are not judged: near half a turn, a turn a little past it
and one a little short of it the other way round are close rotations with opposite vectors. A
loop where most judged frames turn the wrong way is ``mirrored``: the camera head has the
direction of travel round the room backwards.

Each loop is also streamed mirrored left-right and scored against the mirrored truth
(``direction_mirrored_input``). A head that reads the turn from the image motion is right on both
or wrong on both; where it is right on one and wrong on the other, its direction did not follow
the images (``direction_ignores_image``): it gave the same turn whichever way the picture moved.

Scenes: the validation split (seeds from 2,000,000, never trained on) and the ``loop`` rows of the
training pool that the last run in ``--training`` rendered (its ``--seed``, ``--pool`` and the step
it resumed at fix the pool: ``stac_backend.training.train.pool_seed0``), so that a weakness the
model has on scenes it was trained on is told apart from one on new scenes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from stac_backend.assets import EMBEDDED_CHECKPOINT
from stac_backend.cache import CacheConfig
from stac_backend.data import SPLITS, make_sequence, to_first_camera_frame
from stac_backend.evaluation.runner import stream_sequence
from stac_backend.metrics import pose_metrics
from stac_backend.metrics.pose import rotation_angle, world_from_camera
from stac_backend.model import build_model
from stac_backend.model.pose import matrix_to_quaternion
from stac_backend.results import write_result
from stac_backend.training.train import loop_rows, pool_seed0

ROOT = Path(__file__).resolve().parents[1]
LAGS = (4, 16, 64)
# Bins of the true relative rotation angle (degrees): small turns up to half a lap.
ANGLE_BINS = (0.0, 2.0, 5.0, 10.0, 20.0, 45.0, 180.0)
# The turns from frame 0 (degrees) whose direction is judged: smaller ones have no direction worth
# judging, and near 180 degrees a rotation vector's direction flips for a small change of rotation.
DIRECTION_RANGE_DEG = (20.0, 90.0)


def training_pool_loops(training: Path, count: int) -> tuple[list[int], dict]:
    """Seeds of the first ``count`` loop sequences of the last run's training pool, and that run's arguments."""
    last = json.loads(training.read_text())["runs"][-1]
    args = last["args"]
    pool, seed = int(args["pool"]), int(args["seed"])
    first = pool_seed0(seed, int(last.get("resumed_from_step", 0)), pool)
    rows = loop_rows(pool)[:count]
    return [first + r for r in rows], {"seed": seed, "pool": pool, "pool_frames": int(args["pool_frames"]),
                                       "resumed_from_step": int(last.get("resumed_from_step", 0)), "first_scene": first}


def relative_rotations(extrinsics: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[P, 3, 3] rotations taking camera ``second``'s axes to camera ``first``'s, for each pair."""
    world = world_from_camera(extrinsics)[:, :3, :3]
    return world[first].transpose(1, 2) @ world[second]


def rotation_pairs(pred: torch.Tensor, gt: torch.Tensor, first: torch.Tensor, second: torch.Tensor):
    """True angle, predicted angle and error angle (degrees) of the relative rotations of the given pairs."""
    rel_p, rel_g = relative_rotations(pred, first, second), relative_rotations(gt, first, second)
    deg = 180.0 / math.pi
    return (rotation_angle(rel_g) * deg, rotation_angle(rel_p) * deg,
            rotation_angle(rel_p.transpose(1, 2) @ rel_g) * deg)


def rotation_vectors(rotation: torch.Tensor) -> torch.Tensor:
    """[N, 3] axis times angle (radians, in [0, pi]) of [N, 3, 3] rotations."""
    q = matrix_to_quaternion(rotation.double())  # x, y, z, w
    q = torch.where(q[:, 3:] < 0, -q, q)  # w >= 0: the angle is at most pi
    vector = q[:, :3]
    norm = vector.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(norm, q[:, 3:])
    return torch.where(norm > 1e-12, vector / norm.clamp_min(1e-12) * angle, torch.zeros_like(vector))


def mirrored_left_right(extrinsics: torch.Tensor) -> torch.Tensor:
    """The camera-from-world extrinsics [S, 3, 4] that see the left-right mirror image of the scene:
    x negated in camera and world coordinates alike (the images flipped about a centred principal point)."""
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=extrinsics.dtype))
    return torch.cat([flip @ extrinsics[..., :3] @ flip, flip @ extrinsics[..., 3:]], dim=-1)


def turn_direction(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    """Of the frames whose turn from frame 0 is in DIRECTION_RANGE_DEG, how many the head turns the wrong way."""
    frame_0, every = torch.zeros(gt.shape[0], dtype=torch.long), torch.arange(gt.shape[0])
    true = rotation_vectors(relative_rotations(gt, frame_0, every))
    predicted = rotation_vectors(relative_rotations(pred, frame_0, every))
    low, high = (math.radians(d) for d in DIRECTION_RANGE_DEG)
    judged = (true.norm(dim=-1) >= low) & (true.norm(dim=-1) < high)
    wrong = (true * predicted).sum(-1) < 0
    frames = int(judged.sum())
    fraction = float(wrong[judged].float().mean()) if frames else 0.0
    return {"frames": frames, "wrong_way_fraction": fraction, "mirrored": frames > 0 and fraction > 0.5}


def add_mirrored_input(row: dict, pred_mirrored: torch.Tensor, truth: torch.Tensor) -> dict:
    """Score the prediction for the left-right mirrored images against the mirrored truth, and say
    whether the loop's direction was right on one input and wrong on the other."""
    row["direction_mirrored_input"] = turn_direction(pred_mirrored, mirrored_left_right(truth))
    row["direction_ignores_image"] = row["direction"]["mirrored"] != row["direction_mirrored_input"]["mirrored"]
    return row


def binned(true: np.ndarray, pred: np.ndarray, error: np.ndarray) -> list[dict]:
    rows = []
    for low, high in zip(ANGLE_BINS[:-1], ANGLE_BINS[1:]):
        inside = (true >= low) & (true < high) & (true > 1e-6)
        if not inside.any():
            continue
        rows.append({"true_deg": [low, high], "pairs": int(inside.sum()),
                     "gain": float(np.median(pred[inside] / true[inside])),
                     "error_deg": float(np.median(error[inside]))})
    return rows


def diagnose(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    n = gt.shape[0]
    groups = {f"lag_{lag}": (torch.arange(n - lag), torch.arange(lag, n)) for lag in LAGS if lag < n}
    groups["from_frame_0"] = (torch.zeros(n - 1, dtype=torch.long), torch.arange(1, n))
    result = {"metrics": pose_metrics(pred, gt), "direction": turn_direction(pred, gt), "rotation": {}}
    for name, (first, second) in groups.items():
        true, predicted, error = (t.numpy() for t in rotation_pairs(pred, gt, first, second))
        result["rotation"][name] = binned(true, predicted, error)
    return result


def mean_metrics(rows: list[dict]) -> dict | None:
    return {k: float(np.mean([r["metrics"][k] for r in rows])) for k in rows[0]["metrics"]} if rows else None


def pooled(rows: list[dict]) -> dict:
    """Means over loops of the pose metrics (all loops, and the mirrored ones apart from the rest), the
    count of mirrored loops, and the mean of each bin's gain and error over the loops that have it."""
    mirrored = [r for r in rows if r["direction"]["mirrored"]]
    direction = {"loops": len(rows), "mirrored_loops": len(mirrored),
                 "mirrored_loops_mirrored_input": sum(r["direction_mirrored_input"]["mirrored"] for r in rows),
                 "loops_direction_ignores_image": sum(r["direction_ignores_image"] for r in rows),
                 "wrong_way_fraction": float(np.mean([r["direction"]["wrong_way_fraction"] for r in rows])),
                 "metrics_mirrored": mean_metrics(mirrored),
                 "metrics_not_mirrored": mean_metrics([r for r in rows if not r["direction"]["mirrored"]])}
    rotation = {}
    for name in rows[0]["rotation"]:
        bins = {}
        for r in rows:
            for b in r["rotation"][name]:
                bins.setdefault(tuple(b["true_deg"]), []).append(b)
        rotation[name] = [{"true_deg": list(key), "loops": len(v), "pairs": sum(b["pairs"] for b in v),
                           "gain": float(np.mean([b["gain"] for b in v])),
                           "error_deg": float(np.mean([b["error_deg"] for b in v]))} for key, v in sorted(bins.items())]
    return {"metrics": mean_metrics(rows), "direction": direction, "rotation": rotation}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    p.add_argument("--training", type=Path, default=ROOT / "docs/benchmarks/training_h100.json",
                   help="the checkpoint's training record: its last run's pool gives the trained-on loops")
    p.add_argument("--sequences", type=int, default=4, help="loops of each kind (validation, trained on)")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.sequences < 1:
        p.error("--sequences must be >= 1")
    torch.set_num_threads(args.threads)
    model = build_model(checkpoint=args.checkpoint, device=args.device)
    trained_seeds, pool = training_pool_loops(args.training, args.sequences)
    if pool["pool_frames"] != args.frames:
        print(f"note: the training pool's sequences had {pool['pool_frames']} frames, these {args.frames}", file=sys.stderr)
    scenes = {"validation": [SPLITS["validation"] + i for i in range(args.sequences)], "trained_on": trained_seeds}
    report = {"benchmark": "pose_diagnosis", "checkpoint": args.checkpoint.name, "frames": args.frames,
              "image_hw": [args.height, args.width], "lags": list(LAGS), "training_pool": pool, "scenes": scenes,
              "per_loop": {}, "summary": {}}
    for kind, seeds in scenes.items():
        rows = []
        for seed in seeds:
            seq = to_first_camera_frame(make_sequence(args.frames, args.height, args.width, trajectory="loop", seed=seed))
            truth = seq.extrinsics.float()
            pred = stream_sequence(model, seq.images, CacheConfig(policy="full"))[0]["extrinsics"]
            pred_mirrored = stream_sequence(model, seq.images.flip(-1), CacheConfig(policy="full"))[0]["extrinsics"]
            row = add_mirrored_input({"seed": seed, **diagnose(pred, truth)}, pred_mirrored, truth)
            rows.append(row)
            m = row["metrics"]
            print(f"{kind} {seed}: ate {m['ate_rmse']:.3f} auc30 {m['pose_auc_30']:.3f} pair rot {m['pair_rot_deg']:.1f} deg,"
                  f" turns the wrong way on {row['direction']['wrong_way_fraction']:.0%} of frames"
                  f" ({row['direction_mirrored_input']['wrong_way_fraction']:.0%} mirrored)", file=sys.stderr)
        report["per_loop"][kind] = rows
        report["summary"][kind] = pooled(rows)
        write_result(args.out, report, "pose_diagnosis", args.device)
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
