"""Typed payloads <-> Flower records: the one module besides the apps that imports ``flwr``.

Every payload crossing the network is a frozen dataclass of the domain code (ComBat's
``DesignMoments``, the GLM's ``LogisticTerms``...). :func:`to_record` packs one into a
``RecordDict``: its arrays in an ``ArrayRecord``, its scalars in a ``ConfigRecord`` with the
payload's type name and this module's schema version. :func:`from_record` unpacks it on receipt
and checks what arrived before any code uses it: the type, every field present, arrays numeric
and finite, and, where the caller says, their shapes. A malformed reply is a
:class:`PayloadError` naming the field and the reason (and the sender, when given), never a
crash deep in the maths.

A payload a site sends also declares, in data-independent terms, the size of each axis of its
arrays and string tuples (``AXES``: field -> axis names such as ``"features"`` or ``"fits"``) and
the counts that must be 0 or at least a protocol minimum (``COUNTS``: field -> the minimum's
name). :func:`check_sent` holds a packed payload to its declaration: the site's privacy guard
(:mod:`client.guard`) runs it on every reply before it leaves.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.errors import MyeloFedError
from common.messages import StudyConfig

SCHEMA_VERSION = 1
T = TypeVar("T")


class PayloadError(MyeloFedError):
    """A message's content is not the payload it claims to be."""


def to_record(payload: Any, prefix: str = "") -> RecordDict:
    """Pack a payload dataclass (fields: numpy arrays, numbers, strings, tuples of strings,
    None) into records."""
    if not dataclasses.is_dataclass(payload) or isinstance(payload, type):
        raise TypeError(f"not a payload dataclass: {type(payload).__name__}")
    arrays: dict[str, Array] = {}
    meta: dict[str, Any] = {"payload": type(payload).__name__, "schema": SCHEMA_VERSION,
                            "none": []}
    for item in dataclasses.fields(payload):
        value = getattr(payload, item.name)
        if isinstance(value, np.ndarray):
            arrays[item.name] = Array(np.ascontiguousarray(value))
        elif value is None:
            meta["none"].append(item.name)
        elif isinstance(value, (bool, int, float, str)):
            meta[f"f.{item.name}"] = value
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            meta[f"t.{item.name}"] = list(value)
        elif isinstance(value, np.integer | np.floating):
            meta[f"f.{item.name}"] = value.item()
        else:
            raise TypeError(f"{type(payload).__name__}.{item.name}: cannot send a "
                            f"{type(value).__name__}")
    return RecordDict({f"{prefix}arrays": ArrayRecord(array_dict=arrays),
                       f"{prefix}meta": ConfigRecord(meta)})


def pack(**payloads: Any) -> RecordDict:
    """Several payloads in one message, each under its own name."""
    out = RecordDict({})
    for name, payload in payloads.items():
        for key, record in to_record(payload, prefix=f"{name}.").items():
            out[key] = record
    return out


def from_record(content: RecordDict, cls: type[T], shapes: Mapping[str, tuple[int, ...]] | None
                = None, sender: str = "a site", prefix: str = "") -> T:
    """Unpack and check a payload of type ``cls``.

    ``shapes`` maps array fields to their expected shapes (``-1`` = any length on that axis).
    """
    def fail(reason: str) -> PayloadError:
        return PayloadError(f"{cls.__name__} from {sender}: {reason}")

    meta, arrays = _records(content, prefix, fail)
    if meta.get("payload") != cls.__name__:
        raise fail(f"payload type is {meta.get('payload')!r}")
    if meta.get("schema") != SCHEMA_VERSION:
        raise fail(f"schema version {meta.get('schema')!r}, expected {SCHEMA_VERSION}")
    try:
        hints: dict[str, Any] = typing.get_type_hints(cls)
    except NameError:  # annotations naming modules imported for type checking only
        hints = dict(getattr(cls, "__annotations__", {}))
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = item.name
        if name in arrays:
            value = arrays[name].numpy()
            if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
                raise fail(f"'{name}' is not numeric ({value.dtype})")
            if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                raise fail(f"'{name}' holds NaN or infinite values")
            expected = (shapes or {}).get(name)
            if expected is not None and (len(expected) != value.ndim or any(
                    e not in (-1, v) for e, v in zip(expected, value.shape, strict=True))):
                raise fail(f"'{name}' has shape {value.shape}, expected {expected}")
            values[name] = value
        elif name in meta.get("none", []):
            values[name] = None
        elif f"f.{name}" in meta:
            values[name] = meta[f"f.{name}"]
            if hints.get(name) in (float, "float") and isinstance(values[name], int):
                values[name] = float(values[name])
        elif f"t.{name}" in meta:
            values[name] = tuple(str(v) for v in meta[f"t.{name}"])
        elif item.default is not dataclasses.MISSING:
            continue
        else:
            raise fail(f"field '{name}' is missing")
    try:
        return cls(**values)
    except (TypeError, ValueError, MyeloFedError) as exc:
        raise fail(str(exc)) from None


