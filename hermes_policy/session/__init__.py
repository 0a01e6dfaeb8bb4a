"""StreamingSession: frames in, answers out, on a per-layer KV store of bounded size.

Data flow of one session::

    add_frames(frames) -> chunks of `chunk_frames` -> adapter.frames_piece -> prefill on the
    KV store at each layer's next free position (with the rule's pseudo-queries in the same
    forward when this chunk triggers compression) -> retention rule -> keep / re-index

    ask(question) -> prefill the question after the store's tokens -> greedy decode with
    explicit positions (CUDA graphs on a GPU) -> the Q/A tokens are not kept -> Answer

Questions never trigger retention work: everything the rule needs happens at ingestion.
The session drives; the retention rules and the guidance planner decide
(:mod:`hermes_policy.retention`), the attention paths compute (:mod:`hermes_policy.attention`),
and an observer watches (:mod:`hermes_policy.session.observer`).
"""

from hermes_policy.session.observer import NoObserver, SessionObserver
from hermes_policy.session.results import Answer, IngestReport, Turn
from hermes_policy.session.streaming_session import StreamingSession

__all__ = [
    "Answer",
    "IngestReport",
    "NoObserver",
    "SessionObserver",
    "StreamingSession",
    "Turn",
]
