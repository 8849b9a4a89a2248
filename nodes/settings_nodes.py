"""The optional training-settings nodes (optimizer & schedule, previews, checkpoints, advanced), one per
train_settings.GROUPS entry. Each outputs its widget values; the Train node merges them over the defaults, so an
unconnected settings node is the same as a connected one left at its defaults."""
from __future__ import annotations

from .compat import io
from .train_settings import GROUPS, SettingsGroup, SettingsValues
from .types import CATEGORY

SETTINGS_CATEGORY = f"{CATEGORY}/training settings"


def settings_node(group: SettingsGroup) -> type[io.ComfyNode]:
    class SettingsNode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=group.node_id, display_name=group.display_name, category=SETTINGS_CATEGORY,
                description=group.description, inputs=[s.input() for s in group.settings],
                outputs=[group.socket_type.Output(display_name=group.socket,
                                                  tooltip=f"Connect to {group.socket} of Train HiDream LoKr")])

        @classmethod
        def execute(cls, **values) -> io.NodeOutput:
            known = {s.id for s in group.settings}
            return io.NodeOutput(SettingsValues(group.node_id, {k: v for k, v in values.items() if k in known}))

    SettingsNode.__name__ = SettingsNode.__qualname__ = group.node_id
    return SettingsNode


SETTINGS_NODES = [settings_node(group) for group in GROUPS]
