from sandlot.sdk._async.exec_stream import AsyncExecStream
from sandlot.sdk._async.filesystem import AsyncFilesystem
from sandlot.sdk._async.sandbox import AsyncSandbox

__all__ = ["AsyncExecStream", "AsyncFilesystem", "AsyncSandbox"]
