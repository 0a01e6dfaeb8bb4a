"""`hermes-probe serve`: a real uvicorn server on 127.0.0.1, driven by the official `openai` client.

References: answers of a plain :class:`StreamingSession` fed the same frames (the served
answer reports how many frames it saw); the API key on every route; bounded load.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import openai
import pytest

from hermes_policy import StreamingSession
from hermes_policy.inputs.synthetic_text import text_stream
from hermes_policy.retention import FifoRetention
from hermes_policy.serving import ServerConfig, create_app, serve_in_background
from hermes_policy.serving.sources import SourceSpec, open_source, paced

KEY = "test-key"


@contextmanager
def running(adapter, **config):
    """A uvicorn server on a free loopback port, in a thread; stopped on exit."""
    app = create_app(adapter, ServerConfig(**{"policy": "fifo", "budget": 64, **config}))
    with serve_in_background(app) as base:
        yield base, app


def client(base: str, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key or "none", max_retries=0, timeout=60)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ask_a_new_stream(base: str, stream: dict, question: str, ready=lambda status: status["frames_ingested"] >= 4):
    """Create a stream, wait until its status is ``ready``, ask ``question`` (3 tokens);
    returns the stream id and the reply."""
    stream_id = httpx.post(base + "/v1/streams", json={"chunk_frames": 2, **stream}).json()["id"]
    wait_for(lambda: ready(httpx.get(f"{base}/v1/streams/{stream_id}").json()))
    reply = client(base, None).chat.completions.create(
        model="x", messages=[{"role": "user", "content": question}], max_tokens=3, extra_body={"stream_id": stream_id})
    return stream_id, reply


def test_text_stream_answers_equal_a_session_fed_the_same_frames(tiny_adapter):
    with running(tiny_adapter, api_key=KEY) as (base, app):
        headers = {"Authorization": f"Bearer {KEY}"}
        created = httpx.post(base + "/v1/streams", headers=headers, json={
            "source": "synthetic", "fps": 20, "chunk_frames": 4, "standing_questions": ["Is it raining?"]})
        assert created.status_code == 200, created.text
        stream_id = created.json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/streams/{stream_id}", headers=headers).json()["frames_ingested"] >= 8)

        oa = client(base)
        reply = oa.chat.completions.create(model="x", messages=[{"role": "user", "content": "What was said?"}],
                                           max_tokens=5, extra_body={"stream_id": stream_id})
        seen = reply.usage.model_extra["frames_seen"]
        assert seen >= 8 and reply.usage.model_extra["ttft_ms"] > 0

        # a plain session fed the same first `seen` frames of the same source answers the same
        reference = StreamingSession(tiny_adapter, FifoRetention(budget=64), chunk_frames=4, fps=20)
        frames = text_stream(seen, seed=0).frames
        reference.add_frames(frames[:seen], timestamps=[i / 20 for i in range(seen)])
        assert reply.choices[0].message.content == reference.ask("What was said?", max_new_tokens=5).text

        # streamed token by token (SSE): the concatenated deltas are a complete answer
        pieces, usage = [], None
        for event in oa.chat.completions.create(model="x", messages=[{"role": "user", "content": "And now?"}],
                                                max_tokens=5, stream=True, extra_body={"stream_id": stream_id}):
            if event.choices and event.choices[0].delta.content:
                pieces.append(event.choices[0].delta.content)
            usage = getattr(event, "usage", None) or usage
        assert usage is not None and usage.completion_tokens >= 1
        status = httpx.get(f"{base}/v1/streams/{stream_id}", headers=headers).json()
        assert status["frames_ingested"] >= seen and max(status["tokens_kept_per_layer"]) <= 64
        assert status["standing_questions"][0]["question"] == "Is it raining?"
        assert httpx.delete(f"{base}/v1/streams/{stream_id}", headers=headers).json()["deleted"]
        assert httpx.get(f"{base}/v1/streams/{stream_id}", headers=headers).status_code == 404


def test_sse_tokens_equal_the_plain_answer_for_the_same_frames(tiny_adapter):
    """A stream played as fast as ingest takes it, finished: the streamed tokens, the
    non-streaming answer and a plain session's ``ask`` on the same frames are the same text."""
    with running(tiny_adapter) as (base, _):
        stream_id = httpx.post(base + "/v1/streams", json={
            "source": "synthetic", "frames": 12, "fps": 1, "chunk_frames": 4, "realtime": False}).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/streams/{stream_id}").json()["finished"])
        oa = client(base, None)
        plain = oa.chat.completions.create(model="x", messages=[{"role": "user", "content": "Tell me."}],
                                           max_tokens=6, extra_body={"stream_id": stream_id})
        streamed = "".join(
            e.choices[0].delta.content or ""
            for e in oa.chat.completions.create(model="x", messages=[{"role": "user", "content": "Tell me."}],
                                                max_tokens=6, stream=True, extra_body={"stream_id": stream_id})
            if e.choices
        )
        assert streamed == plain.choices[0].message.content
        assert plain.usage.model_extra["frames_seen"] == 12
    reference = StreamingSession(tiny_adapter, FifoRetention(budget=64), chunk_frames=4, fps=1)
    frames = list(open_source(tiny_adapter, SourceSpec("synthetic", frames=12), 1))
    reference.add_frames([f for f, _ in frames], timestamps=[t for _, t in frames])
    assert streamed == reference.ask("Tell me.", max_new_tokens=6).text


