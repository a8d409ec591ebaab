"""Next-token choice for a whole engine step: penalties, min_tokens, greedy or sampled
(temperature, min-p, top-k, top-p), seeded noise, and logprobs.

Per row, in this order (vLLM's v1 order):
1. repetition penalty over prompt + output tokens (CTRL / transformers / vLLM: a seen token's
   positive logit is divided by it, a negative one multiplied);
2. presence and frequency penalties over output tokens (OpenAI: logit -= frequency * count +
   presence * (count > 0));
3. min_tokens: stop ids (and EOS unless ignore_eos) get -inf until min_tokens outputs exist;
   a row whose grammar is active (`SamplingRow.constrained`) then gets -inf for every token its
   packed bitmask (`grammar.py`: int32 words, bit t set = token t allowed) does not allow;
4. temperature 0 (or top_k 1): argmax of these penalised logits; neutral penalties leave the
   logits untouched, so greedy output is what plain argmax gave before;
5. otherwise divide by the temperature, drop tokens under min_p times the top probability,
   keep the top_k, keep the smallest head whose probability reaches top_p, and choose
   argmax(p / q) with q ~ Exp(1) noise (the exponential race: a draw from p, renormalised).

Noise of a seeded request comes from a generator (on the logits' device) keyed on (seed, output
position), so its tokens do not depend on its batch mates, on preemption, or on which engine
(prefill or decode) samples; unseeded rows share the engine's generator.

Logprobs (when asked) follow vLLM's default (`logprobs_mode="raw_logprobs"`): log_softmax of the
model's raw logits, before penalties, temperature and truncation. `LOGPROBS_PROCESSED` reports
instead log_softmax of the penalised, temperature-scaled logits (temperature 0 counts as 1),
before min-p / top-k / top-p truncation (vLLM v0's convention).

`sample_one` is the one-row reference (the tests' oracle); `sample_batch` is the batched path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import xgrammar as xgr

from .batch import on_device

if TYPE_CHECKING:
    from .grammar import GrammarSpec

LOGPROBS_RAW = "raw"
LOGPROBS_PROCESSED = "processed"
LOGPROBS_MODES = (LOGPROBS_RAW, LOGPROBS_PROCESSED)


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of decoding (OpenAI-style names)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the top one's
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and output: >1 discourages repeats
    min_tokens: int = 0  # stop and EOS tokens are masked until this many tokens were generated
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    keep_logits: bool = False  # keep each step's logits on the sequence (tests)
    grammar: GrammarSpec | None = None  # structured output: what the output must match

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature < float("inf"):  # also refuses NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs (top count) must be in [0, 20], got {self.logprobs}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0




@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs of one sequence at one step."""

    params: SamplingParams
    prompt: Sequence[int]
    output: Sequence[int]  # tokens generated so far; len(output) is this token's position
    constrained: bool = False  # its grammar is active: the step's token bitmask row applies


@dataclass(frozen=True)
class RowSample:
    """One row's choice, and its logprobs when the row asked for them."""

    token: int
    logprob: float | None = None
    top_ids: np.ndarray | None = None  # int32 [k], best first
    top_logprobs: np.ndarray | None = None  # float32 [k]


_MASK64 = (1 << 64) - 1


