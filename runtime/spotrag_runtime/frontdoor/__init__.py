"""The front door: one OpenAI-compatible endpoint for many RAGDeployments.

Routes each request by its ``model`` to a RAGDeployment's gateway Service,
splits a model's traffic between RAGDeployments by weight (``ModelRoute``),
checks API keys once, and applies each RAGDeployment's moderation. See
docs/front-door.md.

    config.py     FrontDoorConfig (the mounted JSON/YAML file)
    routing.py    pure: RAGDeployments + ModelRoutes -> RouteTable, picking a variant
    discovery.py  keeps the RouteTable current from the API (spotrag_runtime.kube's
                  informers); writes ModelRoute status
    proxy.py      upstream calls and the moderated answer stream
    metrics.py    per model and variant
    app.py        the HTTP API
"""

from spotrag_runtime.frontdoor.config import FrontDoorConfig
from spotrag_runtime.frontdoor.routing import Backend, Route, RouteTable, Variant, build_table

__all__ = ["Backend", "FrontDoorConfig", "Route", "RouteTable", "Variant", "build_table"]
