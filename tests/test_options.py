"""RuntimeOptions: the environment's overrides, the process's active options, and what reads them."""

from __future__ import annotations

import pytest
import torch

from hermes_policy import RuntimeOptions, StreamingSession, options
from hermes_policy.errors import HermesError, StreamError
from hermes_policy.kernels import (
    block_attention_kernel,
    compaction_kernel,
    fusion,
    probability_kernel,
    split_kv_attention,
    summary_kernel,
)
from hermes_policy.options import ENVIRONMENT, OptionsError

SWITCHES = {
    "split_kv_kernel": split_kv_attention.SWITCH,
    "probability_kernel": probability_kernel.SWITCH,
    "block_attention_kernel": block_attention_kernel.SWITCH,
    "compaction_kernel": compaction_kernel.SWITCH,
    "summary_kernel": summary_kernel.SWITCH,
}


def test_defaults_and_an_empty_environment():
    assert RuntimeOptions.from_env({}) == RuntimeOptions()
    default = RuntimeOptions()
    assert default.answer_path is None and default.ingest_graphs is None
    assert all(getattr(default, field) for field in SWITCHES) and default.fused_ops
    assert not default.blocks_with_chunk


@pytest.mark.parametrize("field,variable", sorted(ENVIRONMENT.items()))
def test_each_variable_overrides_its_field(field, variable):
    off, on = RuntimeOptions.from_env({variable: "0"}), RuntimeOptions.from_env({variable: "1"})
    assert getattr(off, field) is False and getattr(on, field) is True
    for other in ENVIRONMENT:
        if other != field:
            assert getattr(off, other) == getattr(RuntimeOptions(), other)
    assert RuntimeOptions.from_env({variable: ""}) == RuntimeOptions()  # empty: unset
    assert RuntimeOptions.from_env({variable: " 0 "}) == off


def test_the_variables_are_those_of_before():
    assert ENVIRONMENT == {
        "split_kv_kernel": "HERMES_SPLIT_KV",
        "probability_kernel": "HERMES_PROBABILITY_KERNEL",
        "block_attention_kernel": "HERMES_BLOCK_KERNEL",
        "compaction_kernel": "HERMES_COMPACTION_KERNEL",
        "summary_kernel": "HERMES_SUMMARY_KERNEL",
        "fused_ops": "HERMES_FUSED_OPS",
        "blocks_with_chunk": "HERMES_BLOCKS_WITH_CHUNK",
    }


@pytest.mark.parametrize("value", ["yes", "off", "2", "true", "O"])
def test_a_bad_value_names_the_variable(value):
    with pytest.raises(OptionsError, match=rf"\$HERMES_SPLIT_KV must be 0 \(off\) or 1 \(on\), got '{value}'"):
        RuntimeOptions.from_env({"HERMES_SPLIT_KV": value})
    assert issubclass(OptionsError, HermesError)


def test_the_environment_overrides_the_settings_given():
    opts = RuntimeOptions.from_env({"HERMES_SUMMARY_KERNEL": "0"}, answer_path="static", summary_kernel=True)
    assert opts.answer_path == "static" and opts.summary_kernel is False
    assert RuntimeOptions.from_env({}, fused_ops=False).fused_ops is False


def test_from_env_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("HERMES_COMPACTION_KERNEL", "0")
    assert RuntimeOptions.from_env().compaction_kernel is False


def test_options_are_frozen():
    with pytest.raises(AttributeError):
        RuntimeOptions().fused_ops = False  # type: ignore[misc]


def test_apply_and_applied():
    before = options.current()
    previous = options.apply(RuntimeOptions(summary_kernel=False))
    assert previous == before and options.current().summary_kernel is False
    with options.applied(fused_ops=False) as inside:
        assert options.current() is inside and not inside.fused_ops and not inside.summary_kernel
    assert options.current() == RuntimeOptions(summary_kernel=False)
    with pytest.raises(OptionsError, match="RuntimeOptions"):
        options.apply({"fused_ops": False})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", sorted(SWITCHES))
