"""Mutation fuzzing of every weight-file loader.

Valid seed files (an SD1.5, an SDXL and a "tiny" width-32 bank, SD1.5 and SDXL embeddings exported from them,
linear and plus style encoders, kohya and peft LoRAs) are mutated — truncated,
bit-flipped, their header length or JSON rewritten, NaN written into their data — and each result is fed to
its loader *and used* (every bank row read, the encoder run, the LoRA converted). The only acceptable
outcomes are a working object or a :class:`WeightsError`. Used by ``tests/test_weights_fuzz.py`` (a quick
run) and ``bench/fuzz_weights.py`` (the long one).
"""
from __future__ import annotations

import json
import random
import struct
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from productbg.weights.bank import CategoryBank
from productbg.weights.describe import describe_file
from productbg.weights.embedding import export_embedding, read_embedding
from productbg.weights.errors import WeightsError
from productbg.weights.lora import LoraModule, read_lora, to_kohya, to_peft
from productbg.weights.safefile import atomic_save
from weight_samples import example_bank, ip_adapter_file_dict, tiny_style_encoder
from productbg.weights.style_encoder import load_style_encoder
from productbg.backbones.targets import TargetModel

JSON_DTYPES = ["F16", "F32", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "Q4", "", None, 3]


@dataclass
class Seed:
    """A valid file and how to load and use it."""

    kind: str
    data: bytes
    use: Callable[[Path], Any]


@dataclass
class FuzzResult:
    """Outcome counts of a fuzz run.

    Attributes:
        cases: cases run.
        loaded: cases that produced a working object.
        rejected: cases that raised WeightsError.
        failures: (case number, kind, mutation, traceback) for anything else.
        slowest_s: longest single case.
        seconds: whole run.
    """

    cases: int = 0
    loaded: int = 0
    rejected: int = 0
    failures: list[tuple[int, str, str, str]] = field(default_factory=list)
    slowest_s: float = 0.0
    seconds: float = 0.0
    by_mutation: dict[str, int] = field(default_factory=dict)


def _use_bank(path: Path) -> Any:
    with CategoryBank.load(path) as bank:
        for name in bank.names:
            bank.get(name)
        return bank.tensors()


def _use_encoder(target: TargetModel) -> Callable[[Path], Any]:
    def use(path: Path) -> Any:
        encoder = load_style_encoder(path, target)
        shape = (1, encoder.config.clip_width) if encoder.config.variant == "linear" else (1, 5, encoder.config.clip_width)
        with torch.no_grad():
            tokens = encoder(torch.zeros(shape, dtype=next(encoder.parameters()).dtype))
            return [encoder.layer_kv(i, tokens) for i in range(encoder.num_layers)]
    return use


def _use_lora(path: Path) -> Any:
    lora = read_lora(path)
    return to_kohya(lora.modules, lora.metadata), to_peft(lora.modules, lora.metadata)


def make_seeds(workdir: Path) -> list[Seed]:
    """Build the valid seed files (small, real key names) and return their bytes with their users."""
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = []
    bank = example_bank(vectors_per_id=1, dtype=torch.float16)
    seeds.append(Seed("bank", _bytes_of(lambda p: bank.save(p), workdir / "bank.safetensors"), _use_bank))
    tiny = example_bank(vectors_per_id=2, width=32)
    seeds.append(Seed("bank_tiny", _bytes_of(lambda p: tiny.save(p), workdir / "bank_tiny.safetensors"), _use_bank))
    sdxl = example_bank(vectors_per_id=1, dtype=torch.float16, family="sdxl", names=("运动鞋", "Coffee Mug"))
    seeds.append(Seed("bank_sdxl", _bytes_of(lambda p: sdxl.save(p), workdir / "bank_sdxl.safetensors"), _use_bank))
    for family, b in (("sd15", bank), ("sdxl", sdxl)):
        seeds.append(Seed(f"embedding_{family}", _bytes_of(lambda p, b=b: export_embedding(b, "运动鞋", p),
                                                           workdir / f"embedding_{family}.safetensors"), read_embedding))
    for variant in ("linear", "plus"):
        encoder, target = tiny_style_encoder(variant)
        enc_path = workdir / f"se_{variant}.safetensors"
        writer = (lambda p, e=encoder: e.save(p, {"steps": 1})) if variant == "plus" else \
            (lambda p, e=encoder: atomic_save(ip_adapter_file_dict(e), p))
        seeds.append(Seed(f"style_{variant}", _bytes_of(writer, enc_path), _use_encoder(target)))
    modules = _small_lora_modules()
    for layout, fn in (("kohya", to_kohya), ("peft", to_peft)):
        tensors, meta = fn(modules, {})
        seeds.append(Seed(f"lora_{layout}", _bytes_of(lambda p, t=tensors, m=meta: atomic_save(t, p, m),
                                                      workdir / f"lora_{layout}.safetensors"), _use_lora))
    return seeds