def _records(content: RecordDict, prefix: str, fail: Callable[[str], PayloadError]
             ) -> tuple[dict[str, Any], ArrayRecord]:
    """A packed payload's scalars (its ConfigRecord, as a dict) and arrays."""
    try:
        meta, arrays = dict(content[f"{prefix}meta"]), content[f"{prefix}arrays"]
    except (KeyError, TypeError):
        raise fail(f"no '{prefix}meta' and '{prefix}arrays' records") from None
    if not isinstance(arrays, ArrayRecord):  # a reply may hold any record under any name
        raise fail(f"'{prefix}arrays' is a {type(arrays).__name__}, not an ArrayRecord")
    return meta, arrays


def unpack(content: RecordDict, name: str, cls: type[T],
           shapes: Mapping[str, tuple[int, ...]] | None = None, sender: str = "a site") -> T:
    """The payload packed under ``name`` by :func:`pack`, checked as :func:`from_record` does."""
    return from_record(content, cls, shapes, sender, prefix=f"{name}.")


#: The sizes an axis may have: one size, or a collection (e.g. a ``range``) of them.
Size = int | Collection[int]


def _fits(size: Size, value: int) -> bool:
    return value == size if isinstance(size, int) else value in size


def check_sent(content: RecordDict, cls: type[T], sizes: Mapping[str, Size],
               minimums: Mapping[str, int], prefix: str = "", sender: str = "this site") -> T:
    """Hold a packed payload to its class's declaration before it leaves a site.

    Refused, with the field and the reason: any record entry that is not a field of ``cls``;
    a scalar field that holds a list; an array or string-tuple field that ``cls.AXES`` does not
    declare; an axis whose size is not what ``sizes`` allows for its name (the caller resolves
    the names from the request and the protocol, never from the site's patient counts), or that
    has another size in another field (a field cannot pass per-patient values off as per-scanner
    ones beside a per-scanner field); a
    ``cls.COUNTS`` field with a value from 1 to its minimum - 1; and whatever
    :func:`from_record` refuses.
    """
    axes: Mapping[str, tuple[str, ...]] = getattr(cls, "AXES", {})
    counts: Mapping[str, str] = getattr(cls, "COUNTS", {})

    def fail(reason: str) -> PayloadError:
        return PayloadError(f"{cls.__name__} from {sender}: {reason}")

    names = [item.name for item in dataclasses.fields(cls)]  # type: ignore[arg-type]
    meta, arrays = _records(content, prefix, fail)
    known = {"payload", "schema", "none"} | {f"{kind}.{n}" for n in names for kind in "ft"}
    unknown = ([k for k in meta if k not in known] + [k for k in arrays if k not in names]
               + [str(k) for k in meta.get("none", []) if k not in names])
    if unknown:
        raise fail(f"'{unknown[0]}' is not a field of the payload")
    listed = [k for k, v in meta.items() if k.startswith("f.") and isinstance(v, list)]
    if listed:
        raise fail(f"'{listed[0][2:]}' holds a list, not one value")
    shapes: dict[str, tuple[int, ...]] = {}
    seen: dict[str, tuple[str, int]] = {}  # axis -> (the first field it sized, its size)
    for name in names:
        if name in arrays:
            shapes[name] = tuple(arrays[name].shape)
        elif f"t.{name}" in meta:
            shapes[name] = (len(meta[f"t.{name}"]),)
        else:
            continue
        if name not in axes:
            raise fail(f"'{name}' declares no axes: it cannot leave the site")
        declared = axes[name]
        for axis in declared:
            if axis not in sizes:
                raise fail(f"axis '{axis}' of '{name}' has no size for this message")
        if len(shapes[name]) != len(declared) or not all(
                _fits(sizes[a], n) for a, n in zip(declared, shapes[name], strict=True)):
            allowed = ", ".join(f"{a}={_shown(sizes[a])}" for a in declared)
            raise fail(f"'{name}' has shape {shapes[name]}, its declaration allows ({allowed})")
        for axis, n in zip(declared, shapes[name], strict=True):
            first, size = seen.setdefault(axis, (name, n))
            if size != n:
                raise fail(f"'{name}' has {n} along axis '{axis}', '{first}' has {size}: one "
                           "axis has one size in a payload")
    payload = from_record(content, cls, sender=sender, prefix=prefix)
    for name, minimum_name in counts.items():
        minimum = minimums[minimum_name]
        value = getattr(payload, name)
        values = np.atleast_1d(np.asarray(_counts_in(value, name, fail) if isinstance(value, str)
                                          else value))
        small = values[(values > 0) & (values < minimum)]
        if small.size:
            raise fail(f"'{name}' counts {small[0]:g}, fewer than {minimum_name} = {minimum} "
                       "(and more than 0)")
        if np.any(values < SUPPRESSED_COUNT):
            raise fail(f"'{name}' holds a negative count other than {SUPPRESSED_COUNT} "
                       "(suppressed)")
    return payload


