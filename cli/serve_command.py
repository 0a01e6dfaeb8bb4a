"""``hermes-probe serve``: live streams behind an OpenAI-compatible API (see hermes_policy.serving)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

import typer


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    model: Annotated[
        str | None, typer.Option(help="Hub id, local folder or .gguf file; default: the embedded SmolLM2.")
    ] = None,
    policy: Annotated[
        str, typer.Option(help="Default rule of new streams: a policy.json, paper-default or a rule name (bounded).")
    ] = "paper-default",
    budget: Annotated[int, typer.Option(min=1, help="Stream tokens per layer (rules and paper-default).")] = 4000,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="HERMES_API_KEY", help="Bearer token every route requires (needed off loopback).")
    ] = None,
    max_streams: Annotated[int, typer.Option(min=1, help="Streams held at once; more get a 503.")] = 4,
    kv_memory_gb: Annotated[
        float, typer.Option(min=0.001, help="KV-cache memory all streams may take together (each counted at the most its buffers can grow to; see docs/serving.md).")
    ] = 8.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Default answer length limit.")] = 64,
    tokens_per_frame: Annotated[int | None, typer.Option(min=1, help="Text-frame length (causal LMs).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code from the model repository.")] = False,
) -> None:
    """Serve live streams: sessions fed by the clock, questions in the OpenAI chat format, a page at /."""
    options = dict(locals())
    from hermes_cli.main import friendly_errors

    friendly_errors(_run)(**options)


def _run(**o: Any) -> None:
    from hermes_cli.main import _load, console

    from hermes_policy.errors import HermesError

    if not is_loopback(o["host"]) and not o["api_key"]:
        raise HermesError(f"listening on {o['host']} (not loopback) needs --api-key (or $HERMES_API_KEY)")
    import uvicorn

    from hermes_policy.serving import ServerConfig, create_app

    adapter = _load(o["model"], o["device"], o["dtype"], o["tokens_per_frame"], o["trust_remote_code"])
    config = ServerConfig(policy=o["policy"], budget=o["budget"], max_streams=o["max_streams"],
                          kv_budget_bytes=int(o["kv_memory_gb"] * 2**30), api_key=o["api_key"],
                          max_new_tokens=o["max_new_tokens"])
    app = create_app(adapter, config)
    console.print(f"serving {adapter.name_or_path} on http://{o['host']}:{o['port']}/ (page at /, API at /v1)")
    uvicorn.run(app, host=o["host"], port=o["port"], log_level="warning")
