"""``sandlot``: the command line. ``server`` runs the control server; the user commands
(create, ls, exec, run, cp, rm, token, quota, secret, image) live in :mod:`sandlot.cli.commands`."""

from __future__ import annotations

from typing import Any

import click


@click.group()
@click.version_option(package_name="sandlot")
def main() -> None:
    """sandlot: secure, ephemeral sandboxes on your own machine."""


@main.command()
@click.option(
    "--listen",
    default=None,
    metavar="unix:PATH|tcp:HOST:PORT",
    help="Where to listen (default: the per-user Unix socket, whose permissions are the "
    "authentication; TCP requires API tokens, and a TCP server also serves its admin API on "
    "that Unix socket, where the CLI finds it). One server per state directory.",
)
@click.option(
    "--database",
    default=None,
    metavar="URL",
    help="SQLAlchemy URL (default: SQLite in the state directory; e.g. postgresql://...).",
)
@click.option(
    "--engine",
    default="local",
    show_default=True,
    help="'local', 'kubernetes' (sandboxes as Pods: see --kubeconfig, --namespace), or "
    "module:factory returning an Engine.",
)
@click.option(
    "--kubeconfig",
    default=None,
    metavar="FILE",
    help="With --engine kubernetes: the cluster's kubeconfig (default: the in-cluster service "
    "account, else ~/.kube/config).",
)
@click.option(
    "--namespace",
    default="sandlot",
    show_default=True,
    help="With --engine kubernetes: the namespace sandboxes' Pods live in.",
)
@click.option(
    "--runtime-image",
    default=None,
    metavar="IMAGE",
    help="With --engine kubernetes: the image holding the agent runtime (docs/kubernetes.md).",
)
@click.option(
    "--allow-privileged-pods",
    is_flag=True,
    default=False,
    help="With --engine kubernetes: let privileged sandboxes be made (a privileged Pod is root "
    "on its node; off by default).",
)
@click.option(
    "--pod-user-namespaces",
    is_flag=True,
    default=False,
    help="With --engine kubernetes: each sandbox Pod in its own user namespace (hostUsers: "
    "false; needs Kubernetes >= 1.33 and a runtime and kernel that support it).",
)
@click.option(
    "--runtime-class",
    "runtime_classes",
    multiple=True,
    metavar="RUNTIME=CLASS",
    help="With --engine kubernetes: the RuntimeClass of a runtime (default gvisor=gvisor; "
    "RUNTIME= for the cluster's default runtime; repeatable).",
)
@click.option("--public-url", default=None, help="Base URL clients use to reach this server.")
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--pool",
    "pools",
    multiple=True,
    metavar="IMAGE:INSTANCE_TYPE=N",
    help="Keep N sandboxes of this kind ready for instant create() (repeatable; "
    "e.g. default:micro=2). Default: no pools.",
)
@click.option(
    "--domain",
    default=None,
    metavar="DOMAIN[:PORT]",
    help="Wildcard domain pointing at this server: exposed ports are also served at "
    "{port}-{sandbox id}.DOMAIN (routed by the Host header).",
)
@click.option(
    "--ports-listen",
    default=None,
    metavar="tcp:HOST:PORT|none",
    help="A TCP address that serves sandboxes' exposed ports and nothing else (not the API). "
    "Default for a Unix-socket server: tcp:127.0.0.1:0 (a free port, the same one across "
    "restarts while it stays free), so exposed URLs open in a browser; for a TCP server: "
    "none (ports are served on --listen).",
)
@click.option(
    "--tcp-proxy-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the TCP proxies of sandboxes created with enable_tcp_proxy listen on.",
)
@click.option(
    "--trusted-image-dir",
    "trusted_image_dirs",
    multiple=True,
    metavar="DIR",
    help="A directory whose root filesystems and OCI layouts API tokens may use as images "
    "(repeatable). Default: none; host paths are for the local socket's owner only.",
)
@click.option(
    "--trusted-registry",
    "trusted_registries",
    multiple=True,
    metavar="HOST[:PORT]",
    help="A registry on this host (loopback, link-local or one of its own addresses) that API "
    "tokens may pull images from (repeatable). Default: none; such registries are for the "
    "local socket's owner only.",
)
@click.option(
    "--key-file",
    default=None,
    metavar="PATH",
    help="The server key sealing secrets at rest (default: server.key beside a SQLite "
    "database, made at first start; env SANDLOT_SERVER_KEY_FILE). Replicas sharing PostgreSQL "
    "need the same file, e.g. a mounted Kubernetes Secret.",
)
@click.option(
    "--overcommit",
    type=click.Choice(["allow", "none"]),
    default="allow",
    show_default=True,
    help="allow: sandboxes' limits may add up to more than the host has, but each create must "
    "fit in what is free now (disks stay sparse); none: disks are preallocated and the memory, "
    "pids and file handles promised to all sandboxes never exceed the host's.",
)
@click.option(
    "--reserve",
    type=click.FloatRange(0, 0.99),
    default=0.10,
    show_default=True,
    help="Fraction of the host's disk, memory, pids and file handles no create may take.",
)
@click.option(
    "--extra-ca-file",
    default=None,
    envvar="SANDLOT_EXTRA_CA_FILE",
    metavar="PATH",
    help="PEM file of CA certificates every new sandbox trusts besides its image's own (e.g. "
    "a TLS-inspecting proxy's or an internal package index's CA): added to the image's system "
    "bundle, with SSL_CERT_FILE, REQUESTS_CA_BUNDLE, PIP_CERT and NODE_EXTRA_CA_CERTS set. "
    "Certificates only (a private key is refused), 1 MiB at most. Default: none; the host's "
    "own CAs are never given to sandboxes. Env SANDLOT_EXTRA_CA_FILE.",
)
@click.option(
    "--runtime",
    "default_runtime",
    type=click.Choice(["crun", "gvisor"]),
    default="crun",
    show_default=True,
    envvar="SANDLOT_RUNTIME",
    help="The runtime of sandboxes whose create names none: crun (a container on the host's "
    "kernel) or gvisor (gVisor's user-space kernel between the code and the host's; needs "
    "runsc). A create may still name either. Env SANDLOT_RUNTIME.",
)
@click.option(
    "--max-json-body",
    default=1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1024),
    metavar="BYTES",
    help="Largest JSON request body the control API accepts (larger: 413). File bodies to "
    "sandboxes are streamed and not limited by this.",
)
@click.option(
    "--max-exposed-ports",
    type=click.IntRange(min=1),
    default=None,
    help="Ports one sandbox may have exposed at once (default 32).",
)
@click.option(
    "--max-port-requests",
    type=click.IntRange(min=1),
    default=None,
    help="HTTP requests in flight to one exposed port; more wait, then get 503 (default 256).",
)
@click.option(
    "--max-tcp-connections",
    type=click.IntRange(min=1),
    default=None,
    help="TCP proxy connections open at once to one sandbox; more are closed (default 4096).",
)
@click.option(
    "--max-requests-per-token",
    type=click.IntRange(min=1),
    default=None,
    help="Requests in flight at once per API token; more get 429 (default 1024).",
)
@click.option(
    "--h2-max-streams",
    type=click.IntRange(min=1),
    default=None,
    help="Concurrent streams (and running handlers) per HTTP/2 connection (default 128).",
)
@click.option(
    "--h2-frame-burst",
    type=click.IntRange(min=1),
    default=None,
    help="Resets, PINGs, SETTINGS... an HTTP/2 client may send in a burst before GOAWAY "
    "(default 200).",
)
@click.option(
    "--h2-frame-rate",
    type=click.FloatRange(min=0),
    default=None,
    help="How fast that budget refills, per second (default 20; also +1 per response served "
    "whole).",
)
def server(
    listen: str | None,
    database: str | None,
    engine: str,
    kubeconfig: str | None,
    namespace: str,
    runtime_image: str | None,
    allow_privileged_pods: bool,
    pod_user_namespaces: bool,
    runtime_classes: tuple[str, ...],
    public_url: str | None,
    log_level: str,
    pools: tuple[str, ...],
    domain: str | None,
    ports_listen: str | None,
    tcp_proxy_host: str,
    trusted_image_dirs: tuple[str, ...],
    trusted_registries: tuple[str, ...],
    key_file: str | None,
    overcommit: str,
    reserve: float,
    extra_ca_file: str | None,
    default_runtime: str,
    max_json_body: int,
    max_exposed_ports: int | None,
    max_port_requests: int | None,
    max_tcp_connections: int | None,
    max_requests_per_token: int | None,
    h2_max_streams: int | None,
    h2_frame_burst: int | None,
    h2_frame_rate: float | None,
) -> None:
    """Run the control server and gateway. Limits left out keep their defaults (listed in
    docs/ports.md)."""
    from sandlot.ca_certs import ExtraCAError
    from sandlot.ca_certs import load as load_extra_ca
    from sandlot.server.config import PoolKey, PortLimits
    from sandlot.server.h2limits import H2Limits
    from sandlot.server.runner.portslisten import parse_ports_listen
    from sandlot.server.runner.serve import HostPolicy, ServerOptions, parse_listen, serve

    try:
        unix_server = parse_listen(listen).is_unix
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    try:
        parse_ports_listen(ports_listen, unix_server)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ports-listen") from None
    try:
        extra_ca = load_extra_ca(extra_ca_file) if extra_ca_file else None
    except ExtraCAError as exc:
        raise click.BadParameter(str(exc), param_hint="--extra-ca-file") from None
    try:
        pool_sizes = dict(PoolKey.parse(p) for p in pools)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--pool") from None
    try:
        kube = _kubernetes_settings(
            kubeconfig,
            namespace,
            runtime_image,
            runtime_classes,
            allow_privileged=allow_privileged_pods,
            user_namespaces=pod_user_namespaces,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--runtime-class") from None
    try:
        options = ServerOptions(
            listen=listen,
            database=database,
            engine=engine,
            kubernetes=kube,
            public_url=public_url,
            log_level=log_level,
            pools=pool_sizes,
            domain=domain,
            ports_listen=ports_listen,
            tcp_proxy_host=tcp_proxy_host,
            trusted_image_dirs=trusted_image_dirs,
            trusted_registries=trusted_registries,
            key_file=key_file,
            policy=HostPolicy(overcommit, reserve, extra_ca),
            max_json_body=max_json_body,
            default_runtime=default_runtime,
            h2_limits=H2Limits(
                **_given(
                    max_streams=h2_max_streams,
                    frame_burst=h2_frame_burst,
                    frame_rate=h2_frame_rate,
                )
            ),
            port_limits=PortLimits(
                **_given(
                    max_exposed=max_exposed_ports,
                    max_requests=max_port_requests,
                    max_tcp_connections=max_tcp_connections,
                )
            ),
            **_given(token_requests=max_requests_per_token),
        )
        serve(options)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


def _kubernetes_settings(
    kubeconfig: str | None,
    namespace: str,
    runtime_image: str | None,
    runtime_classes: tuple[str, ...],
    *,
    allow_privileged: bool,
    user_namespaces: bool,
) -> Any:
    from sandlot.engines.base import RUNTIMES
    from sandlot.engines.kubernetes.settings import DEFAULT_RUNTIME_CLASSES, KubernetesSettings

    classes = dict(DEFAULT_RUNTIME_CLASSES)
    for item in runtime_classes:
        runtime, sep, name = item.partition("=")
        if not sep or runtime not in RUNTIMES:
            raise ValueError(
                f"--runtime-class must be RUNTIME=CLASS with RUNTIME one of {', '.join(RUNTIMES)}"
                f", not {item!r}"
            )
        classes[runtime] = name or None
    return KubernetesSettings(
        namespace=namespace,
        kubeconfig=kubeconfig,
        runtime_classes=classes,
        allow_privileged=allow_privileged,
        user_namespaces=user_namespaces,
        **_given(runtime_image=runtime_image),
    )


def _given(**values: object) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _register() -> None:
    from sandlot.cli.commands import COMMANDS
    from sandlot.cli.snapshot_commands import fork, snapshot

    for command in [*COMMANDS, snapshot, fork]:
        main.add_command(command)


_register()
