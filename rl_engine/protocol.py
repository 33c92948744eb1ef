"""The wire protocol between the coordinator, rollout workers and trainer.

Messages are `msgspec` Structs in one tagged union (the tag is the class name, in field `type`),
wrapped in an `Envelope` that carries `PROTOCOL_VERSION`. Tensors never go through msgpack: each
tensor field is replaced on the wire by a `TensorHeader` (frame index, dtype name, shape) and its
bytes travel as a separate ZMQ frame, sent zero copy from a contiguous CPU tensor and rebuilt with
`torch.frombuffer` on the receiving side. No pickle anywhere.

`decode` validates everything a peer controls (version, tag, field types, frame count, frame sizes,
dtype names) and raises `ProtocolError` naming the problem; a receiver answers with `ErrorReply` and
keeps serving. To extend the protocol, add a `Message` subclass and list it in `MESSAGE_TYPES`.

Who sends what in the RL loop: `rl_engine/actors/__init__.py`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import msgspec
import torch
import zmq

PROTOCOL_VERSION = 8  # 2: the RL loop's messages (GenerateBatch, TrainBatch, ...); 3: async (partial rollouts);
# 4: authenticated sockets (WeightsApplied.rejected_messages); 5: TrainBatch.rewards / groups;
# 6: worker restarts (WorkerExited from the launcher, PublishWeights to the trainer); 7: TrainBatch.loss_mask;
# 8: ErrorReply.ref (a weight update's rejection names its version)

# Wire dtype names -> torch dtypes. Fixed table: a peer can never make us resolve an arbitrary name.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

if TYPE_CHECKING:
    from rl_engine.auth import MessageSigner, RunAuth

Buffer = Union[bytes, bytearray, memoryview, "zmq.Frame"]


class ProtocolError(Exception):
    """A message that cannot be decoded. `route` holds the ROUTER identity frames, if any."""

    def __init__(self, message: str, *, route: Sequence[bytes] = ()) -> None:
        super().__init__(message)
        self.route = list(route)


class Unauthenticated(Exception):
    """A message from a peer that did not prove it holds the run's secret: dropped unanswered, counted."""


class TensorHeader(msgspec.Struct, array_like=True, frozen=True):
    """Stands in for a tensor inside the msgpack frame: its bytes are in frames[frame]."""

    frame: int
    dtype: str
    shape: list[int]


class Envelope(msgspec.Struct, kw_only=True):
    # `msg` stays raw until the version is checked, so a newer peer's unknown message types are
    # reported as a version mismatch rather than as a confusing field error.
    version: int
    msg: msgspec.Raw


class Message(msgspec.Struct, tag=True, tag_field="type", kw_only=True):
    """Base of every message; the tag is the class name."""


class Heartbeat(Message):
    sender: str
    time: float  # sender's time.time(), for liveness and clock-skew metrics


class Hello(Message):
    """First message of a worker to the coordinator (registration)."""

    worker_id: str
    role: str  # "rollout" | "trainer" | ...
    capabilities: dict[str, str | int | float | bool] = {}


