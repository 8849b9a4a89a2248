"""HiDream-I1's four text encoders (CLIP-L, CLIP-G, T5-XXL, Llama-3.1-8B) behind one `encode`.

Text conditioning is computed by diffusers' own `HiDreamImagePipeline.encode_prompt` (on a pipeline holding only
the text parts), so cached embeddings are by construction the ones the pipeline would feed the transformer.
"""
from __future__ import annotations

import gc
from typing import Optional, Union

import torch
from diffusers import HiDreamImagePipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerFast, T5EncoderModel, T5Tokenizer

from .embeds import PromptEmbeds

Device = Union[str, torch.device]


class HiDreamTextEncoders:
    """The four HiDream text encoders and their tokenizers.

    `encode` runs diffusers' `HiDreamImagePipeline.encode_prompt` on a pipeline that holds only these text parts
    (no transformer, VAE or scheduler) with classifier-free guidance off, so the encoding IS the pipeline's:
    CLIP-L/CLIP-G pooled projections at 128 tokens, T5 last hidden state, and all Llama hidden states but the
    embedding layer.

    `identity` is a stable string naming these exact encoders (configs, tokenizer files, weight files, dtype); use it
    in cache keys so that cached embeddings are never reused with other encoders.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_3: T5Tokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_4: PreTrainedTokenizerFast,
        text_encoder_4: torch.nn.Module,
        identity: str,
    ) -> None:
        self.identity = identity
        # The pipeline sets tokenizer_4.pad_token = eos_token in its __init__, exactly as at inference time.
        self._pipeline: Optional[HiDreamImagePipeline] = HiDreamImagePipeline(
            scheduler=None,
            vae=None,
            transformer=None,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            tokenizer_2=tokenizer_2,
            text_encoder_2=text_encoder_2,
            tokenizer_3=tokenizer_3,
            text_encoder_3=text_encoder_3,
            tokenizer_4=tokenizer_4,
            text_encoder_4=text_encoder_4,
        )
        for encoder in self._encoders():
            encoder.eval().requires_grad_(False)

    def _live_pipeline(self) -> HiDreamImagePipeline:
        if self._pipeline is None:
            raise RuntimeError("these HiDream text encoders were freed; load them again with load_text_encoders")
        return self._pipeline

    def _encoders(self) -> list[torch.nn.Module]:
        pipe = self._live_pipeline()
        return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.text_encoder_4]

    def modules(self) -> list[torch.nn.Module]:
        """The four encoders (none once freed): what holds their memory."""
        return self._encoders() if self._pipeline is not None else []

    @property
    def device(self) -> torch.device:
        return next(self._live_pipeline().text_encoder_4.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._live_pipeline().text_encoder_4.parameters()).dtype

    def to(self, device: Device) -> "HiDreamTextEncoders":
        for encoder in self._encoders():
            encoder.to(device)
        return self

    def encode(self, prompts: list[str], max_sequence_length: int = 128) -> PromptEmbeds:
        """Encode captions -> PromptEmbeds with t5 (B,128,D_t5), llama (L,B,128,D_llama), pooled (B,D_pooled).

        Runs under no_grad (not inference_mode, whose tensors could not later be saved for backward in training).
        The result stays on the encoders' device in their dtype; the caller moves it.
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode expects a non-empty list of caption strings")
        pipe = self._live_pipeline()
        with torch.no_grad():
            t5, _, llama, _, pooled, _ = pipe.encode_prompt(
                prompt=list(prompts),
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
        return PromptEmbeds(t5=t5, llama=llama, pooled=pooled)

    def free(self) -> None:
        """Drop every reference to the encoders so their memory (tens of GB for the real model) is released."""
        self._pipeline = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
