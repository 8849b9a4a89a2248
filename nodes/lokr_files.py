"""Save a LoKr into ComfyUI's loras output folder, and load one from the loras folders."""
from __future__ import annotations

import json
from pathlib import Path

import folder_paths

from ..trainer_core.config import ConfigError
from .compat import io
from .paths import checked_output_name, new_lora_file
from .types import CATEGORY, LoKrHandle, LoKrType, LoraModelType


class SaveLoKr(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrSave",
            display_name="Save HiDream LoKr",
            category=f"{CATEGORY}/files",
            description="Writes the LoKr to output/loras/<prefix>_NNNNN.safetensors (a new name every time) with "
                        "LyCORIS key names, the LyCORIS and training config and this workflow in the metadata. "
                        "LoraLoaderModelOnly and Load HiDream LoKr list it.",
            inputs=[LoKrType.Input("lokr", tooltip="The LoKr to save."),
                    io.String.Input("filename_prefix", display_name="file prefix",
                                    default="hidream_lokr/hidream_lokr",
                                    tooltip="filename_prefix: the file name's start under output/loras/ (may "
                                            "contain a subfolder).")],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The file's name as the LoRA loaders list it")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str) -> bool | str:
        """Checked when the graph is queued: the file name may not leave output/loras."""
        try:
            checked_output_name(filename_prefix, "filename_prefix", subfolders=True)
        except ConfigError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, lokr: LoKrHandle, filename_prefix: str) -> io.NodeOutput:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from ..trainer_core.util import write_with

        path = new_lora_file(filename_prefix)
        with safe_open(str(lokr.path), "pt") as f:
            metadata = dict(f.metadata() or {})
        metadata.update({k: str(v) for k, v in lokr.metadata.items()})
        metadata["lycoris_config"] = json.dumps(lokr.lycoris.to_dict())
        if cls.hidden.prompt is not None:
            metadata["prompt"] = json.dumps(cls.hidden.prompt)
        workflow = (cls.hidden.extra_pnginfo or {}).get("workflow")
        if workflow is not None:
            metadata["workflow"] = json.dumps(workflow)
        tensors = load_file(str(lokr.path))
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata))  # atomic, the user's file mode
        name = path.relative_to(Path(folder_paths.get_output_directory()) / "loras").as_posix()
        return io.NodeOutput(name, ui={"text": [name]})


def lokr_handle_from_file(path: Path) -> LoKrHandle:
    from safetensors import safe_open

    from ..trainer_core.adapters import LycorisConfig

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
        keys = list(f.keys())
    if not any(k.endswith((".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a")) for k in keys):
        raise ConfigError(f"{path.name} holds no LoKr weights (no .lokr_w1/.lokr_w2 keys): pick a LoKr file")
    lycoris = LycorisConfig.from_dict(json.loads(metadata["lycoris_config"])) if "lycoris_config" in metadata \
        else LycorisConfig()
    return LoKrHandle(path=path, lycoris=lycoris, steps=int(metadata.get("steps", 0) or 0), metadata=metadata)


class LoadLoKr(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrLoad",
            display_name="Load HiDream LoKr",
            category=f"{CATEGORY}/files",
            description="Loads a LoKr file from the loras folders (models/loras, output/loras) to sample with it, "
                        "apply it to a MODEL, or continue training from it.",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A LyCORIS LoKr .safetensors from the loras folders.")],
            outputs=[LoKrType.Output(display_name="lokr", tooltip="The loaded LoKr"),
                     LoraModelType.Output(display_name="lora",
                                          tooltip="The same LoKr as ComfyUI's LORA_MODEL (its Load LoRA Model node)")],
        )

    @classmethod
    def execute(cls, lora_name: str) -> io.NodeOutput:
        handle = lokr_handle_from_file(Path(folder_paths.get_full_path_or_raise("loras", lora_name)))
        return io.NodeOutput(handle, handle.state_dict())
