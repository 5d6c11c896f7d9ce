"""Reading published pickles without running them: an allow-listed pickle machine with lazy arrays.

Published feature sets ship as pickles (TA3N's and C5's feature files, LFB's Python-2 noun bank).
Python's own unpickler imports and calls whatever a file names; this one interprets the opcodes
itself and knows a handful of constructors (numpy arrays, dtypes and scalars, ``OrderedDict``,
``_codecs.encode`` as Python 3 writes bytes under protocol 2). Anything else a file names is
refused before any of it is used: nothing in a pickle runs.

Large byte strings (array data) are not read: they become `LazyArray` objects that remember where
their bytes lie in the file and read them, or one row of them, on demand. So a pickle larger than
memory can be walked, and its arrays read piece by piece. Python-2 ``str`` (LFB's bank) reads as
latin-1 text, as ``pickle.load(f, encoding="latin1")`` would; as array data it is the raw bytes.
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from featstore.store.importer import ImportFailure

__all__ = ["LAZY_FROM", "LazyArray", "PickleFile", "PickleRefused", "load_pickle", "materialize"]

LAZY_FROM = 1 << 12  # byte strings at least this long stay in the file (array data), read when asked


class PickleRefused(ImportFailure):
    """A pickle names something other than plain data (a class, a function): it is not read at all."""


class _SourceFile:
    """One open file whose lazy arrays read from it with ``pread`` (no shared file position)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def pread(self, size: int, offset: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise ImportFailure(f"{self.path}: cut short ({len(data)} of {size} bytes at offset {offset})")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LazyArray:
    """An array whose bytes stay in the pickle until read.

    Attributes:
        shape, dtype: as the pickle gives them.
        fortran: the data is in Fortran order.
    """

    __slots__ = ("file", "offset", "shape", "dtype", "fortran")

    def __init__(self, file: _SourceFile, offset: int, shape: tuple[int, ...], dtype: np.dtype, fortran: bool) -> None:
        self.file, self.offset, self.shape, self.dtype, self.fortran = file, offset, shape, dtype, fortran

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def read(self) -> np.ndarray:
        """The whole array."""
        raw = self.file.pread(self.nbytes, self.offset)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape, order="F" if self.fortran else "C")

    def __getitem__(self, index: int) -> np.ndarray:
        """Row ``index`` (first axis), reading only its bytes when the array is in C order."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} of an array of {n} rows")
        index %= n
        if self.fortran:
            return self.read()[index]
        row_bytes = self.nbytes // n
        raw = self.file.pread(row_bytes, self.offset + index * row_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape[1:])

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype}, offset={self.offset})"


def materialize(value: Any) -> Any:
    """``value`` with every `LazyArray` in it read (containers copied)."""
    if isinstance(value, LazyArray):
        return value.read()
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v) for v in value]
    if isinstance(value, tuple):
        return tuple(materialize(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------------
# What a pickle may name. Each maker takes the REDUCE arguments; builders finish at BUILD.


class _LazyBytes:
    __slots__ = ("offset", "length", "latin1")

    def __init__(self, offset: int, length: int, latin1: bool) -> None:
        self.offset, self.length, self.latin1 = offset, length, latin1


class _Marker:
    """A named global that is only ever an argument (``numpy.ndarray`` in ``_reconstruct``)."""

    def __init__(self, name: str) -> None:
        self.name = name


_NDARRAY = _Marker("numpy.ndarray")


class _DTypeBuilder:
    def __init__(self, descr: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(descr, str):
            raise PickleRefused(f"a numpy dtype described by {type(descr).__name__}")
        self.dtype = np.dtype(descr)

    def build(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2:
            raise PickleRefused(f"a numpy dtype with the unexpected state {state!r}")
        order = state[1]
        if len(state) >= 5 and (state[2] is not None or state[3] is not None or state[4] is not None):
            raise PickleRefused("a structured or sub-array numpy dtype (only plain number arrays are read)")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _ArrayBuilder:
    def __init__(self, reader: "_Machine") -> None:
        self.reader = reader
        self.value: Any = None

    def build(self, state: Any) -> None:
        # ndarray.__setstate__: (version, shape, dtype, is_fortran, rawdata); version absent in old files.
        if isinstance(state, tuple) and len(state) == 4:
            state = (1, *state)
        if not isinstance(state, tuple) or len(state) != 5:
            raise PickleRefused(f"a numpy array with the unexpected state of {len(state)} items")
        _, shape, dtype, fortran, raw = state
        self.value = self.reader.array(tuple(int(d) for d in shape), _finish(dtype), bool(fortran), raw)


def _finish(value: Any) -> Any:
    if isinstance(value, _DTypeBuilder):
        return value.dtype
    if isinstance(value, _ArrayBuilder):
        return value.value
    return value


def _plain_dtype(dtype: Any, *, objects: bool = False) -> np.dtype:
    """Number and fixed-width text dtypes; ``object`` only where the items are already plain data."""
    dtype = _finish(dtype)
    if not isinstance(dtype, np.dtype) or dtype.kind not in ("biufcUSO" if objects else "biufcUS"):
        raise PickleRefused(f"an array of dtype {dtype} (only arrays of numbers or text are read)")
    return dtype


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")


class _Machine:
    """The pickle machine: a stack, a memo, and only the opcodes plain data needs."""

    def __init__(self, handle: io.BufferedReader, file: _SourceFile, lazy_from: int) -> None:
        self.handle = handle
        self.file = file
        self.lazy_from = lazy_from
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.ops: dict[int, Callable[[], None]] = {
            0x80: lambda: self.read(1),  # PROTO
            0x95: lambda: self.read(8),  # FRAME: framing is transparent to the opcodes
            ord("("): lambda: self.marks.append(len(self.stack)),
            ord("0"): self.stack.pop,
            ord("1"): self.pop_mark,
            ord("2"): lambda: self.stack.append(self.stack[-1]),
            ord("N"): lambda: self.stack.append(None),
            0x88: lambda: self.stack.append(True),
            0x89: lambda: self.stack.append(False),
            ord("I"): self.text_int,
            ord("J"): lambda: self.stack.append(self.unpack("<i", 4)),
            ord("K"): lambda: self.stack.append(self.read(1)[0]),
            ord("M"): lambda: self.stack.append(self.unpack("<H", 2)),
            ord("L"): lambda: self.stack.append(int(self.line().rstrip("L"))),
            0x8A: lambda: self.stack.append(int.from_bytes(self.read(self.read(1)[0]), "little", signed=True)),
            0x8B: lambda: self.stack.append(int.from_bytes(self.read(self.unpack("<i", 4)), "little", signed=True)),
            ord("F"): lambda: self.stack.append(float(self.line())),
            ord("G"): lambda: self.stack.append(self.unpack(">d", 8)),
            ord("T"): lambda: self.push_bytes(self.unpack("<i", 4), latin1=True),
            ord("U"): lambda: self.push_bytes(self.read(1)[0], latin1=True),
            ord("B"): lambda: self.push_bytes(self.unpack("<I", 4)),
            ord("C"): lambda: self.push_bytes(self.read(1)[0]),
            0x8E: lambda: self.push_bytes(self.unpack("<Q", 8)),
            0x96: lambda: self.push_bytes(self.unpack("<Q", 8)),
            ord("X"): lambda: self.stack.append(self.read(self.unpack("<I", 4)).decode("utf-8", "surrogatepass")),
            0x8C: lambda: self.stack.append(self.read(self.read(1)[0]).decode("utf-8", "surrogatepass")),
            0x8D: lambda: self.stack.append(self.read(self.unpack("<Q", 8)).decode("utf-8", "surrogatepass")),
            ord("V"): lambda: self.stack.append(self.handle.readline()[:-1].decode("raw-unicode-escape")),
            ord(")"): lambda: self.stack.append(()),
            ord("t"): lambda: self.stack.append(tuple(self.pop_mark())),
            0x85: lambda: self.tuple_of(1),
            0x86: lambda: self.tuple_of(2),
            0x87: lambda: self.tuple_of(3),
            ord("]"): lambda: self.stack.append([]),
            ord("l"): lambda: self.stack.append(self.pop_mark()),
            ord("a"): self.append,
            ord("e"): self.appends,
            ord("}"): lambda: self.stack.append({}),
            ord("d"): self.dict_of_mark,
            ord("s"): self.setitem,
            ord("u"): self.setitems,
            0x8F: lambda: self.stack.append(set()),
            0x90: self.additems,
            0x91: lambda: self.stack.append(frozenset(self.pop_mark())),
            ord("p"): lambda: self.memo.__setitem__(int(self.line()), self.stack[-1]),
            ord("q"): lambda: self.memo.__setitem__(self.read(1)[0], self.stack[-1]),
            ord("r"): lambda: self.memo.__setitem__(self.unpack("<I", 4), self.stack[-1]),
            0x94: lambda: self.memo.__setitem__(len(self.memo), self.stack[-1]),
            ord("g"): lambda: self.stack.append(self.memo[int(self.line())]),
            ord("h"): lambda: self.stack.append(self.memo[self.read(1)[0]]),
            ord("j"): lambda: self.stack.append(self.memo[self.unpack("<I", 4)]),
            ord("c"): lambda: self.stack.append(self.global_(self.line(), self.line())),
            0x93: self.stack_global,
            ord("R"): self.reduce,
            ord("b"): self.build,
        }

    # ---------------------------------------------------------------- reading
    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise EOFError("the pickle ends in the middle of an opcode")
        return data

    def unpack(self, fmt: str, n: int) -> Any:
        return struct.unpack(fmt, self.read(n))[0]

    def line(self) -> str:
        raw = self.handle.readline()
        if not raw.endswith(b"\n"):
            raise EOFError("the pickle ends in the middle of an opcode")
        return raw[:-1].decode("latin1")

    def text_int(self) -> None:
        text = self.line()  # protocol 0 writes True and False as I01 and I00
        self.stack.append({"01": True, "00": False}[text] if text in ("00", "01") else int(text))

    def push_bytes(self, length: int, *, latin1: bool = False) -> None:
        if length < 0:
            raise PickleRefused("a byte string of negative length")
        if length >= self.lazy_from:
            offset = self.handle.tell()
            self.handle.seek(length, io.SEEK_CUR)
            self.stack.append(_LazyBytes(offset, length, latin1))
            return
        data = self.read(length)
        self.stack.append(data.decode("latin1") if latin1 else data)

    # ---------------------------------------------------------------- containers
    def pop_mark(self) -> list[Any]:
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def tuple_of(self, n: int) -> None:
        items = tuple(self.stack[len(self.stack) - n:])
        del self.stack[len(self.stack) - n:]
        self.stack.append(items)

    def append(self) -> None:
        value = self.stack.pop()
        self.stack[-1].append(value)

    def appends(self) -> None:
        items = self.pop_mark()
        self.stack[-1].extend(items)

    def dict_of_mark(self) -> None:
        items = self.pop_mark()
        self.stack.append(dict(zip(items[::2], items[1::2])))

    def setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self.stack[-1][key] = value

    def setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def additems(self) -> None:
        items = self.pop_mark()
        self.stack[-1].update(items)

    # ---------------------------------------------------------------- globals
    def stack_global(self) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        self.stack.append(self.global_(module, name))

    def global_(self, module: str, name: str) -> Any:
        makers: dict[tuple[str, str], Any] = {
            **{(m, "_reconstruct"): self.reconstruct for m in _NUMPY_MODULES},
            **{(m, "scalar"): self.scalar for m in _NUMPY_MODULES},
            **{(m, "_frombuffer"): self.frombuffer for m in _NUMERIC_MODULES},
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): _DTypeBuilder,
            ("_codecs", "encode"): self.encode,
            ("collections", "OrderedDict"): self.ordered_dict,
        }
        found = makers.get((module, name))
        if found is None:
            raise PickleRefused(
                f"it names {module}.{name}; only numpy arrays, dicts, lists, strings and numbers are read, "
                "and nothing a pickle names is ever imported or run")
        return found

    def reduce(self) -> None:
        args = self.stack.pop()
        maker = self.stack.pop()
        if not callable(maker) or isinstance(maker, _Marker):
            raise PickleRefused(f"it calls {getattr(maker, 'name', type(maker).__name__)}")
        self.stack.append(maker(*args))

    def build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, (_ArrayBuilder, _DTypeBuilder)):
            raise PickleRefused(f"it sets the state of a {type(target).__name__}")
        target.build(state)

    # ---------------------------------------------------------------- the allowed constructors
    def reconstruct(self, cls: Any, shape: Any, typecode: Any) -> _ArrayBuilder:
        if cls is not _NDARRAY:
            raise PickleRefused("it rebuilds an ndarray subclass")
        return _ArrayBuilder(self)

    def array(self, shape: tuple[int, ...], dtype: Any, fortran: bool, raw: Any) -> Any:
        dtype = _plain_dtype(dtype, objects=isinstance(raw, list))
        if dtype.kind == "O":
            # An object array pickles its items themselves; this machine made them, so they are plain data.
            items = np.empty(len(raw), dtype=object)
            items[:] = [_resolve(item) for item in raw]
            return items.reshape(shape, order="F" if fortran else "C")
        if isinstance(raw, _LazyBytes):
            lazy = LazyArray(self.file, raw.offset, shape, dtype, fortran)
            if lazy.nbytes != raw.length:
                raise PickleRefused(f"an array of {lazy.nbytes} bytes stored in {raw.length}")
            return lazy
        data = self.bytes_of(raw)
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()

    def bytes_of(self, raw: Any) -> bytes:
        if isinstance(raw, _LazyBytes):
            return self.file.pread(raw.length, raw.offset)
        if isinstance(raw, str):
            return raw.encode("latin1")  # a Python-2 str read as latin-1 text: its bytes again
        if isinstance(raw, (bytes, bytearray)):
            return bytes(raw)
        raise PickleRefused(f"array data of type {type(raw).__name__}")

    def scalar(self, dtype: Any, raw: Any = None) -> Any:
        dtype = _plain_dtype(dtype)
        return np.frombuffer(self.bytes_of(raw), dtype=dtype)[0]

    def frombuffer(self, buffer: Any, dtype: Any, shape: Any, order: Any) -> Any:
        return self.array(tuple(int(d) for d in shape), dtype, order == "F", buffer)

    def encode(self, text: Any, encoding: str = "utf-8") -> Any:
        if isinstance(text, _LazyBytes) or encoding not in ("latin1", "latin-1"):
            raise PickleRefused(f"_codecs.encode with {encoding!r}")
        return text.encode("latin1")

    @staticmethod
    def ordered_dict(items: Any = ()) -> dict:
        return dict(items)

    # ---------------------------------------------------------------- the loop
    def run(self) -> Any:
        ops = self.ops
        read = self.handle.read
        while True:
            code = read(1)
            if not code:
                raise EOFError("the pickle ends without its STOP opcode")
            if code == b".":
                return _resolve(self.stack.pop())
            op = ops.get(code[0])
            if op is None:
                raise PickleRefused(f"opcode {code!r} is not one plain data needs")
            op()


def _resolve(value: Any) -> Any:
    """Builders replaced by what they built, everywhere in the tree (in place for lists and dicts)."""
    value = _finish(value)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list, tuple, _ArrayBuilder, _DTypeBuilder)):
                value[key] = _resolve(item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (dict, list, tuple, _ArrayBuilder, _DTypeBuilder)):
                value[i] = _resolve(item)
    elif isinstance(value, tuple):
        value = tuple(_resolve(item) for item in value)
    elif isinstance(value, _LazyBytes):
        raise PickleRefused("a large byte string outside any array")
    return value


class PickleFile:
    """A published pickle opened for reading; its `LazyArray` values read from it until `close`.

    Args:
        path: the pickle.
        lazy_from: byte strings at least this long (array data) stay in the file.
    Raises:
        PickleRefused: the pickle names anything but plain data (a class, a function), so nothing of
            it is used; or it is not a pickle of plain data at all.
    """

    def __init__(self, path: str | os.PathLike, *, lazy_from: int = LAZY_FROM) -> None:
        self.path = Path(path)
        self.file = _SourceFile(self.path)
        try:
            with open(self.path, "rb") as handle:
                self.value = _Machine(handle, self.file, lazy_from).run()
        except PickleRefused as err:
            self.file.close()
            raise PickleRefused(f"{self.path}: refused: {err}") from None
        except (EOFError, IndexError, KeyError, struct.error, ValueError, TypeError, UnicodeDecodeError) as err:
            self.file.close()
            raise PickleRefused(f"{self.path}: not a readable pickle of plain data ({type(err).__name__}: {err})") from None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "PickleFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_pickle(path: str | os.PathLike) -> Any:
    """A whole published pickle as plain data, every array read (small files; tests).

    Raises:
        PickleRefused: as `PickleFile`.
    """
    with PickleFile(path) as opened:
        return materialize(opened.value)


