"""The hello example with AsyncSandbox, deleting the sandbox through ``async with``."""

import asyncio

from sandlot import AsyncSandbox


async def main() -> None:
    async with await AsyncSandbox.create() as sandbox:
        result = await sandbox.exec("echo 'Hello from Koyeb Sandbox!'")
        print(result.stdout.strip())


if __name__ == "__main__":
    asyncio.run(main())
