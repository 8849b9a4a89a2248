"""ComfyUI-HiDream-LoKr: ComfyUI entry point.

ComfyUI imports this file when the repository sits in `custom_nodes/`. The graph nodes (`nodes/`, V3 schema via
`comfy_entrypoint`) wrap `trainer_core`, which works on its own from the command line. Until the node pack lands
this entry point registers no nodes, so importing it is always safe, inside ComfyUI or not.
"""

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["WEB_DIRECTORY", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
