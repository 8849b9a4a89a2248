"""A test-only observer loaded into the test server next to the pack: it records every file-system operation the
server process makes under one folder (HIDREAM_LOKR_AUDIT_DIR, a canary outside ComfyUI's folders), through
Python's audit hooks (`sys.addaudithook`: opening a file, listing or walking a folder, creating, renaming or
removing anything). GET /hidream_lokr_test/audit returns [[event, path], ...]; POST .../audit/selftest reads one
canary file (the positive control). It changes nothing it observes.

Not part of the pack: tests/comfyui/comfy_server.py links it into the test server's custom_nodes.
"""
import os
import sys
import threading

WEB_DIRECTORY = None
NODE_CLASS_MAPPINGS: dict = {}

_CANARY = os.path.realpath(os.environ.get("HIDREAM_LOKR_AUDIT_DIR", "")) if os.environ.get(
    "HIDREAM_LOKR_AUDIT_DIR") else None
_EVENTS = {"open", "os.listdir", "os.scandir", "os.walk", "os.mkdir", "os.rename", "os.remove", "os.rmdir",
           "os.symlink", "os.link", "os.chmod", "os.chown", "os.utime", "os.truncate", "shutil.copyfile",
           "shutil.copytree", "shutil.rmtree", "shutil.move", "glob.glob", "os.exec", "subprocess.Popen"}
_seen: list = []
_lock = threading.Lock()


def _paths(args):
    for arg in args:
        if isinstance(arg, (str, bytes, os.PathLike)):
            try:
                yield os.fsdecode(arg)
            except TypeError:
                continue
        elif isinstance(arg, (list, tuple)):
            yield from _paths(arg)


def _hook(event, args):
    if _CANARY is None or event not in _EVENTS:
        return
    for path in _paths(args):
        if not path:
            continue
        full = os.path.abspath(path)
        # Either spelling counts: the path as given, and where it really leads.
        if any(p == _CANARY or p.startswith(_CANARY + os.sep) for p in (full, os.path.realpath(full))):
            with _lock:
                _seen.append([event, full])


if _CANARY:
    sys.addaudithook(_hook)
    try:
        from aiohttp import web
        from server import PromptServer

        @PromptServer.instance.routes.get("/hidream_lokr_test/audit")
        async def _audit(request):
            with _lock:
                return web.json_response({"canary": _CANARY, "events": list(_seen)})

        @PromptServer.instance.routes.post("/hidream_lokr_test/audit/selftest")
        async def _selftest(request):
            """Reads the canary's selftest.txt in the server process: the test sees whether the hook records."""
            with open(os.path.join(_CANARY, "selftest.txt"), encoding="utf-8") as f:
                return web.json_response({"read": f.read()})
    except ImportError:  # not inside a ComfyUI server
        pass
