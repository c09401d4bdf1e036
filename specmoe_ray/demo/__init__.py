"""A demo target/draft pair trained on the Python standard library's own source.

`TARGET_DIR` is a small Qwen3-MoE (8 experts, top-2) and `DRAFT_DIR` a small dense Qwen3
distilled from it; both are ordinary Hugging Face checkpoints (config.json, bf16 safetensors,
tokenizer.json) written by `python -m specmoe_ray.demo.train`. `HELDOUT_FILE` lists the
stdlib files (paths relative to `sysconfig.get_paths()["stdlib"]`) that neither model nor the
tokenizer saw in training; `CARD_FILE` records how they were made and what they measure.
"""

from __future__ import annotations

import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
TARGET_DIR = os.path.join(DEMO_DIR, "target")
DRAFT_DIR = os.path.join(DEMO_DIR, "draft")
HELDOUT_FILE = os.path.join(DEMO_DIR, "heldout.txt")
CARD_FILE = os.path.join(DEMO_DIR, "CARD.md")

__all__ = ["CARD_FILE", "DEMO_DIR", "DRAFT_DIR", "HELDOUT_FILE", "TARGET_DIR"]
