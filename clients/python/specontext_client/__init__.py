"""Python client of the SpeContext generator's gRPC API (proto/specontext.proto)."""
from .client import Client, Result, StreamPiece, SpeContextError, Usage

__all__ = ["Client", "Result", "StreamPiece", "SpeContextError", "Usage"]