def test_video_file_played_at_its_own_rate_and_asked_while_it_runs(tmp_path):
    from tiny_llava_ov import tiny_llava_onevision

    from hermes_policy.inputs.synthetic_benchmark import write_synthetic_benchmark
    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llava_onevision(tmp_path / "llava", layers=2), device="cpu")
    bench = write_synthetic_benchmark(tmp_path / "bench", num_videos=1, num_frames=40, fps=10.0, height=64, width=64)
    video = str(bench.parent / "videos" / "synthetic_000.mp4")
    with running(adapter, budget=40) as (base, _):
        stream_id, reply = ask_a_new_stream(base, {"source": "file", "location": video, "fps": 10}, "What moves?")
        seen = reply.usage.model_extra["frames_seen"]
        status = httpx.get(f"{base}/v1/streams/{stream_id}").json()
        assert 4 <= seen < 40 and not status["finished"]  # answered while the file still plays
        assert httpx.get(f"{base}/v1/streams/{stream_id}/frame.jpg").headers["content-type"] == "image/jpeg"
        memory = httpx.get(f"{base}/v1/streams/{stream_id}/memory").json()
        assert len(memory["kept_frames_per_layer"]) == 2

        reference = StreamingSession(adapter, FifoRetention(budget=40), chunk_frames=2, fps=10)
        frames = list(open_source(adapter, SourceSpec("file", video), 10))[:seen]
        reference.add_frames(np.stack([f for f, _ in frames]), timestamps=[t for _, t in frames])
        assert reply.choices[0].message.content == reference.ask("What moves?", max_new_tokens=3).text


def test_api_key_bad_inputs_and_the_memory_limit(tiny_adapter):
    with running(tiny_adapter, api_key=KEY, max_streams=1) as (base, _):
        assert httpx.get(base + "/v1/streams").status_code == 401
        assert httpx.get(base + "/v1/streams", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").chat.completions.create(model="x", messages=[{"role": "user", "content": "?"}],
                                                          extra_body={"stream_id": "x"})
        headers = {"Authorization": f"Bearer {KEY}"}
        bad = httpx.post(base + "/v1/streams", headers=headers, content=b"{not json")
        assert bad.status_code == 422
        missing = httpx.post(base + "/v1/streams", headers=headers, json={"source": "file", "location": "/no/such.mp4"})
        assert missing.status_code == 400 and "text-only" in missing.json()["error"]["message"]
        unknown = httpx.post(base + "/v1/streams", headers=headers, json={"source": "webcam"})
        assert unknown.status_code == 400 and "unknown source" in unknown.json()["error"]["message"]
        unbounded = httpx.post(base + "/v1/streams", headers=headers, json={"policy": "full"})
        assert unbounded.status_code == 400 and "bounded rule" in unbounded.json()["error"]["message"]
        first = httpx.post(base + "/v1/streams", headers=headers, json={"source": "synthetic"})
        assert first.status_code == 200
        full = httpx.post(base + "/v1/streams", headers=headers, json={"source": "synthetic"})
        assert full.status_code == 503 and "maximum of 1 streams" in full.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError):
            client(base).chat.completions.create(model="x", messages=[{"role": "user", "content": "?"}],
                                                 extra_body={"stream_id": "nope"})
        with pytest.raises(openai.BadRequestError):
            client(base).chat.completions.create(model="x", messages=[{"role": "user", "content": "?"}])


