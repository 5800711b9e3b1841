"""What every fuzz harness in this directory shares: its seed corpus, atheris's
command line, and the rule that an input either passes or is refused with the
exception the caller expects.

A harness is a script (`python tests/fuzz/fuzz_block_codec.py -runs=2000`): the
command line is libFuzzer's (`-runs`, `-seed`, `-max_total_time`, `-max_len`,
corpus directories, or one input file to replay), see README's "Fuzzing". It
starts from its own seeds and its regression inputs. `-runs=N -seed=S` is
deterministic: the bounded run in `make test` (`test_fuzz_bounded.py`) is that.

On the first accepted input and the first refused one a harness prints one line
(`fuzz: first accepted input`, `fuzz: first refused input`), so the bounded run
can tell that an input reached both sides of the code under test.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

# The repository root, so a harness run as a script imports the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ACCEPTED_LINE = "fuzz: first accepted input"
REFUSED_LINE = "fuzz: first refused input"

_seen: set[str] = set()


def accepted() -> None:
    """Call when an input was accepted (parsed, decoded, validated)."""
    _report(ACCEPTED_LINE)


def refused() -> None:
    """Call when an input was refused with the expected exception."""
    _report(REFUSED_LINE)


def _report(line: str) -> None:
    if line not in _seen:
        _seen.add(line)
        print(line, file=sys.stderr, flush=True)


def run(test_one_input: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]) -> None:
    """Runs `test_one_input` under atheris with this process's command line, from
    `seeds()` and the harness's regression inputs (`regressions/<harness>/`: every
    input a run once failed on, kept so that every later run replays it) besides
    any corpus directory given. libFuzzer adds what it finds to the first corpus
    directory: the one given, or a temporary one."""
    import atheris

    argv = list(sys.argv)
    given = [arg for arg in argv[1:] if not arg.startswith("-")]
    if len(given) == 1 and Path(given[0]).is_file():  # replay one input
        atheris.Setup(argv, test_one_input)
        atheris.Fuzz()
    regressions = Path(__file__).parent / "regressions" / Path(argv[0]).stem
    with tempfile.TemporaryDirectory(prefix="kvrelay-fuzz-") as seed_dir:
        for i, seed in enumerate(seeds()):
            (Path(seed_dir) / f"seed-{i}").write_bytes(seed)
        argv += [seed_dir] + ([str(regressions)] if regressions.is_dir() else [])
        atheris.Setup(argv, test_one_input)
        atheris.Fuzz()
