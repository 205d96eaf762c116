"""Image features into the token embeddings: the prompt's image positions take the features in order."""
from __future__ import annotations

import torch

from edgelmm.models.text import TextModel
from edgelmm.spec import check_image_positions


def splice_image(text: TextModel, ids: torch.Tensor, features: torch.Tensor, image_ids: tuple[int, ...]) -> torch.Tensor:
    """Embed ids [1, T] and overwrite the positions holding any of ``image_ids`` with features [1, N, D] in
    order; returns embeds [1, T, D]. ConfigError when the counts differ."""
    is_image = torch.isin(ids, torch.tensor(image_ids, device=ids.device))  # (1, T)
    embeds = text.embed(ids.masked_fill(is_image, 0))  # (1, T, D)
    check_image_positions(int(is_image.sum()), features.shape[0], features.shape[1])
    return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
