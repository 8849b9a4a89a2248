"""Small services every wing may use: crash-safe files (atomic), crash points for the crash tests (faults), the
device and its memory (device), the count of device-to-host reads a piece of code makes (host_sync), and third-party
libraries' chatter kept off the console (quiet)."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "DiskFullError": ".atomic", "file_sha256": ".atomic", "published": ".atomic", "write_bytes": ".atomic",
    "write_text": ".atomic", "write_with": ".atomic",
    "accelerator_peak_gib": ".device", "peak_memory_bytes": ".device", "release_memory": ".device",
    "reset_peak_memory": ".device", "resolve_device": ".device", "synchronize": ".device",
    "crash_point": ".faults", "HostSyncCounter": ".host_sync", "quiet_libraries": ".quiet",
})
