"""TinyGPT-V: EVA ViT-g → ln_vision (fp32) → Q-Former (32 queries) → llama_proj → llama_proj2 → the modified
Phi-2 (``TextModel`` with QK LayerNorm and the post-attention RMSNorm). Offers the interface the generation
code uses: ``encode_image``, ``splice`` and ``.text``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelmm.models.eva import EvaViT
from edgelmm.models.qformer import QFormer
from edgelmm.models.splice import splice_image
from edgelmm.models.text import TextModel
from edgelmm.spec import ModelSpec


class TinyGPTV(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        visual, text = spec.vision, spec.text
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
        """Embed ids [1, T] with the image features [1, N, D] at the image positions (MiniGPT-4's
        ``get_context_emb``: text, image, text); returns embeds [1, T, D]."""
        return splice_image(self.text, ids, features, self.spec.image_ids)
