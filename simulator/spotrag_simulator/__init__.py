"""`spotrag simulate`: a discrete-event simulation of one RAGDeployment that runs
the operator's real autoscaling and placement code (spotrag_operator.autoscale,
spotrag_operator.placement) next to the alternatives.

Modules: trace (load/generate requests), profile (GPU, model, prices, spot,
timing), engine (one vLLM engine's batching), sim (the event loop, gateway,
nodes, interruptions), policies (spotrag and the baselines), sizing (peak fleet
and targets), run (compare policies), report (summary, table, PNG), cli.
"""

from .cli import cli
from .presets import Profile, ProfileError, build_profile, load_profile
from .run import POLICIES, Comparison, compare
from .trace import TraceError, TraceRequest, generate_trace, load_trace

__all__ = [
    "POLICIES",
    "Comparison",
    "Profile",
    "ProfileError",
    "TraceError",
    "TraceRequest",
    "build_profile",
    "cli",
    "compare",
    "generate_trace",
    "load_profile",
    "load_trace",
]
