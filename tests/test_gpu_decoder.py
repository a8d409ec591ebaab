"""The decoder and paged cache on a CUDA device: same greedy tokens as transformers (CPU, float32).

Marked `gpu`: skipped on CPU-only machines with a reason; run through the device tool with
`python -m pytest -q -m gpu`.
"""

import pytest
import torch

from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.random_checkpoint import VARIANTS, load_reference, reference_greedy
from gemma4_model.sampling import SamplingParams


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_float32_greedy_matches_transformers(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    config, model = load_text_decoder(path, device="cuda", dtype=torch.float32)
    assert model.embed_tokens.weight.is_cuda
    prompts = [torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (37, 9, 23)]
    cache = PagedKVCache(config.text, page_size=4, num_pages=96, device="cuda", dtype=torch.float32)
    seqs = Engine(model, cache, SchedulerLimits(max_batch_tokens=16, chunk_size=8)).generate(
        prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    ref = load_reference(path, variant)
    for p, seq in zip(prompts, seqs):
        assert seq.output == reference_greedy(ref, p, 32)


@pytest.mark.gpu
def test_cuda_bfloat16_default_model_answers_like_float32_cpu():
    # Random tiny weights have near-tied logits that bf16 rounding flips; the trained model does not.
    from transformers import AutoTokenizer

    from default_model import CHECKPOINT
    from default_model.formatting import Renderer, answer_text
    from default_model.tasks import make_set

    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    renderer = Renderer(tok, None, None)
    instances = make_set(7, 21, heldout=True, kinds=("add", "copy", "reverse", "tool_call", "tool_answer", "json", "think"))
    prompts = [renderer.render(i, with_answer=False).prompt_ids for i in instances]
    params = SamplingParams(max_tokens=48, stop_token_ids=(1, tok.convert_tokens_to_ids("<turn|>"),
                                                           tok.convert_tokens_to_ids("<|tool_response>")))
    outputs = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        config, model = load_text_decoder(CHECKPOINT, device=device, dtype=dtype)
        cache = PagedKVCache(config.text, page_size=16, num_pages=256, device=device, dtype=dtype)
        outputs[device] = [s.output for s in Engine(model, cache).generate(prompts, params)]
    # A held-out prompt the model gets wrong rides on near-tied logits, where bf16 rounding may
    # take another branch; every answer it gets right must come out the same.
    right = [i for i, out in enumerate(outputs["cpu"]) if tok.decode(out) == answer_text(instances[i])]
    assert len(right) >= 18
    assert [outputs["cuda"][i] for i in right] == [outputs["cpu"][i] for i in right]


@pytest.mark.gpu
@pytest.mark.parametrize("dependent,prefetch_k,tma,splits,early,early_metadata", [
    (False, 0, False, False, 0, False), (True, 0, False, False, 0, False), (True, 2048, False, False, 0, False),
    (False, 0, True, False, 0, False), (True, 0, True, True, 0, False), (True, 0, True, True, 1, False),
    (True, 0, True, True, 2, False), (True, 0, True, True, 1, True)])
def test_cuda_small_m_products_answer_like_cublas(monkeypatch, dependent, prefetch_k, tma, splits, early,
                                                  early_metadata):
    """The decoder's products through `kernels.gemv` (TANDEM_SMALL_M), plain or dependent launches
    with the L2 prefetch (TANDEM_PDL, TANDEM_GEMV_PREFETCH_K) or the first weight chunks loaded before
    the wait (TANDEM_GEMV_EARLY_CHUNKS) or tensor-descriptor loads (TANDEM_GEMV_TMA), or their K
    splits added by the norms after them (TANDEM_SPLITS_IN_NORM_ROWS), and attention reading its
    metadata before its wait (TANDEM_ATTENTION_EARLY_METADATA), CUDA graphs on: the trained model's
    answers that cuBLAS's products get right come out the same."""
    from transformers import AutoTokenizer

    from default_model import CHECKPOINT
    from default_model.formatting import Renderer, answer_text
    from default_model.tasks import make_set
    from dataclasses import replace

    from gemma4_model.kernels import fused, gemv, paged_attention

    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    instances = make_set(11, 12, heldout=True, kinds=("add", "copy", "reverse", "json"))
    prompts = [Renderer(tok, None, None).render(i, with_answer=False).prompt_ids for i in instances]
    params = SamplingParams(max_tokens=40, stop_token_ids=(1, tok.convert_tokens_to_ids("<turn|>")))
    outputs = []
    for small_m in (False, True):
        monkeypatch.setattr(gemv, "SMALL_M_ON", small_m)
        monkeypatch.setattr(gemv, "PREFETCH_K", prefetch_k)
        monkeypatch.setattr(gemv, "EARLY_CHUNKS", early)
        monkeypatch.setattr(paged_attention, "DECODE_TILES",
                            replace(paged_attention.DECODE_TILES, early_metadata=early_metadata and small_m))
        monkeypatch.setattr(gemv, "TMA_ON", tma and small_m)
        monkeypatch.setattr(fused, "PDL_ON", dependent and small_m)
        monkeypatch.setattr(gemv, "SPLITS_IN_NORM_ROWS", gemv.MAX_ROWS if splits and small_m else 0)
        config, model = load_text_decoder(CHECKPOINT, device="cuda", dtype=torch.bfloat16)
        model.set_kernels(True)
        cache = PagedKVCache(config.text, page_size=16, num_pages=256, device="cuda", dtype=torch.bfloat16)
        engine = Engine(model, cache)
        graphs = engine.capture_decode_graphs(8)
        outputs.append([s.output for s in engine.generate(prompts, params)])
        graphs.close()  # its scratch page per group
    right = [i for i, out in enumerate(outputs[0]) if tok.decode(out) == answer_text(instances[i])]
    assert len(right) >= 9
    assert [outputs[1][i] for i in right] == [outputs[0][i] for i in right]


@pytest.mark.gpu
def test_cuda_bfloat16_image_and_audio_prompts_answer_like_float32_cpu():
    """Tandem's encoders and decoder on CUDA in bf16: the default model's image and audio tasks
    give the tokens they give on the CPU in float32."""
    from transformers import AutoTokenizer

    from default_model import CHECKPOINT
    from default_model.evaluate import tandem_greedy, tandem_media
    from default_model.formatting import Renderer
    from default_model.tasks import make_set
    from default_model.train import media_processors
    from gemma4_model.audio import load_audio_encoder
    from gemma4_model.config import load_config
    from gemma4_model.vision import load_image_encoder

    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    renderer = Renderer(tok, *media_processors())
    rendered = [renderer.render(i, with_answer=False) for i in make_set(7, 12, heldout=True, kinds=("colour", "tone", "beeps"))]
    special = dict(load_config(CHECKPOINT).special_tokens)
    stops = (1, tok.convert_tokens_to_ids("<turn|>"))
    outputs = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        config, model = load_text_decoder(CHECKPOINT, device=device, dtype=dtype)
        encoders = {"image": load_image_encoder(CHECKPOINT, device=device, dtype=dtype),
                    "audio": load_audio_encoder(CHECKPOINT, device=device, dtype=dtype)}
        outs = []
        for r in rendered:
            with torch.no_grad():
                media = tandem_media(r, encoders, special, device)
            cache = PagedKVCache(config.text, page_size=16, num_pages=64, device=device, dtype=dtype)
            outs.append(tandem_greedy(Engine(model, cache), r.prompt_ids, 8, stops, media))
        outputs[device] = outs
    assert outputs["cuda"] == outputs["cpu"]
