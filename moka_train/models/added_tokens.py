"""Trainable embeddings for the special tokens the MLLM adds (``<video>``, ``<audio_start>``, ...).

The backbone's embedding matrix stays frozen and unresized. The K added tokens get their own small
``[K, hidden]`` parameter, so stage 1 and 2 train K rows instead of putting gradients (and ~1 GB of Adam
state at 7B) on the whole matrix. Not resizing also leaves a tied LM head alone: the added tokens are input
markers, never predicted, so the logits keep the backbone's vocabulary. Token ids may lie past the
embedding matrix (a tokenizer that grew) or inside it (Qwen's padded vocabulary rows); either way the added
rows replace what the frozen matrix would return. The official code leaves these embeddings random, frozen
and unsaved; here they train and are saved with their token ids, which are checked at load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AddedTokenEmbedding(nn.Module):
    """``base`` (frozen ``nn.Embedding``) with trainable rows for ``token_ids``.

    New rows start at the mean of the base embedding (a common, stable choice; the official code's random
    rows are far from the text manifold).
    """

    def __init__(self, base: nn.Embedding, token_ids: Sequence[int]) -> None:
        super().__init__()
        token_ids = [int(t) for t in token_ids]
        if len(set(token_ids)) != len(token_ids):
            raise ValueError(f"added token ids must be distinct, got {token_ids}")
        if any(t < 0 for t in token_ids):
            raise ValueError(f"added token ids must be >= 0, got {token_ids}")
        self.base = base
        base.weight.requires_grad_(False)
        self.vocab_size = base.num_embeddings
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=True)
        # id -> row of `weight`, -1 for ids the base matrix serves.
        table_size = max([self.vocab_size, *[t + 1 for t in token_ids]])
        slots = torch.full((table_size,), -1, dtype=torch.long)
        slots[self.token_ids] = torch.arange(len(token_ids))
        self.register_buffer("slot_of_id", slots, persistent=False)
        with torch.no_grad():
            init = base.weight.float().mean(dim=0, keepdim=True).repeat(len(token_ids), 1)
        self.weight = nn.Parameter(init.to(device=base.weight.device))

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.numel() and int(input_ids.max()) >= self.slot_of_id.numel():
            raise ValueError(
                f"token id {int(input_ids.max())} is outside the vocabulary ({self.vocab_size} base ids and the "
                f"added ids {self.token_ids.tolist()})"
            )
        slot = self.slot_of_id[input_ids]
        added = slot >= 0
        embedded = self.base(torch.where(added, 0, input_ids))
        rows = self.weight[slot.clamp(min=0)].to(embedded.dtype)
        return torch.where(added.unsqueeze(-1), rows, embedded)

    def check_token_ids(self, token_ids: Sequence[int], source: str) -> None:
        """Refuse a checkpoint whose added tokens have other ids than this tokenizer gives them."""
        if [int(t) for t in token_ids] != self.token_ids.tolist():
            raise ValueError(
                f"{source}: the added tokens had ids {list(token_ids)} when saved, but this tokenizer gives them "
                f"{self.token_ids.tolist()}; the embeddings would land on the wrong tokens"
            )
