"""The Kubernetes API stand-in: kmock's emulator completed so kopf, kubectl and helm run against it."""
