"""The sandlot agent: the HTTP API inside every sandbox.

It speaks Koyeb's sandbox-executor protocol (so Koyeb's own SDKs work against it) plus
sandlot's extensions, and it imports nothing but the standard library: the runtime bind-mounted
into sandboxes ships only ``sandlot/__init__.py`` and this package. Start it with::

    python -m sandlot.agent --listen unix:/run/sandlot/agent.sock
    python -m sandlot.agent --listen tcp:127.0.0.1:3030

See ``docs/agent.md`` for the API, and ``openapi.json`` beside this file for its description.
"""