def test_kv_memory_limit_refuses_with_a_reason(tiny_adapter):
    with running(tiny_adapter, kv_budget_bytes=1000) as (base, _):
        refused = httpx.post(base + "/v1/streams", json={"source": "synthetic"})
        assert refused.status_code == 503 and "MiB of KV cache" in refused.json()["error"]["message"]


def test_bounded_load_four_streams_twenty_questions_each(tiny_llama_dir):
    """4 streams x 20 questions, asked concurrently: every answer comes back, with latency
    percentiles reported, and is the answer of its own stream's memory: a plain session fed
    the first ``frames_seen`` frames of that stream's source answers each the same (fifo
    keeps no question history, so an answer depends on the frames alone). Frames of 24
    tokens carry each stream's own text (8 would hold only "Second N", the same in all)."""
    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llama_dir, device="cpu", tokens_per_frame=24)
    with running(adapter, max_streams=4) as (base, _):
        ids = [httpx.post(base + "/v1/streams", json={"source": "synthetic", "fps": 20, "chunk_frames": 4,
                                                       "seed": seed}).json()["id"] for seed in range(4)]
        wait_for(lambda: all(httpx.get(f"{base}/v1/streams/{i}").json()["frames_ingested"] >= 4 for i in ids))
        oa = client(base, None)

        def one(job):
            stream_id, n = job
            start = time.perf_counter()
            reply = oa.chat.completions.create(model="x", messages=[{"role": "user", "content": f"Question {n}?"}],
                                               max_tokens=4, extra_body={"stream_id": stream_id})
            answer = (n, reply.usage.model_extra["frames_seen"], reply.choices[0].message.content)
            return stream_id, reply.model_extra["stream_id"], time.perf_counter() - start, answer

        jobs = [(stream_id, n) for n in range(20) for stream_id in ids]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, jobs))
        assert len(results) == 80 and all(asked == answered for asked, answered, *_ in results)
        latencies = sorted(t for _, _, t, _ in results)
        p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
        assert 0 < p50 <= p95
        print(f"load: 80 questions, p50 {p50 * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms")

    def replay(seed: int, asked: list[tuple[int, int, str]]) -> list[str]:
        """A plain session's answers to ``asked`` (in order of frames seen) on the source of ``seed``."""
        reference = StreamingSession(adapter, FifoRetention(budget=64), chunk_frames=4, fps=20)
        source = open_source(adapter, SourceSpec("synthetic", seed=seed), 20)
        texts = []
        for n, seen, _ in asked:
            frames = [next(source) for _ in range(seen - reference.frames_seen)]
            if frames:
                reference.add_frames([f for f, _ in frames], timestamps=[t for _, t in frames])
            texts.append(reference.ask(f"Question {n}?", max_new_tokens=4).text)
        return texts

    told_apart = False
    for seed, stream_id in enumerate(ids):
        asked = sorted((a for stream, _, _, a in results if stream == stream_id), key=lambda a: a[1])
        served = [text for *_, text in asked]
        assert replay(seed, asked) == served, seed
        told_apart |= replay((seed + 1) % 4, asked) != served
    assert told_apart  # another stream's frames give other answers: a mix-up would show


