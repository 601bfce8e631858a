"""The Inception Score (Salimans et al. 2016) of any classifier's predictions.

    IS = exp(E_x KL(p(y|x) || p(y))),  p(y) = E_x p(y|x),

computed on `splits` consecutive chunks and reported as mean and (population) standard deviation
over the chunks, as the original TF code does. It lies in [1, K]: 1 when all predictions agree, K for
confident predictions spread evenly over K classes.
"""

from __future__ import annotations

import math

import torch


def inception_score(
    logits: torch.Tensor | None = None,  # (N, K) unnormalised class scores
    *,
    probs: torch.Tensor | None = None,   # (N, K) class probabilities, instead of logits
    splits: int = 10,                    # number of chunks for the mean and std
) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` chunks, in float64."""
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits and probs")
    if logits is not None:
        log_p = torch.log_softmax(logits.detach().double(), dim=1)
    else:
        assert probs is not None
        log_p = probs.detach().double().log()  # 0 log 0 = 0 below via xlogy
    n = log_p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"need 1 <= splits <= number of samples, got splits={splits}, N={n}")
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        p = part.exp()
        log_py = p.mean(0).log()  # p(y) of this chunk
        kl = torch.xlogy(p, p).sum(1) - (p * log_py.nan_to_num(neginf=0.0)).sum(1)  # KL(p(y|x) || p(y))
        scores.append(math.exp(float(kl.mean())))
    s = torch.tensor(scores, dtype=torch.float64)
    return float(s.mean()), float(s.std(unbiased=False))
