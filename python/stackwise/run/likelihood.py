"""Bits per byte of a trained rack, and which quantity that figure is.

- **causal racks** (``clm``): the next-token cross entropy of the evaluated windows in bits,
  over the UTF-8 bytes of their target tokens. An exact likelihood: comparable across
  tokenizers and with other language models.
- **diffusion racks**: an upper bound on the negative log-likelihood, the continuous-time ELBO
  of absorbing-state (masked) diffusion as MDLM reports it (Sahoo et al. 2024, "Simple and
  Effective Masked Diffusion Language Models", eq. 10-11, with the linear schedule
  alpha_t = 1 - t, so each token is masked with probability t):

      -log p(x) <= integral over t in (0, 1] of (1/t) * E[ sum over masked positions of
                   -log p_theta(x_l | x_t) ] dt

  The integral is a fixed ``ELBO_POINTS``-point Gauss-Legendre quadrature in t over [0, 1]
  (no Monte-Carlo draw of t; the masks at each node are the run's hash masks of the sample
  ids, :func:`~stackwise.training.strategies.masking.diffusion_corrupt`, so the figure is
  reproducible). The rack sees every noise level of the integral, including those outside the
  ``training.masking`` range it was trained on; it is an upper bound, not an estimate of the
  likelihood. A rack with a time embedding gets t at each node. Special tokens are never
  masked and count no bytes.
- **mlm racks**: none. BERT-style masking (some selected tokens kept or replaced at random) is
  not a generative process and its masked-token loss bounds no likelihood (scaling it by all
  tokens would count every token as predicted at the masked positions' loss).

Each quantity has a name, reported beside the figure as ``bits_per_byte_quantity`` in
``stackwise eval``, ``summary.json`` and the ``final`` record of ``metrics.jsonl``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stackwise.training.strategies.masking import IGNORE_INDEX, diffusion_corrupt

ELBO_POINTS = 8
NEXT_TOKEN = "next-token cross entropy (exact)"
DIFFUSION_ELBO = (
    f"masked-diffusion ELBO upper bound (MDLM, linear schedule, {ELBO_POINTS}-point "
    "Gauss-Legendre quadrature in t)"
)


def bits_per_byte_quantity(objective: str) -> str | None:
    """The name of what ``bits_per_byte`` measures for a rack of ``objective`` (None: no
    figure is reported, see the module docstring)."""
    return {"clm": NEXT_TOKEN, "diffusion": DIFFUSION_ELBO}.get(objective)


def quadrature(points: int = ELBO_POINTS) -> list[tuple[float, float]]:
    """Gauss-Legendre nodes and weights ``(t, w)`` on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(points)
    return [(float((xi + 1) / 2), float(wi / 2)) for xi, wi in zip(x, w, strict=True)]


@torch.inference_mode()
def diffusion_nll_bound_nats(
    rack,
    batches,
    *,
    seed: int,
    mask_token_id: int,
    special_ids: tuple[int, ...],
    device: torch.device,
    points: int = ELBO_POINTS,
) -> float:
    """The ELBO bound (nats, summed over every window) of ``batches``: an iterable of
    ``(input_ids [B, S], sample_ids [B])``."""
    nodes = quadrature(points)
    time_conditioned = getattr(rack, "time_embedding", None) is not None
    total = 0.0
    for ids, sample_ids in batches:
        for t, w in nodes:
            inputs, labels = diffusion_corrupt(
                ids, sample_ids, t, seed=seed, mask_token_id=mask_token_id, special_ids=special_ids
            )
            time = torch.full((ids.shape[0],), t, device=device) if time_conditioned else None
            hidden = rack.forward_from(rack.embed(inputs.to(device), time), 0)
            nats = rack.token_loss(
                hidden, labels.to(device), reduction="sum", ignore_index=IGNORE_INDEX
            )
            total += w * float(nats) / t
    return total


def bits_per_byte(nats: float, n_bytes: int) -> float | None:
    return nats / n_bytes / math.log(2) if n_bytes else None
