"""Where every spotrag process finds its Kubernetes API: in-cluster config
inside a pod, else a kubeconfig (the one named, $KUBECONFIG, ~/.kube/config).

Loading goes through the `kubernetes` package, so tokens, client
certificates and exec credential plugins (EKS, GKE) work as in kubectl.
"""

from __future__ import annotations

import ssl
from typing import Any

import kubernetes
from kubernetes import config as kube_config
from kubernetes.client import Configuration


def load_configuration(kubeconfig: str | None = None) -> Configuration:
    configuration = Configuration()
    if kubeconfig:
        kube_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        return configuration
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        kube_config.load_kube_config(client_configuration=configuration)
    return configuration


def api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """The `kubernetes` package's ApiClient for the same server and credentials."""
    return kubernetes.client.ApiClient(load_configuration(kubeconfig))


def auth_headers(configuration: Configuration) -> dict[str, str]:
    """The Authorization header, read per request: in-cluster tokens are
    rotated, and the package's refresh hook renews them here."""
    auth = configuration.auth_settings().get("BearerToken")
    return {"Authorization": auth["value"]} if auth and auth.get("value") else {}


def httpx_options(configuration: Configuration) -> dict[str, Any]:
    """TLS options for an httpx client talking to the same server."""
    options: dict[str, Any] = {}
    if configuration.host.startswith("https"):
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if not configuration.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        options["verify"] = context
    return options
