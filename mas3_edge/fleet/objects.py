"""What a fleet shares, and how a robot decides to believe it.

A set object is one normalisation set of the bank (every layer's mean, var, weight and bias, the
router's first: its mean and var are the router key) as safetensors, with a JSON header in the
file's metadata: the lineage it belongs to, the round's health and gate figures, the camera, the
robot and the time. It is addressed by the sha256 of its bytes. A manifest entry (JSON) names an
object by that digest and size, carries the set's router key (a few hundred bytes: a robot tells
from the entry alone whether its frames would route to the set) and is signed with the
publisher's Ed25519 key; the signature covers the digest and the key, so it binds the object's
bytes too, and the object's router must be the entry's key.

Verification never raises anything but `Refused` (and `Incomplete`, for an object that may still
be arriving): one line each, and nothing is loaded.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import UserError

FORMAT = "mas3-edge-fleet/1"
MAX_OBJECT_BYTES = 8 << 20  # a set of the small model is tens of KB: anything near this is not a set
MAX_ENTRY_BYTES = 64 << 10
HEADER_KEY = "mas3-fleet"


class Refused(Exception):
    """A set that must never be loaded (nor fetched again): the message says why, in one line."""


class Incomplete(Exception):
    """An object shorter than its manifest says, or a manifest that does not parse: it may still be
    arriving (a shared mount, a writer that wrote the manifest first), so it is tried again later."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Lineage:
    """What a set fits: the source model's weights, the label set and the prototypes."""

    source_sha256: str
    label_set: str
    prototypes_sha256: str

    @property
    def id(self) -> str:
        return sha256(json.dumps(asdict(self), sort_keys=True).encode())[:16]

    @classmethod
    def of_version(cls, vdir: Path) -> Lineage:
        from .. import bundle as bundles  # torch: only when a version is read
        meta = bundles.read_meta(vdir)
        proto = Path(vdir) / bundles.PROTO_FILE
        proto_hash = bundles.sha256_file(proto) if proto.is_file() else ""
        return cls(meta["source_sha256"], bundles.version_labels(meta).id, proto_hash)


# ---------------------------------------------------------------- the object


def encode_set(rows: dict[str, np.ndarray], header: dict) -> bytes:
    """Safetensors bytes of one set (`rows`: layer name -> (4, C), the router first)."""
    import safetensors.numpy
    header = {**header, "format": FORMAT, "layers": list(rows)}
    tensors = {f"norm/{name}": np.ascontiguousarray(r, dtype=np.float32) for name, r in rows.items()}
    return safetensors.numpy.save(tensors, metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})


