"""The default model's assistant (MTP drafter), in the Gemma 4 assistant format.

Drafting protocol (as `transformers`' `SinglePositionMultiTokenCandidateGenerator` drives a
Gemma 4 assistant): the target has run up to the last seen token x_q at position q. The
assistant's input is concat(target embedding of x_q, target's final-norm hidden state at q-1)
-> `pre_projection`; every assistant layer attends the target's KV of the last KV-owning layer
of its own type (positions < q; sliding layers the last `sliding_window + 1` of them, see
`sliding_span`) with the query at position q. Its logits propose x_{q+1}; `post_projection` of its hidden state replaces the
target hidden state for the next draft step, which embeds the drafted token and keeps position
q. So K drafts cost K small forwards and no KV of the assistant's own.

Training (teacher-forced, the target frozen): one target pass over a batch gives embeddings,
hidden states, logits and KV for every position. For every answer position q at once (a
strictly causal mask over the target's KV), step j in 1..K feeds the data token x_{q+j-1} and
the previous step's projected state, and learns the target's next-token distribution at
position q+j-1 (soft cross-entropy), so it predicts the target's own next tokens.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from gemma4_model.hf_compat import assistant_kv_sharing

ASSISTANT_SEED_OFFSET = 2_000
DRAFT_STEPS = 5  # num_assistant_tokens written to the assistant's generation config


def assistant_config(target_config):
    """A 4-layer assistant whose attention shapes match the target's KV-owning layers."""
    from transformers import Gemma4AssistantConfig

    text = target_config.get_text_config()
    spec = text.to_dict()  # plain values (head sizes may live in per_layer_config)
    full_layer = spec["layer_types"].index("full_attention")
    overrides = {int(k): v for k, v in (spec.get("per_layer_config") or {}).items()}  # keys may be zero-padded ("05")
    full_head_dim = overrides.get(full_layer, {}).get("head_dim") or spec.get("global_head_dim")
    layer_types = ["sliding_attention"] * 3 + ["full_attention"]
    return Gemma4AssistantConfig(
        text_config=dict(
            vocab_size=text.vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=len(layer_types),
            num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
            head_dim=spec["head_dim"], global_head_dim=full_head_dim or spec["head_dim"], hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0, sliding_window=text.sliding_window, layer_types=layer_types,
            rope_parameters=text.rope_parameters, max_position_embeddings=text.max_position_embeddings,
            rms_norm_eps=text.rms_norm_eps, final_logit_softcapping=None, tie_word_embeddings=True,
            num_kv_shared_layers=len(layer_types), pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
        ),
        backbone_hidden_size=text.hidden_size, use_ordered_embeddings=False,
        pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
    )


def build_assistant(target_config, device):
    from transformers import Gemma4AssistantForCausalLM

    config = assistant_config(target_config)
    config._attn_implementation = "sdpa"  # boolean masks below
    with assistant_kv_sharing():
        model = Gemma4AssistantForCausalLM(config)
    model.generation_config.num_assistant_tokens = DRAFT_STEPS
    return model.to(device)


def sliding_span(window: int) -> int:
    """How many target KV positions below q a sliding assistant layer sees: `window + 1`.

    `transformers`' assistant (`Gemma4AssistantForCausalLM.create_attention_masks`) builds its
    sliding mask as a bidirectional window over the KV flipped to "distance from q - 1", and that
    window is inclusive (distance <= `sliding_window`): positions q - 1 - window .. q - 1. (The
    target's own sliding layers see `window` positions counting the query's own.) Drafting and
    training use this span so the drafts equal `transformers`' generator's.
    """
    return window + 1


def draft_kv(kv: dict, q: int, window: int) -> dict:
    """The target KV that a draft step at position q attends: full below q, sliding its span of it."""
    first = max(0, q - sliding_span(window))
    return {"full_attention": tuple(t[:, :, :q] for t in kv["full_attention"]),
            "sliding_attention": tuple(t[:, :, first: q] for t in kv["sliding_attention"])}


def strict_causal_masks(length: int, window: int, device) -> dict[str, torch.Tensor]:
    """[1, 1, L, L] boolean masks: query q sees target KV at positions < q (sliding: the last
    `sliding_span(window)` of them, as `draft_kv` slices them).

    Row 0 would see nothing; it gets position 0 so attention stays finite (never in the loss).
    """
    q = torch.arange(length, device=device)[:, None]
    kv = torch.arange(length, device=device)[None, :]
    full = (kv < q) | ((q == 0) & (kv == 0))
    sliding = full & (kv >= q - sliding_span(window))
    return {"full_attention": full[None, None], "sliding_attention": sliding[None, None]}


def assistant_forward(assistant, embeds, prev_hidden, position_ids, kv, masks):
    """One draft step for many queries at once: (logits, next projected hidden)."""
    x = assistant.pre_projection(torch.cat([embeds, prev_hidden], dim=-1))
    # output_hidden_states keeps transformers' prefill shortcut for KV-shared layers off: with many
    # queries it would slice per-layer inputs that an assistant does not have.
    out = assistant.model(inputs_embeds=x, attention_mask=masks, position_ids=position_ids,
                          shared_kv_states=kv, use_cache=False, output_hidden_states=True)
    h = out.last_hidden_state
    return assistant.lm_head(h), assistant.post_projection(h)


