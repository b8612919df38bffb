"""The gateway's OpenAPI 3.1 document, kept beside the routes it describes."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

STATUSES = ["QUEUED", "RUNNING", "FINISHED", "FAILED", "TIMED_OUT", "ABORTED"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def _error(description: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{description}"}


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


_REQUEST_ID_HEADER = {"X-Request-Id": {"description": "The RequestId", "schema": {"type": "string"}}}
_REQUEST_ID = {"name": "RequestId", "in": "path", "required": True, "schema": {"type": "string"}}
_FUNCTION = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}

_INVOCATION: dict[str, Any] = {
    "type": "object",
    "required": [
        "RequestId", "FunctionName", "Trigger", "Status", "CreatedAt", "StartedAt",
        "EndedAt", "DurationMs", "Result", "ErrorType", "ErrorMessage",
    ],
    "properties": {
        "RequestId": {"type": "string"},
        "FunctionName": {"type": "string"},
        "Trigger": {"type": "string", "examples": ["http", "kafka", "s3", "timer"]},
        "Status": _ref("Status"),
        "CreatedAt": {"type": "string", "format": "date-time"},
        "StartedAt": {**_nullable("string"), "format": "date-time"},
        "EndedAt": {**_nullable("string"), "format": "date-time"},
        "DurationMs": _nullable("integer"),
        "Result": {"description": "The handler's return value (JSON), null until FINISHED"},
        "ErrorType": _nullable("string"),
        "ErrorMessage": _nullable("string"),
        "ReplayOf": {**_nullable("string"), "description": "GET /invocations/{RequestId} and its terminate: the run this one replays"},
        "Replays": {
            "type": "array",
            "items": {"type": "string"},
            "description": "GET /invocations/{RequestId} and its terminate: the runs that replay this one, oldest first",
        },
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["Error"],
        "properties": {
            "Error": {
                "type": "object",
                "required": ["Code", "Message"],
                "properties": {
                    "Code": {
                        "type": "string",
                        "examples": [
                            "InvalidParameter", "Unauthorized", "WebhookTokenNotSet", "FunctionNotFound",
                            "InvocationNotFound", "InvocationEnded", "InvocationActive", "PayloadTooLarge",
                            "Throttled", "ShuttingDown", "StoreUnavailable", "NotFound", "MethodNotAllowed",
                            "InternalError", "CrossSiteRequest", "NodeNotAnswering", "RequestTimeout",
                            "UnsupportedMediaType",
                        ],
                    },
                    "Message": {"type": "string"},
                },
            }
        },
    },
    "Status": {"type": "string", "enum": STATUSES},
    "Accepted": {
        "type": "object",
        "required": ["RequestId"],
        "properties": {"RequestId": {"type": "string"}},
    },
    "SyncResult": {
        "type": "object",
        "required": ["RequestId", "Status", "Result"],
        "properties": {
            "RequestId": {"type": "string"},
            "Status": _ref("Status"),
            "Result": {"description": "The handler's return value (JSON)"},
            "ErrorType": {**_nullable("string"), "description": "Present when Status is not FINISHED, or when a result stored too deep cannot be returned"},
            "ErrorMessage": {**_nullable("string"), "description": "Present when Status is not FINISHED, or when a result stored too deep cannot be returned"},
        },
    },
    "Invocation": {**_INVOCATION, "required": [*_INVOCATION["required"], "ReplayOf", "Replays"]},
    "ListedInvocation": {
        **_INVOCATION,
        "description": "An Invocation in a list, without ReplayOf and Replays; with results=false, without its Result",
        "required": [name for name in _INVOCATION["required"] if name != "Result"],
    },
    "InvocationList": {
        "type": "object",
        "required": ["Invocations", "NextCursor"],
        "properties": {
            "Invocations": {"type": "array", "items": _ref("ListedInvocation")},
            "NextCursor": {**_nullable("string"), "description": "Pass as cursor for the next page"},
        },
    },
    "Function": {
        "type": "object",
        "required": [
            "FunctionName", "AsyncExecution", "Timeout", "Concurrency", "QpsLimit", "Handler", "Triggers",
        ],
        "properties": {
            "FunctionName": {"type": "string"},
            "AsyncExecution": {"type": "boolean"},
            "Timeout": {"type": "number", "description": "Seconds"},
            "Concurrency": {"type": "integer"},
            "QpsLimit": {"type": "integer"},
            "Handler": {"type": "string", "examples": ["functions/thumbnail.py:main_handler"]},
            "Triggers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["Type"],
                    "properties": {"Type": {"type": "string", "enum": ["s3", "kafka", "timer"]}},
                    "additionalProperties": True,
                },
            },
        },
    },
    "FunctionList": {
        "type": "object",
        "required": ["Functions"],
        "properties": {"Functions": {"type": "array", "items": _ref("Function")}},
    },
    "Health": {
        "type": "object",
        "required": ["Status", "Node"],
        "properties": {
            "Status": {"type": "string", "examples": ["ok"]},
            "Node": {"type": "string", "description": "This node's id ([cluster] node_id)"},
            "Cluster": {
                "type": "object",
                "description": "With a PostgreSQL store: the nodes alive and the QUEUED runs of all of them",
                "properties": {
                    "Nodes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "NodeId": {"type": "string"},
                                "Url": {"type": "string"},
                                "HeartbeatAgeSeconds": {"type": "number"},
                            },
                        },
                    },
                    "Backlog": {"type": "integer"},
                    "LeaseSeconds": {"type": "number"},
                },
            },
            "Store": {
                "type": "object",
                "description": "With the SQLite store: whether its writes go through",
                "required": ["Writes", "RefusedSince", "WritesRefused", "WritesUnanswered"],
                "properties": {
                    "Writes": {"type": "string", "examples": ["ok", "refused: database or disk is full"]},
                    "RefusedSince": {**_nullable("string"), "format": "date-time"},
                    "WritesRefused": {"type": "integer", "description": "Since the server's start"},
                    "WritesUnanswered": {
                        "type": "integer",
                        "description": "Writes the store's writer process died or stalled holding, since the server's start",
                    },
                },
            },
        },
        "additionalProperties": True,
    },
}

_RESPONSES: dict[str, Any] = {
    "BadRequest": _json("Bad JSON body or bad parameter", _ref("Error")),
    "NotFound": _json("Unknown function, RequestId or route", _ref("Error")),
    "Conflict": _json(
        "The invocation already ended (InvocationEnded), or a replayed one has not (InvocationActive)", _ref("Error")
    ),
    "PayloadTooLarge": _json("Body over server.max_body_size", _ref("Error")),
    "RequestTimeout": _json("The body did not arrive within 120 s", _ref("Error")),
    "UnsupportedMediaType": _json("A Content-Encoding the body cannot be sent in (not gzip or deflate)", _ref("Error")),
    "Throttled": _json(
        "Over the function's qps_limit",
        _ref("Error"),
        {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}},
    ),
    "ShuttingDown": _json("The server is stopping", _ref("Error")),
    "Error": _json("Any other failure: 405 MethodNotAllowed, 500 InternalError", _ref("Error")),
}

_PATHS: dict[str, Any] = {
    "/functions/{name}/invocations": {
        "post": {
            "summary": "Invoke a function; the body is the event data",
            "operationId": "invoke",
            "parameters": [
                _FUNCTION,
                {
                    "name": "X-Invocation-Type",
                    "in": "header",
                    "description": "Event queues a sync function instead of waiting for it",
                    "schema": {"type": "string", "enum": ["Event", "RequestResponse"]},
                },
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "description": "The event id; the same key yields the same RequestId",
                    "schema": {"type": "string", "maxLength": 256},
                },
            ],
            "requestBody": {
                "required": False,
                "description": "JSON is passed as the event's data; other bodies as "
                "{body_base64, content_type}",
                "content": {"application/json": {"schema": {}}, "*/*": {"schema": {}}},
            },
            "responses": {
                "200": _json("A sync function's outcome", _ref("SyncResult"), _REQUEST_ID_HEADER),
                "202": _json("Accepted; runs later", _ref("Accepted"), _REQUEST_ID_HEADER),
                "400": _error("BadRequest"),
                "404": _error("NotFound"),
                "408": _error("RequestTimeout"),
                "413": _error("PayloadTooLarge"),
                "415": _error("UnsupportedMediaType"),
                "429": _error("Throttled"),
                "503": _error("ShuttingDown"),
            },
        }
    },
    "/invocations": {
        "get": {
            "summary": "List invocations, newest first",
            "operationId": "listInvocations",
            "parameters": [
                {"name": "function", "in": "query", "schema": {"type": "string"}},
                {"name": "status", "in": "query", "schema": _ref("Status")},
                {"name": "trigger", "in": "query", "schema": {"type": "string", "enum": ["http", "kafka", "s3", "timer"]}},
                {
                    "name": "since",
                    "in": "query",
                    "description": "Accepted at or after this RFC 3339 time (with its zone)",
                    "schema": {"type": "string", "format": "date-time"},
                },
                {
                    "name": "until",
                    "in": "query",
                    "description": "Accepted before this RFC 3339 time (with its zone)",
                    "schema": {"type": "string", "format": "date-time"},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "description": (
                        "At most this many runs. A page may hold fewer: it ends before the run whose result and"
                        " error message would take what the page holds past 8 MiB (its first run always goes in),"
                        " and NextCursor goes on from there; only a null NextCursor means the end"
                    ),
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                },
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "results",
                    "in": "query",
                    "description": (
                        "false: the runs come without their Result (no such key), which is then neither read"
                        " nor counted in the page's 8 MiB; true or false in any case"
                    ),
                    "schema": {"type": "boolean", "default": True},
                },
            ],
            "responses": {
                "200": _json("One page", _ref("InvocationList")),
                "400": _error("BadRequest"),
                "404": _error("NotFound"),
            },
        }
    },
    "/invocations/{RequestId}": {
        "get": {
            "summary": "One invocation's status",
            "operationId": "getInvocation",
            "parameters": [_REQUEST_ID],
            "responses": {"200": _json("The invocation", _ref("Invocation")), "404": _error("NotFound")},
        }
    },
    "/invocations/{RequestId}/event": {
        "get": {
            "summary": "The CloudEvents envelope the run was given",
            "operationId": "getEvent",
            "parameters": [_REQUEST_ID],
            "responses": {
                "200": {"description": "The envelope", "content": {"application/json": {"schema": {"type": "object"}}}},
                "404": _error("NotFound"),
            },
        }
    },
    "/counts": {
        "get": {
            "summary": "Each function's runs by status",
            "operationId": "counts",
            "responses": {
                "200": _json(
                    "{Functions: {name: {status: count}}}",
                    {
                        "type": "object",
                        "required": ["Functions"],
                        "properties": {
                            "Functions": {
                                "type": "object",
                                "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer"}},
                            }
                        },
                    },
                )
            },
        }
    },
    "/ui": {
        "get": {
            "summary": "The dashboard (redirects to /ui/)",
            "operationId": "dashboard",
            "responses": {"302": {"description": "To /ui/"}},
        }
    },
    "/ui/{name}": {
        "get": {
            "summary": "The dashboard's files: index.html (at /ui/), app.js, app.css",
            "operationId": "dashboardFile",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {
                    "description": "The file",
                    "content": {
                        kind: {"schema": {"type": "string"}} for kind in ("text/html", "text/javascript", "text/css")
                    },
                },
                "404": _error("NotFound"),
            },
        }
    },
    "/invocations/{RequestId}/logs": {
        "get": {
            "summary": "The run's log; with follow=true, Server-Sent Events until the run ends",
            "operationId": "getLogs",
            "parameters": [
                _REQUEST_ID,
                {"name": "follow", "in": "query", "schema": {"type": "boolean", "default": False}},
                {
                    "name": "tail",
                    "in": "query",
                    "description": "With follow=true: of the log so far, only the lines in about its last this many bytes",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1 << 40},
                },
            ],
            "responses": {
                "200": {
                    "description": "Lines 'RFC3339-time text'. The stream sends each line as "
                    "'data: <line>', then 'event: end' with data {RequestId, Status}; with tail, first "
                    "'event: skipped' with data {Bytes} when earlier lines are left out.",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        # Before OpenAPI 3.2 (itemSchema), an event stream's schema describes one event.
                        "text/event-stream": {
                            "schema": {
                                "type": "object",
                                "required": ["data"],
                                "properties": {
                                    "event": {"type": "string", "enum": ["message", "skipped", "end", "error"]},
                                    "data": {"type": "string"},
                                },
                            }
                        },
                    },
                },
                "400": _error("BadRequest"),
                "404": _error("NotFound"),
            },
        }
    },
    "/invocations/{RequestId}/terminate": {
        "post": {
            "summary": "Kill a QUEUED or RUNNING run; it ends ABORTED",
            "operationId": "terminate",
            "parameters": [_REQUEST_ID],
            "responses": {
                "200": _json("The aborted invocation", _ref("Invocation")),
                "404": _error("NotFound"),
                "409": _error("Conflict"),
            },
        }
    },
    "/invocations/{RequestId}/replay": {
        "post": {
            "summary": "A new run of an ended run's envelope, with a new RequestId, linked both ways",
            "operationId": "replay",
            "parameters": [
                _REQUEST_ID,
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "description": "The same key for the same run yields the same replay (its RequestId), not another",
                    "schema": {"type": "string", "maxLength": 256},
                },
            ],
            "responses": {
                "202": _json(
                    "Accepted",
                    {
                        "type": "object",
                        "required": ["RequestId", "ReplayOf"],
                        "properties": {"RequestId": {"type": "string"}, "ReplayOf": {"type": "string"}},
                    },
                    _REQUEST_ID_HEADER,
                ),
                "400": _error("BadRequest"),
                "404": _error("NotFound"),
                "409": _error("Conflict"),
                "503": _error("ShuttingDown"),
            },
        }
    },
    "/functions/{name}/replay": {
        "post": {
            "summary": "Replay the ended runs of a function that match a filter, newest first, each once",
            "operationId": "replayFunction",
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "description": "Each run is replayed with this key, as by /invocations/{RequestId}/replay: sent again,"
                    " the request answers the same replays and makes no others; the replays made with it are not picked",
                    "schema": {"type": "string", "maxLength": 256},
                },
            ],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "Status": _ref("Status"),
                                "Trigger": {"type": "string", "enum": ["http", "kafka", "s3", "timer"]},
                                "Since": {"type": "string", "format": "date-time"},
                                "Until": {"type": "string", "format": "date-time"},
                                "Limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                                "DryRun": {"type": "boolean", "default": False},
                                "Cursor": {
                                    "type": "string",
                                    "description": "The Cursor of an earlier answer: the runs that match after those it picked",
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    "What was (or, DryRun, would be) replayed; a DryRun's RequestId is null, or with an"
                    " Idempotency-Key the replay the run has under it already",
                    {
                        "type": "object",
                        "required": ["DryRun", "Replayed", "Cursor"],
                        "properties": {
                            "DryRun": {"type": "boolean"},
                            "Cursor": {
                                "type": ["string", "null"],
                                "description": "Where the runs that match go on, for the next request (its Cursor);"
                                " null when none are left",
                            },
                            "Replayed": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "ReplayOf": {"type": "string"},
                                        "RequestId": {"type": ["string", "null"]},
                                    },
                                },
                            },
                        },
                    },
                ),
                "400": _error("BadRequest"),
                "404": _error("NotFound"),
                "408": _error("RequestTimeout"),
                "413": _error("PayloadTooLarge"),
                "415": _error("UnsupportedMediaType"),
                "503": _error("ShuttingDown"),
            },
        }
    },
    "/functions": {
        "get": {
            "summary": "The function registry",
            "operationId": "listFunctions",
            "responses": {"200": _json("Every function", _ref("FunctionList"))},
        }
    },
    "/functions/{name}": {
        "get": {
            "summary": "One function",
            "operationId": "getFunction",
            "parameters": [_FUNCTION],
            "responses": {"200": _json("The function", _ref("Function")), "404": _error("NotFound")},
        }
    },
    "/healthz": {
        "get": {
            "summary": "Liveness",
            "operationId": "healthz",
            "responses": {"200": _json("Alive", _ref("Health"))},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus text exposition",
            "operationId": "metrics",
            "security": [{}, {"uiToken": []}, {"metricsToken": []}],
            "responses": {
                "200": {
                    "description": "Metrics",
                    "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
        }
    },
}


def openapi_document(extra_paths: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every gateway route, plus paths added by other triggers."""
    paths = copy.deepcopy({**_PATHS, **(extra_paths or {})})
    for operations in paths.values():
        for operation in operations.values():
            operation.setdefault("responses", {}).setdefault("default", _error("Error"))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "eventrun",
            "version": "0.1.0",
            "description": "Self-hosted async functions: ack first, run later, stream the logs.",
        },
        "paths": paths,
        # Asked for only when the server has a ui_token (then by every route but /healthz, /ui and
        # the MinIO webhook, which has a token of its own): optional here, the document being one.
        "security": [{}, {"uiToken": []}],
        "components": copy.deepcopy({"schemas": _SCHEMAS, "responses": _RESPONSES, "securitySchemes": _SECURITY}),
    }


_SECURITY = {
    "uiToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The server's [server] ui_token, as Authorization: Bearer <ui_token>; without one set, none is asked for",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The server's [server] metrics_token, which opens GET /metrics only",
    },
}
