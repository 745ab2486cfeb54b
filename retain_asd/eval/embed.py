"""Layer embeddings of BEATs / EAT for kNN scoring: pooling, batch inference (in process or Ray Data), cache.

Pooling of a block output (B, N = T*F, D), tokens time-major (index t*F + f), as GenRep
(`run_genrep_dcase2023.py`: reshape (B, 62, 8, D)):
  * ``genrep``:   mean over time T, flatten F*D     (GenRep "temporal pooling"; 8*768 = 6144 for BEATs)
  * ``mean``:     mean over all tokens -> D          (GenRep's default when no pooling flag is given)
  * ``spectral``: mean over frequency F, flatten T*D (GenRep "spectral pooling")
T and F come from the clip length (`BEATs.grid` / the encoder's returned grid), never hard-coded.

Every layer is read from ONE forward (`BEATs.extract_layers` stops at the highest requested block).
`Embedder` counts forwards and encoded clips, so tests can prove that cached work is not redone.

Cache (`EmbeddingCache`): ``<root>/<checkpoint hash>/<pooling>/layer_<k>/<chunk>.npz`` (a local folder or an
object-store URI, ``<data.storage>/embeddings``) holding
``keys`` (row identities, `evalsets.row_key`) and ``emb`` (n, d). The checkpoint hash is the sha1
of the model's cfg and state dict, so a new or retrained checkpoint never reads stale features; the
row key covers clip, noise segment, gain and SNR, so Mismatch rows (copies of Factory B references
and Factory A tests) hit the entries written for Factory A and B.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from retain_asd import fsio, storage
from retain_asd.models.encoders import load_encoder

log = logging.getLogger(__name__)

POOLINGS = ("genrep", "mean", "spectral")


def pool(hidden: torch.Tensor, grid: tuple[int, int], pooling: str = "genrep") -> torch.Tensor:
    """(B, N = T*F, D) block output -> pooled embedding (B, F*D | D | T*D)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")
    b, n, d = hidden.shape
    t, f = grid
    if t * f != n:
        raise ValueError(f"grid {grid} gives {t * f} tokens but the layer output has {n}")
    x = hidden.reshape(b, t, f, d)  # (B, T, F, D), time-major tokens
    if pooling == "genrep":
        return x.mean(1).flatten(1)  # (B, F*D)
    if pooling == "spectral":
        return x.mean(2).flatten(1)  # (B, T*D)
    return x.mean((1, 2))  # (B, D)


