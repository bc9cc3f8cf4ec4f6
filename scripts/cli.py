"""Command-line plumbing shared by scripts/main.py and the benchmarks (scripts/bench_*.py).

Every script reads one ml_collections config file (`--config=configs/...py`, a module with
`get_config()`) with `--config.KEY=VALUE` overrides, through `config_flags.DEFINE_config_file`.
`define_config_flag` names the default config explicitly in argv (so that loading it and
applying the overrides happen during flag parsing, not while the flag is defined) and
`flags_parser` turns a bad config path, key or value into one message with the valid keys.

Import it from a script as `import cli` (a script's own folder is first on sys.path).
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Configs import each other (`from configs import digits_ddpm`): the repository root must be
# importable before a config is loaded.
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def config_keys(config, prefix="") -> list[str]:
  """The dotted leaf keys of a ConfigDict."""
  keys = []
  for key, value in config.items():
    if hasattr(value, "items"):
      keys.extend(config_keys(value, f"{prefix}{key}."))
    else:
      keys.append(f"{prefix}{key}")
  return keys


def config_path(argv: list[str], default: str) -> str:
  """The --config path named in argv, else `default`."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def override_keys(argv: list[str]) -> list[str]:
  """The dotted keys of the --config.KEY=VALUE (or --config.KEY VALUE) overrides in argv."""
  return [arg[len("--config."):].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]


def define_config_flag(default: str, help_text: str = "Path to a config file.",
                       lock_config: bool = True):
  """`config_flags.DEFINE_config_file('config', default)`, with the default named in argv.

  Without --config, ml_collections would load the default config and apply the overrides
  while the flag is being defined, outside the error handling of `flags_parser`; naming the
  default explicitly defers both to flag parsing.
  """
  if not any(arg == "--config" or arg.startswith("--config=") for arg in sys.argv[1:]):
    sys.argv.insert(1, f"--config={default}")
  return config_flags.DEFINE_config_file("config", default, help_text, lock_config=lock_config)


def flags_parser(default: str):
  """An absl `flags_parser` for `app.run` that reports config errors, and arguments that are
  not flags, in one line."""

  def parse(argv: list[str]) -> list[str]:
    path = config_path(argv, default)
    if not os.path.exists(path):
      folder = os.path.dirname(default)
      configs = sorted(f for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py")
      fail(f"config file {path!r} not found. Configs in {folder}: {', '.join(configs)}")
    try:
      rest = flags.FLAGS(argv)
    except (SyntaxError, ImportError, NameError) as e:  # the config file's own code
      where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
      fail(f"config file {path!r} cannot be loaded: {type(e).__name__}{where}: "
           f"{getattr(e, 'msg', None) or e}. Fix the file (its get_config() returns a ConfigDict).")
      raise  # unreachable
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      # KeyErrors arrive as a repr inside the flag error; unquote them for a readable line.
      text = str(e).replace("\\n", " ").replace("\\'", "").replace("\n", " ")
      message = " ".join(text.strip("'\" ").split()) or type(e).__name__
      try:
        keys = config_keys(config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
            "config", path).get_config())
        hint = f"\nValid keys of {os.path.basename(path)}: {', '.join(keys)}"
      except Exception:  # pylint: disable=broad-except
        hint = ""
      fail(f"bad config override ({message}){hint}")
      raise  # unreachable
    if len(rest) > 1:
      fail(f"unexpected arguments {rest[1:]}; config overrides look like --config.KEY=VALUE.")
    return rest

  return parse
