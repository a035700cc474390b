"""A thin client of the specontext.v1.Generator service."""
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import grpc

try:
    from ._proto import specontext_pb2 as pb
    from ._proto import specontext_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - a checkout without the generated stubs
    raise ImportError("specontext_client: the gRPC stubs are missing; run clients/python/build_stubs.py "
                      "(or pip install clients/python) first") from e


class SpeContextError(Exception):
    """A failed call: code is the gRPC status code's name ("INVALID_ARGUMENT", ...)."""

    def __init__(self, code: str, message: str):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> "SpeContextError":
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code.name if code is not None else "UNKNOWN", details or "")


@dataclass
class Usage:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_ms: float = 0.0
    queue_ms: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class StreamPiece:
    """One message of a generate_stream() call: the text and token ids since the previous piece.
    The last piece has done=True with finish_reason and usage set."""
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    done: bool = False
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    request_id: str = ""


@dataclass
class Result:
    text: str
    token_ids: List[int]
    finish_reason: str  # "stop", "stop_string", "length", "cancelled" or "unspecified"
    usage: Usage
    request_id: str = ""


def _finish_reason(value: int) -> str:
    name = pb.FinishReason.Name(value)
    return name[len("FINISH_REASON_"):].lower() if name.startswith("FINISH_REASON_") else name.lower()


def _usage(u) -> Usage:
    return Usage(prompt_tokens=u.prompt_tokens, generated_tokens=u.generated_tokens,
                 time_to_first_token_ms=u.time_to_first_token_ms, queue_ms=u.queue_ms,
                 tokens_per_second=u.tokens_per_second)


def _read(path: Optional[Union[str, bytes]]) -> Optional[bytes]:
    if path is None or isinstance(path, bytes):
        return path
    with open(path, "rb") as f:
        return f.read()


Message = Union[dict, tuple]


class Client:
    """Client(address) talks to a specontext-generator at HOST:PORT.

    tls_ca: PEM CA (a path, or the bytes) of the server's certificate: use TLS. tls_cert/tls_key: a
    client certificate for a server requiring mutual TLS. timeout: the deadline of each call in
    seconds (None = none). Use it as a context manager, or call close().
    """

    def __init__(self, address: str, *, tls_ca=None, tls_cert=None, tls_key=None,
                 timeout: Optional[float] = None, options: Sequence = ()):
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls_ca is not None or tls_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca),
                                                 private_key=_read(tls_key),
                                                 certificate_chain=_read(tls_cert))
            self._channel = grpc.secure_channel(address, creds, options=list(options))
        else:
            self._channel = grpc.insecure_channel(address, options=list(options))
        self._stub = pb_grpc.GeneratorStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------

    def model_info(self):
        """The server's GetModelInfo reply (a specontext.v1.ModelInfo message)."""
        try:
            return self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise SpeContextError.from_rpc_error(e) from None

    @staticmethod
    def build_request(prompt: Optional[str] = None, messages: Optional[Sequence[Message]] = None,
                      token_ids: Optional[Sequence[int]] = None, max_new_tokens: int = 128,
                      temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                      stop: Optional[Sequence[str]] = None,
                      stop_token_ids: Optional[Sequence[int]] = None, budget: Optional[int] = None,
                      dense: bool = False, ignore_eos: bool = False, request_id: str = ""):
        """The GenerateRequest for these arguments. Exactly one of prompt, messages and token_ids is
        expected; the server checks it (INVALID_ARGUMENT), as it checks the ranges."""
        req = pb.GenerateRequest(request_id=request_id, max_new_tokens=max_new_tokens,
                                 ignore_eos=ignore_eos)
        if prompt is not None:
            req.prompt = prompt
        if token_ids is not None:
            req.token_ids.extend(token_ids)
        for m in messages or ():
            role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
            req.messages.add(role=role, content=content)
        req.sampling.temperature = temperature
        req.sampling.top_k = top_k
        req.sampling.seed = seed
        if top_p != 1.0:
            req.sampling.top_p = top_p
        req.stop.extend(stop or ())
        req.stop_token_ids.extend(stop_token_ids or ())
        if budget is not None:
            req.sparsity.budget = budget
        req.sparsity.dense = dense
        return req

    def generate_stream(self, prompt: Optional[str] = None, **kwargs) -> Iterator[StreamPiece]:
        """Yields a StreamPiece per server message as it arrives (same arguments as generate())."""
        req = self.build_request(prompt, **kwargs)
        call = self._stub.Generate(req, timeout=self.timeout)
        try:
            for r in call:
                piece = StreamPiece(text=r.text, token_ids=list(r.token_ids), done=r.done,
                                    request_id=r.request_id)
                if r.done:
                    piece.finish_reason = _finish_reason(r.finish_reason)
                    piece.usage = _usage(r.usage)
                yield piece
        except grpc.RpcError as e:
            raise SpeContextError.from_rpc_error(e) from None
        finally:
            call.cancel()  # a caller leaving the loop early cancels the request (no-op when done)

    def generate(self, prompt: Optional[str] = None, messages: Optional[Sequence[Message]] = None,
                 token_ids: Optional[Sequence[int]] = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop: Optional[Sequence[str]] = None, budget: Optional[int] = None,
                 dense: bool = False, ignore_eos: bool = False, **kwargs) -> Result:
        """Generates to the end and returns the Result (text, token_ids, finish_reason, usage).
        messages: [{"role": ..., "content": ...}] or [(role, content)]. Extra keywords: top_k,
        stop_token_ids, request_id."""
        text, ids, request_id = [], [], ""
        finish, usage = "unspecified", Usage()
        for p in self.generate_stream(prompt, messages=messages, token_ids=token_ids,
                                      max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed, stop=stop, budget=budget, dense=dense,
                                      ignore_eos=ignore_eos, **kwargs):
            if p.request_id:
                request_id = p.request_id
            text.append(p.text)
            ids.extend(p.token_ids)
            if p.done:
                finish, usage = p.finish_reason, p.usage
        return Result(text="".join(text), token_ids=ids, finish_reason=finish, usage=usage,
                      request_id=request_id)
