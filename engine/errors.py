"""One error root; each subclass names the thing that is wrong."""

from __future__ import annotations


class EventrunError(Exception):
    """Root of every error eventrun raises on purpose."""

    code = "InternalError"


class ManifestError(EventrunError):
    """The manifest (or the environment overriding it) is invalid."""

    code = "InvalidManifest"


class InvalidParameter(EventrunError):
    """A request carries a value eventrun cannot use."""

    code = "InvalidParameter"


class FunctionNotFound(EventrunError):
    """No function of that name is in the manifest."""

    code = "FunctionNotFound"

    def __init__(self, name: str) -> None:
        super().__init__(f"function {name!r} does not exist")
        self.name = name


class InvocationNotFound(EventrunError):
    """No invocation has that RequestId."""

    code = "InvocationNotFound"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"invocation {request_id!r} does not exist")
        self.request_id = request_id


class InvocationActive(EventrunError):
    """The invocation is still QUEUED or RUNNING, so it cannot be replayed yet."""

    code = "InvocationActive"

    def __init__(self, request_id: str, status: str) -> None:
        super().__init__(f"invocation {request_id!r} is still {status}; replay it once it has ended")
        self.request_id = request_id
        self.status = status


class NodeNotAnswering(EventrunError):
    """A run's node has not acted on a terminate within the wait, and no other node can stop the run."""

    code = "NodeNotAnswering"

    def __init__(self, request_id: str, node: str, silent: float | None, lease: float, *, waited: float | None = None) -> None:
        if silent is None:  # it left the registry (a stop whose end of the run the store refused)
            message = (
                f"invocation {request_id!r} runs on node {node}, which has left the cluster without ending it, so no "
                "other node can stop it; it ends FAILED (ServerStopped) when that node starts again"
            )
        elif waited is None:  # it stopped renewing its lease: killed, cut off, paused
            message = (
                f"invocation {request_id!r} runs on node {node}, which has not renewed its lease for {silent:.1f}s, so no "
                f"other node can stop it; it ends FAILED (NodeLost) once that lease ({lease:g}s) runs out, or ABORTED "
                "should the node answer first (the request is kept)"
            )
        else:  # it renewed its lease lately: it has not got to the request yet, or has just died
            message = (
                f"invocation {request_id!r} runs on node {node}, which has not stopped it within {waited:g}s of the "
                f"request (it last renewed its lease {silent:.1f}s ago), and no other node can stop it; the request is "
                f"kept: it ends ABORTED once that node acts on it, or FAILED (NodeLost) should that node's lease "
                f"({lease:g}s) run out first"
            )
        super().__init__(message)
        self.request_id = request_id


class InvocationEnded(EventrunError):
    """The invocation already ended, so it cannot be changed."""

    code = "InvocationEnded"

    def __init__(self, request_id: str, status: str) -> None:
        super().__init__(f"invocation {request_id!r} already ended with status {status}")
        self.request_id = request_id
        self.status = status


class Throttled(EventrunError):
    """The function's qps_limit is exhausted for now."""

    code = "Throttled"

    def __init__(self, function: str, limit: int, retry_after: float, *, share: int | None = None) -> None:
        across = f" across the nodes ({share} a second on this one)" if share is not None else ""
        super().__init__(f"function {function!r} accepts at most {limit} events per second{across}; retry later")
        self.function = function
        self.retry_after = retry_after


class ShuttingDown(EventrunError):
    """The engine is stopping and takes no new events."""

    code = "ShuttingDown"

    def __init__(self) -> None:
        super().__init__("eventrun is shutting down and accepts no new events")


class StoreError(EventrunError):
    """The invocation store cannot take writes right now (its writer process is gone, or it refuses them: a full disk)."""

    code = "StoreUnavailable"
