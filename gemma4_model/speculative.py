"""Speculative decoding: the drafter protocol, two test drafters, and the verification of one
position of draft tokens against the target's distribution.

Each step the engine asks a `Drafter` for up to k tokens per decoding sequence, runs the
sequence's newest token plus its drafts through the target in one forward (a verify run of k+1
query positions), and then walks the positions in order (`verify_position`): row j is the
target's distribution for the token after draft j. Greedy rows keep a draft while it equals the
target's argmax and emit the argmax at the first disagreement (or the bonus token after k
accepted drafts), so greedy output is token-identical to decoding without drafts. Sampled rows
use speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft x, drawn
from q, is kept with probability min(1, p(x) / q(x)); on rejection the token comes from
normalize(max(0, p - q)); after the last draft (or with none) from p itself. p is the request's
distribution after every sampling transform (penalties, min_tokens, grammar mask, temperature,
min-p, top-k, top-p) at that position, so the output distribution is that of plain sampling. A
deterministic drafter (`Proposal.probs` None) has q = one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import torch

from .sampling import (LOGPROBS_RAW, RowSample, SamplingRow, draw_noise, noise_seed, sampling_probs,
                       transform_logits, with_logprobs)

if TYPE_CHECKING:
    from .engine import GenerationSequence
    from .kv_cache import PagedKVCache

# Drafts verified per step when the server is given none, by target: the published Gemma 4 MTP
# recipes' recommendation (E2B 2; E4B, 12B, 26B-A4B and 31B 4), keyed by the text decoder's
# (hidden size, layers); any other target gets DEFAULT_NUM_SPECULATIVE_TOKENS.
RECOMMENDED_NUM_SPECULATIVE_TOKENS = {(1536, 35): 2, (2560, 42): 4, (3840, 48): 4, (2816, 30): 4, (5376, 60): 4}
DEFAULT_NUM_SPECULATIVE_TOKENS = 4

# Keys the acceptance coin of a seeded request apart from its sampling noise at the same position.
_ACCEPT_SALT = 0x5A17_AC5E_D0C0_FFEE


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for a list of sequences, in the order they were asked for.

    `tokens[i]`: up to k draft token ids for sequence i (fewer, or none, is allowed).
    `probs[i]`: float32 [len(tokens[i]), vocab], the distribution each draft token was drawn from,
    or None when the drafter is deterministic (then q is one-hot on the token).
    """

    tokens: list[list[int]]
    probs: list[torch.Tensor | None]

    def __post_init__(self):
        if len(self.tokens) != len(self.probs):
            raise ValueError("a proposal needs one probs entry (or None) per sequence")
        for toks, q in zip(self.tokens, self.probs):
            if q is not None and q.shape[0] < len(toks):
                raise ValueError(f"draft probs have {q.shape[0]} rows for {len(toks)} tokens")


class Drafter(Protocol):
    """Proposes draft tokens for running sequences. Called once per engine step with the
    sequences that will verify drafts; each sequence's newest token is `seq.tokens[-1]`, its KV
    is not yet in the cache (positions below it are), and `seq.last_hidden` holds the target's
    final-norm hidden state of the position that produced it (None before its first token)."""

    def draft(self, cache: PagedKVCache, seqs: Sequence[GenerationSequence], k: int) -> Proposal: ...


class OracleDrafter:
    """Proposes each sequence's known future: `futures` maps a prompt (as a tuple) to the output
    tokens expected after it (e.g. the target's own greedy continuation computed beforehand).
    `wrong_every` > 0 corrupts every n-th proposed position (a token off by one) to exercise rejections."""

    def __init__(self, futures: Mapping[tuple[int, ...], Sequence[int]], vocab_size: int, wrong_every: int = 0):
        self.futures = {tuple(k): list(v) for k, v in futures.items()}
        self.vocab_size = vocab_size
        self.wrong_every = wrong_every

    def draft(self, cache, seqs, k: int) -> Proposal:
        tokens = []
        for seq in seqs:
            future = self.futures.get(tuple(seq.prompt), [])
            done = len(seq.output)
            proposed = list(future[done:done + k])
            if self.wrong_every:
                proposed = [(t + 1) % self.vocab_size if (done + j) % self.wrong_every == 0 else t
                            for j, t in enumerate(proposed)]
            tokens.append(proposed)
        return Proposal(tokens, [None] * len(seqs))


class RandomDrafter:
    """Random drafts from a random distribution (mostly rejected: a test of the acceptance rule).

    For each sequence and draft position, q = softmax(sharpness * N(0, 1) logits) and the token
    is drawn from q. Its randomness is keyed on (seed, the sequence's id and tokens so far), so a
    sequence's drafts do not depend on what its batch mates do, and sequences with equal tokens
    still draw independently. `deterministic` reports no probs (q is then one-hot on the drawn token)."""

    def __init__(self, vocab_size: int, seed: int = 0, sharpness: float = 2.0, deterministic: bool = False):
        self.vocab_size = vocab_size
        self.seed = seed
        self.sharpness = sharpness
        self.deterministic = deterministic

    def draft(self, cache, seqs, k: int) -> Proposal:
        tokens, probs = [], []
        for seq in seqs:
            key = hash((seq.seq_id, tuple(seq.tokens))) & ((1 << 62) - 1)  # ints hash the same in every process
            generator = torch.Generator().manual_seed(noise_seed(self.seed, key))
            q = torch.softmax(self.sharpness * torch.randn(k, self.vocab_size, generator=generator), dim=-1)
            drawn = torch.multinomial(q, 1, generator=generator)[:, 0] if k else torch.zeros(0, dtype=torch.long)
            tokens.append(drawn.tolist())
            probs.append(None if self.deterministic else q)
        return Proposal(tokens, probs)


