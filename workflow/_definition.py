"""Registering workflows and activities by name (and, for workflows, version)."""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ValidationError

from nerve import ConfigError, TaskRejected, WorkflowNotFound
from workflow._context import ACTIVITY_ATTR

W = TypeVar("W", bound=Callable[..., Awaitable[Any]])  # a workflow function
A = TypeVar("A", bound=Callable[..., Any])  # an activity function


@dataclass(frozen=True, slots=True)
class WorkflowDefinition:
    """A workflow function with its name, version and input type."""

    name: str
    version: str
    fn: Callable[[Any, Any], Awaitable[Any]]
    input_type: type[BaseModel] | None = None
    source: Callable[..., Any] | None = None  # the function as written (fn may wrap it)
    # Exceptions that fail a run when its code raises them; any other exception that is not
    # a NerveError blocks the run instead (a bug: fixed code can resume it).
    fail_on: tuple[type[BaseException], ...] = ()

    def parse_input(self, raw: Any) -> Any:
        """``raw`` validated into the workflow's input model; TaskRejected says what is
        wrong. Without a model (``inp: dict``) the input is passed as it is."""
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

    @overload
    def register(self, fn: W, *, name: str | None = None, version: str = "1",
                 fail_on: Iterable[type[BaseException]] = ()) -> W: ...
    @overload
    def register(self, fn: None = None, *, name: str | None = None, version: str = "1",
                 fail_on: Iterable[type[BaseException]] = ()) -> Callable[[W], W]: ...
    def register(self, fn: W | None = None, *, name: str | None = None, version: str = "1",
                 fail_on: Iterable[type[BaseException]] = ()) -> W | Callable[[W], W]:
        """Register ``async def wf(ctx, input)``. Usable as ``@registry.register(...)``.

        An exception the code raises fails the run when it is a :class:`~nerve.NerveError`
        (``raise WorkflowError("why")``, a step's ``StepError`` left uncaught) or one of
        ``fail_on``; any other blocks the run as a bug that fixed code resumes.
        """
        failing = tuple(fail_on)
        bad = [t for t in failing if not (isinstance(t, type) and issubclass(t, Exception))]
        if bad:
            raise ConfigError(f"fail_on takes exception classes, not {bad!r}")

        def deco(f: W) -> W:
            if not inspect.iscoroutinefunction(f):
                raise ConfigError(f"workflow {f.__name__} must be an async function")
            wf_name = name or f.__name__
            input_type = _input_model(f)
            versions = self._defs.setdefault(wf_name, {})
            if version in versions:
                _refuse_another(f"workflow {wf_name!r} version {version!r}",
                                versions[version].source, f)
            versions[version] = WorkflowDefinition(
                wf_name, version, _with_typed_input(f, input_type), input_type, source=f,
                fail_on=failing)
            return f

        return deco(fn) if fn is not None else deco

    def get(self, name: str, version: str | None = None) -> WorkflowDefinition:
        """The workflow ``name`` at ``version``; the newest registered one if ``version`` is
        None or not registered (any more): a history recorded under an old version replays
        on today's code, which ``ctx.patched`` keeps compatible with it."""
        versions = self._defs.get(name)
        if not versions:
            known = ", ".join(sorted(self._defs)) or "none"
            raise WorkflowNotFound(f"no workflow named {name!r} is registered (known: {known})",
                                   workflow=name)
        if version is not None and version in versions:
            return versions[version]
        return versions[max(versions, key=_version_key)]

    def names(self) -> list[str]:
        """The registered workflow names."""
        return sorted(self._defs)


def _version_key(v: str) -> tuple[Any, ...]:
    # Natural order ("1.10" after "1.9", "v10" after "v2"): text and numbers alternate, so
    # two keys never compare a number with a text.
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", v)))


def _input_model(f: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model the workflow's input is annotated with, if any."""
    params = list(inspect.signature(f).parameters.values())
    if len(params) < 2:
        return None
    try:
        ann = typing.get_type_hints(f).get(params[1].name)
    except (NameError, TypeError) as exc:
        raise ConfigError(f"cannot resolve the input annotation of workflow {f.__name__} "
                          f"({params[1].annotation!r}): {exc}") from None
    if typing.get_origin(ann) in (typing.Union, types.UnionType):  # Optional[Model]
        models = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = models[0] if len(models) == 1 else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _refuse_another(what: str, old: Callable[..., Any] | None, new: Callable[..., Any]) -> None:
    """Two different functions under one name: the second would silently replace the first
    (a user's module replacing the built-in ``agent``, say). A module imported again is fine."""
    def where(fn: Callable[..., Any] | None) -> str:
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"

    if old is not None and where(old) != where(new):
        raise ConfigError(f"{what} is registered already, by {where(old)}; {where(new)} needs "
                          "another name (or, for a workflow, another version)")


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

    @overload
    def register(self, fn: A, *, name: str | None = None) -> A: ...
    @overload
    def register(self, fn: None = None, *, name: str | None = None) -> Callable[[A], A]: ...
    def register(self, fn: A | None = None, *, name: str | None = None) -> A | Callable[[A], A]:
        """Register ``def act(actx: ActivityContext, *args, **kwargs)`` (sync or async)."""

        def deco(f: A) -> A:
            act_name = name or f.__name__
            _refuse_another(f"activity {act_name!r}", self._fns.get(act_name), f)
            setattr(f, ACTIVITY_ATTR, act_name)
            self._fns[act_name] = f
            return f

        return deco(fn) if fn is not None else deco

    def get(self, name: str) -> Callable[..., Any]:
        """The activity ``name``; ConfigError if it is not registered here."""
        try:
            return self._fns[name]
        except KeyError:
            raise ConfigError(f"no activity named {name!r} is registered on this worker",
                              activity=name) from None

    def names(self) -> list[str]:
        """The registered activity names."""
        return sorted(self._fns)


workflows = WorkflowRegistry()
activities = ActivityRegistry()


@overload
def workflow(fn: W, *, name: str | None = None, version: str = "1",
             fail_on: Iterable[type[BaseException]] = ()) -> W: ...
@overload
def workflow(fn: None = None, *, name: str | None = None, version: str = "1",
             fail_on: Iterable[type[BaseException]] = ()) -> Callable[[W], W]: ...
def workflow(fn: W | None = None, *, name: str | None = None, version: str = "1",
             fail_on: Iterable[type[BaseException]] = ()) -> W | Callable[[W], W]:
    """Register a workflow in the default registry (``@workflow`` or ``@workflow(name=...)``);
    the function is returned as it is, signature and all. ``fail_on``: see
    :meth:`WorkflowRegistry.register`."""
    return workflows.register(fn, name=name, version=version, fail_on=fail_on)


@overload
def activity(fn: A, *, name: str | None = None) -> A: ...
@overload
def activity(fn: None = None, *, name: str | None = None) -> Callable[[A], A]: ...
def activity(fn: A | None = None, *, name: str | None = None) -> A | Callable[[A], A]:
    """Register an activity in the default registry (``@activity`` or
    ``@activity(name=...)``); the function is returned as it is, signature and all."""
    return activities.register(fn, name=name)
