"""Adapters from ComfyUI's CLIP and VAE objects to the trainer core's TextEncoder / ImageEncoder protocols, made to
give what the core's own diffusers encoders give for the same files: one training, whichever front end.

Layouts (ComfyUI 0.3.75, comfy/text_encoders/hidream.py and latent_formats.Flux):
  ComfyUI CONDITIONING entry: [t5 (B, 128, 4096), {"pooled_output": (B, 2048),
                                                   "conditioning_llama3": (B, 32, T, 4096)}], T >= 128
  trainer core PromptEmbeds:  t5 (B, 128, D), llama (L, B, 128, D), pooled (B, D)
  ComfyUI VAE: encode() takes IMAGE (B, H, W, 3) in [0, 1] and returns raw Flux latents z; the core caches
  (z - 0.1159) x 0.3611.

What differs between ComfyUI's HiDream text encoding and diffusers' encode_prompt (max_sequence_length 128), and
what the adapter does about it (docs/comfyui.md, "One training, whichever front end"):
* The encoders compute the same things: CLIP-L/G projected pooled output at the first end token, no attention
  mask (the CLIPs are causal, so nothing after it counts); T5's last hidden state with its padding masked; the
  Llama's 32 decoder-layer outputs (the last after the final norm), padding (128009) masked. ComfyUI runs its own
  implementations of them: equal up to float rounding.
* The tokens differ, and the adapter feeds ComfyUI's encoders diffusers' tokens instead (`diffusers_tokens`: the
  same tokenizer files, called as encode_prompt calls them). ComfyUI's own tokenize reads "(word:1.2)" weights and
  "embedding:" names in any caption; cuts CLIP captions into chunks of the model's positions (77, or the file's own
  for HiDream's longer CLIPs) where diffusers truncates at 128 tokens; breaks T5 captions over 127 tokens at a word
  where diffusers cuts at 127; never truncates the Llama, where diffusers keeps 128; and loads the Llama's
  byte-level tokenizer as LlamaTokenizerFast, which under transformers 5 drops the spaces ("a red circle" ->
  "ared", "circle"; measured with ComfyUI 0.3.75, transformers 5.24). A CLIP of 77 positions cannot see a
  128-token window: captions over 75 CLIP tokens stay cut at 75 there (said once).
* The VAE: ComfyUI encodes to the posterior's mode; the core samples the posterior (mean + std x noise, the noise
  from each image's own seeded generator), as SimpleTuner and diffusers' trainers do. The adapter samples with the
  same generators (`_PosteriorSample`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
import weakref
from typing import Optional, Sequence

import torch

from ..trainer_core.hidream import PromptEmbeds
from .convert import raw_to_scaled_latents, scaled_to_raw_latents

logger = logging.getLogger(__name__)

LLAMA_TOKENS = 128
# diffusers' encode_prompt tokenizes every HiDream encoder to max_sequence_length = 128 tokens (CLIPs included).
DIFFUSERS_TOKENS = 128
# HiDreamTokenizer's attribute and CLIP.tokenize's key of each of the four encoders.
TOKENIZERS = {"l": "clip_l", "g": "clip_g", "t5xxl": "t5xxl", "llama": "llama"}
_SESSION_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # objects without a better identity


def comfy_model_identity(kind: str, obj, origin: Optional[str] = None) -> str:
    """A cache-key identity for a ComfyUI CLIP or VAE object that never reads its weights (under Dynamic VRAM
    even a sample of a 16 GB Llama's values pages in scattered parts of it).

    In order of preference: `origin`, the graph that made the object (its loaders' file names, sizes and modification
    times and every setting on the way, `graph_origin`): stable across queues and restarts; else ComfyUI's own
    record of how to load the model again (`patcher.cached_patcher_init` in newer ComfyUI: the loader and its file
    paths), plus the patches added since (e.g. a LoRA on the CLIP); else this object itself for this session only
    (its caches are then not reused by a later session, never wrongly reused).
    """
    h = hashlib.sha256(kind.encode())
    patcher = getattr(obj, "patcher", None)
    init = getattr(patcher, "cached_patcher_init", None)
    if origin:
        h.update(origin.encode())
    elif init:
        h.update(json.dumps(_describe(init), sort_keys=True).encode())
        if getattr(patcher, "patches", None):
            h.update(str(getattr(patcher, "patches_uuid", "")).encode())
    else:
        h.update(_SESSION_IDS.setdefault(obj, uuid.uuid4().hex).encode())
    return f"comfy-{kind}-{h.hexdigest()[:32]}"


def _describe(value, depth: int = 0):
    """A JSON-able description of a loader argument: a file is its name, size and modification time (never its
    contents); objects are their type (never their address)."""
    if depth > 6:
        return "..."
    if isinstance(value, str):
        if os.path.isfile(value):
            stat = os.stat(value)
            return [os.path.basename(value), stat.st_size, stat.st_mtime_ns]
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v, depth + 1) for k, v in value.items()}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return type(value).__qualname__ if not isinstance(value, (torch.dtype, torch.device)) else str(value)


def graph_origin(prompt: Optional[dict], node_id: Optional[str], input_name: str) -> Optional[str]:
    """What feeds `input_name` of node `node_id` in the queued prompt, as a stable string: every upstream node's
    class and settings, with the model files its loaders name described by name, size and modification time.
    None when the prompt does not show it (no prompt, or the input is not a link)."""
    from .prompt_hook import MODEL_INPUTS

    node = (prompt or {}).get(str(node_id)) if node_id is not None else None
    link = ((node or {}).get("inputs") or {}).get(input_name)
    if not (isinstance(link, list) and len(link) == 2):
        return None
    seen: dict[str, object] = {}

    def signature(src: str, depth: int):
        if src in seen or depth > 64:
            return src
        upstream = prompt.get(src) or {}
        class_type = upstream.get("class_type", "")
        seen[src] = None
        inputs = {}
        for name, value in sorted((upstream.get("inputs") or {}).items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                inputs[name] = [signature(value[0], depth + 1), value[1]]
            elif name in MODEL_INPUTS.get(class_type, {}) and isinstance(value, str):
                inputs[name] = _model_file(MODEL_INPUTS[class_type][name], value)
            else:
                inputs[name] = value
        seen[src] = [class_type, inputs]
        return seen[src]

    return json.dumps([signature(str(link[0]), 0), link[1]], sort_keys=True, default=str)


def _model_file(folder: str, name: str):
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    return _describe(path) if path else name


def conditioning_to_embeds(cond: torch.Tensor, extras: dict, llama_tokens: int | None = LLAMA_TOKENS) -> PromptEmbeds:
    """One ComfyUI HiDream conditioning entry -> PromptEmbeds.

    llama_tokens: the Llama length to cut or zero-pad to (128 for the caches, whose entries have a fixed shape);
    None keeps ComfyUI's length (for sampling, where the transformer takes any length).
    """
    if "conditioning_llama3" not in extras or "pooled_output" not in extras:
        raise ValueError("this CONDITIONING is not HiDream's (no conditioning_llama3 / pooled_output): encode with "
                         "the CLIP from QuadrupleCLIPLoader (the four HiDream text encoders)")
    llama = extras["conditioning_llama3"]  # (B, L, T, D)
    b, layers, t, d = llama.shape
    if llama_tokens is not None and t >= llama_tokens:
        llama = llama[:, :, :llama_tokens]
    elif llama_tokens is not None:
        llama = torch.cat([llama, llama.new_zeros(b, layers, llama_tokens - t, d)], dim=2)
    return PromptEmbeds(t5=cond, llama=llama.permute(1, 0, 2, 3).contiguous(), pooled=extras["pooled_output"])


def _diffusers_tokenizer(comfy_tokenizer):
    """The transformers tokenizer diffusers would use for one of ComfyUI's HiDream tokenizers (same files): its own
    for the CLIPs and T5; for the Llama the file's plain PreTrainedTokenizerFast, HiDream's tokenizer_4 class
    (ComfyUI loads Llama-3's byte-level tokenizer as LlamaTokenizerFast, which transformers 5 rebuilds without its
    spaces: "a red circle" -> "ared", "circle")."""
    tokenizer = comfy_tokenizer.tokenizer
    if comfy_tokenizer.embedding_key != "llama":
        return tokenizer
    cached = getattr(comfy_tokenizer, "_hidream_lokr_plain", None)
    if cached is None:
        from transformers import PreTrainedTokenizerFast

        cached = PreTrainedTokenizerFast.from_pretrained(tokenizer.name_or_path)
        cached.pad_token = cached.convert_ids_to_tokens(comfy_tokenizer.pad_token)
        comfy_tokenizer._hidream_lokr_plain = cached
    return cached


def diffusers_tokens(tokenizer, caption: str) -> dict:
    """The tokens diffusers' encode_prompt feeds HiDream's four encoders for `caption` (max_sequence_length 128,
    truncated, start and end tokens, padded), in the form ComfyUI's CLIP.encode_from_tokens takes. ComfyUI's own
    tokenize would read "(word:1.2)" weights, chunk and split captions otherwise (module docstring). A CLIP of
    fewer positions than 128 (a 77-position file) gets as many as it has."""
    out = {}
    for key, name in TOKENIZERS.items():
        comfy_tokenizer = getattr(tokenizer, name)
        length = min(comfy_tokenizer.max_length, DIFFUSERS_TOKENS) if key in ("l", "g") else DIFFUSERS_TOKENS
        ids = _diffusers_tokenizer(comfy_tokenizer)(caption, padding="max_length", max_length=length,
                                                    truncation=True, add_special_tokens=True).input_ids
        out[key] = [[(int(t), 1.0) for t in ids]]
    return out


class ComfyClipTextEncoder:
    """TextEncoder over ComfyUI's CLIP (QuadrupleCLIPLoader): the same text for all four encoders, as
    CLIPTextEncode does, tokenized as diffusers' encode_prompt tokenizes it (`diffusers_tokens`)."""

    def __init__(self, clip, origin: Optional[str] = None) -> None:
        self.clip = clip
        # "tokens128": encoded from diffusers' 128-token windows (cache entries of the older ComfyUI tokens differ)
        self.identity = comfy_model_identity("clip-tokens128", clip, origin)
        self._warned = False

    def _tokens(self, prompt: str) -> dict:
        tokenizer = self.clip.tokenizer
        if not all(hasattr(tokenizer, name) for name in TOKENIZERS.values()):
            return self.clip.tokenize(prompt)  # not HiDream's four encoders: conditioning_to_embeds says so
        tokens = diffusers_tokens(tokenizer, prompt)
        short = min(len(tokens[k][0]) for k in ("l", "g"))  # the CLIPs' positions, when fewer than 128
        if short < DIFFUSERS_TOKENS and not self._warned:
            self._warned = True
            logger.warning("this CLIP-L/G has %d positions: captions over %d CLIP tokens are cut there, where the "
                           "model's own encoders read 126 (docs/comfyui.md)", short, short - 2)
        return tokens

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int = 128) -> PromptEmbeds:
        items = []
        for prompt in prompts:
            tokens = self._tokens(prompt)
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            cond = out.pop("cond")
            items.append(conditioning_to_embeds(cond, out))
        return PromptEmbeds.cat(items)


