"""pyproject.toml as the Comfy Registry and ComfyUI-Manager read it (docs.comfy.org/registry/specifications), kept in
step with requirements.txt. comfy-cli's own validator (`comfy node validate`) was run on it once by hand (see
docs/comfyui.md); ComfyUI's loader reads the same file (tests/comfyui/test_comfyui_pack.py)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _requirements() -> list[str]:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return [line for line in lines if line]


def test_pyproject_has_what_the_registry_asks_for():
    project, comfy = _pyproject()["project"], _pyproject()["tool"]["comfy"]
    # node id: < 100 characters, letters, digits, '-', '_', '.', no two special characters in a row, starting with
    # a letter; the spec advises against "ComfyUI" in it.
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", project["name"]) and \
        len(project["name"]) < 100 and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["requires-python"]
    assert "Repository" in project["urls"]
    assert {"PublisherId", "DisplayName", "Icon", "includes"} <= set(comfy)
    assert "web" not in comfy  # WEB_DIRECTORY serves web/; both would serve every script twice


def test_pyproject_dependencies_mirror_requirements_txt():
    """ComfyUI-Manager installs requirements.txt, the Registry reads pyproject's dependencies: the same list."""
    assert _pyproject()["project"]["dependencies"] == _requirements()
    assert not any(re.match(r"torch(?:[<>=!~ ;[]|$)", r) for r in _requirements())  # ComfyUI owns torch


def test_the_icon_is_a_square_image_the_registry_accepts():
    svg = ElementTree.parse(REPO / "docs" / "icon.svg").getroot()
    width, height = int(svg.get("width")), int(svg.get("height"))
    assert width == height <= 400 and svg.get("viewBox") == f"0 0 {width} {height}"
