"""Text generation from a trained rack.

Causal racks (``clm``): autoregressive sampling with a KV cache. The prompt is run once
(prefill) and each new token costs one position through every block
(:meth:`MLGKALayer.forward_cached`); greedy decoding with the cache gives exactly the tokens of
recomputing the whole sequence each step. When the sequence reaches ``max_seq_len`` the cache is
rebuilt from the last half of it (a sliding window).

Masked racks (``mlm`` / ``diffusion``): the prompt is followed by ``max_new_tokens`` mask tokens,
which two samplers fill in:

- ``depth`` (depth as time): one step per stack. Step i runs the rack from stack i on (prepend
  racks: the sub-rack that stack i was trained with, at its mask ratio r_i, highest on the left;
  append racks: the whole rack), predicts every masked position and unmasks the most confident
  ones until r_{i+1} of the generated positions are still masked (none after the last stack).
- ``diffusion``: iterative absorbing-state sampling with ``steps`` steps (Austin et al. 2021,
  "Structured Denoising Diffusion Models in Discrete State-Spaces"; Sahoo et al. 2024, MDLM):
  at step t = T..1 each masked position draws its token and is revealed with probability 1/t, so
  the last step reveals all.

A rack with a time embedding (``time_interpretation: input``) is told the noise level of each
step, following the sampler's schedule: the depth sampler's step i gets r_i, the mask ratio of
stack i's stage; the diffusion sampler's step t of T gets t/T,
the expected masked fraction of the generated positions at that step.

One request generates at most :data:`MAX_NEW_TOKENS` tokens (65,536), checked before any work:
a larger request is a typo (it would run for hours); generate in several calls instead.

Sampling: ``temperature`` 0 is greedy; otherwise softmax(logits / temperature) after top-k and
top-p (nucleus) filtering. Mask and pad ids are never produced. Everything random is drawn from
one ``torch.Generator`` seeded with ``seed``, so a seed fixes the output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stackwise.exceptions import ConfigurationError
from stackwise.model.attention import KVCache

SAMPLERS = ("ar", "depth", "diffusion")
MAX_NEW_TOKENS = 65536


def check_max_new_tokens(n: object) -> int:
    """``n`` if it is a whole number in [1, :data:`MAX_NEW_TOKENS`], else ConfigurationError."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
        raise ConfigurationError(
            f"must be a whole number in [1, {MAX_NEW_TOKENS}], got {n!r}", "--max-new-tokens"
        )
    return n


def filter_logits(
    logits: Tensor, top_k: int | None = None, top_p: float | None = None, banned=()
) -> Tensor:
    """logits [..., V] with banned ids, those outside the top k and outside the smallest set of
    probability >= top_p set to -inf (the most likely token always stays)."""
    logits = logits.float().clone()
    for i in banned:
        if i is not None and 0 <= i < logits.shape[-1]:
            logits[..., i] = float("-inf")
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose(
    logits: Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    banned=(),
) -> tuple[Tensor, Tensor]:
    """Pick a token per row of logits [N, V]; returns (ids [N], their probability [N])."""
    filtered = filter_logits(logits, top_k, top_p, banned).cpu()
    if temperature <= 0:
        probs = torch.softmax(filtered, dim=-1)
        ids = filtered.argmax(-1)
    else:
        probs = torch.softmax(filtered / temperature, dim=-1)
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return ids, probs.gather(-1, ids[:, None]).squeeze(-1)


# -- causal racks ---------------------------------------------------------------------------------


def _blocks(rack) -> list:
    return [block for stack in rack.stacks for block in stack.blocks]


def forward_cached(rack, ids: Tensor, caches: list[KVCache]) -> Tensor:
    """Logits [B, S, V] of the S tokens ``ids`` following the positions held in ``caches``
    (one per block, extended in place)."""
    offset = caches[0].length
    h = rack.lexical.get_embeddings()(ids)
    if rack.position is not None:
        h = h + rack.position.weight[offset : offset + ids.shape[1]]
    for block, cache in zip(_blocks(rack), caches, strict=True):
        h = block.forward_cached(h, cache)
    return rack.logits(h)


