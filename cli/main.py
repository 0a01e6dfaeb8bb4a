"""The `hermes-probe` command line (installed as the package ``hermes_cli``).

Every command turns the package's :class:`~hermes_policy.errors.HermesError` into one red
line on stderr and exit code 1; nothing else about a user error is printed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="hermes-probe",
    help="Probe how a video-language model's KV cache remembers a stream, and run it on endless video.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Report user errors as one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hermes_policy.errors import HermesError

        try:
            return func(*args, **kwargs)
        except HermesError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to its destination, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command()
@friendly_errors
def demo(
    model: Annotated[
        str | None, typer.Option(help="Hub id, local folder or .gguf file; default: the embedded SmolLM2.")
    ] = None,
    frames: Annotated[int, typer.Option(min=1, help="Frames of the synthetic stream.")] = 40,
    tokens_per_frame: Annotated[int, typer.Option(min=1, help="Text-frame length (causal LMs).")] = 48,
    chunk: Annotated[int, typer.Option(min=1, help="Frames per prefill chunk.")] = 8,
    rule: Annotated[str, typer.Option(help="Retention rule: full or fifo.")] = "full",
    budget: Annotated[int, typer.Option(min=1, help="Stream tokens per layer (bounded rules).")] = 6000,
    question: Annotated[
        str | None, typer.Option(help="Question to ask (default: the stream's own questions).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic stream.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
) -> None:
    """Stream the built-in synthetic stream through a model and answer questions about it."""
    from rich.progress import Progress

    from hermes_policy import StreamingSession
    from hermes_policy.models import load_adapter
    from hermes_policy.retention import make_rule
    from hermes_policy.synthetic import shapes_video, text_stream

    with console.status("loading model..."):
        adapter = load_adapter(model, device=device, tokens_per_frame=tokens_per_frame)
    retention = make_rule(rule, budget)
    if adapter.is_text_only:
        stream = text_stream(frames, seed=seed)
        items: Any = stream.frames
    else:
        stream = shapes_video(frames, seed=seed)
        items = stream.frames
    fps = getattr(stream, "fps", None)
    session = StreamingSession(adapter, retention, chunk_frames=chunk, fps=fps)
    console.print(
        f"[bold]{adapter.name_or_path}[/] ({adapter.architecture}, {adapter.num_layers} layers, "
        f"{adapter.tokens_per_frame} tokens/frame) | rule [bold]{retention.name}[/] | "
        f"{frames} frames in chunks of {chunk}"
    )
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("streaming", total=frames)
        for start in range(0, frames, chunk):
            session.add_frames(items[start : start + chunk])
            progress.update(task, advance=min(chunk, frames - start))
    if question:
        questions = [(question, None)]
    else:
        questions = [(q.question, q.answer) for q in stream.questions[:3]]
    table = Table(title="answers")
    for column in ("question", "expected", "answer", "TTFT ms", "TPOT ms"):
        table.add_column(column)
    results = []
    for text, expected in questions:
        answer = session.ask(text)
        table.add_row(
            text,
            expected or "-",
            answer.text,
            f"{answer.ttft_ms:.1f}",
            f"{answer.tpot_ms:.1f}" if answer.tpot_ms else "-",
        )
        results.append({"question": text, "expected": expected, **_answer_dict(answer)})
    console.print(table)
    kept = session.tokens_kept
    console.print(
        f"tokens kept per layer: min {min(kept)}, max {max(kept)} | KV cache "
        f"{session.store.nbytes() / 2**20:.1f} MiB"
    )
    if json_out is not None:
        write_json_atomic(json_out, {"model": adapter.name_or_path, "rule": retention.name, "answers": results})


def _answer_dict(answer: Any) -> dict[str, Any]:
    return {
        "answer": answer.text,
        "ttft_ms": answer.ttft_ms,
        "tpot_ms": answer.tpot_ms,
        "tokens_kept": answer.tokens_kept,
        "peak_memory_bytes": answer.peak_memory_bytes,
        "kv_cache_bytes": answer.kv_cache_bytes,
        "frames_seen": answer.frames_seen,
    }


@app.command()
def version() -> None:
    """Print the version."""
    from hermes_policy import __version__

    console.print(f"hermes-probe {__version__}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
