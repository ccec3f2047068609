"""Files shipped inside the package.

``small.safetensors``: the embedded default model - the ``small`` preset (6.3 M parameters, fp16
weights with its config) trained on synthetic indoor scenes by ``stac_backend.training.train``
(see docs/quality.md for how and how well). Used when no checkpoint or preset is given.
"""

from pathlib import Path

EMBEDDED_CHECKPOINT = Path(__file__).with_name("small.safetensors")
