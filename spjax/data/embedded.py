"""The embedded default corpus: English prose about Python, generated from the running interpreter.

Every CPython install carries two bodies of real, edited English text; this corpus is made of them:

- the pages of the language reference and library docs that `help()` shows for keywords and topics
  (`pydoc_data.topics.topics`: "assignment", "class", "typesseq", ...), one document each; a page
  listed under two names ("if", "else") is kept once;
- the docstrings of a fixed list of pure-Python standard-library modules (`MODULES` below), one
  document per module: a title line, the module docstring, then every public class and function the
  module defines (sorted by name, each headed by its name) and the public methods of those classes.

On Python 3.11: 165 documents (78 topic pages, 87 modules), 1.17 M characters, 0.46 M tokens with
the shipped tokenizer. Nothing is downloaded or stored: the text is rebuilt on first use (about
0.4 s, mostly imports) and is identical on every run of the same Python version. Under `python -OO`
docstrings are stripped and only the topic pages remain.

Splits: a document belongs to "validation" when `zlib.crc32` of its key ("topic:<name>" or
"module:<name>") is divisible by 20, else to "train" -- about 5% held out, decided by each
document's own key, so the two splits never overlap and adding a module never moves another
document.
"""

import functools
import importlib
import inspect
import warnings
import zlib

import pydoc_data.topics

SPLITS = ("train", "validation")

# Pure-Python modules that import on every platform and every Python >= 3.11, with substantial,
# platform-independent docstrings. Modules whose public API is mostly C (os, itertools, pickle) add
# little and are left out.
MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "base64", "bdb", "calendar", "cmd", "code", "codecs", "collections",
    "configparser", "contextlib", "dataclasses", "difflib", "dis", "doctest",
    "email.headerregistry", "email.message", "email.policy", "email.utils", "enum", "fileinput",
    "fractions", "ftplib", "functools", "gettext", "graphlib", "heapq", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib.metadata", "inspect",
    "ipaddress", "json", "logging", "logging.handlers", "mailbox", "mimetypes", "optparse",
    "pathlib", "pdb", "pickletools", "poplib", "pprint", "pstats", "queue", "random", "re", "sched",
    "selectors", "shelve", "shlex", "smtplib", "socketserver", "statistics", "string", "symtable",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "wsgiref.handlers", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax.handler",
    "xmlrpc.client", "xmlrpc.server", "zipfile", "zipimport",
)


def _doc(obj) -> str:
  # Own docstring only: inspect.getdoc would inherit a base class's text and repeat it many times.
  doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
  return inspect.cleandoc(doc)


def _module_text(name: str) -> str:
  module = importlib.import_module(name)
  parts = [f"Module {name}", _doc(module)]
  for attr, obj in sorted(vars(module).items()):
    # Defined here (not re-exported) and public. No signatures: defaults can repr as addresses.
    if attr.startswith("_") or getattr(obj, "__module__", None) != name:
      continue
    if inspect.isfunction(obj):
      parts += [f"function {attr}", _doc(obj)]
    elif inspect.isclass(obj):
      parts += [f"class {attr}", _doc(obj)]
      for method_name, method in sorted(vars(obj).items()):
        method = getattr(method, "__func__", method)  # classmethod / staticmethod
        if not method_name.startswith("_") and inspect.isfunction(method) and _doc(method):
          parts += [f"{attr}.{method_name}", _doc(method)]
  return "\n\n".join(p for p in parts if p)


@functools.cache
def _corpus() -> dict[str, str]:
  """{key: text} for every document, in a fixed order (topics, then modules)."""
  docs = {}
  for k, v in sorted(pydoc_data.topics.topics.items()):
    if v.strip() not in docs.values():  # "else" and "if" are one page under two names
      docs[f"topic:{k}"] = v.strip()
  # Old modules warn on attribute access (typing.io, ...); reading their docs is not using them.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    docs.update({f"module:{m}": _module_text(m) for m in MODULES})
  return docs


def split_of(key: str) -> str:
  return "validation" if zlib.crc32(key.encode()) % 20 == 0 else "train"


def documents(split: str) -> list[str]:
  """The texts of one split, in a fixed order."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} of the embedded corpus; valid splits: "
                     f"{', '.join(SPLITS)}")
  return [text for key, text in _corpus().items() if split_of(key) == split]