def test_standing_question_events_arrive_as_server_sent_events(tiny_adapter, monkeypatch):
    """A standing question whose answer turns yes emits one event on /events (the yes/no
    decision is forced here; the event path is what is tested)."""
    from hermes_policy.serving import live_stream

    calls = {"n": 0}

    def flip(self, media_time, held=False):
        calls["n"] += 1
        for item in self.standing:
            if calls["n"] >= 2 and not item.answer_yes:
                event = live_stream.StreamEvent(item.question, media_time, self.session.frames_seen, time.time())
                self.events.append(event)
                for listener in list(self._event_listeners):
                    listener(event)
                item.answer_yes = True

    monkeypatch.setattr(live_stream.LiveStream, "check_standing", flip)
    with running(tiny_adapter) as (base, _):
        stream_id = httpx.post(base + "/v1/streams", json={
            "source": "synthetic", "fps": 20, "chunk_frames": 2, "standing_questions": ["Did a person enter?"]}).json()["id"]
        deadline, event = time.monotonic() + 60, None
        with httpx.stream("GET", f"{base}/v1/streams/{stream_id}/events", timeout=30) as response:
            for line in response.iter_lines():  # keep-alive comments come every second
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    break
                assert time.monotonic() < deadline, httpx.get(f"{base}/v1/streams/{stream_id}").json()["error"]
        assert event["question"] == "Did a person enter?" and event["frames_seen"] >= 4


def test_real_yes_no_check_runs_on_the_model(tiny_adapter):
    """The standing-question check itself: one next-token comparison per question per chunk."""
    from hermes_policy.serving.live_stream import LiveStream
    from hermes_policy.serving.model_lock import ModelLock

    session = StreamingSession(tiny_adapter, FifoRetention(budget=64), chunk_frames=2)
    session.add_frames(text_stream(4, seed=1).frames)
    stream = LiveStream(session, iter(()), ModelLock(), standing=["Is it day?"])
    stream.check_standing(3.0)
    logits = session.next_token_logits("Is it day? Answer yes or no.")
    yes, no = (tiny_adapter.encode_text(w)[0] for w in ("Yes", "No"))
    assert stream.standing[0].answer_yes == bool(logits[yes] > logits[no])
    assert len(stream.events) == int(stream.standing[0].answer_yes)


def test_paced_releases_frames_on_the_clock():
    now = {"t": 0.0}
    slept = []

    def sleep(s):
        slept.append(s)
        now["t"] += s

    released = list(paced(iter([("a", 0.0), ("b", 0.5), ("c", 1.25)]), clock=lambda: now["t"], sleep=sleep))
    assert [(f, m) for f, m, _ in released] == [("a", 0.0), ("b", 0.5), ("c", 1.25)]
    assert [round(arrival, 6) for *_, arrival in released] == [0.0, 0.5, 1.25]
    assert max(slept) <= 0.05 + 1e-9


def test_serve_refuses_a_public_address_without_a_key():
    from hermes_cli.main import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "needs --api-key" in result.output


def test_a_question_before_the_first_full_chunk_is_answered_from_the_partial_chunk(tiny_adapter):
    """Frames that do not yet fill a chunk are still memory: the question ingests them."""
    with running(tiny_adapter) as (base, _):
        stream_id = httpx.post(base + "/v1/streams", json={"source": "synthetic", "fps": 10, "chunk_frames": 64}).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/streams/{stream_id}").json()["frames_seen"] >= 3)
        reply = client(base, None).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "So far?"}], max_tokens=2, extra_body={"stream_id": stream_id})
        usage = reply.usage.model_extra
        assert 3 <= usage["frames_seen"] < 64
        # the served time to first token: waiting, then ingesting the frames released before
        # the question (all still pending here), then the answer's own
        assert usage["catch_up_frames"] == usage["frames_seen"] and usage["catch_up_ms"] > 0
        assert usage["ttft_ms"] == pytest.approx(usage["wait_ms"] + usage["catch_up_ms"] + usage["answer_ttft_ms"])