def noise_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed for (request seed, output position) (splitmix64 finaliser)."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seeded_noise(seed: int, position: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Exp(1) noise [vocab] of a seeded request at one output position, drawn on `device`
    (the same on every device of one type; CPU and CUDA generators differ)."""
    generator = torch.Generator(device=device).manual_seed(noise_seed(seed, position))
    return torch.empty(vocab, device=device).exponential_(generator=generator)


def draw_noise(rows: Sequence[SamplingRow], vocab: int, generator: torch.Generator) -> torch.Tensor | None:
    """Noise [rows, vocab] on `generator`'s device for a step, or None when every row is greedy:
    seeded rows from their own key, unseeded sampled rows from `generator` (in row order),
    greedy rows ones (unused; they draw nothing)."""
    if all(r.params.greedy for r in rows):
        return None
    device = generator.device
    noise = torch.empty(len(rows), vocab, device=device)
    unseeded = [i for i, r in enumerate(rows) if not r.params.greedy and r.params.seed is None]
    if unseeded:
        noise[on_device(unseeded, device)] = torch.empty(len(unseeded), vocab, device=device).exponential_(
            generator=generator)
    for i, row in enumerate(rows):
        if row.params.greedy:
            noise[i] = 1.0
        elif row.params.seed is not None:
            noise[i] = seeded_noise(row.params.seed, len(row.output), vocab, device)
    return noise


# ---- the one-row reference ------------------------------------------------------------------


def sample_one(logits: torch.Tensor, row: SamplingRow, eos_token_ids: Sequence[int], noise: torch.Tensor | None,
               logprobs_mode: str = LOGPROBS_RAW, token_bitmask: torch.Tensor | None = None) -> RowSample:
    """One token from a [vocab] logits row, step by step as the module docstring says
    (`noise`, Exp(1) [vocab], is used only when the row samples; `token_bitmask`, int32
    [ceil(vocab / 32)], only when the row is constrained)."""
    p = row.params
    raw = logits.float()
    x = raw.clone()
    vocab = x.numel()
    if p.repetition_penalty != 1.0:
        for t in set(row.prompt) | set(row.output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
        counts = torch.zeros(vocab)
        for t in row.output:
            counts[t] += 1
        x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    if len(row.output) < p.min_tokens:
        for t in _stop_ids(p, eos_token_ids):
            x[t] = float("-inf")
    if row.constrained:
        words = [int(w) for w in token_bitmask.tolist()]
        for t in range(vocab):
            if not (words[t // 32] >> (t % 32)) & 1:
                x[t] = float("-inf")
    penalised = x
    if p.greedy:
        token = int(torch.argmax(x))
    else:
        x = x / p.temperature
        if p.min_p > 0:
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_k:
            kth = torch.sort(x, descending=True).values[min(p.top_k, vocab) - 1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        if noise is None:
            raise ValueError("a row that samples needs noise")
        token = int(torch.argmax(probs / noise.to(probs.device)))
    if p.logprobs is None:
        return RowSample(token)
    source = raw if logprobs_mode == LOGPROBS_RAW else penalised / (p.temperature or 1.0)
    lp = torch.log_softmax(source, dim=-1)
    top = torch.topk(lp, p.logprobs)
    return RowSample(token, float(lp[token]), top.indices.to(torch.int32).cpu().numpy(),
                     top.values.cpu().numpy())


def _stop_ids(p: SamplingParams, eos_token_ids: Sequence[int]) -> list[int]:
    return list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))


# ---- the batched path -----------------------------------------------------------------------


def sample_batch(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int],
                 noise: torch.Tensor | None, logprobs_mode: str = LOGPROBS_RAW,
                 token_bitmask: torch.Tensor | None = None) -> list[RowSample]:
    """One token per row of [rows, vocab] logits; the same choices as `sample_one` row by row.
    `noise` [rows, vocab] (Exp(1)) may be None only when every row is greedy; `token_bitmask`
    [rows, ceil(vocab / 32)] int32 is needed when a row is constrained."""
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    n, vocab = logits.shape
    assert n == len(rows), "one sampling row per logits row"
    raw, penalised = transform_logits(logits, rows, eos_token_ids, token_bitmask)
    return with_logprobs(raw, penalised, rows, choose_tokens(penalised, rows, noise).tolist(), logprobs_mode)


def choose_tokens(x: torch.Tensor, rows: Sequence[SamplingRow], noise: torch.Tensor | None) -> torch.Tensor:
    """Step 4-5 on transformed logits [rows, vocab]: argmax for greedy rows, the noise race over
    `sampling_probs` for the others; a [rows] tensor on x's device, queued without a host sync."""
    tokens = torch.argmax(x, dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        if noise is None:
            raise ValueError("rows that sample need noise")
        index = on_device(sampled, x.device)
        probs = sampling_probs(x[index], [rows[i].params for i in sampled])
        tokens[index] = torch.argmax(probs / noise.to(x.device)[index], dim=-1)
    return tokens


def transform_logits(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int],
                     token_bitmask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw float32 logits, logits after penalties, min_tokens and grammar masks): steps 1-3."""
    raw = logits.float()
    x = _penalise(raw, rows, logits.device)
    x = _mask_early_stops(x, rows, eos_token_ids)
    return raw, _mask_by_grammar(x, rows, token_bitmask)


def with_logprobs(raw: torch.Tensor, penalised: torch.Tensor, rows: Sequence[SamplingRow], tokens: Sequence[int],
                  logprobs_mode: str = LOGPROBS_RAW) -> list[RowSample]:
    """Each row's chosen token as a `RowSample`, with its logprobs when the row asked for them."""
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    device = raw.device
    token_list = [int(t) for t in tokens]
    results = [RowSample(t) for t in token_list]
    wanting = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if wanting:
        if logprobs_mode == LOGPROBS_RAW:
            source = raw[wanting]
        else:
            temps = torch.tensor([rows[i].params.temperature or 1.0 for i in wanting], device=device)
            source = penalised[wanting] / temps[:, None]
        lp = torch.log_softmax(source, dim=-1)
        chosen_ids = torch.tensor([token_list[i] for i in wanting], dtype=torch.long, device=device)
        chosen = lp.gather(1, chosen_ids[:, None])[:, 0].tolist()
        top = torch.topk(lp, max(rows[i].params.logprobs for i in wanting), dim=-1)
        top_ids = top.indices.to(torch.int32).cpu().numpy()
        top_values = top.values.cpu().numpy()
        for j, i in enumerate(wanting):
            k = rows[i].params.logprobs
            results[i] = RowSample(token_list[i], chosen[j], top_ids[j, :k].copy(), top_values[j, :k].copy())
    return results