class _PosteriorSample(torch.nn.Module):
    """Stands in for ComfyUI's DiagonalGaussianRegularizer (which returns the posterior's mode) for one image: the
    posterior sample mean + std x eps, eps drawn from the image's generator exactly as the core's VaeImageEncoder
    draws it (float32, the latent's shape). A tile of ComfyUI's tiled fallback gets the mode."""

    def __init__(self, generator: torch.Generator, size: tuple[int, int]):
        super().__init__()
        self.generator, self.size = generator, size  # the whole image's latent (h, w)

    def forward(self, z: torch.Tensor):
        mean, logvar = torch.chunk(z, 2, dim=1)
        if tuple(mean.shape[2:]) != self.size or mean.shape[0] != 1:
            return mean, None
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        eps = torch.randn(mean.shape[1:], generator=self.generator, dtype=torch.float32).to(mean.device)
        return mean.float() + std.float() * eps, None


@contextlib.contextmanager
def _sampling_posterior(vae, generator: torch.Generator, size: tuple[int, int]):
    model = getattr(vae, "first_stage_model", None)
    regularizer = getattr(model, "regularization", None)
    if regularizer is None:
        yield False
        return
    model.regularization = _PosteriorSample(generator, size)
    try:
        yield True
    finally:
        model.regularization = regularizer


class ComfyVaeImageEncoder:
    """ImageEncoder over ComfyUI's VAE (VAELoader, ae.safetensors), sampling the posterior with each image's
    generator as the core's diffusers VAE does (ComfyUI's own encode returns its mode)."""

    def __init__(self, vae, origin: Optional[str] = None) -> None:
        self.vae = vae
        # "vae-sampled": posterior samples (older cache entries hold its mode)
        self.identity = comfy_model_identity("vae-sampled", vae, origin)

    def encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        image = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1)  # (B, H, W, 3) in [0, 1]
        latents = []
        for one, generator in zip(image, generators):  # one image per call: each with its own noise
            with _sampling_posterior(self.vae, generator, (one.shape[0] // 8, one.shape[1] // 8)) as sampled:
                latents.append(self.vae.encode(one[None]).float())
            if not sampled:
                logger.warning("this ComfyUI VAE has no posterior to sample: its latents are the mode")
        return raw_to_scaled_latents(torch.cat(latents))

    def decode_latents(self, latents: torch.Tensor):
        from PIL import Image

        images = self.vae.decode(scaled_to_raw_latents(latents.float()))
        arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a) for a in arrays.reshape(-1, *arrays.shape[-3:])]