def test_the_ingester_feeds_the_session_one_chunk_per_hold_of_the_model(tiny_adapter):
    """A backlog is ingested chunk by chunk, each under its own hold of the model, so another
    stream's question waits for at most one chunk; the frames and their order are kept."""
    from hermes_policy.serving.live_stream import LiveStream
    from hermes_policy.serving.model_lock import ModelLock

    session = StreamingSession(tiny_adapter, FifoRetention(budget=64), chunk_frames=3)
    frames = text_stream(10, seed=4).frames
    fed, holds = [], []
    add_frames = session.add_frames
    session.add_frames = lambda items, timestamps: (fed.append(list(timestamps)), add_frames(items, timestamps))[1]
    lock = ModelLock()
    hold = lock.hold
    lock.hold = lambda priority: (holds.append(priority), hold(priority))[1]
    stream = LiveStream(session, ((f, i / 10) for i, f in enumerate(frames)), lock, realtime=False).start()
    wait_for(lambda: stream.status()["finished"])
    stream.stop()
    assert [len(batch) for batch in fed] == [3, 3, 3, 1]
    assert [t for batch in fed for t in batch] == [i / 10 for i in range(10)]
    assert holds == ["ingest"] * 4 and session.frames_seen == 9 and session.pending_frames == 1


def test_the_status_reports_frames_seen_and_memory(tiny_adapter):
    """Frames seen, the KV cache held and allocated (what the session's store holds), and
    the peak memory: on CUDA the highest of the stream's forwards' peaks, else the process's."""
    import dataclasses

    from hermes_policy.serving.live_stream import LiveStream, peak_memory
    from hermes_policy.serving.model_lock import ModelLock

    session = StreamingSession(tiny_adapter, FifoRetention(budget=64), chunk_frames=3)
    device_peaks = iter([5, 9, 7, None])
    add_frames = session.add_frames
    session.add_frames = lambda items, timestamps: dataclasses.replace(
        add_frames(items, timestamps), peak_memory_bytes=next(device_peaks))
    frames = text_stream(10, seed=4).frames
    stream = LiveStream(session, ((f, i / 10) for i, f in enumerate(frames)), ModelLock(), realtime=False).start()
    wait_for(lambda: stream.status()["finished"])
    stream.stop()
    status = stream.status()
    assert status["frames_seen"] == status["frames_ingested"] == 10 and status["frames_dropped"] == 0
    assert status["kv_cache_bytes"] == session.store.nbytes() > 0
    assert status["kv_allocated_bytes"] == session.store.cache.allocated_bytes() >= status["kv_cache_bytes"]
    assert status["peak_memory_scope"] == "process resident" and status["peak_memory_bytes"] > 2**20
    assert stream.stats.peak_device_memory_bytes == 9  # the highest forward's, not the last
    assert peak_memory(True, 9) == {"peak_memory_bytes": 9, "peak_memory_scope": "device, during this stream's forwards"}
    assert peak_memory(True, None)["peak_memory_bytes"] is None


