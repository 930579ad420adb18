"""splitfuse: an LLM serving engine built around Dynamic SplitFuse."""
from splitfuse import logs
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.client import AsyncClient, Client, CurveKeys
from splitfuse.frontend.serve import Deployment, serve
from splitfuse.frontend.pipeline import Pipeline, pipeline
from splitfuse.frontend.response import Response
from splitfuse.protocol import Delta

logs.configure()

__all__ = ["EngineConfig", "SamplingParams", "Pipeline", "pipeline", "Response", "Delta", "serve", "Deployment",
           "AsyncClient", "Client", "CurveKeys"]
