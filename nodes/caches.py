"""Cache nodes: fill the on-disk text-embedding and latent caches before training (the trainer core's caches).

The training node would fill them itself; doing it in separate nodes lets a graph encode with ComfyUI's own CLIP
and VAE (and free them) before the transformer is loaded, and shows each phase's progress on its own node.
"""
from __future__ import annotations

from dataclasses import replace

from ..trainer_core.config import ConfigError
from ..trainer_core.util import quiet_libraries
from .compat import io, progress_bar
from .types import CATEGORY, DatasetType, HiDreamModel, HiDreamModelType, TrainingData


def _progress(node_id):
    bar = progress_bar(1, node_id)
    return lambda done, total: bar.update_absolute(done, total)


def _samples(data: TrainingData, max_tokens: int | None = None):
    from ..trainer_core.data import discover_dataset

    return [s for config in data.datasets for s in discover_dataset(config, max_tokens=max_tokens).samples]


def token_limit(model: HiDreamModel | None) -> int:
    """The image-token limit buckets are fitted under, as training will fit them: the connected model's, else
    HiDream-I1's (every ComfyUI HiDream file is Full, Dev or Fast, which share it)."""
    from ..trainer_core.hidream import HIDREAM_I1_CONFIG, image_token_limit

    return image_token_limit(model.transformer.config if model is not None else HIDREAM_I1_CONFIG)


def text_encoder_for(model: HiDreamModel | None, clip, origin: str | None = None) -> object:
    """The encoder a text-cache node uses: ComfyUI's CLIP when connected (`origin`: what made it, from the queued
    prompt, comfy_adapters.graph_origin), else the model's own encoders."""
    if clip is not None:
        from .comfy_adapters import ComfyClipTextEncoder

        return ComfyClipTextEncoder(clip, origin)
    if model is not None and model.text_encoder is not None:
        return model.text_encoder
    raise ConfigError("no text encoder: connect a HiDream model loaded with its text encoders, or a CLIP from "
                      "QuadrupleCLIPLoader (the four HiDream text encoders)")


def image_encoder_for(model: HiDreamModel | None, vae, origin: str | None = None) -> object:
    if vae is not None:
        from .comfy_adapters import ComfyVaeImageEncoder

        return ComfyVaeImageEncoder(vae, origin)
    if model is not None and model.image_encoder is not None:
        return model.image_encoder
    raise ConfigError("no image encoder: connect a HiDream model loaded with its VAE, or a VAE from VAELoader "
                      "(ae.safetensors, the Flux VAE HiDream uses)")


class CacheTextEmbeddings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrCacheTextEmbeddings",
            display_name="HiDream LoKr cache text embeddings",
            category=f"{CATEGORY}/cache",
            description="Encodes every caption of the dataset once (CLIP-L, CLIP-G, T5, Llama) and stores the "
                        "embeddings on disk under output/hidream_lokr/cache; later runs with the same captions and "
                        "encoders reuse them without loading the encoders.",
            inputs=[
                DatasetType.Input("dataset", tooltip="The dataset whose captions to encode."),
                HiDreamModelType.Input("hidream_model", optional=True,
                                       tooltip="Encode with this model's own four text encoders."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Or encode with ComfyUI's CLIP (QuadrupleCLIPLoader with the four HiDream "
                                      "encoders); wins over the model's encoders when both are connected."),
            ],
            outputs=[DatasetType.Output(display_name="dataset", tooltip="The dataset, its text cache filled")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, dataset: TrainingData, hidream_model: HiDreamModel = None, clip=None) -> io.NodeOutput:
        from ..trainer_core.data import TextEmbeddingCache

        from .comfy_adapters import graph_origin

        encoder = text_encoder_for(hidream_model, clip, graph_origin(cls.hidden.prompt, cls.hidden.unique_id, "clip"))
        captions = [s.caption for s in _samples(dataset)]
        with quiet_libraries(diffusers=False):  # the text encoders' forward passes warn about their attention implementation
            TextEmbeddingCache(dataset.cache_dir / "text", encoder.identity).fill(
                captions, encoder, progress=_progress(cls.hidden.unique_id))
        return io.NodeOutput(replace(dataset, text_encoder=encoder, cached=tuple({*dataset.cached, "text"})))


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrCacheLatents",
            display_name="HiDream LoKr cache latents",
            category=f"{CATEGORY}/cache",
            description="Encodes every image of the dataset (resized/cropped to its bucket) with the VAE once and "
                        "stores the latents on disk, in the trainer's scaled form (z - 0.1159) x 0.3611.",
            inputs=[
                DatasetType.Input("dataset", tooltip="The dataset whose images to encode."),
                HiDreamModelType.Input("hidream_model", optional=True, tooltip="Encode with this model's VAE."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Or ComfyUI's VAE (VAELoader, ae.safetensors); wins over the model's VAE."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Images per VAE call (of one bucket)."),
            ],
            outputs=[DatasetType.Output(display_name="dataset", tooltip="The dataset, its latent cache filled")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, dataset: TrainingData, hidream_model: HiDreamModel = None, vae=None,
                batch_size: int = 1) -> io.NodeOutput:
        from ..trainer_core.data import LatentCache

        from .comfy_adapters import graph_origin

        encoder = image_encoder_for(hidream_model, vae, graph_origin(cls.hidden.prompt, cls.hidden.unique_id, "vae"))
        LatentCache(dataset.cache_dir / "latents", encoder.identity).fill(
            _samples(dataset, token_limit(hidream_model)), encoder, batch_size,
            progress=_progress(cls.hidden.unique_id))
        return io.NodeOutput(replace(dataset, image_encoder=encoder, cached=tuple({*dataset.cached, "latents"})))