def model_hash(model: nn.Module) -> str:
    """sha1 of the cfg and every tensor of the state dict: the checkpoint *content* identity."""
    h = hashlib.sha1(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def as_model(model_or_path: nn.Module | str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A BEATs or EAT model (family detected from the checkpoint) on `device`, eval mode."""
    model = model_or_path if isinstance(model_or_path, nn.Module) else load_encoder(model_or_path)
    return model.to(device).eval()


@torch.no_grad()
def embed(model: nn.Module, waveforms, layers: int | Sequence[int], pooling: str = "genrep") -> dict[int, torch.Tensor]:
    """{layer: pooled (B, ...)} for every requested 1-based layer, from one forward of (B, S) waveforms."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    x = torch.as_tensor(np.asarray(waveforms) if not isinstance(waveforms, torch.Tensor) else waveforms)
    x = x.to(next(model.parameters()).device, torch.float32)
    hidden, grid = model.extract_layers(x, layers=layers)  # blocks 1..max(layers), each (B, N, D)
    return {k: pool(hidden[k - 1], grid, pooling).float().cpu() for k in layers}


@torch.no_grad()
def embed_oracle(model: nn.Module, clean, noise, layers: int | Sequence[int], lam: float = 0.5,
                 pooling: str = "genrep") -> dict[int, torch.Tensor]:
    """Oracle mixture embedding (paper Table 3): lam * h(clean) + (1 - lam) * h(noise) per token, then pool."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    device = next(model.parameters()).device
    h_clean, grid = model.extract_layers(torch.as_tensor(np.asarray(clean)).to(device).float(), layers=layers)
    h_noise, _ = model.extract_layers(torch.as_tensor(np.asarray(noise)).to(device).float(), layers=layers)
    return {k: pool(lam * h_clean[k - 1] + (1 - lam) * h_noise[k - 1], grid, pooling).float().cpu()
            for k in layers}


class EmbeddingCache:
    """Pooled embeddings per (checkpoint hash, pooling, layer), looked up by row key.

    `root` is a local folder or an object-store URI (`retain_asd.storage`). A chunk is written whole: a local
    file through a temp file + rename, an object in one PUT, so a reader never sees half a chunk.
    """

    def __init__(self, root: str | os.PathLike, checkpoint_hash: str, pooling: str):
        self.dir = storage.as_location(storage.join(root, checkpoint_hash[:20], pooling))
        self._index: dict[int, dict[str, tuple[Path | str, int]]] = {}

    def _chunks(self, layer: int) -> list[Path | str]:
        """The chunk files (objects) of one layer, sorted; a writer's hidden temp files are skipped."""
        folder = storage.join(self.dir, f"layer_{layer}")
        if not storage.is_uri(folder):
            fsio.remove_stale_temps(folder)
            return fsio.visible(Path(folder).glob("*.npz"))
        return [storage.join(folder, name) for name in storage.list_names(folder)
                if name.endswith(".npz") and not name.startswith(".")]

    @staticmethod
    def _load(chunk: Path | str, name: str) -> np.ndarray:
        """One array of a chunk; an object is read in one GET (np.load needs a seekable file)."""
        source = chunk if not storage.is_uri(chunk) else io.BytesIO(storage.read_bytes(chunk))
        with np.load(source) as z:
            return z[name]

    def _layer_index(self, layer: int) -> dict[str, tuple[Path | str, int]]:
        if layer not in self._index:
            index = {}
            for chunk in self._chunks(layer):
                try:
                    keys = self._load(chunk, "keys")
                except Exception as err:  # a cache chunk is derived data: drop it, its rows are recomputed
                    log.warning("%s", fsio.CorruptFileError(chunk, f"{type(err).__name__}: {err}",
                                                            "removed; its embeddings are computed again"))
                    storage.remove(chunk)
                    continue
                index.update({str(k): (chunk, i) for i, k in enumerate(keys)})
            self._index[layer] = index
        return self._index[layer]

    def missing(self, keys: Sequence[str], layers: Sequence[int]) -> list[str]:
        """Keys absent for at least one layer, in order, without duplicates."""
        out = dict.fromkeys(k for k in keys if any(k not in self._layer_index(L) for L in layers))
        return list(out)

    def put(self, keys: Sequence[str], layer: int, emb: np.ndarray) -> None:
        name = hashlib.sha1("".join(keys).encode()).hexdigest()[:16]
        chunk = storage.as_location(storage.join(self.dir, f"layer_{layer}", f"{name}.npz"))
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.asarray(keys, dtype=str), emb=np.asarray(emb, dtype=np.float32))
        storage.write_bytes(chunk, buffer.getvalue())  # temp file + rename, or one PUT
        index = self._layer_index(layer)
        index.update({k: (chunk, i) for i, k in enumerate(keys)})

    def get(self, keys: Sequence[str], layer: int) -> np.ndarray:
        """(len(keys), d) float32 in the order of `keys`; every key must be present."""
        index = self._layer_index(layer)
        absent = [k for k in keys if k not in index]
        if absent:
            raise KeyError(f"{self.dir}: layer {layer} has no embedding for {len(absent)} rows")
        by_chunk: dict[Path | str, list[tuple[int, int]]] = {}
        for pos, k in enumerate(keys):
            chunk, i = index[k]
            by_chunk.setdefault(chunk, []).append((pos, i))
        out = None
        for chunk, pairs in by_chunk.items():
            emb = self._load(chunk, "emb")
            if out is None:
                out = np.empty((len(keys), emb.shape[1]), np.float32)
            for pos, i in pairs:
                out[pos] = emb[i]
        return out


class Embedder:
    """A frozen encoder + cache; counts encoder forwards and encoded clips (what the cache saves)."""

    def __init__(self, model_or_path, pooling: str = "genrep", cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 16, device: str | None = None):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = as_model(model_or_path, device)
        self.checkpoint_path = None if isinstance(model_or_path, nn.Module) else str(model_or_path)
        self.checkpoint_hash = model_hash(self.model)
        self.pooling = pooling
        self.batch_size = batch_size
        self.cache = None if cache_dir is None else EmbeddingCache(cache_dir, self.checkpoint_hash, pooling)
        self.num_forwards = 0
        self.num_clips_encoded = 0

    def embed_waveforms(self, waveforms: np.ndarray, layers: Sequence[int]) -> dict[int, np.ndarray]:
        """No cache: {layer: (B, d)} in batches of `batch_size`."""
        parts: dict[int, list[np.ndarray]] = {k: [] for k in layers}
        for start in range(0, len(waveforms), self.batch_size):
            chunk = waveforms[start : start + self.batch_size]
            out = embed(self.model, chunk, layers, self.pooling)
            self.num_forwards += 1
            self.num_clips_encoded += len(chunk)
            for k in layers:
                parts[k].append(out[k].numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def embed_keyed(self, keys: Sequence[str], load_waveforms, layers: Sequence[int],
                    use_ray: bool = False) -> dict[int, np.ndarray]:
        """{layer: (len(keys), d)} for rows named by `keys`; only cache misses are encoded.

        `load_waveforms(missing_keys) -> (M, S)` builds the audio of the missing rows (e.g. the mixtures).
        """
        layers = sorted(set(layers))
        if self.cache is None:
            unique = list(dict.fromkeys(keys))
            out = self.embed_waveforms(load_waveforms(unique), layers)
            pos = {k: i for i, k in enumerate(unique)}
            return {k: v[[pos[x] for x in keys]] for k, v in out.items()}
        missing = self.cache.missing(keys, layers)
        # a bar on a terminal only (disable=None), so logs and CI output stay clean
        with tqdm(total=len(missing), unit="clip", desc="embedding", disable=None, leave=False) as bar:
            for start in range(0, len(missing), 256):  # bounded memory: 256 clips of audio at a time
                chunk = missing[start : start + 256]
                waveforms = load_waveforms(chunk)
                if use_ray:
                    out = embed_with_ray(self, waveforms, layers)
                else:
                    out = self.embed_waveforms(waveforms, layers)
                for k in layers:
                    self.cache.put(chunk, k, out[k])
                bar.update(len(chunk))
        return {k: self.cache.get(keys, k) for k in layers}


# ---------------------------------------------------------------------------------------------------- Ray Data
class _EncodeActor:
    """Ray Data actor: loads the checkpoint once, embeds batches of waveforms."""

    def __init__(self, checkpoint_path: str, layers: list[int], pooling: str):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = as_model(checkpoint_path, device)
        self.layers, self.pooling = layers, pooling

    def __call__(self, batch: dict) -> dict:
        waveforms = np.stack(list(batch["waveform"])).astype(np.float32)  # (B, S); FixedSizeList -> objects
        out = embed(self.model, waveforms, self.layers, self.pooling)
        return {"index": batch["index"], **{f"layer_{k}": list(out[k].numpy()) for k in self.layers}}


def embed_with_ray(embedder: Embedder, waveforms: np.ndarray, layers: Sequence[int],
                   num_actors: int = 1) -> dict[int, np.ndarray]:
    """The same embeddings as `Embedder.embed_waveforms`, computed by a Ray Data actor pool.

    Needs a checkpoint on disk (actors load it themselves) and Ray initialised (`runtime.init_ray`).
    One GPU per actor when the cluster has GPUs, else one CPU.
    """
    import ray

    if embedder.checkpoint_path is None:
        raise ValueError("embed_with_ray needs an Embedder built from a checkpoint path (actors load it)")
    gpus = ray.cluster_resources().get("GPU", 0)
    ds = ray.data.from_items([{"index": i, "waveform": w} for i, w in enumerate(waveforms)])
    out = ds.map_batches(_EncodeActor, batch_size=embedder.batch_size, concurrency=num_actors,
                         fn_constructor_kwargs={"checkpoint_path": embedder.checkpoint_path,
                                                "layers": list(layers), "pooling": embedder.pooling},
                         **({"num_gpus": 1} if gpus else {"num_cpus": 1})).take_all()
    out.sort(key=lambda r: r["index"])
    embedder.num_forwards += -(-len(waveforms) // embedder.batch_size)
    embedder.num_clips_encoded += len(waveforms)
    return {k: np.stack([r[f"layer_{k}"] for r in out]).astype(np.float32) for k in layers}