def test_each_kernel_switch_follows_the_active_options(field):
    switch = SWITCHES[field]
    assert switch.option == field
    options.apply(RuntimeOptions())
    assert switch.enabled() == (not switch.failed)
    with options.applied(**{field: False}):
        assert not switch.enabled()
        assert all(other.enabled() == (not other.failed) for name, other in SWITCHES.items() if name != field)


def test_fused_ops_follow_the_active_options(monkeypatch):
    op = fusion.FusedOp(lambda x: 2 * x)

    class OnCuda(torch.Tensor):  # a tensor that says it lives on CUDA, for compiles() only
        @property
        def device(self):
            return torch.device("cuda")

    first = torch.ones(1).as_subclass(OnCuda)
    options.apply(RuntimeOptions())
    assert op.compiles(first)
    with options.applied(fused_ops=False):
        assert not op.compiles(first)


def test_session_applies_its_options(tiny_adapter):
    chosen = RuntimeOptions(answer_path="static", split_kv_kernel=False, compaction_kernel=False)
    session = StreamingSession(tiny_adapter, chunk_frames=4, options=chosen)
    assert session.answer_path == "static"
    assert session.options == RuntimeOptions(
        answer_path="static", ingest_graphs=False, split_kv_kernel=False, compaction_kernel=False
    )
    assert options.current() == session.options
    assert not split_kv_attention.SWITCH.enabled() and not compaction_kernel.SWITCH.enabled()


def test_session_without_options_reads_the_environment(tiny_adapter, monkeypatch):
    monkeypatch.setenv("HERMES_PROBABILITY_KERNEL", "0")
    options.apply(RuntimeOptions(summary_kernel=False))
    session = StreamingSession(tiny_adapter, chunk_frames=4)
    assert session.options == RuntimeOptions(answer_path="eager", ingest_graphs=False, probability_kernel=False)
    assert options.current().summary_kernel  # the environment's options replaced the applied ones
    monkeypatch.setenv("HERMES_PROBABILITY_KERNEL", "maybe")
    with pytest.raises(OptionsError, match="HERMES_PROBABILITY_KERNEL"):
        StreamingSession(tiny_adapter, chunk_frames=4)


def test_session_checks_its_options(tiny_adapter):
    with pytest.raises(StreamError, match="answer_path must be one of"):
        StreamingSession(tiny_adapter, options=RuntimeOptions(answer_path="fast"))  # type: ignore[arg-type]
    with pytest.raises(StreamError, match="needs the whole model on one CUDA device"):
        StreamingSession(tiny_adapter, options=RuntimeOptions(ingest_graphs=True))
    with pytest.raises(StreamError, match="options must be RuntimeOptions"):
        StreamingSession(tiny_adapter, options={"answer_path": "static"})  # type: ignore[arg-type]


def test_other_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HERMES_PROBE_CACHE", str(tmp_path))
    assert options.cache_root() == tmp_path
    monkeypatch.delenv("HERMES_PROBE_CACHE")
    assert options.cache_root().name == "hermes-probe"
    monkeypatch.setenv("HERMES_PROBE_NO_CACHE", "1")
    assert not options.derived_cache_enabled()
    monkeypatch.delenv("HERMES_PROBE_NO_CACHE")
    assert options.derived_cache_enabled()
    monkeypatch.setenv("HERMES_EVAL_DIST_TIMEOUT_S", "90")
    assert options.distributed_timeout_s(5.0) == 90.0
    monkeypatch.setenv("HERMES_EVAL_DIST_TIMEOUT_S", "soon")
    with pytest.raises(OptionsError, match="HERMES_EVAL_DIST_TIMEOUT_S"):
        options.distributed_timeout_s(5.0)
    monkeypatch.delenv("HERMES_EVAL_DIST_TIMEOUT_S")
    assert options.distributed_timeout_s(5.0) == 5.0