@torch.no_grad()
def generate_causal(
    rack,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
    banned=(),
) -> list[int]:
    """Prompt + ``max_new_tokens`` sampled tokens (see the module docstring)."""
    check_max_new_tokens(max_new_tokens)
    if not prompt_ids:
        raise ConfigurationError("the prompt encodes to no token; give some text", "--prompt")
    limit = rack.config.max_seq_len
    dev = next(rack.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    rack.eval()
    out = list(prompt_ids)
    caches: list[KVCache] | None = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = rack(torch.tensor([out[-limit:]], device=dev))
        elif caches is None or caches[0].length >= limit:
            # prefill: the prompt, or (window full) the last half of the sequence
            window = out[-limit:] if caches is None else out[-max(1, limit // 2) :]
            caches = [KVCache() for _ in _blocks(rack)]
            logits = forward_cached(rack, torch.tensor([window], device=dev), caches)
        else:
            logits = forward_cached(rack, torch.tensor([[out[-1]]], device=dev), caches)
        nxt, _ = choose(logits[:, -1], gen, temperature, top_k, top_p, banned)
        out.append(int(nxt[0]))
    return out


# -- masked racks ---------------------------------------------------------------------------------


def _level(config, i: int, n: int) -> float:
    """Masked fraction the depth sampler reaches before step i (i = n: 0)."""
    from stackwise.training.strategies.masking import MaskScheduler

    if i >= n:
        return 0.0
    m = config.training.masking
    return MaskScheduler(
        m.min_fraction, m.max_fraction, m.schedule, reverse=True
    ).get_mask_fraction(i, n)


def _time(rack, level: float, device) -> Tensor | None:
    """The noise level ``level`` as the time input [1] of a time-conditioned rack, else None."""
    if getattr(rack, "time_embedding", None) is None:
        return None
    return torch.full((1,), float(level), device=device)


def _masked_start(rack, prompt_ids, max_new_tokens, mask_id) -> tuple[Tensor, int]:
    limit = rack.config.max_seq_len
    check_max_new_tokens(max_new_tokens)
    if len(prompt_ids) + max_new_tokens > limit:
        raise ConfigurationError(
            f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceed the rack's "
            f"max_seq_len {limit}",
            "--max-new-tokens",
        )
    dev = next(rack.parameters()).device
    x = torch.tensor([list(prompt_ids) + [mask_id] * max_new_tokens], device=dev)
    return x, len(prompt_ids)


@torch.no_grad()
def generate_depth(
    rack,
    config,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    mask_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    banned=(),
) -> list[int]:
    """Depth-as-time unmasking, one step per stack (module docstring)."""
    x, p = _masked_start(rack, prompt_ids, max_new_tokens, mask_id)
    gen = torch.Generator().manual_seed(seed)
    n = len(rack.stacks)
    prepend = config.training.progressive.building_mode == "prepend"
    rack.eval()
    for i in range(n):
        masked = (x[0] == mask_id).nonzero().squeeze(-1)
        masked = masked[masked >= p]
        if len(masked) == 0:
            break
        start = i if prepend else 0
        time = _time(rack, _level(config, i, n), x.device)
        h = rack.forward_from(rack.embed(x, time), start)
        logits = rack.logits(h)[0, masked]
        ids, conf = choose(logits, gen, temperature, top_k, top_p, banned)
        keep_masked = min(len(masked), round(_level(config, i + 1, n) * max_new_tokens))
        n_reveal = len(masked) - keep_masked
        order = torch.argsort(conf, descending=True, stable=True)[:n_reveal]
        x[0, masked[order]] = ids[order].to(x.device)
    return x[0].tolist()


@torch.no_grad()
def generate_diffusion(
    rack,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    mask_id: int,
    steps: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    banned=(),
) -> list[int]:
    """Iterative masked-diffusion sampling in ``steps`` steps (module docstring)."""
    if steps < 1:
        raise ConfigurationError("must be >= 1", "--steps")
    x, p = _masked_start(rack, prompt_ids, max_new_tokens, mask_id)
    gen = torch.Generator().manual_seed(seed)
    rack.eval()
    for t in range(steps, 0, -1):
        masked = (x[0] == mask_id).nonzero().squeeze(-1)
        masked = masked[masked >= p]
        if len(masked) == 0:
            break
        logits = rack(x, time=_time(rack, t / steps, x.device))[0, masked]
        ids, _ = choose(logits, gen, temperature, top_k, top_p, banned)
        reveal = torch.rand(len(masked), generator=gen) < 1.0 / t
        x[0, masked[reveal]] = ids[reveal].to(x.device)
    return x[0].tolist()
