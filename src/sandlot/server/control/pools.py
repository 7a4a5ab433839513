"""Warm pools: sandboxes started ahead of time, claimed by a matching ``create()`` instantly.

The server keeps ``size`` sandboxes per (image, instance type), each already running with its
agent healthy but *unclaimed*: the agent runs in pool mode, so the first authenticated request
makes its bearer token the secret. A ``create()`` whose options a pooled sandbox can honour
takes one, stores the owner's name, labels, lifecycle and a fresh secret, claims the agent with
that secret and hands the owner's ``env`` to the agent (``POST /configure``); the pool refills
in the background. Anything a pool sandbox cannot honour (privileged, another region, TCP
proxy, ...) falls back to a cold create, as does a pooled sandbox that fails its claim (it is
discarded).

Pooled sandboxes are rows with status ``pooled`` in the project ``POOL_PROJECT`` (visible to no
token); they are not subject to lifecycle timers until claimed, and survive server restarts.
"""

from __future__ import annotations

import logging
import secrets

import anyio

from sandlot.engines.base import Engine, SandboxSpec
from sandlot.instance_types import get_instance_type
from sandlot.server.config import PoolKey
from sandlot.server.control import agentcalls
from sandlot.server.control.core import Core, address_of
from sandlot.server.control.tables import SandboxRow, utcnow
from sandlot.server.schemas import CreateSandbox
from sandlot.server.status import SandboxStatus

log = logging.getLogger("sandlot.pool")

POOL_PROJECT = "__pool__"
REFILL_SECONDS = 0.5


class WarmPools:
    def __init__(self, control: Core, sizes: dict[PoolKey, int], region: str) -> None:
        self.control = control
        self.sizes = {k: n for k, n in sizes.items() if n > 0}
        self.region = region
        self._claim_lock = anyio.Lock()

    def _matching(self, req: CreateSandbox, image: str) -> PoolKey | None:
        key = PoolKey(image, req.instance_type)
        if key not in self.sizes:
            return None
        if req.privileged or req.enable_tcp_proxy or req.registry_secret is not None:
            return None
        if req.runtime != "crun":  # pools hold crun sandboxes
            return None
        if (req.region or self.control.default_region) != self.region:
            return None
        return key

    # -- claim ----------------------------------------------------------------------------------

    async def claim(self, project: str, req: CreateSandbox, image: str) -> SandboxRow | None:
        """A pooled sandbox made the caller's, or None (then the caller creates one cold)."""
        key = self._matching(req, image)
        if key is None:
            return None
        now = utcnow()
        async with self._claim_lock:  # one claimant per pooled sandbox
            row = await self.control.db(
                self.control.store.claim_pooled,
                POOL_PROJECT,
                key.image,
                key.instance_type,
                project=project,
                status=SandboxStatus.CLAIMING,
                labels=dict(req.labels or {}),
                env=self.control.store.seal_env(req.env or {}),
                idle_timeout=req.idle_timeout,
                delete_after_delay=req.delete_after_delay,
                delete_after_inactivity_delay=req.delete_after_inactivity_delay,
                light_sleep=req.enable_light_sleep,
                exposed_port_protocol=req.exposed_port_protocol,
                created_at=now,
                last_activity_at=now,
                **({"name": req.name} if req.name else {}),
            )
        if row is None:
            return None
        # Derived from the id by the server key: the claim's first request gives it to the agent.
        secret = self.control.store.sandbox_secret(row)
        try:
            await self._claim_agent(row, secret, dict(req.env or {}))
        except Exception as exc:
            log.warning("claiming pooled sandbox %s failed (%s): creating one cold", row.id, exc)
            with anyio.CancelScope(shield=True):
                await self.control.discard(
                    self.control.engines[self.region], row.id, f"pool claim failed: {exc}"
                )
            return None
        final = await self.control.db(
            self.control.store.update_sandbox,
            row.id,
            only_if_status=SandboxStatus.CLAIMING,
            status=SandboxStatus.RUNNING,
        )
        detail = f"{image} ({req.instance_type}) from the warm pool"
        # the history need not hold up the create
        await self.control.later(self.control.event, row.id, "created", detail)
        return final  # type: ignore[no-any-return]

    async def _claim_agent(self, row: SandboxRow, secret: str, env: dict[str, str]) -> None:
        address = address_of(row)
        if address is None:
            raise RuntimeError("the pooled sandbox has no agent address")
        # The gateway's own keep-alive pool to this agent: the claim opens the connection the
        # owner's first request will reuse.
        agent = self.control.agents.connect(row.id, address, secret)
        # The first authenticated request claims the agent: its token is now the secret.
        status, answer = await agentcalls.call(agent, "POST", "/configure", {"env": env})
        if status != 200:
            reply = agentcalls.validate(agentcalls.AgentReply, answer, "/configure")
            raise RuntimeError(f"agent answered {status}: {reply.message(status)}")

    # -- refill ---------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            for key, size in self.sizes.items():
                try:
                    await self._refill(key, size)
                except Exception:  # pragma: no cover - logged; retried next round
                    log.exception("refilling the %s/%s pool failed", key.image, key.instance_type)
            await anyio.sleep(REFILL_SECONDS)

    async def _refill(self, key: PoolKey, size: int) -> None:
        have = await self.control.db(
            self.control.store.count_pooled, POOL_PROJECT, key.image, key.instance_type
        )
        for _ in range(size - have):
            await self._add(key)

    async def _add(self, key: PoolKey) -> None:
        engine: Engine = self.control.engines[self.region]
        sandbox_id = secrets.token_hex(12)
        now = utcnow()
        # Everything else keeps the column defaults until a claim sets the owner's values.
        row = SandboxRow(
            id=sandbox_id,
            project=POOL_PROJECT,
            name=f"pool-{sandbox_id[:8]}",
            status=SandboxStatus.POOLING,
            image=key.image,
            instance_type=key.instance_type,
            region=self.region,
            idle_timeout=0,
            created_at=now,
            updated_at=now,
        )
        await self.control.db(self.control.store.add_sandbox, row)
        spec = SandboxSpec(
            id=sandbox_id,
            image=key.image,
            secret="",
            pool=True,
            instance_type=get_instance_type(key.instance_type),
            name=row.name,
        )
        try:
            info = await engine.create(spec)
            await self.control.db(
                self.control.store.update_sandbox,
                sandbox_id,
                agent_unix_path=info.agent_address.unix_path,
                agent_host=info.agent_address.host,
                agent_port=info.agent_address.port,
            )
            await self.control.agents.wait_healthy(engine, sandbox_id, info.agent_address, 60.0)
            await self.control.db(
                self.control.store.update_sandbox,
                sandbox_id,
                only_if_status=SandboxStatus.POOLING,
                status=SandboxStatus.POOLED,
            )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.control.discard(engine, sandbox_id, f"pool fill failed: {exc!r}")
            if not isinstance(exc, Exception):
                raise
            log.warning("adding to the %s/%s pool failed: %s", key.image, key.instance_type, exc)
            await anyio.sleep(5)  # do not spin on a broken image