def target_pass(target, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Target embeddings (scaled, as the drafter sees them), final-norm hidden, logits, KV per type."""
    out = target(**batch, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    embeds = target.get_input_embeddings()(batch["input_ids"])
    return embeds, out.hidden_states[-1], out.logits, dict(out.shared_kv_states)


def teacher_forced_steps(assistant, embeds, hidden, kv, steps: int, window: int):
    """Each step's draft logits [B, L, V] for every anchor q at once, teacher-forced.

    Step j at anchor q feeds the data token x_{q+j-1} and the previous step's projected state
    (step 1: the target's h_{q-1}), with the query at position q over the target KV that
    `draft_kv(kv, q, window)` would give: the drafting protocol, for all anchors in one pass.
    """
    batch, length = embeds.shape[:2]
    masks = strict_causal_masks(length, window, embeds.device)
    positions = torch.arange(length, device=embeds.device)[None].expand(batch, -1)
    prev = F.pad(hidden, (0, 0, 1, 0))[:, :length]  # state entering step 1 at q: h_{q-1}
    for shift in range(steps):
        step_embeds = F.pad(embeds[:, shift:], (0, 0, 0, shift))  # x_{q+j-1}, j = shift + 1
        draft_logits, prev = assistant_forward(assistant, step_embeds, prev, positions, kv, masks)
        yield draft_logits


def chain_loss(assistant, embeds, hidden, logits, kv, answer: torch.Tensor, steps: int, window: int):
    """Mean soft cross-entropy of `steps` teacher-forced draft steps over all answer anchors."""
    losses = []
    for j, draft_logits in enumerate(teacher_forced_steps(assistant, embeds, hidden, kv, steps, window), start=1):
        shift = j - 1
        target_logits = F.pad(logits[:, shift:], (0, 0, 0, shift))  # target's next-token logits at q+j-1
        valid = answer & F.pad(answer[:, j:], (0, j), value=False)  # x_q and x_{q+j} are answer tokens
        if not valid.any():
            break
        teacher = torch.softmax(target_logits[valid].float(), dim=-1)
        losses.append(-(teacher * torch.log_softmax(draft_logits[valid].float(), dim=-1)).sum(-1).mean())
    return torch.stack(losses).mean()


def train_assistant(target, next_batch, args, device, log: list) -> torch.nn.Module:
    """Train a fresh assistant against the frozen `target`; `next_batch()` gives collated batches."""
    torch.manual_seed(args.seed + ASSISTANT_SEED_OFFSET)
    target.eval().requires_grad_(False)
    assistant = build_assistant(target.config, device)
    assistant.train()
    window = assistant.config.get_text_config().sliding_window
    opt = torch.optim.AdamW(assistant.parameters(), lr=args.assistant_lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0 = time.time()
    for step in range(args.assistant_steps):
        lr = args.assistant_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.assistant_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next_batch()
        answer = batch.pop("labels") != -100
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                embeds, hidden, logits, kv = target_pass(target, batch)
            loss = chain_loss(assistant, embeds, hidden, logits, kv, answer, DRAFT_STEPS, window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(assistant.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.assistant_steps - 1:
            log.append({"assistant_step": step, "loss": round(float(loss.detach()), 4), "lr": lr,
                        "elapsed_s": round(time.time() - t0, 1)})
            print(log[-1], flush=True)
    return assistant.eval()


@torch.no_grad()
def accepted_drafts(target, assistant, target_kwargs: dict, prompt_len: int, steps: int) -> list[int]:
    """Greedy drafting replayed over a finished greedy generation: accepted drafts per round.

    `target_kwargs` holds the prompt plus the target's own greedy output (and any media). Each
    round starts at the last seen token q, drafts up to `steps` tokens from the target's KV
    below q, and accepts the longest prefix equal to the target's greedy tokens; the target's
    next token follows, so a round yields accepted + 1 tokens. Exact for greedy decoding: the
    target's KV and hidden states for an accepted prefix are those of its own generation.
    """
    ids = target_kwargs["input_ids"]
    end = ids.shape[1]
    embeds, hidden, _, kv = target_pass(target, target_kwargs)
    window = assistant.config.get_text_config().sliding_window
    rounds = []
    q = prompt_len  # position of the first generated token
    while q < end - 1:
        state = hidden[:, q - 1: q]
        token_embed = embeds[:, q: q + 1]
        shared = draft_kv(kv, q, window)
        position = torch.tensor([[q]], device=ids.device)
        accepted = 0
        for j in range(steps):
            logits, state = assistant_forward(assistant, token_embed, state, position, shared,
                                              {"full_attention": None, "sliding_attention": None})
            draft = int(logits[0, -1].argmax())
            if q + 1 + j >= end or draft != int(ids[0, q + 1 + j]):
                break
            accepted += 1
            token_embed = target.get_input_embeddings()(ids[:, q + 1 + j: q + 2 + j])
        rounds.append(accepted)
        q += accepted + 1
    return rounds
