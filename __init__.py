"""ComfyUI-HiDream-LoKr: ComfyUI entry point.

ComfyUI imports this file when the repository sits in (or is listed as) a `custom_nodes` folder. The nodes use
ComfyUI's V3 schema and register through `comfy_entrypoint`. There is deliberately no NODE_CLASS_MAPPINGS here:
ComfyUI would use it instead of `comfy_entrypoint`.

Outside ComfyUI (the CLI, the core's tests) this file is never imported: trainer_core works on its own.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import HiDreamLoKrExtension, prompt_hook, routes  # noqa: F401  (routes: the live view's HTTP routes)

    prompt_hook.install()  # checks queued prompts of this pack (every model file named up front)
    return HiDreamLoKrExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
