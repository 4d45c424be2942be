"""Stage 0: pretraining of the tiny backbones (the CPU analog of CLIP + an LLM)."""
import os

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")

# The base checkpoint made by `launch/pretrain_backbones.py --config=configs/pretrain_tiny.py`,
# shipped with the package so the quickstart starts from pretrained backbones like a real run.
SHIPPED_BASE = os.path.join(_ASSETS, "base_tiny")

# The LCA + projector (+ label head) made by `launch/align_adapter.py` on SHIPPED_BASE with the
# quickstart config: stage 1 starts from it (`model.init_adapter`), as LLaVA's instruction tuning
# starts from its released pretrained projector.
SHIPPED_ADAPTER = os.path.join(_ASSETS, "adapter_tiny")
