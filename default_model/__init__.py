"""Tandem's embedded default model: a small Gemma 4 trained on a synthetic task set.

`CHECKPOINT` is the committed Hugging Face-format checkpoint the server and demo use by default;
`ASSISTANT` is its paired assistant (MTP drafter) in the Gemma 4 assistant format.
"""

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
ASSISTANT = Path(__file__).resolve().parent / "assistant"
