"""spotrag's Kubernetes operator (kopf): RAGDeployment → engines, gateway, index."""
