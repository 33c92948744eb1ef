"""Launchers: start the actors of a run as processes and keep them alive or stop them together.

`local` runs everything on one machine (`launch`, `LocalLauncher`, `ProcessSpec`); `child` is the
entry point each started process runs first; `heartbeat` (imported on its own, it pulls in torch
through the wire protocol) detects dead peers.
"""

from rl_engine.launch.local import LaunchResult, LocalLauncher, ProcessResult, ProcessSpec, free_port, launch

__all__ = ["LaunchResult", "LocalLauncher", "ProcessResult", "ProcessSpec", "free_port", "launch"]