def accept_coin(row: SamplingRow, generator: torch.Generator) -> float:
    """Uniform [0, 1) for the acceptance test of a sampled row at its next output position:
    from a generator keyed on (seed, position) for a seeded request, else from `generator`."""
    if row.params.seed is not None:
        keyed = torch.Generator(device=generator.device).manual_seed(
            noise_seed(row.params.seed ^ _ACCEPT_SALT, len(row.output)))
        return float(torch.rand(1, generator=keyed, device=generator.device))
    return float(torch.rand(1, generator=generator, device=generator.device))


def verify_position(logits: torch.Tensor, rows: Sequence[SamplingRow], drafts: Sequence[int | None],
                    draft_probs: Sequence[torch.Tensor | None], eos_token_ids: Sequence[int],
                    generator: torch.Generator, logprobs_mode: str = LOGPROBS_RAW,
                    token_bitmask: torch.Tensor | None = None) -> list[tuple[RowSample, bool]]:
    """One position of verification for several sequences: per row, the token to emit (with its
    logprobs when asked) and whether it is the accepted draft (then the next position follows).

    `logits` [rows, vocab] are the target's at this position; `drafts[i]` the draft token there
    (None: this row emits its bonus / plain token); `draft_probs[i]` q [vocab] it was drawn from
    (None: deterministic, one-hot). A row without a draft gets exactly the plain sampler's token.
    """
    raw, penalised = transform_logits(logits, rows, eos_token_ids, token_bitmask)
    tokens = torch.argmax(penalised, dim=-1).tolist()
    accepted = [d is not None and r.params.greedy and d == t for r, d, t in zip(rows, drafts, tokens)]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        # The plain sampler's draw for every sampled row (its noise keyed as without drafts), then
        # the acceptance test for the rows that have a draft here.
        noise = draw_noise([rows[i] for i in sampled], logits.shape[-1], generator).to(logits.device)
        probs = sampling_probs(penalised[sampled], [rows[i].params for i in sampled])
        plain = torch.argmax(probs / noise, dim=-1).tolist()
        for j, i in enumerate(sampled):
            p, d = probs[j], drafts[i]
            tokens[i] = plain[j]
            if d is None:
                continue
            q = draft_probs[i]
            q_d = 1.0 if q is None else float(q[d])
            if accept_coin(rows[i], generator) * q_d < float(p[d]):
                tokens[i], accepted[i] = d, True
                continue
            if q is None:
                residual = p.clone()
                residual[d] = 0.0
            else:
                residual = (p - q.to(p.device, p.dtype)).clamp(min=0.0)
            if bool((residual > 0).any()):  # else p <= q everywhere: rejection had probability 0
                tokens[i] = int(torch.argmax(residual / noise[j]))
    samples = with_logprobs(raw, penalised, rows, tokens, logprobs_mode)
    return list(zip(samples, accepted))


class AssistantDrafter:
    """A Gemma 4 assistant (`drafter.Drafter`) as the engine's drafter: greedy drafts (q one-hot,
    so rejection sampling stays exact), from each sequence's newest token at position q and the
    target's final-norm hidden state that produced it (`GenerationSequence.last_hidden`)."""

    def __init__(self, assistant):
        self.assistant = assistant

    def draft(self, cache: PagedKVCache, seqs: Sequence[GenerationSequence], k: int) -> Proposal:
        """Sequences without a hidden state yet (a handoff that carried none) get no drafts."""
        ready = [s for s in seqs if s.last_hidden is not None]
        tokens: dict[int, list[int]] = {}
        if ready:
            device = ready[0].last_hidden.device
            last = torch.tensor([s.tokens[-1] for s in ready], device=device)
            positions = torch.tensor([s.num_tokens - 1 for s in ready], device=device)
            hidden = torch.stack([s.last_hidden for s in ready])
            result = self.assistant.draft(cache, [s.seq_id for s in ready], last, hidden, positions, k)
            tokens = {s.seq_id: row.tolist() for s, row in zip(ready, result.tokens)}
        return Proposal([tokens.get(s.seq_id, []) for s in seqs], [None] * len(seqs))


def recommended_num_speculative_tokens(hidden_size: int, num_layers: int) -> int:
    """Drafts per step for a target of this shape (see RECOMMENDED_NUM_SPECULATIVE_TOKENS)."""
    return RECOMMENDED_NUM_SPECULATIVE_TOKENS.get((hidden_size, num_layers), DEFAULT_NUM_SPECULATIVE_TOKENS)
