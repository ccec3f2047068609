"""Reconstruction quality of every cache policy on real datasets with ground truth (``stac eval``).

* ``datasets``: loaders for TUM RGB-D, 7-Scenes, ScanNet-style exports, plain folders and
  ``stac synth`` folders, with the papers' frame subsampling;
* ``sequence``: ``EvalSequence`` and the preprocessing that moves ground truth with the frames;
* ``runner``: streaming each sequence under each policy (``Stream``), memory and speed;
* ``scoring``: the field's metrics (``stac_backend.metrics``) for a sequence and its segments;
* ``report``: JSON, a markdown table and plots.
"""

from .datasets import FORMATS, LoadOptions, associate, detect_format, load_sequences
from .report import markdown_table, provenance, write_report
from .runner import evaluate, policy_configs, stream_sequence, summarize
from .scoring import MetricSettings, score_prediction
from .sequence import EvalSequence, FrameRecord, build_sequence

__all__ = [
    "FORMATS",
    "LoadOptions",
    "associate",
    "detect_format",
    "load_sequences",
    "EvalSequence",
    "FrameRecord",
    "build_sequence",
    "policy_configs",
    "stream_sequence",
    "evaluate",
    "summarize",
    "MetricSettings",
    "score_prediction",
    "markdown_table",
    "provenance",
    "write_report",
]
