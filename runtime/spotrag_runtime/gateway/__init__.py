"""The RAG gateway: retrieval, an OpenAI-compatible API, a token-aware
admission queue, engine picking and failover.

Only the configuration is imported here, so the operator can render the
gateway's ConfigMap without torch or FastAPI. The server lives in
``spotrag_runtime.gateway.app`` (``create_app``) and the command in
``spotrag_runtime.gateway.cli``.
"""

from spotrag_runtime.gateway.config import ConfigError, GatewayConfig, load_config

__all__ = ["ConfigError", "GatewayConfig", "load_config"]