def decode_set(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, rows in the header's layer order) of an object's bytes; Refused when malformed."""
    import safetensors.numpy
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        header = json.loads(meta[HEADER_KEY])
        tensors = safetensors.numpy.load(data)
        rows = {name: tensors[f"norm/{name}"] for name in header["layers"]}
    except Exception as e:  # safetensors and json raise several types for bad bytes
        raise Refused(f"not a set object ({type(e).__name__})") from None
    if header.get("format") != FORMAT or len(rows) != len(tensors) or not rows:
        raise Refused(f"not a set object of format {FORMAT}")
    if any(r.ndim != 2 or r.shape[0] != 4 for r in rows.values()):
        raise Refused("a layer of the set is not (4, C)")
    return header, rows


# ---------------------------------------------------------------- keys and trust


def keygen(name: str, folder: Path) -> tuple[Path, Path]:
    """Write NAME.key (private, PEM, mode 0600) and NAME.pub (the trust file's line) in `folder`."""
    from ..fsutil import atomic_write
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"robot name {name!r} must be letters, digits, - and _")
    key_path, pub_path = folder / f"{name}.key", folder / f"{name}.pub"
    if key_path.exists():
        raise UserError(f"{key_path} exists; remove it first or pick another name (a key is never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(key_path, pem)
    os.chmod(key_path, 0o600)
    atomic_write(pub_path, f"{name} {public_hex(key)}\n")
    return key_path, pub_path


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_key(path: Path) -> tuple[str, Ed25519PrivateKey]:
    """(robot name: the file's stem, its private key); UserError naming the file otherwise."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise UserError(f"cannot read the fleet key {path}: {e.strerror or e}; make one with "
                        "`mas3-edge fleet keygen NAME`") from None
    except (ValueError, TypeError):
        raise UserError(f"{path} is not an unencrypted PEM private key; make one with `mas3-edge fleet keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path} is not an Ed25519 key; make one with `mas3-edge fleet keygen`")
    return Path(path).stem, key


def load_trust(path: Path) -> dict[str, str]:
    """Public key (hex) -> robot name, from lines `NAME HEX` (the .pub files, concatenated; # comments)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the trust file {path}: {getattr(e, 'strerror', None) or e}") from None
    trust = {}
    for i, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or not _is_public_hex(words[1]):
            raise UserError(f"{path}:{i}: expected `NAME HEX` (a .pub file's line), got {line.strip()[:60]!r}")
        trust[words[1].lower()] = words[0]
    if not trust:
        raise UserError(f"the trust file {path} names no key; add the .pub lines of the robots to accept")
    return trust


def _is_public_hex(word: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(word))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- manifest entries


def _canonical(entry: dict) -> bytes:
    return json.dumps({k: v for k, v in entry.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def router_key(rows: dict[str, np.ndarray]) -> dict:
    """The entry's form of a set's router key: its first layer's mean and var, float32 little-endian
    in base64 (exact, so the object's own key can be checked against it)."""
    router = next(iter(rows.values()))[:2].astype("<f4")
    return {"mean": base64.b64encode(router[0].tobytes()).decode(), "var": base64.b64encode(router[1].tobytes()).decode()}


def entry_router(entry: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, var) of an entry's router key; None for an entry made before entries carried one.
    Refused when the key is there but malformed, not finite, or has a variance <= 0."""
    key = entry.get("router")
    if key is None:
        return None
    try:
        mean, var = (np.frombuffer(base64.b64decode(key[k], validate=True), "<f4") for k in ("mean", "var"))
    except (ValueError, TypeError, KeyError):
        raise Refused("the entry's router key does not decode") from None
    if mean.shape != var.shape or not mean.size:
        raise Refused("the entry's router key has a mean and a var of different lengths")
    if not (np.isfinite(mean).all() and np.isfinite(var).all()) or (var <= 0).any():
        raise Refused("the set's router key is not finite (NaN or inf) or has a variance <= 0")
    return mean, var


def make_entry(obj: bytes, header: dict, robot: str, key: Ed25519PrivateKey, router: dict | None = None) -> dict:
    """The signed manifest entry that names `obj` (with `router`, router_key of its rows)."""
    entry = {"format": FORMAT, "object": sha256(obj), "size": len(obj), "lineage": header["lineage_id"],
             "robot": robot, "camera_id": header.get("camera_id"), "created": header.get("created", time.time()),
             "round": header.get("round", {}), "signer": public_hex(key)}
    if router is not None:
        entry["router"] = router
    return {**entry, "signature": key.sign(_canonical(entry)).hex()}


def verify_entry(data: bytes, trust: dict[str, str], lineage_id: str) -> dict:
    """The entry, with `robot` the trust file's name for its signer; Refused or Incomplete otherwise."""
    if len(data) > MAX_ENTRY_BYTES:
        raise Refused(f"oversized manifest entry ({len(data)} bytes, at most {MAX_ENTRY_BYTES})")
    try:
        entry = json.loads(data)
        signer, signature = entry["signer"], bytes.fromhex(entry["signature"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise Incomplete("manifest entry does not parse (half-written?)") from None
    if not isinstance(signer, str) or signer.lower() not in trust:
        raise Refused(f"unknown signer {str(signer)[:16]}... (not in the trust file)")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer)).verify(signature, _canonical(entry))
    except (InvalidSignature, ValueError):
        raise Refused(f"tampered manifest entry: the signature of {trust[signer.lower()]} does not verify") from None
    if entry.get("lineage") != lineage_id:
        raise Refused(f"wrong lineage {entry.get('lineage')} (this robot's is {lineage_id})")
    if not isinstance(entry.get("size"), int) or not 0 < entry["size"] <= MAX_OBJECT_BYTES:
        raise Refused(f"oversized object ({entry.get('size')} bytes, at most {MAX_OBJECT_BYTES})")
    entry_router(entry)  # a malformed or NaN key: refused before anything is fetched
    return {**entry, "robot": trust[signer.lower()]}


def verify_object(data: bytes, entry: dict, lineage: Lineage) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, rows) of an object its verified entry names; Refused or Incomplete otherwise."""
    if len(data) > entry["size"]:
        raise Refused(f"oversized object ({len(data)} bytes or more, the signed size is {entry['size']})")
    if len(data) < entry["size"]:
        raise Incomplete(f"truncated object ({len(data)} of {entry['size']} bytes)")
    if sha256(data) != entry["object"]:
        raise Refused("tampered object: its sha256 is not the signed one")
    header, rows = decode_set(data)
    if header.get("lineage") != asdict(lineage):
        raise Refused(f"wrong lineage in the object (made for {header.get('lineage_id')}, this robot is {lineage.id})")
    router = next(iter(rows.values()))[:2]
    if not np.isfinite(router).all():
        raise Refused("the set's router key is not finite (NaN or inf)")
    if entry.get("router") is not None and entry["router"] != router_key(rows):
        raise Refused("the object's router key is not the one its entry signs")
    if not all(np.isfinite(r).all() for r in rows.values()) or (router[1] <= 0).any():
        raise Refused("the set holds non-finite values or a non-positive variance")
    return header, rows
