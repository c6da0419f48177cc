"""Registering workflows and activities by name (and, for workflows, version)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from nerve import ConfigError, TaskRejected, WorkflowNotFound
from workflow._context import ACTIVITY_ATTR


@dataclass(frozen=True, slots=True)
class WorkflowDefinition:
    """A workflow function with its name, version and input type."""

    name: str
    version: str
    fn: Callable[[Any, Any], Awaitable[Any]]
    input_type: type[BaseModel] | None = None

    def parse_input(self, raw: Any) -> Any:
        if self.input_type is None:
            return raw
        try:
            return self.input_type.model_validate(raw or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "input"
            raise TaskRejected(f"invalid input for workflow {self.name}: {where}: {first['msg']}",
                               workflow=self.name) from None


class WorkflowRegistry:
    """Workflows by name and version. New runs use the newest version unless asked."""

    def __init__(self) -> None:
        self._defs: dict[str, dict[str, WorkflowDefinition]] = {}

    def register(self, fn: Callable[..., Awaitable[Any]] | None = None, *,
                 name: str | None = None, version: str = "1") -> Any:
        """Register ``async def wf(ctx, input)``. Usable as ``@registry.register(...)``."""

        def deco(f: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            if not inspect.iscoroutinefunction(f):
                raise ConfigError(f"workflow {f.__name__} must be an async function")
            wf_name = name or f.__name__
            params = list(inspect.signature(f).parameters.values())
            input_type = None
            if len(params) >= 2:
                ann = params[1].annotation
                if isinstance(ann, str):
                    ann = f.__globals__.get(ann, ann)
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    input_type = ann
            self._defs.setdefault(wf_name, {})[version] = WorkflowDefinition(
                wf_name, version, _with_typed_input(f, input_type), input_type)
            return f

        return deco(fn) if fn is not None else deco

    def get(self, name: str, version: str | None = None) -> WorkflowDefinition:
        versions = self._defs.get(name)
        if not versions:
            known = ", ".join(sorted(self._defs)) or "none"
            raise WorkflowNotFound(f"no workflow named {name!r} is registered (known: {known})",
                                   workflow=name)
        if version is not None and version in versions:
            return versions[version]
        return versions[max(versions, key=_version_key)]

    def names(self) -> list[str]:
        return sorted(self._defs)


def _version_key(v: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in v.replace("-", ".").split("."))


def _with_typed_input(f: Callable[..., Awaitable[Any]], input_type: type[BaseModel] | None,
                      ) -> Callable[[Any, Any], Awaitable[Any]]:
    if input_type is None:
        return f

    async def run(ctx: Any, raw: Any) -> Any:
        return await f(ctx, input_type.model_validate(raw or {}))

    run.__name__ = f.__name__
    return run


class ActivityRegistry:
    """Activities by name, for :class:`~workflow.ActivityWorker`."""

    def __init__(self) -> None:
        self._fns: dict[str, Callable[..., Any]] = {}

    def register(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Register ``def act(actx: ActivityContext, *args, **kwargs)`` (sync or async)."""

        def deco(f: Callable[..., Any]) -> Callable[..., Any]:
            act_name = name or f.__name__
            setattr(f, ACTIVITY_ATTR, act_name)
            self._fns[act_name] = f
            return f

        return deco(fn) if fn is not None else deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._fns[name]
        except KeyError:
            raise ConfigError(f"no activity named {name!r} is registered on this worker",
                              activity=name) from None

    def names(self) -> list[str]:
        return sorted(self._fns)


workflows = WorkflowRegistry()
activities = ActivityRegistry()


def workflow(fn: Callable[..., Awaitable[Any]] | None = None, *, name: str | None = None,
             version: str = "1") -> Any:
    """Register a workflow in the default registry."""
    return workflows.register(fn, name=name, version=version)


def activity(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Register an activity in the default registry."""
    return activities.register(fn, name=name)