def _small_lora_modules() -> list[LoraModule]:
    """Six modules with SD1.5 names (UNet and text encoder, linear and conv), tiny widths, some with alpha."""
    gen = torch.Generator().manual_seed(0)
    paths = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 0),
             ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", 0),
             ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj", 0),
             ("unet", "down_blocks.0.resnets.0.conv1", 3),
             ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 0),
             ("text_encoder", "text_model.encoder.layers.11.mlp.fc2", 0)]
    out = []
    for i, (component, path, k) in enumerate(paths):
        down = torch.randn((2, 3, k, k) if k else (2, 3), generator=gen).half()
        up = torch.randn((4, 2, 1, 1) if k else (4, 2), generator=gen).half()
        out.append(LoraModule(component, path, down, up, torch.tensor(1.0 + i) if i % 2 else None))
    return out


_SEED_FILES = {"bank": "bank.safetensors", "bank_tiny": "bank_tiny.safetensors", "bank_sdxl": "bank_sdxl.safetensors",
               "embedding_sd15": "embedding_sd15.safetensors", "embedding_sdxl": "embedding_sdxl.safetensors",
               "style_linear": "se_linear.safetensors",
               "style_plus": "se_plus.safetensors", "lora_kohya": "lora_kohya.safetensors",
               "lora_peft": "lora_peft.safetensors"}


def _bytes_of(write: Callable[[Path], Any], path: Path) -> bytes:
    """The written file with its header keys sorted: safetensors orders metadata by a per-map random hash, and
    the same seed must give the same fuzz cases."""
    write(path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > n:
        raise RuntimeError(f"re-serialised header of {path.name} grew from {n} to {len(raw)} bytes")
    raw += b" " * (n - len(raw))  # same length (padding is legal), so the data offsets stay valid
    canonical = data[:8] + raw + data[8 + n:]
    path.write_bytes(canonical)
    return canonical


# ---------------------------------------------------------------------- mutations
def _split(data: bytes) -> tuple[int, bytes, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8:8 + n], data[8 + n:]


def _join(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def m_truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))]


def m_flip_header(data: bytes, rng: random.Random) -> bytes:
    n, _, _ = _split(data)
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(min(len(out), 8 + n))] ^= 1 << rng.randrange(8)
    return bytes(out)


def m_flip_any(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def m_header_length(data: bytes, rng: random.Random) -> bytes:
    n, _, _ = _split(data)
    value = rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(data), len(data) - 8, 2**31, 2**63, 2**64 - 1,
                        100_000_001, rng.randrange(2**64)])
    return struct.pack("<Q", max(0, min(value, 2**64 - 1))) + data[8:]


def m_data_nan(data: bytes, rng: random.Random) -> bytes:
    n, header, body = _split(data)
    doc = json.loads(header)
    names = [k for k, v in doc.items() if k != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0]]
    if not names:
        return data
    entry = doc[rng.choice(names)]
    size = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}.get(entry["dtype"], 4)
    begin, end = entry["data_offsets"]
    pos = begin + rng.randrange((end - begin) // size) * size
    pattern = {2: b"\x00\x7e", 4: b"\x00\x00\xc0\x7f", 8: b"\x00" * 6 + b"\xf8\x7f"}[size]
    if rng.random() < 0.5:  # +inf instead of NaN
        pattern = {2: b"\x00\x7c", 4: b"\x00\x00\x80\x7f", 8: b"\x00" * 6 + b"\xf0\x7f"}[size]
    out = bytearray(body)
    out[pos:pos + size] = pattern
    return _join(header, bytes(out))


def m_append(data: bytes, rng: random.Random) -> bytes:
    return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def m_json(data: bytes, rng: random.Random) -> bytes:
    n, header, body = _split(data)
    doc = json.loads(header)
    rng.choice(_JSON_EDITS)(doc, rng)
    raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
    return _join(raw, body)


def m_duplicate_key(data: bytes, rng: random.Random) -> bytes:
    n, header, body = _split(data)
    doc = json.loads(header)
    name = rng.choice([k for k in doc if k != "__metadata__"] or ["__metadata__"])
    raw = json.dumps(doc).encode()
    entry = json.dumps({name: doc[name]})[1:-1].encode()
    return _join(raw[:-1] + b"," + entry + b"}", body)


def _tensor_names(doc: dict) -> list[str]:
    return [k for k in doc if k != "__metadata__"] or ["x"]


def j_dtype(doc: dict, rng: random.Random) -> None:
    doc.setdefault(rng.choice(_tensor_names(doc)), {})["dtype"] = rng.choice(JSON_DTYPES)


def j_shape(doc: dict, rng: random.Random) -> None:
    entry = doc.setdefault(rng.choice(_tensor_names(doc)), {})
    shape = list(entry.get("shape", []))
    op = rng.randrange(5)
    if op == 0 and shape:
        shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2**40])
    elif op == 1:
        shape.append(1)
    elif op == 2 and shape:
        shape.pop()
    elif op == 3 and shape:
        shape[0], shape[-1] = shape[-1], shape[0]
    else:
        shape = rng.choice([[-1], [1.5], ["3"], [True], None, [2**70]])
    entry["shape"] = shape


