"""Train a small VGGT-family model on synthetic streaming scenes.

    python -m stac_backend.training.train --preset small --device cuda --minutes 8 --out runs/small
    python -m stac_backend.training.train ... --resume runs/small/last.pt      # continue a run

A deeper model grown from a trained one (``grow.py``) trains the same way: ``--resume`` with the
grown ``.safetensors`` and no ``--preset`` takes the model's size from the file.

The model is trained exactly as it streams: one batched forward under the block-causal mask of
chunks of ``--chunk`` frames (frames see earlier chunks and their own chunk), so the trained model
is consistent with ``Stream``. Targets are metric and in the first camera's frame (VGGT's
convention): depth, world points and the 9-number pose encoding. Losses:
- camera: on the pose encoding (translation, quaternion with sign ambiguity removed, fov), either
  Huber with the translation in metres (``--camera-loss huber``, the embedded model's) or L1 with
  the translation relative to the scene's mean point distance (``--camera-loss relative``, as VGGT
  trains: past 0.1 m a Huber loss in metres keeps a translation error's gradient at 0.1 per metre,
  however large the error), weighted by ``--camera-weight`` in the total;
- depth and points: confidence-weighted L1 (errors relative to the scene's mean point distance, so
  confidences are scale-free) minus alpha * log(confidence) on valid pixels, plus a first-order
  gradient term on depth, as VGGT trains its dense heads.

Scenes are pre-rendered into a pool (``--pool`` sequences of ``--pool-frames`` frames, different
seeds, all three trajectory kinds) and training samples random windows from it (with
``--revisit-fraction``, that share of them driving more than once around a pooled loop, so that
the model sees places come back; with ``--bounded-fraction``, that share of them attending only to
what a bounded cache shaped like ``stac``'s would hold, so that it learns to use a few retrieved
frames instead of the whole past); no pool renders a held-out scene (seeds 1,000,000 to 1,009,999,
which the quality benchmarks score) or a validation scene (2,000,000 to 2,009,999, where
checkpoints are compared). Checkpoints (``last.pt``: weights + optimizer + step, loadable with
weights_only=True) are written every ``--save-every`` steps and at the end; ``model.safetensors``
holds the weights and config for serving. With ``--ema DECAY`` the run also keeps an exponential
moving average of the weights (``model_ema*.safetensors``, and in ``last.pt`` to resume it): with
the small batches of long windows the weights of the last step are noisy, and their average is the
steadier checkpoint to compare on validation scenes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import SPLIT_COUNT, SPLITS, make_sequence, split_overlapping
from ..data.sequence import to_first_camera_frame
from ..model import build_model, save_checkpoint
from ..model.checkpoint import read_state_dict
from ..model.pose import camera_centers, extri_intri_to_pose_encoding, pose_encoding_to_extri_intri
from ..model.vggt import chunk_causal_mask

TRAJECTORIES = ("loop", "back_and_forth", "random_walk")
# A training pool never renders a held-out scene (the quality benchmarks') or a validation scene
# (where checkpoints are compared): stac_backend.data.splits.


def pool_seed0(seed: int, step: int, pool: int) -> int:
    """First scene seed of a run's training pool (a fresh pool every 5,000 steps)."""
    seed0 = seed * 100_000 + (step // 5000) * pool
    split = split_overlapping(seed0, pool)
    if split is not None:
        first = SPLITS[split]
        raise ValueError(f"--seed {seed} at step {step} would train on {split} scenes (seeds {first:,} to "
                         f"{first + SPLIT_COUNT - 1:,}): choose another --seed")
    return seed0


def render_pool(count: int, frames: int, height: int, width: int, device: str, seed0: int = 0) -> dict[str, torch.Tensor]:
    """count sequences of frames each, in their first camera's frame."""
    parts: dict[str, list] = {"images": [], "depth": [], "valid": [], "points": [], "pose": []}
    for i in range(count):
        seq = make_sequence(frames, height, width, trajectory=TRAJECTORIES[i % 3], seed=seed0 + i, device=device)
        seq = to_first_camera_frame(seq)
        parts["images"].append(seq.images.half())
        parts["depth"].append(seq.depth.half())
        parts["valid"].append(seq.valid)
        parts["points"].append(seq.world_points.half())
        parts["pose"].append(extri_intri_to_pose_encoding(seq.extrinsics, seq.intrinsics, (height, width)))
    return {k: torch.stack(v) for k, v in parts.items()}


def loop_rows(count: int) -> list[int]:
    """The pool rows ``render_pool`` renders as one closed lap of the ``loop`` trajectory."""
    return [i for i in range(count) if TRAJECTORIES[i % len(TRAJECTORIES)] == "loop"]


def revisit_window(total: int, frames: int, generator: random.Random) -> list[int]:
    """Frame indices of a window that drives more than once around a one-lap loop of ``total``
    frames: the smallest stride that covers 1.25 laps in ``frames`` frames, wrapping past the
    lap's end (its last frame is its first, so the lap has ``total - 1`` distinct frames). With
    an odd lap and stride 2 the second lap falls between the first's frames, as the held-out
    revisit loops do (``evaluation.synthetic.revisit_loop``)."""
    lap = total - 1
    if frames < 2 or lap < 2:
        raise ValueError(f"a revisit window needs >= 2 frames from a lap of >= 3, got {frames} from {total}")
    stride = max(1, math.ceil(1.25 * lap / (frames - 1)))
    start = generator.randrange(lap)
    return [(start + stride * k) % lap for k in range(frames)]


def sample_batch(pool, batch: int, frames: int, generator: random.Random, max_stride: int = 2,
                 revisit_fraction: float = 0.0):
    """``batch`` windows of ``frames`` frames, every 1st..``max_stride``-th frame of a pooled
    sequence (stride 1 twice as likely as each other): longer strides make windows that span a
    loop, so the model learns to use frames far back in its cache. A ``revisit_fraction`` of the
    windows instead drives more than once around a pooled loop (``revisit_window``), so that late
    frames come back to places the window's first frames saw: what a bounded cache's spatial
    memory is for, and what windows shorter than a lap never show the model."""
    n, total = pool["images"].shape[:2]
    strides = (1,) + tuple(range(1, max_stride + 1))
    loops = loop_rows(n)
    rows, cols = [], []
    for _ in range(batch):
        if loops and revisit_fraction > 0 and generator.random() < revisit_fraction:
            rows.append(generator.choice(loops))
            cols.append(revisit_window(total, frames, generator))
            continue
        stride = min(generator.choice(strides), max(1, (total - 1) // max(1, frames - 1)))
        start = generator.randrange(0, total - stride * (frames - 1))
        rows.append(generator.randrange(n))
        cols.append(list(range(start, start + stride * frames, stride)))
    idx_r = torch.tensor(rows)[:, None].expand(-1, frames)
    idx_c = torch.tensor(cols)
    return {k: v[idx_r, idx_c] for k, v in pool.items()}


def rebase_to_first(batch):
    """Re-express a window's targets in its own first frame (the model's world frame)."""
    pose = batch["pose"].float()
    B, S = pose.shape[:2]
    H, W = batch["depth"].shape[-2:]
    extr, intr = pose_encoding_to_extri_intri(pose, (H, W))
    R, t = extr[..., :3, :3], extr[..., :3, 3]
    R0, t0 = R[:, :1], t[:, :1]
    # camera_i-from-frame0 = camera_i-from-world @ world-from-frame0
    R_new = R @ R0.transpose(-1, -2)
    t_new = t - (R_new @ t0[..., None])[..., 0]
    new_extr = torch.cat([R_new, t_new[..., None]], dim=-1)
    points = batch["points"].float()  # in the pool sequence's first-camera frame
    points = torch.einsum("bij,bshwj->bshwi", R0[:, 0], points) + t0[:, 0][:, None, None, None, :]
    return extri_intri_to_pose_encoding(new_extr, intr, (H, W)), points


def scene_scale(points, valid):
    """Per-sample mean distance of the valid target points from the first camera [B] (metres)."""
    dist = points.norm(dim=-1)  # [B, S, H, W]
    count = valid.flatten(1).sum(1).clamp(min=1)
    return ((dist * valid).flatten(1).sum(1) / count).clamp(min=1e-3)


def confidence_l1(pred, conf, target, valid, scale, alpha: float = 1.0):
    """Confidence-weighted L1 on errors relative to the scene's scale, minus alpha * log(conf).

    The optimum is conf = alpha / relative error, so confidences mean the same thing in a 3 m room
    and a 30 m hall: metric errors in metres would pin every confidence at its floor of 1
    (1 + exp) and make them useless for filtering and for STAC's spatial pool. alpha sets which
    error a confidence of 2 (STAC's reference bar) stands for: alpha / 2 of the scene's scale. At
    alpha 0.2 a small model's errors (above 10% of the scene) pinned every confidence at the floor;
    at 1.0 pixels within 50% of the scene's scale pass the bar.
    """
    err = (pred - target).abs()
    if err.dim() == conf.dim() + 1:
        err = err.sum(-1)
    err = err / scale.view(-1, *([1] * (err.dim() - 1)))
    term = conf * err - alpha * torch.log(conf)
    return term[valid].mean()


def depth_gradient_loss(pred, target, valid):
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    vx = valid[..., :, 1:] & valid[..., :, :-1]
    vy = valid[..., 1:, :] & valid[..., :-1, :]
    return (dx(pred) - dx(target)).abs()[vx].mean() + (dy(pred) - dy(target)).abs()[vy].mean()


CAMERA_LOSSES = ("huber", "relative")


def camera_loss(pred, target, scale=None, kind: str = "huber"):
    """Pose-encoding loss of [B, S, 9] predictions. ``huber``: Huber (delta 0.1) on the translation in
    metres and on the fov, L1 on the quaternion. ``relative``: L1 on all three, the translation
    divided by ``scale`` [B] (the scene's mean point distance), so that a pose error costs the same
    in a small room and a large hall and keeps its full gradient however large it is."""
    quat_p, quat_t = pred[..., 3:7], target[..., 3:7]
    # q and -q are the same rotation
    quat_err = torch.minimum((quat_p - quat_t).abs().sum(-1), (quat_p + quat_t).abs().sum(-1))
    if kind == "huber":
        trans = F.huber_loss(pred[..., :3], target[..., :3], reduction="none", delta=0.1).sum(-1)
        fov = F.huber_loss(pred[..., 7:], target[..., 7:], reduction="none", delta=0.1).sum(-1)
    elif kind == "relative":
        if scale is None:
            raise ValueError("the relative camera loss needs the scene scale")
        trans = (pred[..., :3] - target[..., :3]).abs().sum(-1) / scale.view(-1, *([1] * (pred.dim() - 2)))
        fov = (pred[..., 7:] - target[..., 7:]).abs().sum(-1)
    else:
        raise ValueError(f"unknown camera loss {kind!r}: expected one of {CAMERA_LOSSES}")
    return (trans + quat_err + 0.5 * fov).mean()


def bounded_frame_mask(centres, chunk: int, window: int, retrieval: int) -> torch.Tensor:
    """[B, S, S] bool: the frames a bounded cache shaped like ``stac``'s holds when each chunk runs -
    its own chunk, frame 0 (pinned), the ``window`` frames before the chunk, and the ``retrieval``
    older frames whose cameras are nearest the chunk's mean camera position (``centres`` [B, S, 3]),
    a frame-level stand-in for the pooled tokens ``stac`` retrieves near the camera. Heavy hitters
    (kept by attention score) are not modelled. Never a later chunk: the mask stays causal."""
    B, S, _ = centres.shape
    mask = torch.zeros(B, S, S, dtype=torch.bool, device=centres.device)
    for start in range(0, S, chunk):
        stop = min(start + chunk, S)
        rows = mask[:, start:stop]  # a view: written in place
        rows[:, :, start:stop] = True
        rows[:, :, 0] = True
        rows[:, :, max(0, start - window):start] = True
        older = start - window  # frames 1 .. older-1 have left the window
        if retrieval > 0 and older > 1:
            here = centres[:, start:stop].mean(1)
            distance = (centres[:, 1:older] - here[:, None]).norm(dim=-1)
            nearest = distance.topk(min(retrieval, older - 1), dim=1, largest=False).indices + 1
            rows.scatter_(2, nearest[:, None, :].expand(-1, stop - start, -1), True)
    return mask


def compute_losses(model, batch, chunk: int, conf_alpha: float = 1.0, bounded: tuple[int, int] | None = None,
                   bounded_rows: torch.Tensor | None = None, camera: tuple[str, float] = ("huber", 1.0)):
    """The losses of one batch. With ``bounded`` = (window, retrieval), the samples that
    ``bounded_rows`` [B] marks run under ``bounded_frame_mask`` instead of the full causal mask.
    ``camera`` = (kind, weight): the camera loss (``camera_loss``) and its weight in the total; the
    ``camera`` entry is the loss before weighting, comparable between weights."""
    pose_t, points_t = rebase_to_first(batch)
    images = batch["images"].float()
    depth_t = batch["depth"].float()
    valid = batch["valid"] & (depth_t > 0)
    frame_mask = None
    if bounded is not None and bounded_rows is not None and bool(bounded_rows.any()):
        causal = chunk_causal_mask(images.shape[1], chunk, images.device)
        extrinsics, _ = pose_encoding_to_extri_intri(pose_t, images.shape[-2:])
        limited = bounded_frame_mask(camera_centers(extrinsics), chunk, *bounded)
        frame_mask = torch.where(bounded_rows.to(images.device)[:, None, None], limited, causal)
    out = model(images, chunk_size=chunk, frame_mask=frame_mask)
    scale = scene_scale(points_t, valid)
    losses = {
        "camera": camera_loss(out["pose_enc"].float(), pose_t, scale, camera[0]),
        "depth": confidence_l1(out["depth"].float(), out["depth_conf"].float(), depth_t, valid, scale, conf_alpha),
        "depth_grad": depth_gradient_loss(out["depth"].float(), depth_t, valid),
        "points": confidence_l1(out["world_points"].float(), out["world_points_conf"].float(), points_t, valid, scale, conf_alpha),
    }
    losses["total"] = camera[1] * losses["camera"] + losses["depth"] + losses["depth_grad"] + losses["points"]
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None,
                   help="model size (default: the --resume checkpoint's recorded config, else small)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--frames", type=int, default=8, help="frames per training window")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--max-stride", type=int, default=2, help="windows take every 1st..Nth frame of a pooled sequence")
    p.add_argument("--revisit-fraction", type=float, default=0.0,
                   help="share of windows that drive more than once around a pooled loop (0: none)")
    p.add_argument("--bounded-fraction", type=float, default=0.0,
                   help="share of windows whose global attention sees only what a stac-shaped bounded cache holds (0: none)")
    p.add_argument("--bounded-window", type=int, default=4, help="recent frames the bounded mask keeps")
    p.add_argument("--bounded-retrieval", type=int, default=2,
                   help="older frames the bounded mask brings back, those whose cameras are nearest")
    p.add_argument("--camera-loss", choices=CAMERA_LOSSES, default="huber",
                   help="huber: translation in metres (the embedded model's); relative: L1, translation over the scene's scale")
    p.add_argument("--camera-weight", type=float, default=1.0, help="the camera loss's weight in the total")
    p.add_argument("--conf-alpha", type=float, default=1.0, help="confidence regulariser: conf 2 = alpha/2 relative error")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pool", type=int, default=384, help="pre-rendered training sequences")
    p.add_argument("--pool-frames", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=0.0,
                   help="also keep an exponential moving average of the weights with this decay per step (0: off)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not 0.0 <= args.ema < 1.0:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if not 0.0 <= args.revisit_fraction <= 1.0:
        p.error(f"--revisit-fraction must be in [0, 1], got {args.revisit_fraction}")
    if not 0.0 <= args.bounded_fraction <= 1.0:
        p.error(f"--bounded-fraction must be in [0, 1], got {args.bounded_fraction}")
    if not args.camera_weight > 0:
        p.error(f"--camera-weight must be > 0, got {args.camera_weight}")
    if args.bounded_window < 0 or args.bounded_retrieval < 0:
        p.error("--bounded-window and --bounded-retrieval must be >= 0")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(model_config(args.preset, args.resume), device=args.device, seed=args.seed, cuda_graphs=False,
                        compile=False, fp8=False).train()
    model.dpt_frames_chunk = None  # all frames through the heads at once
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    step, ema_state = 0, None
    if args.resume is not None:
        if args.resume.suffix == ".safetensors":  # weights only (e.g. carried between machines)
            from ..model import load_checkpoint

            load_checkpoint(model, args.resume)
            state_file = args.resume.parent / "state.json"
            step = json.loads(state_file.read_text())["step"] if state_file.is_file() else 0
            print("resuming from weights only: the optimizer state starts fresh", flush=True)
        else:
            state = torch.load(args.resume, map_location=args.device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
            ema_state = state.get("ema")
        rng = random.Random(args.seed + step)
        print(f"resumed from {args.resume} at step {step}", flush=True)
    ema = WeightAverage(model, args.ema, ema_state) if args.ema else None
    t0 = time.time()
    pool = render_pool(args.pool, args.pool_frames, args.height, args.width, args.device, seed0=pool_seed0(args.seed, step, args.pool))
    print(f"rendered {args.pool} x {args.pool_frames} frames in {time.time() - t0:.1f} s", flush=True)
    deadline = time.time() + args.minutes * 60
    warmup, history = 200, []
    use_amp = args.device.startswith("cuda")
    while step < args.max_steps and time.time() < deadline:
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.max_steps))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(pool, args.batch, args.frames, rng, args.max_stride, args.revisit_fraction)
        bounded_rows = None  # drawn only when asked for, so that other runs sample the windows they always did
        if args.bounded_fraction > 0:
            bounded_rows = torch.tensor([rng.random() < args.bounded_fraction for _ in range(args.batch)])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            losses = compute_losses(model, batch, args.chunk, args.conf_alpha,
                                    (args.bounded_window, args.bounded_retrieval), bounded_rows,
                                    (args.camera_loss, args.camera_weight))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if ema is not None:
            ema.update()
        step += 1
        if step % 50 == 0:
            row = {"step": step, "lr": lr, "seconds": round(time.time() - t0, 1), **{k: round(float(v.detach()), 4) for k, v in losses.items()}}
            history.append(row)
            print(json.dumps(row), flush=True)
        if step % args.save_every == 0:
            save(model, optimizer, step, args.out, ema)
    save(model, optimizer, step, args.out, ema)
    (args.out / "history.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "history": history}, indent=1))
    print(f"done: {step} steps in {time.time() - t0:.0f} s", flush=True)
    return 0


def model_config(preset: str | None, resume: Path | None):
    """The model to train: the preset named, else the one the checkpoint to resume records (a grown
    model has no preset of its own: grow.py), else ``small``."""
    if preset is not None:
        return preset
    if resume is not None:
        _, recorded = read_state_dict(resume)
        if recorded is not None:
            return recorded
    return "small"


class WeightAverage:
    """An exponential moving average of a model's floating-point parameters (float32 copies)."""

    def __init__(self, model, decay: float, state: dict | None = None):
        self.model, self.decay = model, decay
        self.params = {n: p for n, p in model.named_parameters() if p.dtype.is_floating_point}
        self.average = {n: p.detach().float().clone() for n, p in self.params.items()}
        if state:  # resumed: the average the run had, where it has the parameter
            for n, value in state.items():
                if n in self.average:
                    self.average[n].copy_(value)

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        torch._foreach_lerp_([self.average[n] for n in names], [self.params[n].detach().float() for n in names],
                             1.0 - self.decay)

    @contextmanager
    def swapped_in(self):
        """The model holds the averaged weights inside the block, its own again after it."""
        with torch.no_grad():
            own = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.average[n])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(own[n])


def save(model, optimizer, step: int, out: Path, ema: WeightAverage | None = None) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": model.config.to_json()}
    if ema is not None:
        state["ema"] = ema.average
    torch.save(state, out / "last.pt")
    model.eval()
    save_checkpoint(model, out / "model.safetensors")
    save_checkpoint(model, out / "model_fp16.safetensors", dtype=torch.float16)  # the shippable file
    if ema is not None:
        with ema.swapped_in():
            save_checkpoint(model, out / "model_ema.safetensors")
            save_checkpoint(model, out / "model_ema_fp16.safetensors", dtype=torch.float16)
    (out / "state.json").write_text(json.dumps({"step": step}))
    model.train()


if __name__ == "__main__":
    sys.exit(main())
