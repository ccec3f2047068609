"""Grow a trained model deeper without changing what it computes.

    python -m stac_backend.training.grow --checkpoint stac_backend/assets/small.safetensors \
        --factor 2 --out runs/grown/model.safetensors

Training a larger model from scratch would throw away the hours the current one has had. Instead,
before each (frame, global) block pair of the aggregator, ``factor - 1`` new pairs are inserted
whose LayerScale gammas are zero: a pre-norm block with zero gammas is the identity
(x + 0 * attn + 0 * mlp), so the grown model's outputs equal the original's exactly, and training
then lets the new blocks take part as their gammas leave zero. The new blocks start as copies of
the pair they precede, so their attention and MLP weights are already tuned to the features they
see. The original pair j becomes pair ``j * factor + factor - 1``; the DPT heads' intermediate
layers are renumbered the same way and the camera head still reads the last pair, so every head
reads the same features as before.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..model import build_model, save_checkpoint
from ..model.config import config_with
from ..model.vggt import VGGT, count_parameters


def grown_index(layer: int, factor: int) -> int:
    """Where the original block pair ``layer`` sits in a model grown by ``factor``."""
    return layer * factor + factor - 1


def grow_depth(model: VGGT, factor: int) -> VGGT:
    """A model with ``factor`` x the aggregator depth that computes exactly what ``model`` does."""
    c = model.config
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if c.aa_block_size != 1:
        raise ValueError(f"growing needs aa_block_size 1 (one frame and one global block per layer), got {c.aa_block_size}")
    if not c.init_values:
        raise ValueError("growing needs LayerScale in the blocks (init_values > 0): zero gammas make the new blocks identities")
    grown_config = config_with(
        c,
        depth=c.depth * factor,
        dpt_intermediate_layer_idx=tuple(grown_index(i, factor) for i in c.dpt_intermediate_layer_idx),
    )
    grown = VGGT(grown_config).to(next(model.parameters()).device)
    source = model.state_dict()
    state = {}
    for name, tensor in grown.state_dict().items():
        kind, index, rest = _block_name(name)
        if kind is None:
            state[name] = source[name].clone()
            continue
        original = index // factor  # the pair this one precedes (or is)
        value = source[f"aggregator.{kind}.{original}.{rest}"].clone()
        if index != grown_index(original, factor) and rest in ("ls1.gamma", "ls2.gamma"):
            value.zero_()
        state[name] = value
    grown.load_state_dict(state, strict=True)
    return grown.train(model.training)


def _block_name(name: str) -> tuple[str | None, int, str]:
    """("frame_blocks" | "global_blocks", index, the rest) for an aggregator block's tensor."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "aggregator" and parts[1] in ("frame_blocks", "global_blocks"):
        return parts[1], int(parts[2]), ".".join(parts[3:])
    return None, -1, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a .safetensors that records its config")
    p.add_argument("--factor", type=int, default=2, help="aggregator depth multiplier")
    p.add_argument("--out", type=Path, required=True, help="where to write the grown .safetensors")
    args = p.parse_args(argv)
    model = build_model(checkpoint=args.checkpoint, compile=False, cuda_graphs=False, fp8=False)
    grown = grow_depth(model, args.factor)
    save_checkpoint(grown, args.out)
    print(f"grew {args.checkpoint} from depth {model.config.depth} ({count_parameters(model):,} parameters) to depth "
          f"{grown.config.depth} ({count_parameters(grown):,}); heads read layers {grown.config.dpt_intermediate_layer_idx}: "
          f"{args.out}", flush=True)
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