def j_offsets(doc: dict, rng: random.Random) -> None:
    entry = doc.setdefault(rng.choice(_tensor_names(doc)), {})
    begin, end = entry.get("data_offsets", [0, 0])
    entry["data_offsets"] = rng.choice([[end, begin], [begin + 2, end + 2], [begin, end + 1], [-4, end],
                                        [begin, 2**62], [0, end - begin], [begin], "0,1"])


def j_drop_tensor(doc: dict, rng: random.Random) -> None:
    doc.pop(rng.choice(_tensor_names(doc)), None)


def j_rename_tensor(doc: dict, rng: random.Random) -> None:
    name = rng.choice(_tensor_names(doc))
    if name in doc:
        new = rng.choice([name + "x", name.replace("1", "2", 1), name.replace(".", "_"), "", "ip_adapter.99.to_k_ip.weight",
                          "image_proj.proj.0.weight", "lora_unet_input_blocks_1_1_proj_in.lora_down.weight"])
        doc[new] = doc.pop(name)


def j_metadata(doc: dict, rng: random.Random) -> None:
    meta = doc.setdefault("__metadata__", {})
    key = rng.choice(list(meta) + ["productbg.kind", "productbg.categories", "productbg.schema", "productbg.width"])
    value = meta.get(key, "")
    choices = ["", "null", "[]", "{}", "[\"\"]", "2", "999999999999", "-1", "NaN", "[" * 5000 + "]" * 5000,
               value + "x", value[:-1], value.upper(), "style_encoder", "category_bank", "\"\\ud800\""]
    if key == "productbg.categories":
        try:
            names = json.loads(value)
            choices += [json.dumps(names + names[:1]), json.dumps(names[:-1]), json.dumps(names + ["x"]),
                        json.dumps([" " + n for n in names]), json.dumps([1] + names[1:]), json.dumps(["A", "a"] + names[2:])]
        except ValueError:
            pass
    meta[key] = rng.choice(choices)
    if rng.random() < 0.1:
        doc["__metadata__"] = rng.choice([[], "x", {"a": 1}, None])


_JSON_EDITS = [j_dtype, j_shape, j_offsets, j_drop_tensor, j_rename_tensor, j_metadata, j_metadata, j_metadata]

MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncate": m_truncate, "flip_header": m_flip_header, "flip_any": m_flip_any,
    "header_length": m_header_length, "data_nan": m_data_nan, "append": m_append, "json": m_json,
    "json2": m_json, "json3": m_json, "duplicate_key": m_duplicate_key,
}


# ---------------------------------------------------------------------- runner
def run_fuzz(cases: int, workdir: Path, seed: int = 0, on_case: Callable[[int], None] | None = None) -> FuzzResult:
    """Run ``cases`` mutated files through their loaders.

    Args:
        cases: number of mutated files.
        workdir: scratch folder.
        seed: random seed (a failure is reproducible from it and the case number).
        on_case: optional progress callback.

    Returns:
        The :class:`FuzzResult`.
    """
    rng = random.Random(seed)
    seeds = make_seeds(workdir / "seeds")
    for s in seeds:  # the unmutated seeds must load (this also warms up lazy imports before timing)
        s.use(workdir / "seeds" / _SEED_FILES[s.kind])
    result = FuzzResult()
    path = workdir / "case.safetensors"
    t_start = time.perf_counter()
    for case in range(cases):
        s = seeds[case % len(seeds)]
        name = rng.choice(list(MUTATIONS))
        data = s.data
        for _ in range(1 if rng.random() < 0.8 else 2):
            data = _mutate(name, data, rng)
        path.unlink(missing_ok=True)  # rewriting in place is slow on some filesystems (and unsafe if mapped)
        path.write_bytes(data)
        t0 = time.perf_counter()
        outcome = _attempt(s, path)
        result.slowest_s = max(result.slowest_s, time.perf_counter() - t0)
        _record(result, case, s.kind, name, outcome)
        if on_case:
            on_case(case)
    result.seconds = time.perf_counter() - t_start
    return result


def _mutate(name: str, data: bytes, rng: random.Random) -> bytes:
    try:
        return MUTATIONS[name](data, rng)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error, RecursionError):
        return m_flip_any(data, rng) if data else data  # an earlier mutation broke what this one parses


def _attempt(s: Seed, path: Path) -> str | None:
    """None if it loaded, "" if WeightsError, else the traceback."""
    outcomes = [_outcome(s.use, path), _outcome(describe_file, path)]
    failures = [o for o in outcomes if o]
    return failures[0] if failures else outcomes[0]


def _outcome(fn: Callable[[Path], Any], path: Path) -> str | None:
    try:
        fn(path)
        return None
    except WeightsError:
        return ""
    except Exception:  # noqa: BLE001 - anything else is exactly what the fuzzer hunts for
        return traceback.format_exc()


def _record(result: FuzzResult, case: int, kind: str, mutation: str, outcome: str | None) -> None:
    result.cases += 1
    result.by_mutation[mutation] = result.by_mutation.get(mutation, 0) + 1
    if outcome is None:
        result.loaded += 1
    elif outcome == "":
        result.rejected += 1
    else:
        result.failures.append((case, kind, mutation, outcome))
