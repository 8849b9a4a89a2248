"""HiDream-I1 itself: loading its parts (folders and single files), the one transformer call, flow matching,
sampling, the VAE's latents, and the embedded tiny model."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "PromptEmbeds": ".embeds",
    "LoadBalancingLoss": ".flow_matching", "flow_matching_loss": ".flow_matching",
    "flow_matching_target": ".flow_matching", "noisy_latents": ".flow_matching",
    "patch_tokens_to_image": ".flow_matching", "resolution_shift": ".flow_matching",
    "sample_sigmas": ".flow_matching", "shift_sigmas": ".flow_matching",
    "TRANSFORMER_FILE_SUFFIXES": ".frozen", "is_transformer_file": ".frozen",
    "default_file_precision": ".frozen", "load_frozen_transformer": ".frozen", "image_token_limit": ".frozen",
    "transformer_config": ".frozen",
    "compute_dtype": ".forward", "predict_flow": ".forward", "transformer_blocks": ".forward",
    "HiDreamModelPaths": ".models", "component_identity": ".models", "load_scheduler": ".models",
    "load_text_encoders": ".models", "load_transformer": ".models", "load_vae": ".models",
    "resolve_model_paths": ".models", "scheduler_shift": ".models", "text_encoders_identity": ".models",
    "denoise": ".sample", "make_scheduler": ".sample", "rescale_guidance": ".sample", "sample_image": ".sample",
    "HIDREAM_I1_CONFIG": ".single_file", "load_transformer_file": ".single_file",
    "read_transformer_file": ".single_file", "stored_weight_dtype": ".single_file",
    "HiDreamTextEncoders": ".text_encoders", "StagedTextEncoders": ".text_encoders",
    "FLUX_VAE_SCALING_FACTOR": ".vae", "FLUX_VAE_SHIFT_FACTOR": ".vae", "PREVIEW_DECODE_TILE": ".vae",
    "latents_to_images": ".vae",
    "raw_to_scaled_latents": ".vae", "scaled_to_raw_latents": ".vae", "vae_decode": ".vae", "vae_encode": ".vae",
})
