"""Hostile pickles for the checkpoint-safety tests, written opcode by opcode.

Each builds a torch zip whose data.pkl, if a full unpickler ran it, would call
`posix.system("touch <marker>")`. SPELLINGS are the ways of naming that global (a plain GLOBAL,
names stored in the memo and fetched back before STACK_GLOBAL, names as SHORT_BINSTRING /
BINSTRING: what a string scan of the pickle missed); SHAPES the places the call sits (the top
level, the argument of an allowed class's REDUCE, the state of an allowed object's BUILD, a
tensor's storage record). Used by tests/unit/test_checkpoint_safety.py and
tests/integration/test_hostile_checkpoint.py.
"""

import pickle
import struct
import zipfile
from pathlib import Path

import torch

P = pickle  # the opcode constants (pickle.GLOBAL, pickle.STACK_GLOBAL, ...)


def unicode(text: str) -> bytes:
    data = text.encode()
    return P.BINUNICODE + struct.pack("<I", len(data)) + data


def short_binstring(text: str) -> bytes:
    data = text.encode()
    return P.SHORT_BINSTRING + bytes([len(data)]) + data


def binstring(text: str) -> bytes:
    data = text.encode()
    return P.BINSTRING + struct.pack("<i", len(data)) + data


def global_op(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


# How `posix.system` gets onto the stack, after a decoy value: the pair of strings that a scanner
# pairing STACK_GLOBAL with "the last two strings pushed" takes for the global's name.
SPELLINGS = {
    "global": lambda: P.EMPTY_TUPLE + global_op("posix", "system"),
    "memo": lambda: (
        P.MARK
        + unicode("posix")
        + P.BINPUT
        + bytes([1])
        + unicode("system")
        + P.LONG_BINPUT
        + struct.pack("<I", 2)
        + unicode("collections")
        + unicode("OrderedDict")
        + P.TUPLE
        + P.LONG_BINGET
        + struct.pack("<I", 1)
        + P.LONG_BINGET
        + struct.pack("<I", 2)
        + P.STACK_GLOBAL
    ),
    "short_binstring": lambda: (
        (P.MARK + unicode("torch") + unicode("Size") + P.TUPLE + short_binstring("posix") + short_binstring("system"))
        + P.STACK_GLOBAL
    ),
    "binstring": lambda: (
        (P.MARK + unicode("torch") + unicode("Size") + P.TUPLE + binstring("posix") + binstring("system"))
        + P.STACK_GLOBAL
    ),
}


def call(spelling: str, marker: Path) -> bytes:
    """Ops that leave (decoy, posix.system(f"touch {marker}")) on the stack."""
    return SPELLINGS[spelling]() + unicode(f"touch {marker}") + P.TUPLE1 + P.REDUCE + P.TUPLE2


def top_level(evil: bytes) -> bytes:
    return P.EMPTY_DICT + unicode("x") + evil + P.SETITEM


def reduce_of_allowed_class(evil: bytes) -> bytes:
    # LossScaler(scale=<the call>): the class is allowlisted, its argument is not.
    scaler = global_op("deepspeed.runtime.fp16.loss_scaler", "LossScaler") + evil + P.TUPLE1 + P.REDUCE
    return P.EMPTY_DICT + unicode("scaler") + scaler + P.SETITEM


def build_of_allowed_object(evil: bytes) -> bytes:
    # An allowlisted object (as DeepSpeed's own files hold it) whose BUILD state holds the call.
    scaler = global_op("deepspeed.runtime.fp16.loss_scaler", "LossScaler") + P.EMPTY_TUPLE + P.NEWOBJ
    state = P.EMPTY_DICT + unicode("cur_scale") + evil + P.SETITEM
    return P.EMPTY_DICT + unicode("scaler") + scaler + state + P.BUILD + P.SETITEM


def tensor_storage(evil: bytes) -> bytes:
    # torch._utils._rebuild_tensor_v2(storage, 0, (2,), (1,), False, OrderedDict()) with the call in
    # the storage record (as its location) that the persistent load reads.
    storage = (
        P.MARK + unicode("storage") + global_op("torch", "FloatStorage") + unicode("0") + evil + P.BININT1 + bytes([2])
    )
    storage += P.TUPLE + P.BINPERSID
    args = storage + P.BININT1 + bytes([0]) + P.BININT1 + bytes([2]) + P.TUPLE1 + P.BININT1 + bytes([1]) + P.TUPLE1
    args += P.NEWFALSE + global_op("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE
    tensor = global_op("torch._utils", "_rebuild_tensor_v2") + P.MARK + args + P.TUPLE + P.REDUCE
    return P.EMPTY_DICT + unicode("w") + tensor + P.SETITEM


SHAPES = {
    "top_level": top_level,
    "reduce_of_allowed_class": reduce_of_allowed_class,
    "build_of_allowed_object": build_of_allowed_object,
    "tensor_storage": tensor_storage,
}


def replace_pickle(path: Path, data_pkl: bytes) -> Path:
    """Rewrite the torch.save zip file `path` with `data_pkl` as its pickle (data.pkl)."""
    with zipfile.ZipFile(path) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    assert any(name.endswith("/data.pkl") for name, _ in entries), f"{path}: not a torch zip file"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for name, data in entries:
            target.writestr(name, data_pkl if name.endswith("/data.pkl") else data)
    return path


def hostile_pickle(spelling: str, shape: str, marker: Path) -> bytes:
    """A whole data.pkl that runs `touch marker` if fully unpickled."""
    return P.PROTO + bytes([2]) + SHAPES[shape](call(spelling, marker)) + P.STOP


def write_with_pickle(path: Path, data_pkl: bytes) -> Path:
    """A torch.save zip file (one float tensor under key '0') whose data.pkl is `data_pkl`."""
    torch.save({"w": torch.zeros(2)}, path)
    return replace_pickle(path, data_pkl)


def hostile_file(directory: Path, spelling: str, shape: str) -> tuple[Path, Path]:
    """-> (file, marker): `file` creates `marker` if fully unpickled."""
    marker = directory / f"ran-{spelling}-{shape}"
    directory.mkdir(parents=True, exist_ok=True)
    path = write_with_pickle(directory / "mp_rank_00_model_states.pt", hostile_pickle(spelling, shape, marker))
    return path, marker
