"""Stage 0: pretraining of the tiny backbones (the CPU analog of CLIP + an LLM)."""
import os

# The base checkpoint made by `launch/pretrain_backbones.py --config=configs/pretrain_tiny.py`,
# shipped with the package so the quickstart starts from pretrained backbones like a real run.
SHIPPED_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "assets", "base_tiny")