#: How a count under the minimum leaves a site (``common.payloads.SUPPRESSED``).
SUPPRESSED_COUNT = -1


def _counts_in(text: str, name: str, fail: Callable[[str], PayloadError]) -> list[int]:
    """The counts of a ``"name:count,..."`` string, or a refusal: a count field holds nothing
    else."""
    out = []
    for part in filter(None, text.split(",")):
        _, colon, count = part.rpartition(":")
        if not colon or not count.lstrip("-").isdigit():
            raise fail(f"'{name}' must be name:count pairs, not {part[:40]!r}")
        out.append(int(count))
    return out


def _shown(size: Size) -> str:
    if isinstance(size, int):
        return str(size)
    if isinstance(size, range) and size.step == 1:
        return f"{size.start}..{size.stop - 1}"
    return "{" + ",".join(str(n) for n in sorted(size)) + "}"


def pack_request(request: Any) -> RecordDict:
    """A typed request (:mod:`common.messages`) as Flower's records: its study settings under
    ``study``, each payload under its field's name, each payload of a tuple field under the
    name and its index (``model0``, ``model1``...); absent (None) payloads left out."""
    payloads: dict[str, Any] = {}
    settings: dict[str, StudyConfig] = {}
    for item in dataclasses.fields(request):
        value = getattr(request, item.name)
        if isinstance(value, StudyConfig):
            settings[item.name] = value
        elif isinstance(value, tuple):
            payloads |= {f"{item.name}{i}": payload for i, payload in enumerate(value)}
        elif value is not None:
            payloads[item.name] = value
    out = pack(**payloads)
    for name, config in settings.items():
        out[name] = ConfigRecord(config.to_mapping())
    return out


def unpack_request(content: RecordDict, cls: type[T], sender: str = "the server") -> T:
    """The typed request ``cls`` packed by :func:`pack_request`, every payload checked as
    :func:`from_record` does; a :class:`PayloadError` names what is malformed."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[item.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is StudyConfig:
            if item.name not in content:
                raise PayloadError(f"{cls.__name__} from {sender}: no '{item.name}' record")
            values[item.name] = StudyConfig.from_mapping(dict(content[item.name]))
        elif typing.get_origin(kind) is tuple:
            found: list[Any] = []
            while f"{item.name}{len(found)}.meta" in content:
                found.append(from_record(content, args[0], sender=sender,
                                         prefix=f"{item.name}{len(found)}."))
            values[item.name] = tuple(found)
        elif f"{item.name}.meta" in content:
            values[item.name] = from_record(content, args[0] if args else kind, sender=sender,
                                            prefix=f"{item.name}.")
        elif item.default is dataclasses.MISSING:
            raise PayloadError(f"{cls.__name__} from {sender}: no '{item.name}' payload")
    return cls(**values)


def pack_weights(arrays: Mapping[str, np.ndarray], study: StudyConfig) -> RecordDict:
    """A CNN message: the global weights (``arrays``, by name) and the study settings."""
    return RecordDict({"arrays": ArrayRecord({k: Array(np.require(v, requirements="C"))
                                              for k, v in arrays.items()}),
                       "study": ConfigRecord(study.to_mapping())})
