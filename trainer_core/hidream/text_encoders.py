"""HiDream-I1's four text encoders (CLIP-L, CLIP-G, T5-XXL, Llama-3.1-8B) behind one `encode`.

Text conditioning is computed by diffusers' own `HiDreamImagePipeline.encode_prompt` (on a pipeline holding only
the text parts), so cached embeddings are by construction the ones the pipeline would feed the transformer.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator, Optional, Sequence, Union

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


class StagedTextEncoders:
    """HiDream's four text encoders kept in CPU memory, each brought to `device` only while it encodes.

    Together they are ~26 GB in bf16 (Llama-3.1-8B 15, T5-XXL 9.5): on the device at once they need more than a
    24 GB card has, and the transformer needs the card next. Here the captions of a chunk are encoded one encoder at
    a time, with the pipeline's own per-encoder functions (those `encode_prompt` composes, so the embeddings are
    the same): CLIP-L and CLIP-G together (their pooled outputs are one vector), then T5, then the Llama, each
    visiting the device once per chunk and going back to CPU memory after. The CLIP and T5 outputs of a chunk wait
    in CPU memory (about 1 MiB a caption); the Llama's are handed out batch by batch with them. The device holds at
    most one encoder (the Llama: 15 GB in bf16, ~8 in int8) and one batch's activations.

    `precisions[i]` is encoder i's text_encoder_N_precision: it is quantised on its first visit, on the device, a
    block at a time (quant.quantize_frozen), and stays quantised in CPU memory after. With `stream_blocks` (the
    run's offload_blocks) even one encoder is not brought whole: each of its blocks visits the device only while it
    runs, and batches are cut to `stream_batch` captions, so the device holds one layer and one small batch.
    """

    def __init__(self, encoders: HiDreamTextEncoders, device: Device, precisions: Sequence[str] = ("no_change",) * 4,
                 stream_blocks: bool = False, chunk_size: int = 512, stream_batch: int = 8):
        self.encoders, self.device, self.precisions = encoders, torch.device(device), list(precisions)
        self.stream_blocks, self.chunk_size, self.stream_batch = stream_blocks, chunk_size, stream_batch
        self.identity = encoders.identity
        self._prepared: set = set()  # encoders (whole) or (encoder, block) already quantised

    @contextlib.contextmanager
    def _visiting(self, *indices: int) -> Iterator[None]:
        from ..quant import quantize_frozen

        modules = self.encoders._encoders()
        if self.stream_blocks:
            with contextlib.ExitStack() as stack:
                for index in indices:
                    stack.enter_context(self._streaming(index, modules[index]))
                yield
            return
        for index in indices:
            if index in self._prepared:
                modules[index].to(self.device)
            else:
                quantize_frozen(modules[index], self.precisions[index], device=self.device)
                self._prepared.add(index)
        try:
            yield
        finally:
            for index in indices:
                modules[index].to("cpu")

    @contextlib.contextmanager
    def _streaming(self, index: int, encoder: torch.nn.Module) -> Iterator[None]:
        """Every block of `encoder` on the device only while it runs (quantised there on its first run)."""
        from ..quant import blocks_of, quantize_block

        handles = []
        for name, block in blocks_of(encoder):
            def bring(module, args, name=name, block=block):
                if (index, name) in self._prepared:
                    block.to(self.device)
                else:
                    quantize_block(encoder, name, block, self.precisions[index], self.device)
                    self._prepared.add((index, name))

            def back(module, args, output) -> None:  # (a forward hook's return value would replace the output)
                module.to("cpu")

            handles.append(block.register_forward_pre_hook(bring))
            handles.append(block.register_forward_hook(back))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            encoder.to("cpu")

    def encode(self, prompts: list[str], max_sequence_length: int = 128) -> PromptEmbeds:
        """`HiDreamTextEncoders.encode`'s result (t5 and pooled on the CPU, llama on the device)."""
        return PromptEmbeds.cat([embeds for _, embeds in self.encode_many(prompts, len(prompts),
                                                                          max_sequence_length)])

    def encode_many(self, prompts: Sequence[str], batch_size: int, max_sequence_length: int = 128
                    ) -> Iterator[tuple[list[str], PromptEmbeds]]:
        """(captions, their PromptEmbeds) for every batch of `batch_size` captions of `prompts`, in order."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode_many expects a non-empty list of caption strings")
        pipe, device, length = self.encoders._live_pipeline(), self.device, max_sequence_length
        if self.stream_blocks:
            batch_size = min(batch_size, self.stream_batch)
        for start in range(0, len(prompts), self.chunk_size):
            chunk = list(prompts[start:start + self.chunk_size])
            batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            with torch.no_grad():
                with self._visiting(0, 1):
                    pooled = [torch.cat([pipe._get_clip_prompt_embeds(pipe.tokenizer, pipe.text_encoder, b, length,
                                                                      device),
                                         pipe._get_clip_prompt_embeds(pipe.tokenizer_2, pipe.text_encoder_2, b,
                                                                      length, device)], dim=-1).cpu()
                              for b in batches]
                with self._visiting(2):
                    t5 = [pipe._get_t5_prompt_embeds(b, length, device).cpu() for b in batches]
                with self._visiting(3):
                    for batch, batch_pooled, batch_t5 in zip(batches, pooled, t5):
                        llama = pipe._get_llama3_prompt_embeds(batch, length, device)
                        yield batch, PromptEmbeds(t5=batch_t5, llama=llama, pooled=batch_pooled)

    def free(self) -> None:
        self.encoders.free()