def _penalise(x: torch.Tensor, rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
    """Repetition, presence and frequency penalties; rows without them stay bit-identical."""
    marked = [i for i, r in enumerate(rows) if r.params.penalised]
    if not marked:
        return x
    x = x.clone()
    sub = x[marked]
    n, vocab = sub.shape
    seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
    counts = torch.zeros(n, vocab, device=device)
    seen_rows, seen_ids, out_rows, out_ids = [], [], [], []
    for j, i in enumerate(marked):
        ids = set(rows[i].prompt) | set(rows[i].output)
        seen_rows += [j] * len(ids)
        seen_ids += ids
        out_rows += [j] * len(rows[i].output)
        out_ids += rows[i].output
    seen[torch.tensor(seen_rows, dtype=torch.long, device=device),
         torch.tensor(seen_ids, dtype=torch.long, device=device)] = True
    if out_ids:
        index = (torch.tensor(out_rows, dtype=torch.long, device=device),
                 torch.tensor(out_ids, dtype=torch.long, device=device))
        counts.index_put_(index, torch.ones(len(out_ids), device=device), accumulate=True)
    params = [rows[i].params for i in marked]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    repeated = seen & (rep != 1.0)
    sub = torch.where(repeated, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).float()
    x[marked] = sub
    return x


def _mask_early_stops(x: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int]) -> torch.Tensor:
    """Stop and EOS ids at -inf for rows that have fewer than min_tokens outputs."""
    pairs = [(i, t) for i, r in enumerate(rows) if len(r.output) < r.params.min_tokens
             for t in _stop_ids(r.params, eos_token_ids)]
    if not pairs:
        return x
    x = x.clone()
    row_idx, ids = zip(*pairs)
    x[on_device(row_idx, x.device), on_device(ids, x.device)] = float("-inf")
    return x


def _mask_by_grammar(x: torch.Tensor, rows: Sequence[SamplingRow], token_bitmask: torch.Tensor | None) -> torch.Tensor:
    """-inf where a constrained row's bitmask forbids the token; other rows untouched. xgrammar's
    kernel (C++ on CPU, CUDA/Triton on GPU) does it in place on the marked rows: a torch unpack
    of the bits costs several times more at Gemma 4's 262144 ids (bench/grammar_mask.py)."""
    marked = [i for i, r in enumerate(rows) if r.constrained]
    if not marked:
        return x
    if token_bitmask is None:
        raise ValueError("constrained rows need a token bitmask")
    x = x.clone()  # x may be the raw logits, which logprobs still need
    xgr.apply_token_bitmask_inplace(x, token_bitmask.to(x.device), vocab_size=x.shape[1], indices=marked)
    return x


def sampling_probs(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution [rows, vocab] sampled rows draw from: temperature, min-p, top-k and top-p
    over their transformed logits (step 5 before the race; speculative decoding verifies against it)."""
    n, vocab = x.shape
    device = x.device
    inf = float("-inf")
    # parameters reach the device without a sync; which steps apply is decided on the host
    x = x / on_device([p.temperature for p in params], device, torch.float32)[:, None]
    if any(p.min_p > 0 for p in params):
        min_p = on_device([p.min_p for p in params], device, torch.float32)[:, None]
        probs = torch.softmax(x, dim=-1)
        cut = (probs < min_p * probs.max(dim=-1, keepdim=True).values) & (min_p > 0)
        x = x.masked_fill(cut, inf)
    top_k = [min(p.top_k, vocab) if p.top_k else vocab for p in params]
    if any(k < vocab for k in top_k):
        sorted_x = torch.sort(x, dim=-1, descending=True).values
        kth = sorted_x.gather(1, on_device(top_k, device)[:, None] - 1)
        x = x.masked_fill(x < kth, inf)
    probs = torch.softmax(x, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = on_device([p.top_p for p in params], device, torch.float32)[:, None]
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p) & (top_p < 1.0)
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


class Sampler:
    """The engine's sampler: its EOS ids, its generator for unseeded rows, its logprobs mode."""

    def __init__(self, eos_token_ids: Sequence[int], seed: int | None = None, logprobs_mode: str = LOGPROBS_RAW,
                 device: torch.device | str = "cpu"):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.eos_token_ids = tuple(eos_token_ids)
        self.logprobs_mode = logprobs_mode
        self.generator = torch.Generator(device=device)  # noise is drawn where the logits are
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 token_bitmask: torch.Tensor | None = None) -> list[RowSample]:
        noise = draw_noise(rows, logits.shape[-1], self.generator)
        return sample_batch(logits, rows, self.eos_token_ids, noise, self.logprobs_mode, token_bitmask)

    def tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """`sample_batch`'s tokens as a [rows] tensor on the logits' device, queued without a host
        sync, for rows without penalties, grammar or logprobs (`engine.overlappable`)."""
        assert not any(r.params.penalised or r.constrained or r.params.logprobs is not None for r in rows)
        _, x = transform_logits(logits, rows, self.eos_token_ids)
        return choose_tokens(x, rows, draw_noise(rows, logits.shape[-1], self.generator))
