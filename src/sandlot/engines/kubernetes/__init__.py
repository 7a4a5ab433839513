"""The kubernetes engine: sandboxes as Pods on a cluster (docs/kubernetes.md). Needs the
``kubernetes`` extra (``pip install 'sandlot[kubernetes]'``): import
:class:`~sandlot.engines.kubernetes.engine.KubernetesEngine` from ``.engine``; this package
itself imports nothing of the client, so the server can read :mod:`.settings` without it."""
