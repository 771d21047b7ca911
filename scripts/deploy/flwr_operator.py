#!/usr/bin/env python3
"""The ``flwr`` CLI, presenting the operator's TLS client certificate to the SuperLink.

A SuperLink started by ``start_superlink.sh`` sits behind a proxy that passes the Control API
(register SuperNodes; submit, list, stop runs) only to a client certificate signed by the
deployment's CA (``operator.crt`` from ``make_certs.sh``). Flower 1.42's CLI has no setting for
a client certificate, so this runs the same CLI with one added to its TLS context:

    MOSAIC_OPERATOR_CERT=certs/operator.crt MOSAIC_OPERATOR_KEY=certs/operator.key \\
        .venv/bin/python scripts/deploy/flwr_operator.py ls deploy

Arguments are ``flwr``'s own. Without the two variables it is the plain ``flwr`` CLI.
``flwr_deploy.py --operator-cert/--operator-key`` calls it for you.
"""

from __future__ import annotations

import os
import ssl
import sys

CERT, KEY = "MOSAIC_OPERATOR_CERT", "MOSAIC_OPERATOR_KEY"


def client_context(verify: ssl.SSLContext | str | bool, cert: str, key: str) -> ssl.SSLContext:
    """The TLS context of a ``ProtobufClient`` (``verify``: a context, a CA file, or True for
    the system's CAs) with the client certificate ``cert``/``key`` loaded into it."""
    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    elif verify is True:
        context = ssl.create_default_context()
    else:  # verify=False is plain HTTP (flwr's `insecure = true`): nothing to present a certificate on
        raise SystemExit(f"flwr_operator: the connection is insecure (no TLS); {CERT} needs a TLS connection")
    context.load_cert_chain(cert, key)
    return context


def present_client_certificate(cert: str, key: str) -> None:
    """Make every HTTPS client the ``flwr`` CLI builds present ``cert``/``key``."""
    from flwr.supercore.protobuf.client import ProtobufClient

    for path, what in ((cert, CERT), (key, KEY)):
        if not os.path.isfile(path):
            raise SystemExit(f"flwr_operator: {what}={path}: file not found (operator.crt/.key from "
                             "scripts/deploy/make_certs.sh)")
    original = ProtobufClient.__init__

    def init(self, base_url: str, *args, verify: ssl.SSLContext | str | bool = True, **kwargs) -> None:
        if base_url.startswith("https://"):
            verify = client_context(verify, cert, key)
        original(self, base_url, *args, verify=verify, **kwargs)

    ProtobufClient.__init__ = init


def main() -> None:
    cert, key = os.environ.get(CERT), os.environ.get(KEY)
    if bool(cert) != bool(key):
        raise SystemExit(f"flwr_operator: set both {CERT} and {KEY}, or neither")
    if cert:
        present_client_certificate(cert, key)
    from flwr.cli.app import app

    sys.argv[0] = "flwr"
    app()


if __name__ == "__main__":
    main()
