"""The pack inside a real ComfyUI 0.3.75: it imports, registers every node with tooltips and descriptions."""
from __future__ import annotations

NODES = {
    "HiDreamLoKrLoadDiffusers", "HiDreamLoKrLoadTransformerFile", "HiDreamLoKrImageDataset", "HiDreamLoKrCombineDatasets",
    "HiDreamLoKrDatasetFromImages", "HiDreamLoKrCacheTextEmbeddings", "HiDreamLoKrCacheLatents", "HiDreamLoKrConfig",
    "HiDreamLoKrTrain", "HiDreamLoKrSampler", "HiDreamLoKrApplyToModel", "HiDreamLoKrSave", "HiDreamLoKrLoad",
}


def test_pack_imports_without_errors(comfy):
    log = comfy.log()
    assert "ComfyUI-HiDream-LoKr" in log
    pack_lines = [line for line in log.splitlines() if "ComfyUI-HiDream-LoKr" in line]
    assert not any("IMPORT FAILED" in line for line in pack_lines), "\n".join(pack_lines)
    assert "Cannot import" not in "\n".join(pack_lines)


def test_every_node_is_registered_with_description_and_tooltips(comfy):
    info = comfy.get("/object_info")
    ours = {name for name in info if name.startswith("HiDreamLoKr")}
    assert ours == NODES
    for name in NODES:
        node = info[name]
        assert node["category"].startswith("HiDream LoKr"), name
        assert len(node["description"]) > 40, name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
    train = info["HiDreamLoKrTrain"]["input"]["required"]
    assert train["hidream_model"][0] == "HIDREAM_MODEL" and train["lokr_config"][0] == "HIDREAM_LOKR_CONFIG"
    assert info["HiDreamLoKrTrain"]["output"] == ["HIDREAM_LOKR", "IMAGE", "IMAGE"]
    assert info["HiDreamLoKrSampler"]["output"] == ["LATENT", "IMAGE"]
    assert info["HiDreamLoKrApplyToModel"]["output"] == ["MODEL"]


def test_example_workflows_are_listed_as_templates(comfy):
    templates = comfy.get("/api/workflow_templates")
    assert set(templates["ComfyUI-HiDream-LoKr"]) == {"hidream_lokr_tiny_demo", "hidream_lokr_train",
                                                      "hidream_lokr_sample_native"}
