"""Tandem's embedded default model: a small Gemma 4 trained on a synthetic task set.

`CHECKPOINT` is the committed Hugging Face-format checkpoint the server and demo use by default.
"""

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
