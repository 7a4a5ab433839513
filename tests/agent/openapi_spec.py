# ruff: noqa: E501  (a data file: long descriptions read better unwrapped)
"""The agent's OpenAPI description, written as Python data.

``src/sandlot/agent/openapi.json`` is generated from this file and committed (the agent serves
it, and must not import anything to do so); ``test_agent_openapi.py`` checks that the two agree
and that the routes described are exactly the routes served. After editing::

    python tests/agent/openapi_spec.py > src/sandlot/agent/openapi.json
"""

from __future__ import annotations

import json
from typing import Any


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(
    props: dict[str, Any],
    required: tuple[str, ...] | list[str] = (),
    extra: bool = True,
    desc: str | None = None,
) -> dict[str, Any]:
    o = {"type": "object", "properties": props}
    if required:
        o["required"] = list(required)
    if not extra:
        o["additionalProperties"] = False
    if desc:
        o["description"] = desc
    return o


S = {"type": "string"}
B = {"type": "boolean"}
INT = {"type": "integer"}
N = {"type": "number"}


def jbody(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def jresp(desc: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def ERR(desc: str) -> dict[str, Any]:
    return jresp(desc, ref("Error"))


def SSE(d: str, events: list[str]) -> dict[str, Any]:
    return {
        "description": d,
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "One server-sent event: `event: <name>` and `data: <JSON>`.",
                    "properties": {
                        "event": {"type": "string", "enum": events},
                        "data": {"type": "string", "description": "JSON"},
                    },
                    "required": ["data"],
                }
            }
        },
    }


common = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "413": ERR("Request body larger than the limit"),
    "400": ERR("Invalid JSON or fields"),
}


def post(
    summary: str,
    req: dict[str, Any],
    responses: dict[str, Any],
    tags: list[str],
    desc: str | None = None,
    required: bool = True,
) -> dict[str, Any]:
    op = {
        "summary": summary,
        "tags": tags,
        "requestBody": jbody(req, required),
        "responses": {**responses, **common},
    }
    if desc:
        op["description"] = desc
    return {"post": op}


