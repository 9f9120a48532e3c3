"""turbollm: a fast LLM inference engine and OpenAI-compatible server."""
from turbollm.core.lora_request import LoRARequest
from turbollm.sampling_params import SamplingParams
from turbollm.structured_spec import StructuredOutputSpec

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "SamplingParams", "StructuredOutputSpec", "__version__"]


def __getattr__(name):
    # LLM pulls in torch and the model code: import it only when asked for.
    if name == "LLM":
        from turbollm.llm import LLM
        return LLM
    raise AttributeError(name)
