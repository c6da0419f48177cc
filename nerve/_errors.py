"""Every error nerve raises, in one tree.

::

    NerveError
    ├── ConfigError                 bad configuration or input given by a person
    ├── CodecError                  a message could not be decoded or failed validation
    ├── BusError
    │   ├── NatsServerNotFound      no nats-server binary in the interpreter's scripts dir or PATH
    │   ├── NatsServerStartError    the embedded server did not come up
    │   ├── NatsServerCrashed       the embedded server exited on its own
    │   └── ProvisioningError       a stream/bucket exists with an incompatible config
    ├── HistoryError
    │   └── StaleWriterError        an append was fenced off: someone else wrote the history
    ├── LeaseError
    │   ├── LeaseHeldError          the lease is held by another holder
    │   └── LeaseLostError          the holder's lease expired or was taken
    ├── SupervisorError
    │   ├── EscalationError         a supervisor exceeded its restart intensity
    │   └── ProcessExited           a supervised OS process died
    ├── WorkflowError
    │   ├── WorkflowNotFound        no workflow registered under that name/version
    │   ├── NondeterminismError     replay issued a different step than the history recorded
    │   ├── WorkflowCodeError       the workflow's code raised (a bug): the run is blocked
    │   ├── StepError               a step failed for good (after its retry policy)
    │   ├── RunNotFound             no history for that run id
    │   ├── TaskRejected            a submitted task was invalid or refused
    │   └── ResultTooLarge          a step's or a run's result is too big for the history
    ├── BudgetError
    │   ├── BudgetExceeded          a reservation does not fit the tenant's limits
    │   ├── TenantKilled            the tenant's kill-switch is on
    │   ├── RunHalted               the runaway breaker stopped this run
    │   ├── UnknownTenant           no ledger for that tenant (and no default limits)
    │   ├── UnknownModel            no price for that model in the price table
    │   ├── ReservationNotFound     a malformed reservation id
    │   └── LedgerUnavailable       the ledger could not be reached (fail closed)
    ├── GatewayError
    │   ├── UpstreamError           the model provider failed (status, retryable)
    │   └── InvalidLLMRequest       a request a provider can never accept
    ├── SandboxError
    │   ├── SandboxUnavailable      no backend can run here / the sandbox is gone
    │   ├── SandboxCrashed          the sandbox died while running a step
    │   └── EgressDenied            a destination outside the sandbox's policy
    ├── ApiError                    an HTTP API request cannot be served (status, code)
    │   ├── Unauthenticated         no API key, or an unknown or revoked one (401)
    │   ├── PermissionDenied        the key may not do that: another tenant's, admin only (403)
    │   ├── InvalidRequest          a malformed body, parameter or signal (400/413/422)
    │   ├── Conflict                the run's state does not allow it (finished, no such wait) (409)
    │   └── Overloaded              too many streams or requests; retry after retry_after_ms (503)
    └── ReadModelError              the read model (sqlite projections) failed or is rebuilding

Errors carry the ids they are about as fields (``run_id``, ``index``, ``subject``...) and
survive crossing the bus: :meth:`NerveError.to_wire` gives a msgpack-able dict and
:func:`error_from_wire` rebuilds the same class with the same fields.
"""

from __future__ import annotations

from typing import Any

_REGISTRY: dict[str, type[NerveError]] = {}


class NerveError(Exception):
    """Root of every error nerve raises.

    ``retryable`` says whether trying the same thing again may succeed (a transient fault)
    or never will (bad input, a decision already made).
    """

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            # A per-instance verdict (an upstream's 429 vs 400) overrides the class default
            # and travels with the error.
            self.retryable = retryable
            fields["retryable"] = retryable
        self.fields: dict[str, Any] = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self).__name__, self.message, self.fields))

    def to_wire(self) -> dict[str, Any]:
        """A plain dict (msgpack/JSON safe when the fields are) that names this error."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "retryable": self.retryable,
            "fields": self.fields,
        }


def _rebuild(name: str, message: str, fields: dict[str, Any]) -> NerveError:
    cls = _REGISTRY.get(name, NerveError)
    err = cls.__new__(cls)
    NerveError.__init__(err, message, **fields)
    return err


def error_from_wire(data: dict[str, Any]) -> NerveError:
    """Rebuild an error sent with :meth:`NerveError.to_wire` (unknown names become NerveError)."""
    return _rebuild(str(data.get("type", "NerveError")), str(data.get("message", "")),
                    dict(data.get("fields") or {}))


_REGISTRY["NerveError"] = NerveError


class ConfigError(NerveError):
    """A setting or an input given by a person is wrong; the message says which and why."""


class CodecError(NerveError):
    """A message could not be decoded, or decoded into something that fails validation."""


class BusError(NerveError):
    """The NATS bus (embedded server, connection, provisioning) failed."""

    retryable = True


class NatsServerNotFound(BusError):
    """No ``nats-server`` binary was found."""

    retryable = False


class NatsServerStartError(BusError):
    """The embedded ``nats-server`` did not become ready."""


class NatsServerCrashed(BusError):
    """The embedded ``nats-server`` exited without being asked to."""


class ProvisioningError(BusError):
    """A stream, bucket or object store could not be created or has an incompatible config."""

    retryable = False


class HistoryError(NerveError):
    """Reading or writing a run history failed."""


class StaleWriterError(HistoryError):
    """The append was rejected because the history moved on: this writer no longer owns it."""


class LeaseError(NerveError):
    """A lease operation failed."""


class LeaseHeldError(LeaseError):
    """The lease is held by someone else."""

    retryable = True


class LeaseLostError(LeaseError):
    """This holder's lease expired or was taken over; stop acting on what it protected."""