schemas = {
    "Error": obj({"error": S, "success": {"type": "boolean", "enum": [False]}}, ["error"]),
    "Success": obj({"success": {"type": "boolean", "enum": [True]}}, ["success"]),
    "CommandRequest": obj(
        {
            "cmd": {
                "type": "string",
                "description": "Run as `sh -c <cmd>` in a new process group.",
            },
            "cwd": {"type": "string", "description": "Working directory (default: the agent's)."},
            "env": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Merged over the agent's environment.",
            },
            "timeout": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 604800,
                "description": "sandlot: kill the group (SIGKILL) after this many seconds.",
            },
        },
        ["cmd"],
    ),
    "RunResponse": obj(
        {
            "stdout": S,
            "stderr": S,
            "code": INT,
            "error": {
                "type": "string",
                "description": "`Non-zero exit code`, or the timeout message.",
            },
            "timed_out": B,
            "stdout_base64": {
                "type": "string",
                "description": "sandlot: exact bytes when stdout is not UTF-8.",
            },
            "stderr_base64": {
                "type": "string",
                "description": "sandlot: exact bytes when stderr is not UTF-8.",
            },
            "truncated": {
                "type": "array",
                "items": {"type": "string", "enum": ["stdout", "stderr"]},
            },
        },
        ["stdout", "stderr", "code"],
    ),
    "WriteFileRequest": obj(
        {
            "path": S,
            "content": S,
            "encoding": {"type": "string", "enum": ["utf-8", "utf8", "text", "base64"]},
            "create_parents": B,
            "mode": {
                "oneOf": [
                    {"type": "string", "pattern": "^[0-7]{1,4}$"},
                    {"type": "integer", "minimum": 0, "maximum": 4095},
                ]
            },
        },
        ["path", "content"],
    ),
    "PathRequest": obj({"path": S}, ["path"]),
    "ReadFileRequest": obj(
        {"path": S, "encoding": {"type": "string", "enum": ["utf-8", "utf8", "text", "base64"]}},
        ["path"],
    ),
    "ReadFileResponse": obj(
        {
            "content": S,
            "encoding": {"type": "string", "enum": ["base64"]},
            "lossy": B,
            "warning": S,
        },
        ["content"],
    ),
    "ListDirRequest": obj({"path": S, "details": B}, ["path"]),
    "FileInfo": obj(
        {
            "type": {
                "type": "string",
                "enum": [
                    "file",
                    "directory",
                    "symlink",
                    "fifo",
                    "socket",
                    "char_device",
                    "block_device",
                    "other",
                ],
            },
            "size": INT,
            "mode": {"type": "string", "description": "Permission bits, octal."},
            "mtime": N,
            "uid": INT,
            "gid": INT,
            "target": {"type": "string", "description": "Symlink target."},
        },
        ["type", "size", "mode", "mtime"],
    ),
    "ListDirResponse": obj(
        {
            "entries": {"type": "array", "items": S},
            "details": {
                "type": "array",
                "items": {"allOf": [ref("FileInfo"), obj({"name": S}, ["name"])]},
            },
        },
        ["entries"],
    ),
    "StatRequest": obj({"path": S, "follow_symlinks": B}, ["path"]),
    "ConfigureRequest": obj({"env": {"type": "object", "additionalProperties": S}}, ["env"]),
    "ConfigureResponse": obj(
        {"success": B, "env": {"type": "array", "items": S}}, ["success", "env"]
    ),
    "StatResponse": {
        "allOf": [obj({"path": S, "exists": B}, ["path", "exists"])],
        "description": "With `exists: true`, also the FileInfo fields.",
    },
    "UploadResponse": obj({"success": B, "path": S, "size": INT}, ["success", "path", "size"]),
    "Port": {
        "oneOf": [{"type": "string", "pattern": "^[0-9]+$"}, {"type": "integer"}],
        "description": "1-65535; Koyeb sends a string.",
    },
    "BindPortRequest": obj(
        {
            "port": ref("Port"),
            "multi": {
                "type": "boolean",
                "description": "sandlot: add to the bound ports instead of answering 409.",
            },
        },
        ["port"],
    ),
    "BindPortResponse": obj(
        {"success": B, "message": S, "port": S, "ports": {"type": "array", "items": S}},
        ["success", "message", "port"],
    ),
    "BindPortConflict": obj(
        {"success": B, "error": S, "current_port": S}, ["success", "error", "current_port"]
    ),
    "UnbindPortRequest": obj({"port": ref("Port")}),
    "UnbindPortResponse": obj(
        {"success": B, "message": S, "ports": {"type": "array", "items": S}}, ["success", "message"]
    ),
    "PortsResponse": obj({"ports": {"type": "array", "items": S}}, ["ports"]),
    "StartProcessRequest": {
        "allOf": [
            ref("CommandRequest"),
            obj(
                {
                    "stdin": {
                        "type": "boolean",
                        "description": "sandlot: give the process a stdin pipe (default /dev/null).",
                    }
                }
            ),
        ]
    },
    "RunRequest": {
        "allOf": [
            ref("CommandRequest"),
            obj(
                {
                    "input": {
                        "type": "string",
                        "description": "sandlot: fed to the command's stdin (default /dev/null).",
                    },
                    "input_encoding": {
                        "type": "string",
                        "enum": ["utf-8", "utf8", "text", "base64"],
                    },
                }
            ),
        ]
    },
    "StartProcessResponse": obj(
        {"id": S, "pid": INT, "status": {"type": "string", "enum": ["running"]}},
        ["id", "pid", "status"],
    ),
    "ProcessStatus": {
        "type": "string",
        "enum": ["running", "completed", "failed", "killed", "lost"],
        "description": "lost: started by an agent that died; it ended, its exit status unknown.",
    },
    "ProcessSummary": obj(
        {
            "id": S,
            "command": S,
            "status": ref("ProcessStatus"),
            "pid": INT,
            "exit_code": {"type": ["integer", "null"]},
            "started_at": S,
            "completed_at": {"type": ["string", "null"]},
        },
        ["id", "command", "status", "pid", "exit_code", "started_at", "completed_at"],
        extra=False,
        desc="Exactly the keys Koyeb's Python SDK accepts (it builds ProcessInfo(**entry)).",
    ),
    "ProcessDetails": {
        "allOf": [
            ref("ProcessSummary"),
            obj(
                {
                    "ended_at": {"type": ["string", "null"]},
                    "signal": {"type": ["string", "null"]},
                    "cwd": S,
                    "stdin": B,
                    "log_dropped_chunks": INT,
                    "timeout": {"type": ["number", "null"]},
                    "timed_out": {"type": "boolean", "description": "Killed by its own timeout."},
                    "orphaned": {
                        "type": "boolean",
                        "description": "Started by an agent that died (its output is lost).",
                    },
                    "orphaned_at": {
                        "type": "string",
                        "description": "When the agent that started it was replaced.",
                    },
                    "wait_timed_out": {
                        "type": "boolean",
                        "description": "wait_process only: the wait ended before the process.",
                    },
                }
            ),
        ]
    },
    "ListProcessesResponse": obj(
        {"processes": {"type": "array", "items": ref("ProcessSummary")}}, ["processes"]
    ),
    "KillProcessRequest": obj(
        {
            "id": S,
            "signal": {
                "oneOf": [{"type": "string"}, {"type": "integer"}],
                "description": 'sandlot: e.g. "INT", "SIGUSR1", 15. Default TERM then KILL after `grace`.',
            },
            "grace": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        },
        ["id"],
    ),
    "KillProcessResponse": obj(
        {"success": B, "message": S, "status": ref("ProcessStatus")}, ["success", "message"]
    ),
    "WaitProcessRequest": obj(
        {"id": S, "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400}}, ["id"]
    ),
    "WriteStdinRequest": obj(
        {
            "id": S,
            "data": S,
            "encoding": {"type": "string", "enum": ["utf-8", "utf8", "text", "base64"]},
            "eof": B,
        },
        ["id"],
    ),
    "WriteStdinResponse": obj({"success": B, "written": INT}, ["success", "written"]),
}

