"""A real ComfyUI 0.3.75 server for the tests: started once per session, this pack linked into its custom_nodes.

The ComfyUI install comes from scripts/comfyui_env.sh (COMFYUI_DIR, default .cache/comfyui/ComfyUI); these tests
run with that environment's Python (scripts/test.sh does it).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import requests

REPO = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "ComfyUI-HiDream-LoKr"
# A test-only observer of file-system access under the server's canary folder (audit_pack/__init__.py).
AUDIT_PACK = Path(__file__).resolve().parent / "audit_pack"


def comfyui_dir() -> Path:
    path = Path(os.environ.get("COMFYUI_DIR", REPO / ".cache" / "comfyui" / "ComfyUI"))
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {path}: run scripts/comfyui_env.sh (scripts/test.sh does) or set "
                           "COMFYUI_DIR")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: Path, comfy_dir: Path, python: str = sys.executable,
                 extra_args: tuple[str, ...] = (), env: Optional[dict] = None) -> None:
        self.base_dir, self.comfy_dir, self.python = base_dir, comfy_dir, python
        self.extra_args = tuple(extra_args)  # e.g. ("--front-end-root", <folder>) for the browser tests
        self.env = dict(env or {})
        # Outside every ComfyUI folder of this server: what a hostile prompt must never read or write.
        self.canary = base_dir.parent / f"{base_dir.name}-canary"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir / "comfyui.log"
        self.process: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_LINK_NAME, REPO), ("hidream_lokr_test_audit", AUDIT_PACK)):
            link = custom_nodes / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        self.canary.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "HIDREAM_LOKR_ALLOW_ANY_PATH"}  # the fence stays up
        env = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", HIDREAM_LOKR_AUDIT_DIR=str(self.canary),
                   **self.env)
        cmd = [self.python, "main.py", "--cpu", "--disable-api-nodes", "--listen", "127.0.0.1", "--port",
               str(self.port), "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               *self.extra_args]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------------------------------------ the API

    def get(self, route: str):
        response = requests.get(f"{self.url}{route}", timeout=30)
        response.raise_for_status()
        return response.json()

    def queue(self, graph: dict, workflow: Optional[dict] = None) -> requests.Response:
        body = {"prompt": graph, "client_id": self.client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        return requests.post(f"{self.url}/prompt", json=body, timeout=30)

    def submit(self, graph: dict, workflow: Optional[dict] = None) -> str:
        response = self.queue(graph, workflow)
        assert response.ok, f"POST /prompt failed ({response.status_code}): {response.text[:2000]}"
        return response.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history/<id> until the prompt finished (success, error or interrupt); return its entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def interrupt(self) -> None:
        requests.post(f"{self.url}/interrupt", json={}, timeout=30).raise_for_status()

    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def audited(self) -> list[list[str]]:
        """[event, path] of every file-system operation the server made under its canary folder so far."""
        return self.get("/hidream_lokr_test/audit")["events"]


class EventListener:
    """Collects the server's websocket JSON messages for our client id (progress, custom events, ...)."""

    def __init__(self, server: ComfyServer) -> None:
        import threading

        self.server = server
        self.events: list[tuple[float, str, dict]] = []
        self.binary_types: list[int] = []  # binary frames: 1 = preview image (clients without feature flags)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("websocket did not connect")

    def _run(self) -> None:
        import asyncio

        import aiohttp

        async def listen() -> None:
            url = f"ws://127.0.0.1:{self.server.port}/ws?clientId={self.server.client_id}"
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        self.events.append((time.time(), data["type"], data.get("data", {})))
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        self.binary_types.append(int.from_bytes(msg.data[:4], "big"))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return

        asyncio.run(listen())

    def of(self, kind: str, prompt_id: Optional[str] = None) -> list[dict]:
        return [d for _, k, d in list(self.events)
                if k == kind and (prompt_id is None or d.get("prompt_id") in (None, prompt_id))]

    def wait_for(self, predicate, timeout: float = 300.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for _, kind, data in list(self.events):
                if predicate(kind, data):
                    return data
            time.sleep(0.05)
        raise TimeoutError("the awaited websocket event never came")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for name, data in entry["status"].get("messages", []) if name == kind]


def load_graph(name: str) -> dict:
    return json.loads((Path(__file__).parent / "workflows" / name).read_text())