class SupervisorError(NerveError):
    """A supervision tree failed."""


class EscalationError(SupervisorError):
    """A supervisor restarted its children more often than its intensity allows."""


class ProcessExited(SupervisorError):
    """A supervised OS process exited with a non-zero code or was killed by a signal."""

    retryable = True


class WorkflowError(NerveError):
    """A workflow run failed or could not be started."""


class WorkflowNotFound(WorkflowError):
    """No workflow is registered under the requested name (and version)."""


class NondeterminismError(WorkflowError):
    """Replaying the history made the workflow issue a different step than was recorded."""


class WorkflowCodeError(WorkflowError):
    """The workflow's own code raised an exception that is not a failure it chose (a bug: a
    ``KeyError``, a ``TypeError``...). The run is blocked, not failed, so that fixed code can
    replay it and carry on; ``error_type``, ``where`` and ``traceback`` say what was raised."""


class StepError(WorkflowError):
    """A step failed for good; ``error_type`` and ``attempts`` say how."""


class RunNotFound(WorkflowError):
    """There is no run with that id."""


class TaskRejected(WorkflowError):
    """A submitted task is invalid or was refused; ``reason`` says why."""


class ResultTooLarge(WorkflowError):
    """A result is too big to be one history event (``size`` and ``limit`` in bytes): keep
    big outputs elsewhere (a sandbox file, an object store) and return a reference."""


class BudgetError(NerveError):
    """The budget refused or could not decide."""


class BudgetExceeded(BudgetError):
    """The reservation does not fit in the tenant's remaining budget."""


class TenantKilled(BudgetError):
    """The tenant's kill-switch is on; nothing of theirs runs until it is reset."""


class RunHalted(BudgetError):
    """The runaway breaker stopped this run (cancelled, or paused for a human to resume)."""


class UnknownTenant(BudgetError):
    """The tenant has no ledger, and this operation does not create one."""


class UnknownModel(BudgetError):
    """The price table has no entry for the model; add one or configure a default price."""


class ReservationNotFound(BudgetError):
    """The reservation id is malformed or belongs to no ledger."""


class LedgerUnavailable(BudgetError):
    """The ledger could not be reached; the call is refused (fail closed)."""

    retryable = True


class GatewayError(NerveError):
    """The LLM gateway failed."""


class UpstreamError(GatewayError):
    """The model provider returned an error; ``status`` and ``retryable`` say which kind."""


class InvalidLLMRequest(GatewayError):
    """The request can never succeed (bad shape, unknown model); it is not retried."""


class SandboxError(NerveError):
    """A sandbox operation failed."""


class SandboxUnavailable(SandboxError):
    """No sandbox backend can run here, or the sandbox no longer exists."""


class SandboxCrashed(SandboxError):
    """The sandbox died while running a step."""

    retryable = True


class EgressDenied(SandboxError):
    """The destination is not allowed by the sandbox's egress policy."""


class ApiError(NerveError):
    """An HTTP API request cannot be served; ``status`` and ``code`` say how it answers."""

    status: int = 400
    code: str = "bad_request"


class Unauthenticated(ApiError):
    """No API key was sent, or it is unknown or revoked."""

    status = 401
    code = "unauthenticated"


class PermissionDenied(ApiError):
    """The key is valid but may not do this (another tenant's resource, or admin only)."""

    status = 403
    code = "forbidden"


class InvalidRequest(ApiError):
    """A request body, parameter or signal is malformed; the message names the field."""

    status = 422
    code = "invalid_request"


class Conflict(ApiError):
    """The run's state does not allow the request (it ended, nothing waits for that)."""

    status = 409
    code = "conflict"


class Overloaded(ApiError):
    """Too many streams or requests at once; ``retry_after_ms`` says when to try again."""

    status = 503
    code = "overloaded"
    retryable = True


class ReadModelError(NerveError):
    """The read model (the sqlite projections) failed, or is being rebuilt."""

    retryable = True
