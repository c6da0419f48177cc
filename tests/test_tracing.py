"""OpenTelemetry: one trace per run, GenAI attributes on steps, context carried to workers."""

from __future__ import annotations

from typing import Any, ClassVar

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors import Delivery, StepWorker, WorkItem
from bus import Bus
from workflow import NerveClient, Orchestrator, RunContext, WorkflowRegistry
from workflow._tracing import run_span_context

registry = WorkflowRegistry()


@registry.register(name="traced")
async def traced(ctx: RunContext, inp: dict[str, Any]) -> Any:
    first = await ctx.tool("search", {"q": "nerve"})
    return await ctx.tool("search", {"q": first["echo"] + "!"})


class SearchTool(StepWorker):
    durable: ClassVar[str] = "trace-tools"

    def __init__(self) -> None:
        super().__init__("search-tool")

    def work_subjects(self) -> list[str]:
        assert self.bus is not None
        return [self.bus.names.work_tool]

    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        return {"echo": item.args["q"]}


def exporter() -> InMemorySpanExporter:
    mem = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the first test to trace installs one
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(mem))
    return mem


async def test_a_run_is_one_trace_with_genai_step_spans_and_worker_children(bus: Bus) -> None:
    spans = exporter()
    orch = Orchestrator(bus, "trace-o", registry=registry)
    tool = SearchTool()
    await orch.start()
    await tool.start(bus)
    client = NerveClient(bus)
    run_id = await client.submit("acme", workflow="traced", input={})
    assert (await client.wait(run_id, timeout=20)).result == {"echo": "nerve!"}
    await tool.stop()
    await orch.stop()
    trace_id = run_span_context(run_id).trace_id
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    steps = [s for s in mine if s.name == "execute_tool search"]
    assert len(steps) == 2
    for s in steps:
        assert s.attributes["gen_ai.operation.name"] == "execute_tool"
        assert s.attributes["gen_ai.tool.name"] == "search"
        assert s.attributes["gen_ai.conversation.id"] == run_id
        assert s.attributes["gen_ai.agent.name"] == "traced"
        assert s.parent.span_id == run_span_context(run_id).span_id
    # The worker's span is a child of the step span that dispatched it.
    workers = [s for s in mine if s.name == "search-tool process"]
    assert sorted(w.parent.span_id for w in workers) == sorted(s.context.span_id for s in steps)
