from sandlot.sdk._async.exec_stream import AsyncExecStream
from sandlot.sdk._async.filesystem import AsyncFilesystem
from sandlot.sdk._async.sandbox import AsyncSandbox, AsyncSnapshot
from sandlot.sdk._async.template import AsyncSnapshotTemplate

__all__ = [
    "AsyncExecStream",
    "AsyncFilesystem",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AsyncSnapshotTemplate",
]
