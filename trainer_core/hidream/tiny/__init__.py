"""The embedded tiny HiDream-I1: a random one for shape and speed tests (`build_tiny_model`) and a pretrained one
that draws (`build_drawing_model`, from the shipped weights that `pretrain_tiny_model` makes)."""
from ..._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "MODEL_INDEX_COMPONENTS": ".builder", "TINY_SIZES": ".builder", "TinyHiDreamSizes": ".builder",
    "build_tiny_model": ".builder", "caption_corpus": ".builder",
    "DRAWING_RESOLUTION": ".drawing", "DrawingModelError": ".drawing", "build_drawing_model": ".drawing",
    "TransformerRecipe": ".pretrain", "VaeRecipe": ".pretrain", "pretrain_tiny_model": ".pretrain",
})