class WireSamplingParams(msgspec.Struct, kw_only=True, frozen=True):
    """Sampling parameters as sent to a rollout worker (the engine maps them to its own type)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    max_tokens: int = 256
    stop_token_ids: list[int] = []
    seed: int | None = None
    logprobs: bool = True  # behavior log-probs are needed by the loss
    ignore_eos: bool = False  # fixed-length completions (benchmarks)


class SampleResult(msgspec.Struct, kw_only=True):
    """One generated sample; every per-token tensor has one entry per generated token."""

    sample_id: str
    token_ids: torch.Tensor  # [n] int
    behavior_logprobs: torch.Tensor  # [n] float32
    policy_versions: torch.Tensor  # [n] int: weights version that sampled each token
    kv_versions: torch.Tensor  # [n] int: oldest weights version in each token's KV
    finish_reason: str  # "stop" | "length" | "abort"
    # MoE routing replay: [prompt + n - 1, moe layers, k] experts the engine chose for every token it
    # processed (the last sampled token is never fed); None unless the worker records routing.
    routed_experts: torch.Tensor | None = None
    # Speculative decoding: drafts the target verified for this sample, how many it accepted, verify steps
    # (an interrupted partial rollout carries them, and its continuation adds to them)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifies: int = 0

    def __post_init__(self) -> None:
        # Runs on decode too: msgspec turns this ValueError into a validation error.
        n = self.token_ids.numel()
        for name in ("behavior_logprobs", "policy_versions", "kv_versions"):
            got = getattr(self, name).numel()
            if got != n:
                raise ValueError(f"{name} has {got} entries but token_ids has {n}")
        if not 0 <= self.spec_accepted_tokens <= self.spec_draft_tokens or self.spec_verifies < 0:
            raise ValueError(f"speculative counts must satisfy 0 <= accepted ({self.spec_accepted_tokens}) <= drafts "
                             f"({self.spec_draft_tokens}) and verifies ({self.spec_verifies}) >= 0")
        if self.routed_experts is not None and self.routed_experts.dim() != 3:
            raise ValueError(f"routed_experts must be [tokens, layers, k], got shape {list(self.routed_experts.shape)}")


class GenerateRequest(Message):
    """Generate len(sample_ids) samples of one prompt."""

    request_id: str
    sample_ids: list[str]
    prompt_token_ids: list[int]
    sampling: WireSamplingParams
    policy_version: int  # the oldest weights version the worker may use
    # Async partial rollouts: the samples generated so far (one per sample id, in order), to continue
    # with the worker's current weights; their KV is recomputed, their tokens keep their versions.
    resume: list[SampleResult] | None = None


class GenerateResult(Message):
    request_id: str
    samples: list[SampleResult]
    error: str | None = None  # the worker refused the request (e.g. prompt too long); samples is empty
    interrupted: bool = False  # async: stopped by a weight update; samples with finish_reason "abort" go on later
    # rollout.compile_decode: seconds the sender's engine spent compiling decode steps since its previous
    # result (the coordinator's `rollout/decode_compile_s`). Defaulted, so frames without it (an older
    # checkpoint's rollout buffer) still decode.
    decode_compile_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.decode_compile_s) and self.decode_compile_s >= 0):
            raise ValueError(f"decode_compile_s must be a finite number >= 0, got {self.decode_compile_s}")


class GenerateBatch(Message):
    """Colocated placement: the trainer group generates all of these (split over its data-parallel
    engines), then answers one GenerateResult per request."""

    requests: list[GenerateRequest]
    # Async: each data-parallel engine stops once ceil(min_finished / engines) of its requests are
    # finished and answers the others as interrupted partial rollouts; 0: finish them all.
    min_finished: int = 0


class TrainBatch(Message):
    """One optimizer step's samples, flat: sample i owns prompt_lens[i] + response_lens[i] entries of
    token_ids and response_lens[i] entries of each per-response-token tensor, in sample order. The
    trainer packs them itself (every rank the same way). Advantages come from the coordinator."""

    step: int
    policy_version: int  # the weights version this update produces
    prompt_lens: torch.Tensor  # [N] int64
    response_lens: torch.Tensor  # [N] int64
    token_ids: torch.Tensor  # [sum(prompt + response)] int64
    behavior_logprobs: torch.Tensor  # [sum(response)] float32
    policy_versions: torch.Tensor  # [sum(response)] int64: version that sampled each token
    kv_versions: torch.Tensor  # [sum(response)] int64: oldest version in each token's KV
    advantages: torch.Tensor  # [N] float32
    routed_experts: torch.Tensor | None = None  # [sum(prompt + response - 1), moe layers, k]
    weight_targets: dict[str, str] = {}  # disaggregated: rollout worker id -> its weights address
    # [N] float32 and [N] int64: each sample's reward and group, for a trainer that recomputes the
    # advantages (loss.kl_in_reward: the rewards lose the KL to the reference first)
    rewards: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    # [sum(response)] bool: which response tokens the policy sampled (agentic sessions interleave
    # observations); None: all of them
    loss_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.prompt_lens.numel()
        if self.response_lens.numel() != n or self.advantages.numel() != n:
            raise ValueError(f"prompt_lens ({n}), response_lens ({self.response_lens.numel()}) and advantages "
                             f"({self.advantages.numel()}) must have one entry per sample")
        total, responses = int(self.prompt_lens.sum()) + int(self.response_lens.sum()), int(self.response_lens.sum())
        if self.token_ids.numel() != total:
            raise ValueError(f"token_ids has {self.token_ids.numel()} entries; the lengths say {total}")
        for name in ("behavior_logprobs", "policy_versions", "kv_versions", "loss_mask"):
            if getattr(self, name) is not None and getattr(self, name).numel() != responses:
                raise ValueError(f"{name} has {getattr(self, name).numel()} entries; the lengths say {responses}")
        for name in ("rewards", "groups"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}; one entry per sample is ({n},)")
        if self.routed_experts is not None and self.routed_experts.shape[:1] != (total - n,):
            raise ValueError(f"routed_experts covers {self.routed_experts.shape[0]} tokens; "
                             f"the lengths say {total - n}")


class TrainResult(Message):
    """The trainer's answer to TrainBatch, sent once the update is in the trainer's weights (and, when
    colocated, in its engines); disaggregated weights follow (WeightsPublished)."""

    step: int
    policy_version: int
    metrics: dict[str, float]


class UpdateWeights(Message):
    """Coordinator -> rollout worker: receive weights `version` on your weights socket now (between
    engine steps), then answer WeightsApplied."""

    version: int
    # Async: first stop every request in flight and answer each with an interrupted GenerateResult.
    interrupt: bool = False


class WeightsApplied(Message):
    worker_id: str
    version: int
    ok: bool
    error: str = ""
    seconds: float = 0.0
    probe_error: float | None = None  # max |engine - trainer| log-prob on the probe sequence
    rejected_messages: int = 0  # unauthenticated messages the worker has dropped so far


class WeightsPublished(Message):
    """Trainer -> coordinator: every rank has published `version` (failed: targets that refused or
    did not answer)."""

    version: int
    failed: list[str] = []
    seconds: float = 0.0


class LoadCheckpoint(Message):
    """Coordinator -> trainer on resume: load the sharded checkpoint at `path` (it must hold weights
    `policy_version`), put it in the colocated engines or publish it to `weight_targets`, then Ack
    with ref "load:<path>"."""

    path: str
    policy_version: int
    weight_targets: dict[str, str] = {}


class PublishWeights(Message):
    """Coordinator -> trainer: send the current weights (`version`) in full to `weight_targets` (worker id
    -> weights address: a restarted rollout worker rejoining), then answer WeightsPublished."""

    version: int
    weight_targets: dict[str, str]


class WorkerExited(Message):
    """Launcher -> coordinator: the process of rollout worker `worker` (pid `pid`) has ended (`reason`);
    `restarting`: the launcher is starting it again, and it will register anew."""

    worker: str
    pid: int
    reason: str
    restarting: bool = False


class SaveCheckpoint(Message):
    """Coordinator -> trainer: write a checkpoint to `path` (collective); answered by Ack(ref="checkpoint:<path>")."""

    path: str
    step: int


class WeightUpdateBegin(Message):
    version: int
    num_buckets: int


class WeightUpdateBucket(Message):
    version: int
    bucket_index: int
    checksum: str  # hex digest of the bucket's tensors, checked by the receiver
    tensors: dict[str, torch.Tensor]


class WeightUpdateCommit(Message):
    version: int
    num_buckets: int


class Ack(Message):
    ref: str  # what is acknowledged: a request id, "weights:v3", ...


class ErrorReply(Message):
    code: str  # one of the ERROR_* constants below, or a component's own code
    message: str
    ref: str = ""  # what is refused, as in `Ack.ref` ("weights:v3"): lets a peer tell a late answer from this one's


class Shutdown(Message):
    reason: str = ""


ERROR_PROTOCOL = "protocol_error"
ERROR_UNEXPECTED = "unexpected_message"
ERROR_INTERNAL = "internal_error"

MESSAGE_TYPES: tuple[type[Message], ...] = (
    Heartbeat,
    Hello,
    GenerateRequest,
    GenerateResult,
    GenerateBatch,
    TrainBatch,
    TrainResult,
    UpdateWeights,
    WeightsApplied,
    WeightsPublished,
    PublishWeights,
    WorkerExited,
    SaveCheckpoint,
    LoadCheckpoint,
    WeightUpdateBegin,
    WeightUpdateBucket,
    WeightUpdateCommit,
    Ack,
    ErrorReply,
    Shutdown,
)
AnyMessage = Union[MESSAGE_TYPES]  # type: ignore[valid-type]
_TAGS = frozenset(t.__name__ for t in MESSAGE_TYPES)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw bytes of a tensor; zero copy when it is already a contiguous CPU tensor."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    # Viewed as bytes through numpy so bfloat16/float8 (no numpy dtype) work; the memoryview keeps
    # the numpy array, hence the tensor's storage, alive until the frame is sent.
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def encode(msg: Message) -> list[bytes | memoryview]:
    """Encode a message as frames: [msgpack envelope, tensor bytes...] (in header frame order)."""
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"cannot encode {type(msg).__name__}: not one of MESSAGE_TYPES")
    frames: list[bytes | memoryview] = [b""]

    def enc_hook(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            name = _DTYPE_NAMES.get(obj.dtype)
            if name is None:
                raise TypeError(f"tensor dtype {obj.dtype} is not sendable; use one of {sorted(DTYPES)}")
            frames.append(_tensor_bytes(obj))
            return TensorHeader(frame=len(frames) - 1, dtype=name, shape=list(obj.shape))
        raise NotImplementedError(f"cannot encode objects of type {type(obj).__name__}")

    body = msgspec.msgpack.Encoder(enc_hook=enc_hook).encode(msg)
    frames[0] = msgspec.msgpack.encode(Envelope(version=PROTOCOL_VERSION, msg=msgspec.Raw(body)))
    return frames


def _rebuild_tensor(header: TensorHeader, frame: memoryview) -> torch.Tensor:
    dtype = DTYPES.get(header.dtype)
    if dtype is None:
        raise ProtocolError(f"unknown dtype {header.dtype!r} in frame {header.frame}; known: {sorted(DTYPES)}")
    if any(d < 0 for d in header.shape):
        raise ProtocolError(f"negative dimension in shape {header.shape} of frame {header.frame}")
    numel = math.prod(header.shape)
    expected = numel * dtype.itemsize
    if frame.nbytes != expected:
        raise ProtocolError(
            f"frame {header.frame} has {frame.nbytes} bytes but dtype {header.dtype} x shape "
            f"{header.shape} needs {expected}"
        )
    if numel == 0:  # torch.frombuffer rejects empty buffers
        return torch.empty(header.shape, dtype=dtype)
    with warnings.catch_warnings():
        # Received frames are read-only; the tensor aliases them (zero copy). Clone before writing.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(frame, dtype=torch.uint8)
    return flat.view(dtype).view(header.shape)


def decode(frames: Sequence[Buffer]) -> Message:
    """Rebuild a message from its frames; raise `ProtocolError` on anything malformed, whatever
    failed inside (a RecursionError from msgpack nested 1,000 deep included): a peer's bytes can never
    raise anything else out of a receiver."""
    try:
        return _decode(frames)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure on peer-controlled bytes is the peer's error
        raise ProtocolError(f"undecodable message ({type(e).__name__}: {e})") from None


def _decode(frames: Sequence[Buffer]) -> Message:
    if len(frames) == 0:
        raise ProtocolError("empty multipart message: expected at least the msgpack frame")
    views = [memoryview(f).cast("B") for f in frames]
    try:
        envelope = msgspec.msgpack.decode(views[0], type=Envelope)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"frame 0 is not a valid message envelope: {e}") from None
    if envelope.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {envelope.version} does not match ours ({PROTOCOL_VERSION}); "
            "run the same rl_engine version on every actor"
        )
    used: set[int] = set()

    def dec_hook(typ: type, obj: Any) -> Any:
        if typ is not torch.Tensor:
            raise NotImplementedError(f"cannot decode type {typ}")
        try:
            header = msgspec.convert(obj, TensorHeader)
        except msgspec.ValidationError as e:
            raise ProtocolError(f"expected a tensor header [frame, dtype, shape], got {obj!r}: {e}") from None
        if not 1 <= header.frame < len(views):
            raise ProtocolError(
                f"tensor header points at frame {header.frame} but the message has frames 1..{len(views) - 1}"
            )
        if header.frame in used:
            raise ProtocolError(f"frame {header.frame} is referenced by more than one tensor header")
        used.add(header.frame)
        return _rebuild_tensor(header, views[header.frame])

    decoder = msgspec.msgpack.Decoder(AnyMessage, dec_hook=dec_hook)
    try:
        msg = decoder.decode(envelope.msg)
    except msgspec.ValidationError as e:
        tag = _peek_tag(envelope.msg)
        if tag is not None and tag not in _TAGS:
            raise ProtocolError(f"unknown message type {tag!r}; known: {sorted(_TAGS)}") from None
        raise ProtocolError(f"invalid {tag or 'message'}: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed message body: {e}") from None
    if len(used) != len(views) - 1:
        extra = sorted(set(range(1, len(views))) - used)
        raise ProtocolError(f"frames {extra} are not referenced by any tensor header ({type(msg).__name__})")
    return msg


def _peek_tag(body: msgspec.Raw) -> str | None:
    try:
        obj = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        return None
    tag = obj.get("type") if isinstance(obj, dict) else None
    return tag if isinstance(tag, str) else None


def bind(socket: zmq.Socket, *, host: str = "127.0.0.1", port: int | None = None,
         listen_fd: int | None = None) -> str:
    """Bind to loopback unless another host is configured; port None picks a free one. `listen_fd`: a
    socket the launcher bound to `port` and passed down (rl_engine.launch.ports), served instead of
    binding anew (ZMQ_USE_FD), so the port was never free for another process to take.
    Returns the address peers connect to."""
    if listen_fd is not None:
        from rl_engine.launch.ports import adopt

        if port is None:
            raise ValueError(f"listen_fd ({listen_fd}) needs the port it is bound to")
        socket.setsockopt(zmq.USE_FD, adopt(listen_fd, port=port, what=f"the listening socket for {host}:{port}"))
        socket.bind(f"tcp://{host}:{port}")
    elif port is None:
        port = socket.bind_to_random_port(f"tcp://{host}")
    else:
        socket.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"


def send_msg(socket: zmq.Socket, msg: Message, *, route: Sequence[bytes] = (),
             signer: "MessageSigner | None" = None) -> None:
    """Send one message; `route` is the identity prefix when replying from a ROUTER socket. With a
    `signer`, an AES-GMAC tag frame bound to the sender's identity follows the message's frames."""
    frames = encode(msg)
    if signer is not None:
        frames.append(signer.sign(frames, peer=_signed_peer(socket, route, sending=True)))
    socket.send_multipart([*route, *frames], copy=False)


def recv_msg(socket: zmq.Socket, *, num_route_frames: int = 0, auth: "RunAuth | None" = None,
             signer: "MessageSigner | None" = None) -> tuple[list[bytes], Message]:
    """Receive one message: (route frames, message). Use num_route_frames=1 on a ROUTER socket
    talking to DEALER peers. Every check runs here, before decoding: with `auth` (a CURVE server
    socket) the routing id must be the authenticated peer's name; with `signer` the message's tag must
    verify. A message failing either raises `Unauthenticated` (counted by `auth`; never answer it);
    a malformed one raises `ProtocolError` (carrying the route)."""
    parts = socket.recv_multipart(copy=False)
    route = [bytes(p.buffer) for p in parts[:num_route_frames]]
    if len(parts) <= num_route_frames:
        raise ProtocolError(f"expected {num_route_frames} route frames and a message, got {len(parts)} frames",
                            route=route)
    if auth is not None and route and auth.check_peer(parts[num_route_frames], route[0]) is None:
        raise Unauthenticated(f"routing id {route[0]!r} is not the authenticated peer's name")
    frames: list = [p.buffer for p in parts[num_route_frames:]]
    if signer is not None:
        verified = signer.verify(frames, peer=_signed_peer(socket, route, sending=False))
        if verified is None:
            raise Unauthenticated(f"message from {route[0] if route else 'the peer'!r} without a valid tag")
        frames = verified
    try:
        return route, decode(frames)
    except ProtocolError as e:
        e.route = route
        raise


def _signed_peer(socket: zmq.Socket, route: Sequence[bytes], *, sending: bool) -> bytes:
    """What a tag is bound to: the DEALER's identity, and the direction (replies carry a '>' mark)."""
    if route:  # a ROUTER: sending replies to route[0], receiving from route[0]
        return b">" + route[0] if sending else route[0]
    identity = socket.getsockopt(zmq.IDENTITY)
    return identity if sending else b">" + identity


def error_reply(error: Exception) -> ErrorReply:
    """The reply a receiver sends for a message it could not decode or handle."""
    code = ERROR_PROTOCOL if isinstance(error, ProtocolError) else ERROR_INTERNAL
    return ErrorReply(code=code, message=str(error))
