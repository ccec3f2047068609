"""One streaming step as a pure function of explicit state: the module that is exported.

``FunctionalStep(model, layout)(images, frame_offset, *state)`` returns the seven per-frame outputs
followed by the new state (``layout.state()`` order). It runs the project's own network modules
(aggregator, camera head, DPT heads) with attention objects that read the state tensors instead of
a policy object, and calls the ``stac::`` custom ops for the cache work, in the engine's order:
per global layer attention (+ per-key mass); after the heads score decay, top-k keep, then the
retrieval and the voxel-pool update (retrieval first with ``retrieve_before_prune``, the default;
after the update otherwise); the camera trunk's window. Run eagerly it is the torch reference of the
exported graph (tests compare it, and the graph, with ``engine.Stream``).

Shapes: images [B, C, 3, H, W] float in [0, 1]; frame_offset [B] int64 (stream index of each
row's first frame); state tensors [B, ...] (``StepLayout``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.pose import pose_encoding_to_extri_intri
from ..model.vggt import VGGT
from ..graph import ops  # noqa: F401 - registers torch.ops.stac.*
from ..graph.layout import POOL_FIELDS, StepLayout


def compact(x: Tensor, keep: Tensor, capacity: int, dim: int, fill: float = 0.0) -> Tensor:
    """Move the kept entries of x (along ``dim``; keep [B, K], x's dim 0 = B) to the front, in
    order, into ``capacity`` slots filled with ``fill``. Entries beyond capacity are dropped (the
    runtimes refuse steps that would need them). Standard ops only (CumSum, Where, ScatterElements)."""
    B, K = keep.shape
    rank = torch.cumsum(keep.to(torch.int64), dim=1) - 1
    trash = capacity + torch.arange(K, device=x.device, dtype=torch.int64)[None, :]
    dest = torch.where(keep, rank, trash)
    dest = torch.where(dest < capacity, dest, trash)  # overflow goes to the trash slots too
    shape = [1] * x.dim()
    shape[0], shape[dim] = B, K
    index = dest.reshape(shape).expand(x.shape)
    out_shape = list(x.shape)
    out_shape[dim] = capacity + K
    out = torch.full(out_shape, fill, dtype=x.dtype, device=x.device).scatter(dim, index, x)
    return out.narrow(dim, 0, capacity)


class _FullAttention:
    """Global attention over the ``full`` state: kv_k/kv_v [B, L, H, N, D], kv_len [B, 1].

    standard=True attends with standard ops (scaled_dot_product_attention under the key mask,
    exported as MatMul/Softmax) instead of a StacAttention node: a graph without custom nodes,
    for runtimes that cannot load the stac plugins (Triton's onnxruntime / tensorrt backends).
    """

    def __init__(self, state: dict[str, Tensor], standard: bool = False):
        self.s = state
        self.standard = standard
        self.new_k: dict[int, Tensor] = {}
        self.new_v: dict[int, Tensor] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ck, cv = self.s["kv_k"][:, layer], self.s["kv_v"][:, layer]
        B, H, N, _ = ck.shape
        M = k.shape[2]
        old = torch.arange(N, device=q.device)[None, :] < self.s["kv_len"]
        valid = torch.cat([old, torch.ones(B, M, dtype=torch.bool, device=q.device)], dim=1)
        self.new_k[layer], self.new_v[layer] = k, v
        if self.standard:
            return F.scaled_dot_product_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2),
                                                  attn_mask=valid[:, None, None, :])
        valid = valid[:, None, :].expand(B, H, N + M)
        bias = torch.zeros(B, H, N + M, dtype=torch.float32, device=q.device)
        out, _ = torch.ops.stac.attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), bias, valid, 0)
        return out

    def finish(self, step: "FunctionalStep") -> dict[str, Tensor]:
        s = self.s
        L = len(self.new_k)
        new_k = torch.stack([self.new_k[i] for i in range(L)], 1)  # [B, L, H, M, D]
        new_v = torch.stack([self.new_v[i] for i in range(L)], 1)
        B, N = s["kv_k"].shape[0], s["kv_k"].shape[3]
        M = new_k.shape[3]
        keep = torch.cat([torch.arange(N, device=new_k.device)[None, :] < s["kv_len"],
                          torch.ones(B, M, dtype=torch.bool, device=new_k.device)], dim=1)
        return {
            "kv_k": compact(torch.cat([s["kv_k"], new_k], 3), keep, N, 3),
            "kv_v": compact(torch.cat([s["kv_v"], new_v], 3), keep, N, 3),
            "kv_len": s["kv_len"] + M,
        }


class _HotAttention:
    """Global attention over the ``heavy_hitter`` / ``stac`` hot store (+ retrieved tokens)."""

    def __init__(self, state: dict[str, Tensor], retrieved: bool):
        self.s = state
        self.retrieved = retrieved
        self.new_k: dict[int, Tensor] = {}
        self.new_v: dict[int, Tensor] = {}
        self.mass: dict[int, Tensor] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = self.s
        hk, hv = s["hot_k"][:, layer], s["hot_v"][:, layer]
        B, H, Ns, _ = hk.shape
        M = k.shape[2]
        dev = q.device
        old = (torch.arange(Ns, device=dev)[None, :] < s["hot_len"][:, layer, None])[:, None, :].expand(B, H, Ns)
        keys, values, valid, bias = [hk], [hv], [old], [torch.zeros(B, H, Ns, device=dev)]
        if self.retrieved:
            keys.append(s["ret_k"][:, layer])
            values.append(s["ret_v"][:, layer])
            valid.append(s["ret_valid"][:, layer])
            bias.append(s["ret_bias"][:, layer])
        keys.append(k)
        values.append(v)
        valid.append(torch.ones(B, H, M, dtype=torch.bool, device=dev))
        bias.append(torch.zeros(B, H, M, device=dev))
        out, mass = torch.ops.stac.attention(q, torch.cat(keys, 2), torch.cat(values, 2), torch.cat(bias, 2),
                                             torch.cat(valid, 2), 1)
        self.new_k[layer], self.new_v[layer], self.mass[layer] = k, v, mass
        return out

    def finish(self, step: "FunctionalStep", world_points: Tensor, world_points_conf: Tensor,
               frame_offset: Tensor, latest: Tensor) -> dict[str, Tensor]:
        s, c, m = self.s, step.layout.cache, step.layout.model
        L = len(self.new_k)
        new_k = torch.stack([self.new_k[i] for i in range(L)], 1)
        new_v = torch.stack([self.new_v[i] for i in range(L)], 1)
        mass = torch.stack([self.mass[i] for i in range(L)], 1)  # [B, L, H, Ns (+T) + M]
        B, _, H, Ns = s["hot_score"].shape
        ret_valid = s["ret_valid"] if self.retrieved else torch.zeros(B, L, H, 0, dtype=torch.bool, device=mass.device)
        score = torch.ops.stac.score_decay(s["hot_score"], s["hot_len"], mass, ret_valid, float(c.gamma))
        (hot_k, hot_v, hot_frame, hot_index, hot_score, hot_pos, hot_len,
         ev_k, ev_v, ev_score, ev_pos, ev_len) = torch.ops.stac.topk_keep(
            s["hot_k"], s["hot_v"], s["hot_frame"], s["hot_index"], s["hot_pos"], s["hot_len"], new_k, new_v, score,
            world_points, world_points_conf, frame_offset, int(c.window), int(c.hh), list(c.pinned_frames),
            int(m.patch_size), int(m.patch_start_idx), float(c.conf_threshold), int(self.retrieved))
        new = {"hot_k": hot_k, "hot_v": hot_v, "hot_frame": hot_frame, "hot_index": hot_index, "hot_score": hot_score,
               "hot_pos": hot_pos, "hot_len": hot_len}
        if not self.retrieved:
            return new
        # Within the step, as the engine's StacCache.end_step: with retrieve_before_prune the pool
        # is read before this step's evictions are filed, else after. The retrieval's queries are
        # the recent window's tokens, which pruning never evicts: the pruned store gives the same.
        pool = [s["pool_" + n] for n in POOL_FIELDS]
        steps = s["steps"] + 1  # this step, counted from 1 (the stamp of the voxels it uses)

        def update(pool: list[Tensor]) -> list[Tensor]:
            return list(torch.ops.stac.pool_update(*pool, ev_k, ev_v, ev_score, ev_pos, ev_len, steps,
                                                   float(c.voxel_size), float(c.merge_cos), 0.2))

        def retrieve(pool: list[Tensor]) -> tuple[list[Tensor], tuple[Tensor, ...]]:
            *found, last_used = torch.ops.stac.retrieve(
                *pool, hot_frame, hot_pos, hot_len, s["ret_k"], s["ret_v"], s["ret_bias"], s["ret_valid"], steps,
                latest, int(c.window), int(c.retrieval), int(c.first_retrieval_frames), int(c.refresh_steps),
                int(c.retrieval_radius), int(c.include_buffer), float(c.voxel_size))
            return pool[:-1] + [last_used], tuple(found)

        if c.retrieve_before_prune:
            pool, found = retrieve(pool)
            pool = update(pool)
        else:
            pool = update(pool)
            pool, found = retrieve(pool)
        ret_k, ret_v, ret_bias, ret_valid = found
        new.update({"pool_" + n: t for n, t in zip(POOL_FIELDS, pool)})
        new.update({"ret_k": ret_k, "ret_v": ret_v, "ret_bias": ret_bias, "ret_valid": ret_valid, "steps": steps})
        return new


class _CameraAttention:
    """Camera-trunk attention over cam_k/cam_v [B, E, Hc, F, Dc] (valid where cam_frame >= 0)."""

    def __init__(self, state: dict[str, Tensor], blocks: int):
        self.s = state
        self.blocks = blocks
        self.new_k: dict[int, Tensor] = {}
        self.new_v: dict[int, Tensor] = {}

    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        e = iteration * self.blocks + block
        ck, cv = self.s["cam_k"][:, e], self.s["cam_v"][:, e]
        B, C = q.shape[0], q.shape[2]
        valid = torch.cat([self.s["cam_frame"] >= 0, torch.ones(B, C, dtype=torch.bool, device=q.device)], dim=1)
        self.new_k[e], self.new_v[e] = k, v
        return F.scaled_dot_product_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), attn_mask=valid[:, None, None, :])

    def finish(self, step: "FunctionalStep", frame_offset: Tensor, num_frames: int, latest: Tensor) -> dict[str, Tensor]:
        s, c = self.s, step.layout.cache
        E = len(self.new_k)
        new_k = torch.stack([self.new_k[e] for e in range(E)], 1)  # [B, E, Hc, C, Dc]
        new_v = torch.stack([self.new_v[e] for e in range(E)], 1)
        frames = torch.cat([s["cam_frame"], frame_offset[:, None] + torch.arange(num_frames, device=new_k.device)[None, :]], 1)
        keep = frames >= 0
        if c.camera_window is not None:
            window = frames > latest[:, None] - c.camera_window
            for f in c.pinned_frames:
                window = window | (frames == f)
            keep = keep & window
        Fc = s["cam_frame"].shape[1]
        return {
            "cam_k": compact(torch.cat([s["cam_k"], new_k], 3), keep, Fc, 3),
            "cam_v": compact(torch.cat([s["cam_v"], new_v], 3), keep, Fc, 3),
            "cam_frame": compact(frames, keep, Fc, 1, fill=-1),
        }


class FunctionalStep(nn.Module):
    """standard_attention (``full`` only): global attention with standard ops, no custom nodes."""

    def __init__(self, model: VGGT, layout: StepLayout, standard_attention: bool = False):
        super().__init__()
        if model.config != layout.model:
            raise ValueError("the layout was made for another model configuration")
        if standard_attention and layout.policy != "full":
            raise ValueError(f"standard_attention needs the full policy; {layout.policy!r} needs the per-key "
                             "attention mass of the StacAttention op")
        self.model = model
        self.layout = layout
        self.standard_attention = standard_attention
        self.state_names = layout.state_names()
        self.output_names = list(layout_outputs())

    def forward(self, images: Tensor, frame_offset: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        if len(state) != len(self.state_names):
            raise ValueError(f"expected {len(self.state_names)} state tensors ({self.state_names}), got {len(state)}")
        s = dict(zip(self.state_names, state))
        model, c = self.model, self.layout.cache
        cfg = model.config
        B, C, _, H, W = images.shape
        if c.policy == "full":
            glob = _FullAttention(s, self.standard_attention)
        else:
            glob = _HotAttention(s, retrieved=c.policy == "stac")
        cam = _CameraAttention(s, cfg.camera_trunk_depth)

        layers = model.aggregator(images, frame_offset, glob, keep_layers=cfg.kept_layers)
        pose_enc = model.camera_head(layers[-1][:, :, 0], cam)[-1]
        extrinsics, intrinsics = pose_encoding_to_extri_intri(pose_enc, (H, W))
        psi = cfg.patch_start_idx
        chunk = getattr(model, "dpt_frames_chunk", 8)  # as VGGT.forward_step does
        depth, depth_conf = model.depth_head(layers, (H, W), psi, chunk)
        world_points, world_points_conf = model.point_head(layers, (H, W), psi, chunk)
        outputs = {
            "depth": depth[..., 0], "depth_conf": depth_conf, "world_points": world_points,
            "world_points_conf": world_points_conf, "pose_enc": pose_enc, "extrinsics": extrinsics, "intrinsics": intrinsics,
        }
        latest = frame_offset + (C - 1)
        if c.policy == "full":
            new = glob.finish(self)
        else:
            new = glob.finish(self, world_points, world_points_conf, frame_offset, latest)
        new.update(cam.finish(self, frame_offset, C, latest))
        return tuple(outputs[n] for n in self.output_names) + tuple(new[n] for n in self.state_names)


def layout_outputs() -> tuple[str, ...]:
    from ..graph.layout import OUTPUTS

    return OUTPUTS


@contextlib.contextmanager
def traceable(model: VGGT, height: int, width: int) -> Iterator[None]:
    """Make the model traceable by torch.export for a fixed frame size, numerics unchanged.

    - RoPE sizes its cos/sin table with ``int(positions.max())``, a data-dependent value for the
      tracer. The positions of a frame of this size are known, so the table is built here the
      reference way (same ops and dtype) and RoPE only looks it up.
    - The DPT heads' UV position embeddings depend only on the (fixed) feature-map sizes: they are
      computed here, eagerly, by the reference function and enter the graph as constants.
    Both would otherwise be hundreds of nodes recomputed on every step (and slow the export down).
    """
    cfg = model.config
    gh, gw = height // cfg.patch_size, width // cfg.patch_size
    patched: list[tuple[object, str]] = []
    rope = model.aggregator.rope
    if rope is not None:
        length = max(gh, gw) + 1
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (rope.frequency ** (torch.arange(0, half, 2).float() / half))
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        tables = {dt: (angles.to(dt).cos(), angles.to(dt).sin()) for dt in (torch.float32,)}
        q = half // 2

        def rotate(x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
            c, s_ = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
            return x * c + torch.cat([-x[..., q:], x[..., :q]], dim=-1) * s_

        def rope_forward(tokens: Tensor, positions: Tensor) -> Tensor:
            cos, sin = tables[tokens.dtype]
            return torch.cat([rotate(tokens[..., :half], positions[..., 0], cos, sin),
                              rotate(tokens[..., half:], positions[..., 1], cos, sin)], dim=-1)

        rope.forward = rope_forward
        patched.append((rope, "forward"))
    embed = model.aggregator.patch_embed
    if hasattr(embed, "position_embedding"):  # DINOv2: pos_embed resized (bicubic, antialiased) to the grid
        with torch.no_grad():
            table = embed.position_embedding(gh, gw, torch.float32).detach().clone()
        embed.position_embedding = lambda grid_h, grid_w, dtype, table=table: table.to(dtype)
        patched.append((embed, "position_embedding"))
    for head in (model.depth_head, model.point_head):
        if head is None or not head.use_pos_embed:
            continue
        # float32 constants made before tracing (the graph holds them, not their sines and cosines)
        embeds = head.position_embeddings((height, width), "cpu", torch.float32)

        def position_embeddings(image_hw, device, dtype, embeds=embeds) -> tuple[Tensor, ...]:
            return tuple(e.to(device) for e in embeds)

        head.position_embeddings = position_embeddings
        patched.append((head, "position_embeddings"))

        def dpt_forward(layers, image_hw, patch_start_idx, frames_chunk_size=8, head=head):
            # DPTHead.forward loops over groups of frames with range(0, streams * frames, chunk),
            # which the tracer cannot do over a dynamic size. Frames are independent in the head,
            # so the graph runs all of a step's frames as one group (same per-frame numerics).
            first = layers[head.intermediate_layer_idx[0]]
            B, S = first.shape[:2]
            flat = [None if t is None else t.reshape(B * S, 1, *t.shape[2:]) for t in layers]
            pred, conf = head._forward_frames(flat, image_hw, patch_start_idx, 0, B * S)
            return pred.reshape(B, S, *pred.shape[2:]), conf.reshape(B, S, *conf.shape[2:])

        head.forward = dpt_forward
        patched.append((head, "forward"))
    try:
        yield
    finally:
        for obj, name in patched:
            delattr(obj, name)
