"""The embedded default model: real Gemma 4 architecture, right answers on held-out tasks, and
Tandem's decoder giving transformers' greedy tokens."""

import json

import pytest

from default_model import ASSISTANT, CHECKPOINT
from default_model.evaluate import evaluate
from default_model.tasks import KINDS
from gemma4_model.config import load_config


def test_checkpoint_has_the_gemma4_architecture_and_fits_the_size_budget():
    config = load_config(CHECKPOINT)
    text = config.text
    assert config.model_type == "gemma4" and config.vision is not None and config.audio is not None
    assert text.ple_dim > 0 and text.first_shared_layer < text.num_layers
    assert {l.layer_type for l in text.layers} == {"sliding_attention", "full_attention"}
    size = sum(f.stat().st_size for d in (CHECKPOINT, ASSISTANT) for f in d.iterdir())
    assert size <= 20 * 2**20, size
    tokenizer_config = json.loads((CHECKPOINT / "tokenizer_config.json").read_text())
    assert tokenizer_config["image_token"] == "<|image|>" and tokenizer_config["eot_token"] == "<turn|>"


@pytest.fixture(scope="module")
def report():
    return evaluate(CHECKPOINT, per_kind=10, seed=11, device="cpu", assistant_dir=ASSISTANT)


def test_heldout_accuracy_with_transformers(report):
    assert set(report["accuracy_per_kind"]) == set(KINDS)
    assert report["accuracy_overall"] >= 0.95, report["failures"]


def test_tandem_gives_transformers_greedy_tokens_on_every_prompt(report):
    """Text prompts through Tandem's decoder; image and audio prompts through its encoders too."""
    compared = report["tandem_matches_transformers"]
    assert compared["compared"] == 100 and compared["identical"] == compared["compared"], compared
    assert compared["multimodal_compared"] == 30 and compared["multimodal_identical"] == 30


def test_assistant_drafts_are_mostly_accepted(report):
    """Greedy, 5 drafts per round, held-out prompts of every kind (issue target: mean length >= 3)."""
    acceptance = report["draft_acceptance"]
    assert acceptance["draft_tokens"] == 5
    assert set(acceptance["mean_acceptance_length_per_kind"]) == set(KINDS)
    assert acceptance["mean_acceptance_length"] >= 3.0, acceptance
