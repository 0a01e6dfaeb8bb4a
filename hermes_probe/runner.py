"""The probing protocol: stream, probe, accumulate, and turn the result into a policy.

Defaults follow the paper's analysis (METHOD.md section 2): frames sampled at 0.5 fps,
chunks of 8 frames, a FIFO cache of 6,000 stream tokens per layer with positions
re-indexed contiguous after every eviction. A stream too short to fill that window gets a
smaller one (at most 3/4 of its tokens, whole frames), so that probes still see a full,
sliding cache. Probe queries are the dataset's own questions, asked at their time, or,
without a dataset, the guidance prompts and a few generic questions, asked after every
chunk once the cache is full.

Runs over many streams are resumable: after each stream the accumulated profile (which
lists the finished streams) is written atomically to ``profiles.npz``; a rerun skips them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hermes_policy import __version__
from hermes_policy.errors import HermesError
from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
from hermes_policy.models.base import ModelAdapter
from hermes_policy.policy import Guidance, ModelInfo, Policy
from hermes_policy.retention import FifoRetention
from hermes_policy.session import StreamingSession

from .heads import analyze_heads, head_provenance, head_table, with_heads
from .metrics import ProfileMetrics, compute_metrics
from .profiles import AttentionProfile
from .recorder import AttentionRecorder
from .sources import ProbeStream, question_due
from .tiers import TierFit, best_contiguous_split, layer_parameters, role_scores

GENERIC_QUESTIONS = (
    "What is happening right now?",
    "What happened at the beginning?",
    "Which objects have appeared so far?",
)
STREAM_FILL = 0.75


class ProbeError(HermesError):
    """The probe cannot run as asked (output folder in use, nothing to probe, ...)."""


@dataclass
class ProbeConfig:
    """The probing protocol (all overridable; defaults are the paper's)."""

    fps: float = 0.5
    chunk_frames: int = 8
    fifo_budget: int = 6000
    seed: int = 0
    queries: tuple[str, ...] = ()

    def probe_queries(self, guidance: Guidance | None = None) -> list[str]:
        """Queries used when a stream brings no questions of its own."""
        if self.queries:
            return list(self.queries)
        g = guidance or Guidance()
        return [g.local, g.global_, f"{g.local}; {g.global_}", *GENERIC_QUESTIONS]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["queries"] = list(self.queries)
        return data


def stream_budget(config: ProbeConfig, num_frames: int, tokens_per_frame: int) -> int:
    """FIFO window for one stream: the configured budget, scaled down for short streams."""
    stream_tokens = num_frames * tokens_per_frame
    cap = max(1, math.floor(STREAM_FILL * num_frames)) * tokens_per_frame
    return max(tokens_per_frame, min(config.fifo_budget, cap, stream_tokens))


def probe_stream(
    adapter: ModelAdapter, stream: ProbeStream, config: ProbeConfig, recorder: AttentionRecorder,
    on_frames: Callable[[int, int], None] | None = None,
) -> int:
    """Stream one input through a FIFO cache and record every probe query. Returns probes made.
    ``on_frames(done, total)`` is called after each chunk (for progress)."""
    frames, timestamps = stream.load()
    num_frames = len(frames)
    budget = stream_budget(config, num_frames, adapter.tokens_per_frame)
    session = StreamingSession(
        adapter, FifoRetention(budget=budget), chunk_frames=config.chunk_frames, fps=config.fps
    )
    pending = sorted(stream.questions)
    generic = config.probe_queries() if not stream.questions else []
    probes = 0
    for start in range(0, num_frames, config.chunk_frames):
        end = min(start + config.chunk_frames, num_frames)
        session.add_frames(frames[start:end], timestamps=list(timestamps[start:end]))
        session.flush()
        finished = end == num_frames
        now = float(timestamps[end - 1])
        while pending and question_due(pending[0][0], now, finished):
            recorder.probe(session, pending.pop(0)[1])
            probes += 1
        if generic and min(session.tokens_kept) >= budget:
            for query in generic:
                recorder.probe(session, query)
                probes += 1
        if on_frames is not None:
            on_frames(end, num_frames)
    if generic and probes == 0:  # the window never filled: probe once at the end
        for query in generic:
            recorder.probe(session, query)
            probes += 1
    return probes


@dataclass
class ProbeResult:
    """Everything an analysis produced."""

    profile: AttentionProfile
    metrics: ProfileMetrics
    fit: TierFit
    policy: Policy
    failed: dict[str, str] = field(default_factory=dict)


def model_info(adapter: ModelAdapter) -> ModelInfo:
    return ModelInfo.of(adapter)


def record_streams(
    adapter: ModelAdapter,
    streams: list[ProbeStream],
    config: ProbeConfig,
    profile_path: Path,
    progress: bool = True,
) -> tuple[AttentionProfile, dict[str, str]]:
    """Probe every stream not yet in the saved profile; save after each stream."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    info = asdict(model_info(adapter))
    recorder = AttentionRecorder(adapter, max_distance=config.fifo_budget)
    done: list[str] = []  # stream keys (identities), in the order they were probed
    stream_list: list[dict[str, Any]] = []  # what each probed stream was, stored with the run
    if profile_path.is_file():
        recorder.profile = AttentionProfile.load(profile_path)
        meta = recorder.profile.meta
        if meta.get("model") != info or meta.get("config") != config.to_dict():
            raise ProbeError(
                f"{profile_path} was recorded with another model or protocol; "
                "use another --out folder or --force to start over"
            )
        done = list(meta.get("done", []))
        stream_list = list(meta.get("streams", []))
        if len(stream_list) != len(done):  # written before streams were identified by file
            raise ProbeError(
                f"{profile_path} lists its streams by name only, so a resumed run could count one "
                "twice; use --force to start over"
            )
    keys = [s.key for s in streams]
    duplicates = sorted({s.name for s in streams if keys.count(s.key) > 1})
    if duplicates:
        raise ProbeError(f"the same stream is given twice: {', '.join(duplicates)}")
    failed: dict[str, str] = {}
    todo = [s for s in streams if s.key not in done]
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("streams", total=len(streams), completed=len(streams) - len(todo))
        # one long stream takes minutes: a second bar follows its frames
        frames_task = bar.add_task("frames", total=None, visible=False)
        for stream in todo:
            bar.update(task, description=f"probing {Path(stream.name).name[:40]}")

            def on_frames(done_frames: int, total_frames: int) -> None:
                bar.update(frames_task, completed=done_frames, total=total_frames, visible=True)

            try:
                probe_stream(adapter, stream, config, recorder, on_frames=on_frames)
            except HermesError as exc:
                failed[stream.name] = str(exc)
                bar.advance(task)
                continue
            done.append(stream.key)
            stream_list.append({"name": stream.name, **stream.identity})
            profile = recorder.profile
            profile.meta.update({"model": info, "config": config.to_dict(), "done": done,
                                 "streams": stream_list})
            profile.save(profile_path)
            bar.advance(task)
        bar.update(frames_task, visible=False)
    if recorder.profile is None or recorder.profile.probes == 0:
        reasons = "; ".join(f"{k}: {v}" for k, v in failed.items()) or "no stream given"
        raise ProbeError(f"no stream could be probed ({reasons})")
    return recorder.profile, failed


def analyze_profile(
    profile: AttentionProfile, model: ModelInfo, budget: int = 4000, reindex: str = "lazy",
    source: str = "the recorded profile", per_head: bool = False,
) -> tuple[ProfileMetrics, TierFit, Policy]:
    """Metrics, tiers and policy from a recorded profile (no model needed).

    A degenerate profile (no probes, NaN, zeros, a window under two frames) is refused
    with its reason rather than turned into a policy full of ``nan``. With ``per_head`` the
    policy is a ``hermes-policy/2`` one: every layer entry gets its KV heads' roles and
    parameters (:mod:`hermes_probe.heads`)."""
    profile.check_usable(source)
    if profile.num_heads != model.num_heads:
        raise ProbeError(f"{source} was recorded with {profile.num_heads} heads per layer, "
                         f"the model has {model.num_heads}")
    metrics = compute_metrics(profile)
    fit = best_contiguous_split(role_scores(metrics))
    layers = layer_parameters(metrics, fit, budget)
    table = metrics.layer_table()
    provenance = {
        "created_by": f"hermes-probe {__version__}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": "probe",
        "probe": {
            "streams": len(profile.meta.get("done", [])),
            **{k: profile.meta.get("config", {}).get(k) for k in ("fps", "chunk_frames", "fifo_budget", "seed")},
            "probes": profile.probes,
            "frame_period": profile.period,
            "window": metrics.window,
            "tier_fit_r2": round(fit.r2, 4),
            "mismatched_layers": fit.mismatches,
            "roles": fit.roles,
            "metrics": {
                "recency": [round(row["recency_share"], 5) for row in table],
                "newest_frame_ratio": [round(row["newest_frame_ratio"], 4) for row in table],
                "decay_rate": [round(row["decay_rate"], 6) for row in table],
                "periodicity": [round(row["periodicity"], 5) for row in table],
                "anchor_phase": [int(row["anchor_phase"]) for row in table],
                "anchor_strength": [round(row["anchor_strength"], 4) for row in table],
                "entropy": [round(row["entropy"], 5) for row in table],
                "top_mass": [round(row["top_mass"], 5) for row in table],
                "role_score": [round(float(u), 5) for u in fit.scores],
            },
        },
    }
    if per_head:
        head_metrics, roles = analyze_heads(profile, model, budget)
        layers = with_heads(layers, head_metrics, roles)
        provenance["probe"]["heads"] = head_provenance(head_metrics, roles)
    policy = Policy(model, budget, dict(fit.tiers), layers, Guidance(), reindex, provenance)
    return metrics, fit, policy


def analyze(
    adapter: ModelAdapter,
    streams: list[ProbeStream],
    config: ProbeConfig,
    out_dir: str | Path,
    *,
    policy_budget: int = 4000,
    force: bool = False,
    progress: bool = True,
    figures: bool = True,
    per_head: bool = False,
) -> ProbeResult:
    """Probe ``streams`` and write ``policy.json``, ``profiles.npz``, ``metrics.json``,
    ``report.md`` and figures into ``out_dir``.

    An ``out_dir`` that already holds a policy is refused unless ``force``; a profile of an
    interrupted run with the same model and protocol is resumed.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ProbeError(f"output path exists and is not a folder: {out}")
    if (out / "policy.json").exists() and not force:
        raise ProbeError(f"{out} already holds a policy.json; use --force to overwrite it")
    profile_path = out / "profiles.npz"
    if force:
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    profile, failed = record_streams(adapter, streams, config, profile_path, progress=progress)
    metrics, fit, policy = analyze_profile(profile, model_info(adapter), budget=policy_budget, per_head=per_head)
    from hermes_policy.evaluation.manifest import run_manifest
    from hermes_policy.retention import FifoRetention

    manifest = run_manifest(
        adapter, FifoRetention(budget=config.fifo_budget), fps=config.fps, chunk_frames=config.chunk_frames,
        mode="probe", probe=config.to_dict(), streams=[s.name for s in streams],
    )
    write_outputs(out, profile, metrics, fit, policy, failed, figures=figures, manifest=manifest)
    return ProbeResult(profile, metrics, fit, policy, failed)


OUTPUT_FILES = ("policy.json", "profiles.npz", "metrics.json", "report.md")


def clear_outputs(out: Path, keep: Path | None = None) -> None:
    """Remove what an earlier run wrote into ``out`` (only the files this module writes, and
    ``figures/``), the policy first: it marks a finished run, so an interrupted ``--force``
    run leaves no old policy beside new partial profiles. ``keep`` (an input) is spared."""
    import shutil

    spared = keep.resolve() if keep is not None else None
    for name in OUTPUT_FILES:
        path = out / name
        if path.is_file() and path.resolve() != spared:
            path.unlink()
    figures = out / "figures"
    if figures.is_dir():
        shutil.rmtree(figures)


def write_outputs(
    out: Path,
    profile: AttentionProfile,
    metrics: ProfileMetrics,
    fit: TierFit,
    policy: Policy,
    failed: dict[str, str],
    figures: bool = True,
    manifest: dict[str, Any] | None = None,
) -> None:
    """Everything but the profile; the policy last, so its presence means a finished run.

    ``manifest``: the run's manifest (:func:`hermes_policy.evaluation.manifest.run_manifest`), written
    at the top of ``metrics.json``. The per-KV-head analysis (roles, recall at the policy's
    budget) is written with every run, into ``metrics.json``, the report and a figure; only
    a ``--per-head`` policy carries it into the policy itself."""
    from .report import render_report

    head_metrics, roles = analyze_heads(profile, policy.model, policy.budget)
    write_json_atomic(
        out / "metrics.json",
        {"manifest": manifest, "layers": metrics.layer_table(), "head_periodicity": metrics.head_periodicity,
         "head_recency_share": metrics.head_recency_share, "kv_heads": head_table(head_metrics, roles),
         "tier_fit": {
             "tiers": fit.tiers, "levels": fit.levels, "r2": fit.r2, "roles": fit.roles,
             "mismatches": fit.mismatches}, "failed_streams": failed,
         "streams": profile.meta.get("streams", [])},
    )
    write_text_atomic(out / "report.md", render_report(policy, metrics, fit, failed, heads=(head_metrics, roles)))
    if figures:
        from .figures import save_figures, save_head_figure

        save_figures(profile, metrics, fit, out / "figures")
        save_head_figure(head_metrics, roles, out / "figures")
    policy.save(out / "policy.json")
