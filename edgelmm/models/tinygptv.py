"""TinyGPT-V: EVA ViT-g → ln_vision (fp32) → Q-Former (32 queries) → llama_proj → llama_proj2 → the modified
Phi-2 (``TextModel`` with QK LayerNorm and the post-attention RMSNorm). Offers the interface the generation
code uses: ``encode_image``, ``splice`` and ``.text``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelmm.config import TextConfig
from edgelmm.errors import ConfigError
from edgelmm.families.tinygptv import VisualConfig
from edgelmm.models.eva import EvaViT
from edgelmm.models.qformer import QFormer
from edgelmm.models.text import TextModel
from edgelmm.models.vlm import IMAGE_PLACEHOLDER


class TinyGPTV(nn.Module):
    def __init__(self, visual: VisualConfig, text: TextConfig):
        super().__init__()
        self.vision = EvaViT(visual.eva)
        self.ln_vision = nn.LayerNorm(visual.eva.width)  # LAVIS base_model.LayerNorm: eps 1e-5, fp32
        self.qformer = QFormer(visual.qformer)
        self.llama_proj = nn.Linear(visual.qformer.hidden_size, visual.proj_dim)
        self.llama_proj2 = nn.Linear(visual.proj_dim, text.hidden_size)
        self.text = TextModel(text)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] → image features [B, num_queries, D_text]."""
        x = self.vision(pixels)  # (B, 1+G*G, W)
        ln = self.ln_vision
        x = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)  # fp32
        queries = self.qformer(x)  # (B, Q, Hq)
        return self.llama_proj2(self.llama_proj(queries.to(self.llama_proj.weight.dtype)))  # (B, Q, D)

    def splice(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Embed ids [1, T] and overwrite the ``IMAGE_PLACEHOLDER`` positions with features [1, N, D] in order
        (MiniGPT-4's ``get_context_emb``: text, image, text); returns embeds [1, T, D]."""
        is_image = ids == IMAGE_PLACEHOLDER
        embeds = self.text.embed(ids.masked_fill(is_image, 0))  # (1, T, D)
        n = int(is_image.sum())
        if n != features.shape[0] * features.shape[1]:
            raise ConfigError(f"the prompt has {n} image positions but the image gives {features.shape[1]} tokens")
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
