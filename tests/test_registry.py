"""Registering workflows and activities: versions, typed inputs, names taken twice."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from pydantic import BaseModel, Field

import workflow
from nerve import ConfigError, TaskRejected
from workflow import ActivityContext, ActivityRegistry, RunContext, WorkflowRegistry


class Order(BaseModel):
    cents: int = Field(ge=0)


def test_versions_in_natural_order_whatever_they_mix() -> None:
    reg = WorkflowRegistry()
    for version in ("1", "1.9", "1.10", "v2", "v10"):
        @reg.register(name="wf", version=version)
        async def wf(ctx: RunContext, inp: dict[str, Any]) -> str:
            return "x"

    assert reg.get("wf").version == "v10"
    assert reg.get("wf", "1.9").version == "1.9"
    only_numbers = WorkflowRegistry()
    for version in ("1.9", "1.10", "2-rc1"):
        only_numbers.register(name="n", version=version)(wf)
    assert only_numbers.get("n").version == "2-rc1"


def test_the_input_model_is_found_however_the_annotation_is_written() -> None:
    reg = WorkflowRegistry()

    @reg.register
    async def plain(ctx: RunContext, inp: Order) -> None: ...

    @reg.register
    async def optional(ctx: RunContext, inp: Optional[Order]) -> None: ...  # noqa: UP045

    @reg.register
    async def union(ctx: RunContext, inp: Order | None) -> None: ...

    @reg.register
    async def qualified(ctx: RunContext, inp: workflow.AgentInput) -> None: ...

    @reg.register
    async def untyped(ctx: RunContext, inp: dict[str, Any]) -> None: ...

    for name in ("plain", "optional", "union"):
        definition = reg.get(name)
        assert definition.input_type is Order, name
        with pytest.raises(TaskRejected, match="cents"):
            definition.parse_input({"cents": -1})
    assert reg.get("qualified").input_type is workflow.AgentInput
    assert reg.get("untyped").input_type is None
    assert reg.get("untyped").parse_input({"cents": -1}) == {"cents": -1}


def test_an_input_annotation_that_cannot_be_resolved_is_refused_at_registration() -> None:
    reg = WorkflowRegistry()
    with pytest.raises(ConfigError, match="cannot resolve the input annotation of workflow"):
        @reg.register
        async def broken(ctx: RunContext, inp: NoSuchModel) -> None: ...  # noqa: F821


def test_a_second_function_under_a_taken_name_is_refused() -> None:
    reg = WorkflowRegistry()

    @reg.register(name="refund")
    async def refund(ctx: RunContext, inp: dict[str, Any]) -> None: ...

    with pytest.raises(ConfigError, match="workflow 'refund' version '1' is registered already"):
        @reg.register(name="refund")
        async def other(ctx: RunContext, inp: dict[str, Any]) -> None: ...

    reg.register(name="refund")(refund)  # the same function again (a module re-imported)
    reg.register(name="refund", version="2")(refund)  # a new version is a new registration

    acts = ActivityRegistry()

    @acts.register(name="charge")
    async def charge(actx: ActivityContext) -> None: ...

    with pytest.raises(ConfigError, match="activity 'charge' is registered already"):
        @acts.register(name="charge")
        async def charge_twice(actx: ActivityContext) -> None: ...


def test_the_built_in_agent_cannot_be_replaced_by_accident() -> None:
    with pytest.raises(ConfigError, match="workflow 'agent' version '1' is registered already"):
        @workflow.workflow(name="agent")
        async def agent(ctx: RunContext, inp: dict[str, Any]) -> None: ...
