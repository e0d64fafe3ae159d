"""Documents from local files: JSON lines (plain or zstd-compressed) and plain text.

A `.jsonl` or `.jsonl.zst` file holds one JSON object per line with a string "text"; SlimPajama's
also carry {"meta": {"redpajama_set_name": ...}}, which names the domain. Any other file is one
UTF-8 plain-text document. Compressed files are decoded as a stream, a megabyte at a time.

Bad input never disappears silently. With `bad_records="raise"` the first problem raises
`DataError` naming the file and line: a corrupt or truncated .zst file, a line that is not JSON or
not UTF-8, a record without a string "text", or (where domains are asked for) without a known
meta.redpajama_set_name. With "skip" the bad line, or the unreadable rest of a file, is skipped
and counted in a `Skipped` tally that the caller reports.
"""

from collections.abc import Iterator, Mapping
import dataclasses
import json

import zstandard

BAD_RECORDS = ("raise", "skip")
_CHUNK = 1 << 20  # bytes read (and decompressed) at a time


class DataError(ValueError):
  """Bad input data; the message names the file and line."""


@dataclasses.dataclass
class Skipped:
  """What `bad_records="skip"` left out: bad lines, and files whose rest could not be read."""
  lines: int = 0
  files: int = 0
  first: str = ""  # the first problem met, as an example for the report

  def add(self, problem: str, *, rest_of_file: bool = False) -> None:
    self.files += rest_of_file
    self.lines += not rest_of_file
    self.first = self.first or problem

  def merge(self, other: "Skipped") -> None:
    self.lines, self.files = self.lines + other.lines, self.files + other.files
    self.first = self.first or other.first

  def __bool__(self) -> bool:
    return bool(self.lines or self.files)

  def __str__(self) -> str:
    return (f"skipped {self.lines} bad lines and the unreadable rest of {self.files} files "
            f"(first: {self.first})")


def _chunks(path: str) -> Iterator[bytes]:
  """The file's bytes, decompressed when it ends in .zst; raises zstandard.ZstdError if corrupt."""
  with open(path, "rb") as f:
    if not path.endswith(".zst"):
      while chunk := f.read(_CHUNK):
        yield chunk
      return
    # decompressobj (not stream_reader, which ends quietly at a cut-off frame) says whether the
    # frame was complete. A file may hold several frames, one after another.
    zstd = zstandard.ZstdDecompressor()
    frame, in_frame = zstd.decompressobj(), False
    while chunk := f.read(_CHUNK):
      while chunk:
        yield frame.decompress(chunk)
        in_frame = not frame.eof
        chunk = frame.unused_data if frame.eof else b""
        if frame.eof:
          frame = zstd.decompressobj()
    if in_frame:
      raise zstandard.ZstdError("truncated: the file ends inside a compressed frame")


def lines(path: str) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, line without its newline) for every line of a file."""
  number, rest = 0, b""
  for chunk in _chunks(path):
    *complete, rest = (rest + chunk).split(b"\n")
    for line in complete:
      number += 1
      yield number, line
  if rest:
    yield number + 1, rest


def _parse(line: bytes, domains: Mapping[str, str] | None) -> tuple[str, str | None]:
  """A JSON line -> (text, domain or None); ValueError saying what is wrong."""
  try:
    record = json.loads(line)
  except ValueError as e:  # also UnicodeDecodeError
    raise ValueError(f"not a JSON line ({e})") from None
  text = record.get("text") if isinstance(record, dict) else None
  if not isinstance(text, str):
    raise ValueError('no string field "text"')
  if domains is None:
    return text, None
  meta = record.get("meta")
  name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
  if name not in domains:
    raise ValueError(f"meta.redpajama_set_name is {name!r}, not one of {', '.join(domains)}")
  return text, domains[name]


def records(path: str, *, bad_records: str = "raise", skipped: Skipped | None = None,
            domains: Mapping[str, str] | None = None) -> Iterator[tuple[int, str, str | None]]:
  """(line number, text, domain) for every document of a file; domain is None unless `domains`.

  `domains` maps meta.redpajama_set_name to a domain name; records without one are bad. A
  plain-text file is one document at line 1. Bad lines raise `DataError` or go to `skipped`.
  """
  skipped = Skipped() if skipped is None else skipped
  number = 0
  try:
    if not (path.endswith(".jsonl") or path.endswith(".jsonl.zst")):
      text = b"".join(_chunks(path))
      try:
        yield 1, text.decode("utf-8"), None
      except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
      return
    for number, line in lines(path):
      if not line.strip():
        continue  # blank lines (a trailing one, say) hold no record
      try:
        text, domain = _parse(line, domains)
      except ValueError as e:
        if bad_records == "raise":
          raise DataError(f"{path}:{number}: {e}") from None
        skipped.add(f"{path}:{number}: {e}")
        continue
      yield number, text, domain
  except (zstandard.ZstdError, OSError) as e:
    problem = f"{path}: unreadable after line {number} ({e})"
    if bad_records == "raise":
      raise DataError(problem) from None
    skipped.add(problem, rest_of_file=True)
