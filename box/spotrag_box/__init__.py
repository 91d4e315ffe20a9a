"""Cluster in a box: a Kubernetes API stand-in and a simulated GPU cluster for
tests and the demo. Test and demo infrastructure, not a Kubernetes replacement."""
