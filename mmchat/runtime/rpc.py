"""llama.cpp's RPC backend: one model's layers on this machine and on RPC workers.

DESIGN §9. ggml aborts the whole process when an RPC endpoint is unreachable, answers
with another protocol version or dies, so every worker is first *probed* here in plain
Python (TCP connect with a timeout, the protocol's HELLO, device count and device memory)
and only an endpoint that answered is handed to ggml (``ggml_backend_rpc_add_server`` →
``ggml_backend_register``). Once registered, llama.cpp puts the RPC devices (``RPC0``,
``RPC1``, …) first in every model it loads in this process (``llama_model_params.devices``
left NULL) and splits the offloaded layers over them by free memory or ``tensor_split``.

The worker side (``mmchat rpc-worker``) is ``ggml_backend_rpc_start_server`` from the same
installed llama.cpp, so client and worker speak the same protocol.

Wire format (ggml-rpc.cpp, protocol 7): request ``| cmd u8 | size u64 | data |``, response
``| size u64 | data |``, little-endian; HELLO (cmd 14) carries 24 bytes of transport
capabilities (all zero: plain TCP) and answers ``major, minor, patch, pad`` + 24 bytes.
A worker serves one client at a time: an endpoint busy with another client accepts the
connection but does not answer until that client leaves.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from mmchat.errors import UserError

DEFAULT_PORT = 50052
PROTO_MAJOR = 7
PROTO_MINOR = 0
PROBE_TIMEOUT_S = 5.0

_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_CAPS_SIZE = 24

NO_RPC_MESSAGE = (
    "this llama.cpp was built without RPC: reinstall with "
    'CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall '
    "llama-cpp-python==0.3.36"
)


class RpcError(UserError):
    """An RPC worker cannot be used (unreachable, silent, wrong protocol), or RPC is missing."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class WorkerDevice:
    index: int
    memory_free: int
    memory_total: int


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker said when probed."""

    endpoint: str
    version: str
    devices: list[WorkerDevice] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- endpoints ----------------------------------------------------------------------------


def parse_endpoints(text: str | None) -> list[Endpoint]:
    """``HOST:PORT,HOST:PORT`` (a bare HOST means port 50052) → endpoints, in order.

    ggml splits an endpoint at its first ``:``, so IPv6 literals cannot be used (name the
    host instead). Duplicates are refused: a worker serves one client connection."""
    if text is None or not text.strip():
        return []
    found: list[Endpoint] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("[") or item.count(":") > 1:
            raise RpcError(
                f"RPC worker {item!r}: IPv6 addresses are not supported by llama.cpp's RPC "
                "client; use a host name or an IPv4 address"
            )
        host, sep, port_text = item.partition(":")
        if not host:
            raise RpcError(f"RPC worker {item!r} has no host (expected HOST:PORT)")
        port = DEFAULT_PORT
        if sep:
            try:
                port = int(port_text)
            except ValueError:
                raise RpcError(
                    f"RPC worker {item!r}: the port must be a number (expected HOST:PORT)"
                ) from None
        if not 0 < port < 65536:
            raise RpcError(f"RPC worker {item!r}: port must be between 1 and 65535")
        ep = Endpoint(host, port)
        if ep in found:
            raise RpcError(f"RPC worker {ep} is listed twice")
        found.append(ep)
    return found


# --- probing (plain Python: never hands a dead endpoint to ggml) ---------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        data += chunk
    return bytes(data)


def _call(sock: socket.socket, cmd: int, payload: bytes, answer_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != answer_size:
        raise ConnectionError(f"unexpected answer of {size} bytes to command {cmd}")
    return _recv_exact(sock, size)


def probe(endpoint: Endpoint | str, timeout: float = PROBE_TIMEOUT_S) -> WorkerInfo:
    """Ask a worker for its protocol version and devices; RpcError (one line) when it cannot
    be used. Does not need an RPC-enabled llama.cpp on this side."""
    ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoints(endpoint)[0]
    what = f"RPC worker {ep}"
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
    except socket.gaierror as exc:
        raise RpcError(f"{what}: unknown host ({exc.strerror or exc})") from None
    except TimeoutError:
        raise RpcError(f"{what} did not accept a connection within {timeout:g} s") from None
    except OSError as exc:
        raise RpcError(
            f"{what} is unreachable ({exc.strerror or exc}); start it there with "
            f"`mmchat rpc-worker --host HOST --port {ep.port}`"
        ) from None
    try:
        with sock:
            sock.settimeout(timeout)
            try:
                hello = _call(sock, _CMD_HELLO, bytes(_CAPS_SIZE), 4 + _CAPS_SIZE)
            except TimeoutError:
                raise RpcError(
                    f"{what} accepted the connection but did not answer within {timeout:g} s "
                    "(is it serving another client? a worker serves one at a time)"
                ) from None
            major, minor, patch = hello[0], hello[1], hello[2]
            version = f"{major}.{minor}.{patch}"
            if major != PROTO_MAJOR or minor > PROTO_MINOR:
                raise RpcError(
                    f"{what} speaks RPC protocol {version}, this llama.cpp speaks "
                    f"{PROTO_MAJOR}.{PROTO_MINOR}.x: install the same llama-cpp-python "
                    "version on both machines"
                )
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            devices = []
            for i in range(count):
                raw = _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16)
                free, total = struct.unpack("<QQ", raw)
                devices.append(WorkerDevice(i, int(free), int(total)))
    except RpcError:
        raise
    except TimeoutError:
        raise RpcError(f"{what} stopped answering (timeout {timeout:g} s)") from None
    except (OSError, ConnectionError, struct.error) as exc:
        raise RpcError(f"{what} is not a working llama.cpp RPC worker ({exc})") from None
    if not devices:
        raise RpcError(f"{what} reports no devices")
    return WorkerInfo(str(ep), version, devices)


# --- ggml's side (needs llama.cpp built with -DGGML_RPC=on) ---------------------------------

_lock = threading.Lock()
_attached: dict[str, WorkerInfo] = {}
_ggml: Any = None

DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator", 4: "meta"}


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _libllama_ggml() -> Any:
    """The libggml instance libllama uses. A wheel cannot hold symlinks, so
    ``llama_cpp/lib`` has ``libggml.so`` and ``libggml.so.0`` as two copies: libllama loads
    the soname, ``llama_cpp._ggml`` the other, and devices registered in that second
    registry are invisible to llama.cpp. dladdr() on a ggml function as libllama resolves
    it names the right file."""
    import llama_cpp.llama_cpp as C

    try:
        addr = ctypes.cast(C._lib.ggml_backend_dev_count, ctypes.c_void_p).value
        libc = ctypes.CDLL(None)
        info = _DlInfo()
        if addr and libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) and info.dli_fname:
            return ctypes.CDLL(info.dli_fname.decode())
    except (AttributeError, OSError):
        pass
    from llama_cpp._ggml import libggml

    return libggml


def _lib() -> Any:
    """libggml as libllama uses it, with the registry functions typed."""
    global _ggml
    if _ggml is None:
        lib = _libllama_ggml()
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        for name, res, args in (
            ("ggml_backend_reg_by_name", vp, [cp]),
            ("ggml_backend_reg_get_proc_address", vp, [vp, cp]),
            ("ggml_backend_reg_name", cp, [vp]),
            ("ggml_backend_register", None, [vp]),
            ("ggml_backend_dev_count", sz, []),
            ("ggml_backend_dev_get", vp, [sz]),
            ("ggml_backend_dev_by_name", vp, [cp]),
            ("ggml_backend_dev_name", cp, [vp]),
            ("ggml_backend_dev_description", cp, [vp]),
            ("ggml_backend_dev_type", ctypes.c_int, [vp]),
            ("ggml_backend_dev_backend_reg", vp, [vp]),
            ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _ggml = lib
    return _ggml


def rpc_available() -> bool:
    """Whether the installed llama.cpp has the RPC backend."""
    return bool(_lib().ggml_backend_reg_by_name(b"RPC"))


def _proc(name: str) -> int:
    lib = _lib()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RpcError(NO_RPC_MESSAGE)
    addr = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not addr:
        raise RpcError(f"this llama.cpp's RPC backend has no {name}")
    return int(addr)


@dataclass(frozen=True)
class LocalDevice:
    name: str
    description: str
    type: str
    backend: str
    memory_free: int
    memory_total: int

    @property
    def is_rpc(self) -> bool:
        return self.backend == "RPC"


def local_devices() -> list[LocalDevice]:
    """Every device in ggml's registry of this process (RPC devices once attached)."""
    lib = _lib()
    found = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = lib.ggml_backend_dev_backend_reg(dev)
        found.append(
            LocalDevice(
                name=(lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                description=(lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                type=DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                backend=(lib.ggml_backend_reg_name(reg) or b"").decode() if reg else "",
                memory_free=int(free.value),
                memory_total=int(total.value),
            )
        )
    return found


def vision_device() -> str | None:
    """The device for vision encoders while RPC workers are attached: mtmd takes the first
    GPU-type device and RPC devices are GPU-type, so without a local GPU pin the CPU; with
    one, leave the choice to the engine (local GPUs are registered before any RPC device)."""
    local_gpu = any(d.type in ("GPU", "iGPU") and not d.is_rpc for d in local_devices())
    return None if local_gpu else "cpu"


_ABORT_CB_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_abort_cb: Any = None


def _on_ggml_abort(message: bytes | None) -> None:
    """ggml's abort hook: one clear line instead of a gdb backtrace; the process still ends
    (ggml calls abort() right after: a dead worker cannot be recovered from in-process)."""
    try:
        text = (message or b"").decode("utf-8", errors="replace").strip()
        where = ", ".join(_attached) or "?"
        if "RPC" in text or "rpc" in text:
            line = (
                f"Error: lost an RPC worker ({where}) during a computation: the reply is lost "
                f"and llama.cpp ends this process. Restart the worker and run again. "
                f"[ggml: {text.rsplit(': ', 1)[-1]}]\n"
            )
        else:
            line = f"Error: llama.cpp aborted: {text}\n"
        os.write(2, line.encode("utf-8", errors="replace"))
    except Exception:  # a ctypes callback must never raise
        pass


def _install_abort_hook() -> None:
    """Route ggml's aborts (in the libggml-base libllama uses) through ``_on_ggml_abort``."""
    global _abort_cb
    if _abort_cb is not None:
        return
    import llama_cpp.llama_cpp as C

    try:
        setter = C._lib.ggml_set_abort_callback
    except AttributeError:
        return
    setter.restype = ctypes.c_void_p
    setter.argtypes = [_ABORT_CB_TYPE]
    _abort_cb = _ABORT_CB_TYPE(_on_ggml_abort)  # kept alive for the life of the process
    setter(_abort_cb)


def attached() -> list[WorkerInfo]:
    with _lock:
        return list(_attached.values())


def attach(endpoints: list[Endpoint], timeout: float = PROBE_TIMEOUT_S) -> list[WorkerInfo]:
    """Probe every worker, then register them all with ggml (for every model loaded after
    this in this process). Nothing is registered unless every worker answered."""
    if not endpoints:
        return []
    if not rpc_available():
        raise RpcError(NO_RPC_MESSAGE)
    with _lock:
        new = [ep for ep in endpoints if str(ep) not in _attached]
        # probe all first: one bad worker registers none (ggml cannot unregister)
        infos = [probe(ep, timeout) for ep in new]
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
            _proc("ggml_backend_rpc_add_server")
        )
        lib = _lib()
        _install_abort_hook()
        for ep, info in zip(new, infos, strict=True):
            reg = add_server(str(ep).encode())
            if not reg:
                raise RpcError(f"RPC worker {ep}: llama.cpp could not add it (no devices)")
            lib.ggml_backend_register(reg)
            _attached[str(ep)] = info
        return [_attached[str(ep)] for ep in endpoints]


def start_server(
    endpoint: str, *, devices: list[str], n_threads: int, cache_dir: str | None
) -> None:
    """Run ggml's RPC server in this process; returns only if it could not start (the
    caller runs it in a child process: the call blocks in accept())."""
    lib = _lib()
    handles = []
    for name in devices:
        dev = lib.ggml_backend_dev_by_name(name.encode())
        if not dev:
            raise RpcError(f"no ggml device named {name!r}")
        handles.append(dev)
    arr = (ctypes.c_void_p * len(handles))(*handles)
    fn = ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p
    )(_proc("ggml_backend_rpc_start_server"))
    fn(
        endpoint.encode(),
        cache_dir.encode() if cache_dir else None,
        n_threads,
        len(handles),
        ctypes.cast(arr, ctypes.c_void_p),
    )
