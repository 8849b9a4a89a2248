"""ComfyUI nodes (V3 schema): thin wrappers that validate inputs, call trainer_core, and convert types.

Nothing in trainer_core imports from here. Every module in this package may import ComfyUI (comfy, comfy_api,
folder_paths, server): it is only imported inside a running ComfyUI. The V3 API itself comes through compat.py.
Importing the node modules is cheap: trainer_core's heavy parts (diffusers, transformers, LyCORIS) are imported
inside the nodes' execute(), the first time a node needs them.
"""
from __future__ import annotations

from .compat import ComfyExtension, io


def node_list() -> list[type[io.ComfyNode]]:
    from .caches import CacheLatents, CacheTextEmbeddings
    from .datasets import CombineDatasets, DatasetFromImages, ImageDataset
    from .loaders import LoadHiDreamDiffusers, LoadHiDreamTransformerFile
    from .lokr_config import LoKrConfigNode
    from .lokr_files import LoadLoKr, SaveLoKr
    from .prompt_hook import MissingModelFiles
    from .sampling import ApplyLoKrToModel, HiDreamLoKrSampler
    from .settings_nodes import SETTINGS_NODES
    from .train import TrainHiDreamLoKr

    return [LoadHiDreamDiffusers, LoadHiDreamTransformerFile, ImageDataset, CombineDatasets, DatasetFromImages,
            CacheTextEmbeddings, CacheLatents, LoKrConfigNode, TrainHiDreamLoKr, *SETTINGS_NODES,
            HiDreamLoKrSampler, ApplyLoKrToModel, SaveLoKr, LoadLoKr, MissingModelFiles]


class HiDreamLoKrExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
