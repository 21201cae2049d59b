"""Embedding alignment: how close adapted narrative embeddings come to keyword embeddings.

Every profile gets this. Each prompt embedding is the full [T, D] sequence the UNet attends
to, flattened. For each narrative prompt we report its cosine to its own keyword prompt's
(unadapted) embedding, and retrieval top-1: whether its own keyword prompt is the nearest
(by cosine) among all distinct keyword prompts of the set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

EncodeFn = Callable[[list[str]], torch.Tensor]


@torch.inference_mode()
def _flat_unit(encode: EncodeFn, prompts: Sequence[str], batch: int) -> torch.Tensor:
    chunks = [encode(list(prompts[i : i + batch])) for i in range(0, len(prompts), batch)]
    return F.normalize(torch.cat(chunks).float().cpu().flatten(1), dim=1)


def alignment_scores(
    narrative_embeds: torch.Tensor, keyword_embeds: torch.Tensor, own: torch.Tensor
) -> dict[str, float]:
    """Cosine to the own keyword embedding and retrieval top-1, from unit vectors."""
    similarity = narrative_embeds @ keyword_embeds.T
    cosine = similarity.gather(1, own[:, None]).mean()
    top1 = (similarity.argmax(1) == own).float().mean()
    return {"cosine": float(cosine), "retrieval_top1": float(top1)}


def embedding_alignment(
    narratives: Sequence[str],
    keywords: Sequence[str],
    encoders: dict[str, EncodeFn],
    keyword_encoder: EncodeFn,
    batch: int = 64,
) -> dict[str, dict[str, float]]:
    """Score each named encoder (e.g. base, adapter) on (narrative, keyword) pairs.

    Returns `{"cosine": {name: value}, "retrieval_top1": {name: value}}` plus `n` and
    `candidates` (the number of distinct keyword prompts).
    """
    if len(narratives) != len(keywords) or not narratives:
        raise ValueError(f"{len(narratives)} narrative prompts for {len(keywords)} keyword ones")
    distinct = sorted(set(keywords))
    own = torch.tensor([distinct.index(k) for k in keywords])
    keyword_embeds = _flat_unit(keyword_encoder, distinct, batch)
    result: dict[str, dict[str, float]] = {"cosine": {}, "retrieval_top1": {}}
    for name, encode in encoders.items():
        scores = alignment_scores(_flat_unit(encode, narratives, batch), keyword_embeds, own)
        for metric, value in scores.items():
            result[metric][name] = value
    result["n"] = len(narratives)  # type: ignore[assignment]
    result["candidates"] = len(distinct)  # type: ignore[assignment]
    return result
