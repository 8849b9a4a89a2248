"""Training data: image folders -> samples (captions, buckets, crops) -> batches, and the on-disk caches of their
text embeddings and latents."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "CacheEntryCorrupt": ".cache", "CacheStats": ".cache", "ImageEncoder": ".cache", "LatentCache": ".cache",
    "TextEmbeddingCache": ".cache", "TextEncoder": ".cache", "VaeImageEncoder": ".cache", "read_entry": ".cache",
    "BucketBatches": ".datasets", "bucket_for_size": ".datasets", "IMAGE_EXTENSIONS": ".datasets", "ImageDataset": ".datasets",
    "MAX_CAPTION_CHARS": ".datasets", "TrainingSample": ".datasets", "check_enough_samples": ".datasets",
    "discover_dataset": ".datasets", "display_path": ".datasets", "load_sample_pixels": ".datasets",
})
