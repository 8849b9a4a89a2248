"""The text conditioning HiDream-I1's transformer takes, as one value that travels from the encoders through the
text cache to the transformer call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Device = Union[str, torch.device]


@dataclass
class PromptEmbeds:
    """The text conditioning of a batch of captions, in the layout HiDreamImageTransformer2DModel.forward takes.

    t5:     (B, S, D_t5)        T5 last hidden state (`encoder_hidden_states_t5`); S = 128
    llama:  (L, B, S, D_llama)  every Llama layer's output, layer axis first (`encoder_hidden_states_llama3`)
    pooled: (B, D_pooled)       CLIP-L and CLIP-G projected text embeds, concatenated (`pooled_embeds`)
    """

    t5: torch.Tensor
    llama: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        if self.t5.ndim != 3 or self.llama.ndim != 4 or self.pooled.ndim != 2:
            raise ValueError(
                "PromptEmbeds expects t5 (B,S,D), llama (L,B,S,D), pooled (B,D); got "
                f"t5 {tuple(self.t5.shape)}, llama {tuple(self.llama.shape)}, pooled {tuple(self.pooled.shape)}"
            )
        if not (self.t5.shape[0] == self.llama.shape[1] == self.pooled.shape[0]):
            raise ValueError(
                f"PromptEmbeds batch sizes disagree: t5 {self.t5.shape[0]}, llama {self.llama.shape[1]}, "
                f"pooled {self.pooled.shape[0]}"
            )

    @property
    def batch_size(self) -> int:
        return self.t5.shape[0]

    def to(self, device: Optional[Device] = None, dtype: Optional[torch.dtype] = None) -> "PromptEmbeds":
        return PromptEmbeds(
            t5=self.t5.to(device=device, dtype=dtype),
            llama=self.llama.to(device=device, dtype=dtype),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    @classmethod
    def cat(cls, items: list["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch axis (dim 0 of t5/pooled, dim 1 of llama)."""
        if not items:
            raise ValueError("PromptEmbeds.cat needs at least one item")
        return cls(
            t5=torch.cat([item.t5 for item in items], dim=0),
            llama=torch.cat([item.llama for item in items], dim=1),
            pooled=torch.cat([item.pooled for item in items], dim=0),
        )

    def select(self, index: int) -> "PromptEmbeds":
        """One batch element, keeping a batch axis of size 1 (negative indices count from the end)."""
        batch = self.batch_size
        if not -batch <= index < batch:
            raise IndexError(f"index {index} out of range for a batch of {batch}")
        index %= batch
        return PromptEmbeds(
            t5=self.t5[index : index + 1],
            llama=self.llama[:, index : index + 1],
            pooled=self.pooled[index : index + 1],
        )
