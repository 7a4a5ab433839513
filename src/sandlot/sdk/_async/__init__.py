from sandlot.sdk._async.sandbox import AsyncExecStream, AsyncFilesystem, AsyncSandbox

__all__ = ["AsyncExecStream", "AsyncFilesystem", "AsyncSandbox"]
