"""What crosses the pipes between the driver and the ranks: pickled messages whose tensors travel as plain
bytes (torch would otherwise pass them through /dev/shm, which containers often keep tiny) and whose
errors travel as descriptions (exception classes with custom constructors do not survive pickling)."""

import pickle
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from seedvr.errors import INTERNAL, RestoreError

Message = tuple[str, Any, Any]  # (kind, job id, body); see seedvr.spgroup.rank


@dataclass
class _Tensor:
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]
    data: np.ndarray  # the raw bytes, uint8


def pack(value: Any) -> Any:
    """Tensors (at any depth of dicts, lists, tuples) -> byte copies; everything else unchanged."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        return _Tensor(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape),
                       tensor.reshape(-1).view(torch.uint8).numpy())
    if isinstance(value, dict):
        return {key: pack(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(pack(item) for item in value)
    return value


def unpack(value: Any) -> Any:
    """The inverse of `pack`."""
    if isinstance(value, _Tensor):
        data = torch.from_numpy(value.data)  # unpickled arrays own their (writable) memory
        return data.view(getattr(torch, value.dtype)).reshape(value.shape)
    if isinstance(value, dict):
        return {key: unpack(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(unpack(item) for item in value)
    return value


def encode(message: Message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def send(conn: Connection, message: Message) -> None:
    conn.send_bytes(encode(message))


def receive(conn: Connection) -> Message:
    return pickle.loads(conn.recv_bytes())


@dataclass
class RemoteError:
    """An exception raised on a rank, described."""

    kind: str  # "restore", "value", "oom" or "other"
    type_name: str
    message: str
    code: str | None  # the RestoreError code
    traceback: str

    @classmethod
    def describe(cls, error: BaseException) -> "RemoteError":
        kind = ("restore" if isinstance(error, RestoreError) else "oom" if isinstance(error, torch.OutOfMemoryError)
                else "value" if isinstance(error, ValueError) else "other")
        message = error.message if isinstance(error, RestoreError) else str(error)
        return cls(kind, type(error).__name__, message, getattr(error, "code", None),
                   "".join(traceback.format_exception(error)))

    def same_as(self, other: "RemoteError") -> bool:
        return (self.kind, self.type_name, self.message) == (other.kind, other.type_name, other.message)

    def rebuild(self, rank: int) -> Exception:
        """The exception to raise in the driver: the same kind of error the single-process pipeline raises."""
        if self.kind == "restore":
            return RestoreError(self.code or INTERNAL, self.message)
        if self.kind == "oom":
            return torch.OutOfMemoryError(self.message)
        if self.kind == "value":
            return ValueError(self.message)
        return RestoreError(INTERNAL, f"sequence-parallel rank {rank} failed: {self.type_name}: {self.message}")
