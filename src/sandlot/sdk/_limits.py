"""The SDK's defaults and limits, in one place (each says why it is what it is)."""

from __future__ import annotations

DEFAULT_CREATE_TIMEOUT = 300.0
DEFAULT_WAIT_READY_TIMEOUT = 60.0
DEFAULT_HEALTH_TIMEOUT = 5.0
DEFAULT_EXEC_TIMEOUT = 30.0
DEFAULT_POLL_INTERVAL = 0.5
DEFAULT_IDLE_TIMEOUT = 300
#: How much of each output stream ``exec`` keeps (the rest is counted, not kept): a command
#: printing 2 GiB once grew the client to 6.4 GiB. Change it per call (``max_output_bytes=``)
#: or per handle (``sandbox.max_output_bytes``).
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
#: The most ``read_bytes``/``read_file`` return unless told otherwise (``max_bytes=``, or
#: ``sandbox.max_read_bytes``): a sandbox's file can be endless (a symlink to
#: ``/proc/self/pagemap`` streamed until the client died of MemoryError). ``download_file``
#: streams to disk instead and has no limit unless given one.
DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024
#: The largest answer (JSON, or an error's body) the SDK reads: a sandbox's agent answers
#: through the server and may be hostile. A file's bytes and a stream's events are not answers
#: (they have their own limits).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: The longest server-sent-event line the SDK accepts. The agent sends at most 64 KiB of output
#: per event (~384 KiB once JSON-escaped); anything far longer is a broken or hostile agent, and
#: unbounded it would be held whole in memory.
MAX_EVENT_LINE = 4 * 1024 * 1024
#: Server start when the SDK launches the local server itself.
SERVER_START_TIMEOUT = 60.0
