"""A session's questions: answers, and the scores that compare a cache with the full one.

Every method here leaves the cache as it was: a question is prefilled after the stream's
tokens, read, and cut off again (a question-time rule assembles its cache around it and
undoes that afterwards). No retention work happens at question time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from hermes_policy.attention.capture import AttentionCapture
from hermes_policy.attention.context import AttentionContext
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.errors import StreamError
from hermes_policy.graphs.answer_graphs import AnswerGraphs
from hermes_policy.models.base import ModelAdapter, StreamPiece
from hermes_policy.session.results import Answer, Turn


@contextmanager
def paused_collection(pause: bool = True) -> Iterator[Callable[[], None]]:
    """Within this context Python's garbage collector does not run (when ``pause``, and it
    was running); the yielded function resumes it early. Restored on exit either way."""
    paused = pause and gc.isenabled()
    if paused:
        gc.disable()

    def resume() -> None:
        if paused:
            gc.enable()

    try:
        yield resume
    finally:
        resume()


class SessionQuestions:
    """The question half of :class:`~hermes_policy.session.StreamingSession` (mixed in).

    It reads the session's state below and calls its ``flush``, ``_prefill``, ``_sync``
    and peak-memory counters; it changes nothing but the conversation's history.
    """

    adapter: ModelAdapter
    store: KVStore
    memory: Any  # a question-time rule's state (QuestionTimeMemory), or None
    answer_path: str
    max_new_tokens: int
    frames_seen: int
    history: Any  # deque of Turn
    _answer_graphs: AnswerGraphs | None

    def probe_question(self, question: StreamPiece, capture: AttentionCapture) -> None:
        """Prefill a question piece under ``capture`` and take it back out of the cache."""
        saved_lengths = self.store.lengths()
        try:
            with torch.inference_mode():
                self._prefill(question, last_only=True, attention=AttentionContext(capture=capture))
        finally:
            self.store.truncate(saved_lengths)

    @contextmanager
    def _question_memory(self, question: StreamPiece) -> Iterator[None]:
        """Around a question: let a question-time memory assemble the cache, then undo it."""
        memory = self.memory
        if memory is None:
            yield
            return
        with torch.inference_mode():
            memory.before_question(self, question)
        try:
            yield
        finally:
            memory.after_question(self)

    def ask(
        self, question: str, max_new_tokens: int | None = None, on_token: Callable[[int], None] | None = None
    ) -> Answer:
        """Answer a question about everything streamed so far, then forget the Q/A tokens.

        The question is prefilled on the cache, the answer decoded greedily with explicit
        positions, and the cache truncated back to its state before the question. The
        Q/A text is kept in :attr:`history`. No retention work happens here.

        ``on_token`` is called with each answer token id as soon as it is known (stop token
        included), for callers that stream the answer.
        """
        if not question or not question.strip():
            raise StreamError("the question is empty")
        # the peak-memory counter is instrumentation of this answer, reset before it arrives
        self._reset_peak_memory()
        arrival = time.perf_counter()
        # no garbage-collection pause between the question and its first token on the graph
        # path (a collection takes up to a millisecond); collection resumes at that token
        with paused_collection(self.answer_path != "eager") as resume_gc:
            pending = self.flush()
            if self.frames_seen == 0:
                raise StreamError("a question was asked before any frame was streamed")
            limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
            stops = self.adapter.stop_token_ids
            piece = self.adapter.question_piece(question)
            with self._question_memory(piece):
                kept = self.store.stream_lengths()
                kv_bytes = self.store.nbytes()
                tokens, first_token_at = self._answer_tokens(piece, limit, stops, resume_gc, on_token)
            done = time.perf_counter()
        answer_ids = [t for t in tokens if t not in stops]
        text = self.adapter.decode(answer_ids)
        self.history.append(Turn(question, text, self.frames_seen))
        return Answer(
            question=question,
            text=text,
            token_ids=answer_ids,
            ttft_ms=(first_token_at - arrival) * 1e3,
            tpot_ms=(done - first_token_at) * 1e3 / (len(tokens) - 1) if len(tokens) > 1 else None,
            tokens_kept=kept,
            peak_memory_bytes=self._peak_memory(),
            kv_cache_bytes=kv_bytes,
            frames_seen=self.frames_seen,
            pending_frames=pending,
            host_memory_bytes=0 if self.memory is None else self.memory.nbytes(),
        )

    def _answer_tokens(
        self,
        piece: StreamPiece,
        limit: int,
        stops: set[int],
        resume_gc: Callable[[], None],
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[list[int], float]:
        """Greedy answer tokens of a question piece on the cache as it is, and the time the
        first one was known; the cache is left as it was."""
        if self.answer_path != "eager":
            marks: list[float] = []

            def first_token() -> None:
                marks.append(time.perf_counter())
                resume_gc()

            with torch.inference_mode():
                tokens = self.answer_graphs.answer(piece, limit, stops, on_first_token=first_token, on_token=on_token)
            return tokens, marks[0]
        saved_lengths = self.store.lengths()
        tokens: list[int] = []
        try:
            with torch.inference_mode():
                hidden = self._prefill(piece, last_only=True)
                token = int(self.adapter.logits(hidden[:, -1:]).argmax(-1))
                self._sync()
                first_token_at = time.perf_counter()
                tokens.append(token)
                if on_token is not None:
                    on_token(token)
                while token not in stops and len(tokens) < limit:
                    hidden = self._prefill(StreamPiece.text([token], self.adapter.position_axes))
                    token = int(self.adapter.logits(hidden[:, -1:]).argmax(-1))
                    tokens.append(token)
                    if on_token is not None:
                        on_token(token)
                self._sync()
        finally:
            self.store.truncate(saved_lengths)
        return tokens, first_token_at

    def next_token_logits(self, question: str) -> torch.Tensor:
        """Logits ``(vocab,)`` of the first answer token, leaving the cache untouched.

        Used to compare retention rules against the full cache (KL divergence,
        log-probability of known answers) without decoding.
        """
        hidden = self.run_query(question)
        with torch.inference_mode():
            return self.adapter.logits(hidden)[0, -1].float()

    def answer_logprob(self, question: str, answer: str) -> float:
        """Log-probability of ``answer`` (teacher-forced) after ``question``; cache untouched.

        Used to compare retention rules on known answers without decoding.
        """
        answer_ids = self.adapter.encode_text(answer)
        if not answer_ids:
            raise StreamError("the answer is empty")
        self.flush()
        if self.frames_seen == 0:
            raise StreamError("a question was asked before any frame was streamed")
        axes = self.adapter.position_axes
        piece = self.adapter.question_piece(question)
        with self._question_memory(piece):
            saved_lengths = self.store.lengths()
            try:
                with torch.inference_mode():
                    first = self._prefill(piece, last_only=True)
                    rest = self._prefill(StreamPiece.text(answer_ids[:-1], axes)) if len(answer_ids) > 1 else None
                    hidden = first if rest is None else torch.cat([first, rest], dim=1)
                    logprobs = torch.log_softmax(self.adapter.logits(hidden)[0].float(), dim=-1)
                    return float(logprobs[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].sum())
            finally:
                self.store.truncate(saved_lengths)

    def continuation_logprobs(
        self, prompt: list[int], continuation: list[int], capture: AttentionCapture | None = None
    ) -> torch.Tensor:
        """Log-probabilities at each token of ``continuation`` teacher-forced after ``prompt``.

        ``prompt`` and ``continuation`` are token ids prefilled as plain text right after
        the cache's tokens (the caller adds any chat-template text); the cache is left as
        it was. With ``capture``, the attention of every prefilled row is handed over.

        Returns
        -------
        FloatTensor ``(len(continuation), vocab)``: row ``j`` is the log-softmax of the
        distribution that predicts ``continuation[j]``.
        """
        return self.batch_continuation_logprobs([(prompt, continuation)], capture)[0]

    def batch_continuation_logprobs(
        self, items: Sequence[tuple[list[int], list[int]]], capture: AttentionCapture | None = None
    ) -> list[torch.Tensor]:
        """:meth:`continuation_logprobs` of several (prompt, continuation) pairs in one forward.

        Each pair is an independent query block (:attr:`~hermes_policy.attention.context.AttentionContext.blocks`):
        it sees the cache and, causally, itself only, at the layer's next free position,
        exactly as if it had been run alone. The cache is left as it was.

        Returns
        -------
        per pair, FloatTensor ``(len(continuation), vocab)`` on the CPU
        """
        if not items or any(not p or not c for p, c in items):
            raise StreamError("every prompt and continuation must hold tokens")
        self.flush()
        if self.frames_seen == 0:
            raise StreamError("a question was asked before any frame was streamed")
        axes = self.adapter.position_axes
        if self.memory is not None and self.memory.per_question and len(items) > 1:
            # what the memory brings back depends on the question: one pair at a time
            return [out for item in items for out in self.batch_continuation_logprobs([item], capture)]
        with self._question_memory(StreamPiece.text(list(items[0][0]), axes)):
            return self._continuation_logprobs(items, capture)

    def _continuation_logprobs(
        self, items: Sequence[tuple[list[int], list[int]]], capture: AttentionCapture | None
    ) -> list[torch.Tensor]:
        saved_lengths = self.store.lengths()
        axes = self.adapter.position_axes
        blocks = [list(p) + list(c[:-1]) for p, c in items]
        ids = np.concatenate([np.asarray(b, dtype=np.int64) for b in blocks])
        positions = np.concatenate([np.arange(len(b), dtype=np.int64) for b in blocks])
        merged = StreamPiece(
            input_ids=torch.from_numpy(ids),
            positions=torch.from_numpy(np.tile(positions, (axes, 1))),
            frame_index=torch.from_numpy(np.full(len(ids), -1, dtype=np.int64)),
        )
        out = []
        try:
            layout = (0, tuple(len(b) for b in blocks)) if len(blocks) > 1 else None
            with torch.inference_mode():
                hidden = self._prefill(merged, attention=AttentionContext(capture=capture, blocks=layout))
                start = 0
                for (prompt, _continuation), block in zip(items, blocks, strict=True):
                    rows = hidden[:, start + len(prompt) - 1 : start + len(block)]
                    out.append(torch.log_softmax(self.adapter.logits(rows)[0].float(), dim=-1).cpu())
                    start += len(block)
            return out
        finally:
            self.store.truncate(saved_lengths)

    def run_query(self, text: str, capture: AttentionCapture | None = None) -> torch.Tensor:
        """Prefill a question on the cache and take it back out; returns its last hidden state.

        Parameters
        ----------
        text : the question (formatted as :meth:`ask` formats it)
        capture : an attention capture active during the prefill (probing, pseudo-queries)

        Returns
        -------
        Tensor ``(1, 1, hidden)``
        """
        self.flush()
        if self.frames_seen == 0:
            raise StreamError("a question was asked before any frame was streamed")
        piece = self.adapter.question_piece(text)
        with self._question_memory(piece):
            saved_lengths = self.store.lengths()
            try:
                with torch.inference_mode():
                    return self._prefill(piece, last_only=True, attention=AttentionContext(capture=capture))
            finally:
                self.store.truncate(saved_lengths)

    def warm_answers(self, question_lengths: Sequence[int] = (16, 32, 64), max_new_tokens: int | None = None) -> int:
        """Capture now the CUDA graphs that answers to questions of these token lengths would
        capture on the cache as it is (:meth:`AnswerGraphs.warm`); returns how many were
        captured. Nothing happens off the graph path, before the first frame, or with a
        question-time rule (it rebuilds the cache per question). The cache, the history and
        every later answer are unchanged: only the time of the next question's first token.
        """
        if self.answer_path != "graphs" or self.memory is not None or self.frames_seen == 0:
            return 0
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        with torch.inference_mode():
            return self.answer_graphs.warm(tuple(question_lengths), limit)

    @property
    def answer_graphs(self) -> AnswerGraphs:
        """The fixed-shape answering machinery (built on first use)."""
        if self._answer_graphs is None:
            self._answer_graphs = AnswerGraphs(
                self.adapter, self.store, use_graphs=self.answer_path == "graphs"
            )
        return self._answer_graphs

    @answer_graphs.setter
    def answer_graphs(self, graphs: AnswerGraphs | None) -> None:
        """Answer with ``graphs`` from now on (a benchmark comparing forwards; a test's own
        settings); None: built again on the next answer."""
        self._answer_graphs = graphs
