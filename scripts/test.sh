#!/usr/bin/env bash
# Fresh machine -> tests: Chromium (installed when missing), then set up .venv and run the core suite while a
# headless ComfyUI 0.3.75 with its own Python is built (once, cached in .cache/comfyui), then run tests/comfyui and
# tests/browser against a real ComfyUI server.
# "No tests collected" counts as a failure. Arguments go to the first pytest run (the core suite).
# SKIP_COMFYUI_TESTS=1 runs only the core suite (the ComfyUI tests then do not run; nothing counts them as passed).
set -uo pipefail
cd "$(dirname "$0")/.."
# The browser tests drive Debian's Chromium (Playwright never downloads a browser here): installed first when
# missing, so a fresh machine does not find out after the 15-minute core suite. HIDREAM_LOKR_CHROMIUM names another.
chromium="${HIDREAM_LOKR_CHROMIUM:-/usr/bin/chromium}"
if [ "${SKIP_COMFYUI_TESTS:-0}" != "1" ] && [ ! -x "$chromium" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    echo "scripts/test.sh: no Chromium at $chromium; installing Debian's package (apt-get install -y chromium)" >&2
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
            || [ ! -x "$chromium" ]; then
        echo "the browser tests need Chromium at $chromium and it could not be installed here. Run:" >&2
        echo "    sudo apt-get install -y chromium" >&2
        echo "(or set HIDREAM_LOKR_CHROMIUM to a Chromium binary; SKIP_COMFYUI_TESTS=1 runs the core suite alone)" >&2
        exit 1
    fi
fi
bash scripts/setup.sh || exit 1
# ComfyUI's environment is built (first run: ~2.5 min, mostly unpacking wheels) while the core suite runs.
env_log="$(mktemp)"; env_out="$(mktemp)"
env_pid=""
# Leaving early (a failed core suite) stops the build: its own process group, so pip goes with it.
trap '[ -n "$env_pid" ] && kill -- -"$env_pid" 2>/dev/null; rm -f "$env_log" "$env_out"' EXIT
if [ "${SKIP_COMFYUI_TESTS:-0}" != "1" ]; then
    echo "scripts/comfyui_env.sh: preparing ComfyUI's test environment in the background" >&2
    setsid bash scripts/comfyui_env.sh >"$env_out" 2>"$env_log" &
    env_pid=$!
fi
# The core tests run torch on one thread each, so two pytest workers use both cores of a CI machine.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-auto}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
[ "$rc" -ne 0 ] && exit "$rc"
if [ "${SKIP_COMFYUI_TESTS:-0}" = "1" ]; then
    echo "SKIP_COMFYUI_TESTS=1: the ComfyUI tests did not run" >&2
    exit 0
fi

if ! wait "$env_pid"; then
    env_pid=""
    cat "$env_log" >&2
    echo "building the ComfyUI test environment failed (scripts/comfyui_env.sh; its output is above)" >&2
    exit 1
fi
env_pid=""
paths="$(cat "$env_out")"
COMFYUI_DIR="$(echo "$paths" | sed -n 's/^COMFYUI_DIR=//p')"
COMFYUI_PYTHON="$(echo "$paths" | sed -n 's/^COMFYUI_PYTHON=//p')"
export COMFYUI_DIR
# tests/browser: the live training view in headless Chromium (Debian's `chromium`, checked above).
# Two workers, each with its own ComfyUI servers; --dist loadfile keeps a file's tests (which build on each other,
# in order) on one worker. Waits on the server and the browser leave a core free for the other worker.
"$COMFYUI_PYTHON" -m pytest -n "${COMFYUI_TEST_WORKERS:-2}" --dist loadfile tests/comfyui tests/browser
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no ComfyUI tests: failing" >&2
    exit 1
fi
exit "$rc"
