"""The Kubernetes API stand-in: enough of kube-apiserver for kopf, kubectl and helm to run against it."""