@contextmanager
def http_folder(folder):
    """A plain HTTP server over ``folder`` on a free loopback port (a real URL source)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Ranged(SimpleHTTPRequestHandler):
        """Answers ``Range: bytes=a-b`` (an mp4 with its index at the end needs a seek, as
        from any real web server)."""

        def send_head(self):
            spec = self.headers.get("Range", "")
            path = self.translate_path(self.path)
            if not spec.startswith("bytes=") or not os.path.isfile(path):
                return super().send_head()
            size = os.path.getsize(path)
            first, _, last = spec[len("bytes="):].partition("-")
            start, end = int(first or 0), min(int(last) if last else size - 1, size - 1)
            if start >= size:
                self.send_error(416)
                return None
            with open(path, "rb") as handle:
                handle.seek(start)
                body = handle.read(end - start + 1)
            self.send_response(206)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            return io.BytesIO(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Ranged, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_source_streams_the_same_frames_as_the_file_and_is_served(tmp_path):
    """An mp4 over HTTP through PyAV (the url source) gives the file source's frames, and a
    server session on it answers like a session fed those frames."""
    from tiny_llava_ov import tiny_llava_onevision

    from hermes_policy.inputs.video_writing import write_video
    from hermes_policy.models import load_adapter

    rng = np.random.default_rng(0)
    video = write_video(tmp_path / "www" / "clip.mp4", rng.integers(0, 255, (20, 64, 64, 3), dtype=np.uint8), 10.0)
    adapter = load_adapter(tiny_llava_onevision(tmp_path / "llava", layers=2), device="cpu")
    with http_folder(video.parent) as root:
        url = f"{root}/clip.mp4"
        from_url = list(open_source(adapter, SourceSpec("url", url), 5))
        from_file = list(open_source(adapter, SourceSpec("file", str(video)), 5))
        assert len(from_url) == len(from_file) == 10
        for (a, ta), (b, tb) in zip(from_url, from_file, strict=True):
            assert abs(ta - tb) < 1e-6 and np.array_equal(a, b)
        with pytest.raises(Exception, match="cannot open"):
            open_source(adapter, SourceSpec("url", f"{root}/missing.mp4"), 5)

        with running(adapter, budget=40) as (base, _):
            _, reply = ask_a_new_stream(base, {"source": "url", "location": url, "fps": 5}, "What moves?",
                                        ready=lambda status: status["finished"])
    assert reply.usage.model_extra["frames_seen"] == 10
    reference = StreamingSession(adapter, FifoRetention(budget=40), chunk_frames=2, fps=5)
    reference.add_frames(np.stack([f for f, _ in from_file]), timestamps=[t for _, t in from_file])
    assert reply.choices[0].message.content == reference.ask("What moves?", max_new_tokens=3).text


def test_a_capture_device_through_libavdevice_is_served(tmp_path):
    """A real libavdevice input (FFmpeg's lavfi test-pattern device, the same path as
    v4l2 or avfoundation) streamed live: the answer equals a session fed the same frames."""
    from tiny_llava_ov import tiny_llava_onevision

    from hermes_policy.models import load_adapter
    from hermes_policy.serving.sources import LiveVideoSource

    adapter = load_adapter(tiny_llava_onevision(tmp_path / "llava", layers=2), device="cpu")
    device = "lavfi:testsrc=size=64x64:rate=10"
    with running(adapter, budget=40) as (base, _):
        stream_id, reply = ask_a_new_stream(base, {"source": "device", "location": device, "fps": 5}, "What is shown?")
        seen = reply.usage.model_extra["frames_seen"]
        assert httpx.get(f"{base}/v1/streams/{stream_id}").json()["error"] is None

    source = iter(LiveVideoSource(device, 5, device=True))
    frames = [next(source) for _ in range(seen)]
    assert [round(t, 6) for _, t in frames[:3]] == [0.0, 0.2, 0.4]
    reference = StreamingSession(adapter, FifoRetention(budget=40), chunk_frames=2, fps=5)
    reference.add_frames(np.stack([f for f, _ in frames]), timestamps=[t for _, t in frames])
    assert reply.choices[0].message.content == reference.ask("What is shown?", max_new_tokens=3).text


@pytest.mark.parametrize("location", ["/dev/nothing-here", "lavfi:", "mystery:cam0", "webcam"])
def test_a_bad_device_is_a_clear_400(tmp_path, location):
    from tiny_llava_ov import tiny_llava_onevision

    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llava_onevision(tmp_path / "llava", layers=2), device="cpu")
    with running(adapter, budget=40) as (base, _):
        reply = httpx.post(base + "/v1/streams", json={"source": "device", "location": location, "fps": 5})
        assert reply.status_code == 400 and location.split(":")[0] in reply.json()["error"]["message"]
        assert httpx.get(base + "/v1/streams").json()["streams"] == []
