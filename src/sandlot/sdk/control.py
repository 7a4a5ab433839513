"""The control API's client, sync and async: tokens, quotas, registry secrets, a sandbox's
history and the server's health (sandlot; the Koyeb SDK manages these in its console).

    from sandlot.sdk.control import ControlClient

    with ControlClient() as control:             # the local server, or SANDLOT_URL
        token = control.create_token(project="ci", scope="normal")["token"]
        for quota in control.list_quotas():
            print(quota["project"], quota["usage"]["sandboxes"], quota["max_sandboxes"])

Answers are the server's JSON, typed (:mod:`sandlot.sdk.types`); errors are the SDK's
(:mod:`sandlot.sdk.errors`).
"""

from sandlot.sdk._async.control import AsyncControlClient
from sandlot.sdk._sync.control import ControlClient

__all__ = ["AsyncControlClient", "ControlClient"]