proc_id_q = [{"name": "id", "in": "query", "required": True, "schema": S}]
path_q = [{"name": "path", "in": "query", "required": True, "schema": S}]
paths = {
    "/health": {
        "get": {
            "summary": "Liveness (no auth)",
            "tags": ["koyeb"],
            "security": [],
            "responses": {
                "200": jresp(
                    "Healthy", obj({"status": {"type": "string", "enum": ["ok"]}}, ["status"])
                )
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This description (no auth)",
            "tags": ["sandlot"],
            "security": [],
            "responses": {"200": jresp("OpenAPI 3 document", {"type": "object"})},
        }
    },
    "/run": post(
        "Run a command, buffered",
        ref("RunRequest"),
        {
            "200": jresp("Finished (or timed out)", ref("RunResponse")),
            "500": ERR("Could not start (e.g. no sh)"),
        },
        ["koyeb"],
    ),
    "/run_streaming": post(
        "Run a command, streamed as server-sent events",
        ref("RunRequest"),
        {
            "200": SSE(
                "`output` {stream, data, encoding?} events, then `complete` {code, error, timed_out?}; or `error` {error}",
                ["output", "complete", "error"],
            )
        },
        ["koyeb"],
    ),
    "/write_file": post(
        "Write a file (atomic)",
        ref("WriteFileRequest"),
        {
            "200": jresp("Written", ref("Success")),
            "403": ERR("Permission denied"),
            "404": ERR("Parent missing"),
            "409": ERR("Conflict"),
            "507": ERR("No space"),
        },
        ["koyeb"],
    ),
    "/read_file": post(
        "Read a file",
        ref("ReadFileRequest"),
        {
            "200": jresp("Content", ref("ReadFileResponse")),
            "403": ERR("Permission denied"),
            "404": ERR("Missing"),
        },
        ["koyeb"],
    ),
    "/delete_file": post(
        "Delete a file",
        ref("PathRequest"),
        {
            "200": jresp("Deleted", ref("Success")),
            "403": ERR("Permission denied"),
            "404": ERR("Missing"),
        },
        ["koyeb"],
    ),
    "/make_dir": post(
        "Create a directory and its parents (0755)",
        ref("PathRequest"),
        {
            "200": jresp("Created or existing", ref("Success")),
            "403": ERR("Permission denied"),
            "409": ERR("A file is in the way"),
        },
        ["koyeb"],
    ),
    "/delete_dir": post(
        "Delete a directory recursively",
        ref("PathRequest"),
        {
            "200": jresp("Deleted", ref("Success")),
            "403": ERR("Permission denied"),
            "404": ERR("Missing"),
            "409": ERR("Could not delete everything"),
        },
        ["koyeb"],
    ),
    "/list_dir": post(
        "List a directory",
        ref("ListDirRequest"),
        {
            "200": jresp("Entries, sorted", ref("ListDirResponse")),
            "403": ERR("Permission denied"),
            "404": ERR("Missing"),
        },
        ["koyeb"],
    ),
    "/bind_port": post(
        "Bind a port for the gateway",
        ref("BindPortRequest"),
        {
            "200": jresp("Bound", ref("BindPortResponse")),
            "409": jresp(
                "Another port is bound (Koyeb shape, without multi)", ref("BindPortConflict")
            ),
        },
        ["koyeb"],
    ),
    "/unbind_port": post(
        "Unbind one port, or all",
        ref("UnbindPortRequest"),
        {"200": jresp("Unbound", ref("UnbindPortResponse"))},
        ["koyeb"],
        required=False,
    ),
    "/start_process": post(
        "Start a background process",
        ref("StartProcessRequest"),
        {"201": jresp("Started", ref("StartProcessResponse")), "500": ERR("Could not start")},
        ["koyeb"],
    ),
    "/list_processes": {
        "get": {
            "summary": "List background processes",
            "tags": ["koyeb"],
            "responses": {
                "200": jresp("Processes", ref("ListProcessesResponse")),
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        }
    },
    "/kill_process": post(
        "Signal a process's whole group",
        ref("KillProcessRequest"),
        {"200": jresp("Killed", ref("KillProcessResponse"))},
        ["koyeb"],
    ),
    "/process_logs_streaming": {
        "get": {
            "summary": "Replay and follow a process's output",
            "tags": ["koyeb"],
            "parameters": [
                *proc_id_q,
                {
                    "name": "follow",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
                },
            ],
            "responses": {
                "200": SSE(
                    "`log` {timestamp, stream, data, encoding?} events, then `complete` {message, status, exit_code}",
                    ["log", "complete"],
                ),
                "400": ERR("No id"),
                "404": ERR("Unknown process"),
                "410": ERR("Output lost: the process was started by an agent that died"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        },
        "post": {
            "summary": "Same, with the id in a JSON body (Koyeb's documented form)",
            "tags": ["koyeb"],
            "requestBody": jbody(obj({"id": S}, ["id"])),
            "responses": {
                "200": SSE("As GET", ["log", "complete"]),
                "404": ERR("Unknown process"),
                "410": ERR("Output lost: the process was started by an agent that died"),
                **common,
            },
        },
    },
    "/stat": post(
        "Stat a path",
        ref("StatRequest"),
        {
            "200": jresp("Metadata, or exists: false", ref("StatResponse")),
            "403": ERR("Permission denied"),
        },
        ["sandlot"],
    ),
    "/configure": post(
        "Set environment variables for every later command (warm-pool claims)",
        ref("ConfigureRequest"),
        {"200": jresp("Names that were set", ref("ConfigureResponse"))},
        ["sandlot"],
    ),
    "/files": {
        "get": {
            "summary": "Download a file's raw bytes (streamed; one Range supported)",
            "tags": ["sandlot"],
            "parameters": [
                *path_q,
                {
                    "name": "Range",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "One range, e.g. bytes=0-99, bytes=100-, bytes=-10.",
                },
            ],
            "responses": {
                "200": {
                    "description": "The bytes",
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
                "206": {
                    "description": "The requested range (Content-Range says which)",
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
                "416": ERR("Range not satisfiable"),
                "400": ERR("Bad path, a directory, or not a regular file"),
                "403": ERR("Permission denied"),
                "404": ERR("Missing"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        },
        "put": {
            "summary": "Upload raw bytes to a file (streamed, atomic)",
            "tags": ["sandlot"],
            "parameters": [
                *path_q,
                {
                    "name": "create_parents",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
                },
                {
                    "name": "mode",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-7]{1,4}$"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
            "responses": {
                "200": jresp("Written", ref("UploadResponse")),
                "400": ERR("Bad path"),
                "403": ERR("Permission denied"),
                "404": ERR("Parent missing"),
                "411": ERR("No length"),
                "507": ERR("No space"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        },
    },
    "/bound_ports": {
        "get": {
            "summary": "Bound ports",
            "tags": ["sandlot"],
            "responses": {
                "200": jresp("Ports", ref("PortsResponse")),
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        }
    },
    "/process": {
        "get": {
            "summary": "One process, in detail",
            "tags": ["sandlot"],
            "parameters": proc_id_q,
            "responses": {
                "200": jresp("Details", ref("ProcessDetails")),
                "400": ERR("No id"),
                "404": ERR("Unknown process"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        }
    },
    "/pty": {
        "get": {
            "summary": "Interactive terminal over WebSocket",
            "tags": ["sandlot"],
            "description": "Upgrade to a WebSocket (RFC 6455, version 13). Agent to client: a text message {type: ready, id, pid}, the terminal's output as binary messages, then {type: exit, code, signal} and a close frame (1000). Client to agent: binary messages are input; text messages are JSON {type: input, data} | {type: resize, rows, cols} | {type: signal, signal}. Closing the socket hangs the terminal up (SIGHUP, then SIGKILL).",
            "parameters": [
                {
                    "name": "cmd",
                    "in": "query",
                    "required": False,
                    "schema": S,
                    "description": "Default: bash -i if present, else sh -i.",
                },
                {"name": "cwd", "in": "query", "required": False, "schema": S},
                {
                    "name": "env",
                    "in": "query",
                    "required": False,
                    "schema": S,
                    "description": "A JSON object of strings.",
                },
                {
                    "name": "rows",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
                {
                    "name": "cols",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
            ],
            "responses": {
                "101": {"description": "Switching to the WebSocket protocol"},
                "400": ERR("Bad parameters or Sec-WebSocket-Key"),
                "426": ERR("Not a WebSocket upgrade"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        }
    },
    "/tunnel": {
        "get": {
            "summary": "Raw TCP tunnel to a port inside the sandbox (for the gateway)",
            "tags": ["sandlot"],
            "description": "With `Connection: Upgrade` and `Upgrade: tcp`: the agent connects to 127.0.0.1:<port> inside the sandbox, answers 101, then relays bytes both ways (half-closes included). Over the Unix socket, with `Sandlot-Tunnel: fd`, it answers 200 instead, with the connected socket attached to the answer's head (SCM_RIGHTS), and relays nothing.",
            "parameters": [
                {
                    "name": "port",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
                {
                    "name": "Sandlot-Tunnel",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "enum": ["fd"]},
                },
            ],
            "responses": {
                "101": {"description": "Relaying"},
                "200": {"description": "The connected socket is attached (Unix socket only)"},
                "400": ERR("Bad port"),
                "426": ERR("Not an Upgrade: tcp request"),
                "502": ERR("Nothing listens on that port"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
            },
        }
    },
    "/wait_process": post(
        "Wait for a process to end",
        ref("WaitProcessRequest"),
        {
            "200": jresp("Details; wait_timed_out if still running", ref("ProcessDetails")),
            "404": ERR("Unknown process"),
        },
        ["sandlot"],
    ),
    "/write_stdin": post(
        "Write to a process's stdin (started with stdin: true)",
        ref("WriteStdinRequest"),
        {
            "200": jresp("Written", ref("WriteStdinResponse")),
            "404": ERR("Unknown process"),
            "409": ERR("No stdin pipe, or closed"),
        },
        ["sandlot"],
    ),
}

doc = {
    "openapi": "3.1.0",
    "info": {
        "title": "sandlot agent",
        "version": "1",
        "description": "The HTTP API inside every sandlot sandbox: Koyeb's sandbox-executor protocol (tag `koyeb`) plus sandlot extensions (tag `sandlot`). See docs/agent.md.",
    },
    "servers": [{"url": "http://agent"}],
    "security": [{"bearer": []}],
    "tags": [
        {"name": "koyeb", "description": "Koyeb executor protocol"},
        {"name": "sandlot", "description": "sandlot extensions"},
    ],
    "paths": paths,
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "SANDBOX_SECRET"}
        },
        "responses": {
            "Unauthorized": {
                "description": "Missing or wrong bearer secret",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
        "schemas": schemas,
    },
}


def render() -> str:
    return json.dumps(doc, indent=1) + "\n"


if __name__ == "__main__":
    print(render(), end="")
